"""tf.data input pipelines from TFDS for semantic and instance segmentation.

Letters in shapes: B examples per process (``config.batch_size //
jax.process_count()``), S ``config.data.image_size``, M
``config.data.max_instances``.

Batches are dicts of numpy arrays:

- ``image``: (B, S, S, 3) float32 in [0, 1].
- ``mask``: (B, S, S) int32 semantic class ids (see `DatasetMetadata.class_names`).
- Instance ground truth (data sets with instances: ``jfcnn_shapes``,
  ``coco/2017_panoptic``; absent for ``oxford_iiit_pet``), padded to M per example:
  ``boxes`` (B, M, 4) float32 pixel (x1, y1, x2, y2) in the output image, in
  pixel-edge coordinates (pixel (r, c) covers [c, c + 1) x [r, r + 1), so a mask
  spanning columns c0..c1 has x1 = c0 and x2 = c1 + 1), tight around
  ``instance_masks``; ``labels`` (B, M) int32 semantic class ids (0 for
  padding); ``instance_masks`` (B, M, S, S) uint8 0/1; ``instance_valid``
  (B, M) bool.
- ``crowd`` (B, M) bool, ``coco/2017_panoptic`` only: slots holding crowd
  regions (see `jfcnn.data.coco`). They have ``instance_valid`` False (no
  training target) but their box, label and instance mask are filled, so that
  evaluation can ignore detections on them.
- Eval batches only: ``valid`` (B,) bool; False marks the examples that pad the
  last batch to full size (no eval example is dropped).

Reproducible order: the training batch at step s is a function of
(``config.seed``, s, data config, process index and count) only. The epoch e
order is a shuffle seeded from (seed, e); augmentation draws are stateless and
seeded from (seed, global example position). A run started with
``start_step=k`` therefore yields bit-identical batches to an uninterrupted
run's batches k, k+1, ...; resuming costs at most one epoch of reading (of
undecoded records unless ``cache``). Do not call ``tf.random.set_seed``: the
global TensorFlow seed enters tf.data's shuffle.

Augmentation (train, ``config.data.augment``): random horizontal flip, then
resize by a random factor in ``scale_range`` and crop (or zero-pad) to S x S at
a random offset, applied identically to the image (bilinear) and to the
semantic and instance label maps (nearest neighbour); boxes are then derived
from the transformed instance masks, so they stay tight, and an instance that
the crop removes entirely becomes padding. Without augmentation images and
labels are resized to S x S. Data sets with ``keep_aspect`` (COCO) resize the
longer side instead and zero-pad the rest at the bottom and right.

>>> config = ml_collections.ConfigDict({"seed": 0, "batch_size": 8, "data": default_config()})
>>> batch = next(create_train_iterator(config))
>>> batch["image"].shape, batch["boxes"].shape
((8, 128, 128, 3), (8, 8, 4))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jfcnn.data import coco, shapes


class DatasetNotFoundError(RuntimeError):
    """The requested TFDS data set is not prepared in the data directory."""


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """Static facts about a configured data set.

    Attributes:
      name: TFDS name.
      num_classes: number of semantic classes, background (or its equivalent) included.
      class_names: name of each semantic class id 0..num_classes-1.
      image_size: side S of the square output images.
      num_train_examples: examples in ``config.data.train_split`` (all processes).
      num_eval_examples: examples in ``config.data.eval_split`` (all processes).
      has_instances: whether batches carry boxes, labels and instance masks.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    num_train_examples: int
    num_eval_examples: int
    has_instances: bool


@dataclasses.dataclass(frozen=True)
class _DatasetSpec:
    class_names: tuple[str, ...]
    has_instances: bool
    # Subtracted from the stored semantic label to give the class id.
    label_offset: int
    # Only the synthetic set may be built here; real sets would need a download.
    builds_locally: bool
    # Resize the longer side to S and pad, instead of resizing to S x S.
    keep_aspect: bool = False
    # For layouts other than `jfcnn_shapes`/pets: the features to read
    # (decode: bool -> PartialDecoding) and the map to the common form
    # ((builder, decoded=...) -> fn, see `_to_common`).
    decoding: Callable[[bool], tfds.decode.PartialDecoding] | None = None
    to_common: Callable[..., Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]] | None = None


_SPECS = {
    "jfcnn_shapes": _DatasetSpec(
        class_names=shapes.SEMANTIC_CLASS_NAMES,
        has_instances=True,
        label_offset=0,
        builds_locally=True,
    ),
    # Trimap 1 pet, 2 background, 3 border (not classified) -> ids 0, 1, 2.
    "oxford_iiit_pet": _DatasetSpec(
        class_names=("pet", "background", "border"),
        has_instances=False,
        label_offset=1,
        builds_locally=False,
    ),
    "coco/2017_panoptic": _DatasetSpec(
        class_names=coco.CLASS_NAMES,
        has_instances=True,
        label_offset=0,
        builds_locally=False,
        keep_aspect=True,
        decoding=coco.partial_decoding,
        to_common=coco.to_common,
    ),
}

# Streams of the stateless RNG, so shuffle and augmentation draws never share keys.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the ``config.data`` section (offline synthetic data set)."""
    return ml_collections.ConfigDict(
        {
            # or "oxford_iiit_pet", "coco/2017_panoptic" (prepared with `tfds build`)
            "name": "jfcnn_shapes",
            "data_dir": None,  # TFDS data dir; None -> TFDS default (~/tensorflow_datasets)
            "image_size": 128,  # side of the square images and masks fed to the model
            "train_split": "train",
            "eval_split": "validation",  # "test" for oxford_iiit_pet
            "shuffle_buffer": 2048,
            "augment": True,  # random flip + scale/crop (train only)
            "scale_range": (0.75, 1.25),
            "max_instances": 8,  # instance ground truth is padded to this many
            "cache": True,  # keep decoded examples in memory (small data sets)
        }
    )


def _spec(data_config: ml_collections.ConfigDict) -> _DatasetSpec:
    if data_config.name not in _SPECS:
        raise ValueError(
            f"config.data.name must be one of {sorted(_SPECS)}, got {data_config.name!r}"
        )
    return _SPECS[data_config.name]


def _hide_gpus_from_tensorflow() -> None:
    # TensorFlow would otherwise reserve GPU memory that JAX needs.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # Devices already initialized; nothing left to change.
        pass


def _process_info() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"config.batch_size={global_batch_size} must be a positive multiple of "
            f"jax.process_count()={process_count}"
        )
    return global_batch_size // process_count


def _get_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Returns the prepared builder; builds `jfcnn_shapes` locally if needed."""
    spec = _spec(data_config)
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
    if builder.is_prepared():
        return builder
    if spec.builds_locally:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
        return builder
    where = (
        f"data_dir={data_config.data_dir!r}"
        if data_config.data_dir
        else "the TFDS default data dir (config.data.data_dir is None)"
    )
    raise DatasetNotFoundError(
        f"Data set {data_config.name!r} (version {builder.version}) is not prepared in "
        f"{where} (no prepared copy at {builder.data_path}). It is never downloaded here. "
        f"On a machine with internet run\n"
        f"    tfds build {data_config.name} --data_dir=DIR\n"
        f"copy DIR to this machine and pass --config.data.data_dir=DIR."
    )


def _num_examples(builder: tfds.core.DatasetBuilder, split: Any) -> int:
    return builder.info.splits[split].num_examples


def _read(
    builder: tfds.core.DatasetBuilder, split: Any, *, spec: _DatasetSpec, decode: bool
) -> tf.data.Dataset:
    """Reads ``split`` in its fixed file order; images stay encoded unless ``decode``."""
    if spec.decoding is not None:
        decoding = spec.decoding(decode)
    else:
        # Only the features we use are parsed (and, in tests, mocked).
        features = {"image": True, "segmentation_mask": True}
        if spec.has_instances:
            features["objects"] = {"label": True, "mask": True}
        decoders = None
        if not decode:
            decoders = {"image": tfds.decode.SkipDecoding()}
            decoders["segmentation_mask"] = tfds.decode.SkipDecoding()
            if spec.has_instances:
                decoders["objects"] = {"mask": tfds.decode.SkipDecoding()}
        decoding = tfds.decode.PartialDecoding(features, decoders=decoders)
    return builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=decoding,
        # We cache ourselves, and only when asked.
        read_config=tfds.ReadConfig(try_autocache=False),
    )


def _to_common(
    builder: tfds.core.DatasetBuilder, spec: _DatasetSpec, *, decoded: bool
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Returns a function mapping a TFDS example to the data set independent form.

    The form: ``image`` (H, W, 3) uint8; ``label_maps`` (H', W', C) uint8 with
    the stored semantic label in channel 0 and, with instances, the instance
    index map in channel 1 (0 none, k the k-th instance); ``instance_labels``
    (N,) int32 semantic class ids; optionally ``instance_crowd`` (N,) bool.
    One index map replaces N masks because visible instance masks are
    disjoint, and it keeps every label resampled identically with a single
    nearest-neighbour resize.
    """
    if spec.to_common is not None:
        return spec.to_common(builder, decoded=decoded)
    features = builder.info.features

    def decode(name, value):
        return value if decoded else features[name].decode_example(value)

    def fn(example):
        image = decode("image", example["image"])
        semantic = decode("segmentation_mask", example["segmentation_mask"])
        out = {"image": image, "label_maps": semantic}
        if spec.has_instances:
            masks = example["objects"]["mask"]
            if not decoded:
                masks = features["objects"].feature["mask"].decode_batch_example(masks)
            masks_nhw = tf.cast(masks[..., 0], tf.int32)
            ids = tf.range(1, tf.shape(masks_nhw)[0] + 1, dtype=tf.int32)
            # Max (not sum) so that overlapping masks resolve to the later instance;
            # the outer max turns the empty reduction (N = 0) into 0.
            index_map = tf.maximum(tf.reduce_max(masks_nhw * ids[:, None, None], axis=0), 0)
            out["label_maps"] = tf.concat(
                [semantic, tf.cast(index_map, tf.uint8)[..., None]], axis=-1
            )
            out["instance_labels"] = tf.cast(example["objects"]["label"], tf.int32) + 1
        return out

    return fn


def _crop_or_pad(x: tf.Tensor, scaled: tf.Tensor, size: int, offset_frac: tf.Tensor):
    """Crops (scaled >= size) or zero-pads (scaled < size) a (scaled, scaled, C) tensor."""
    slack = tf.abs(scaled - size)
    offset = tf.minimum(
        tf.cast(tf.floor(offset_frac * tf.cast(slack + 1, tf.float32)), tf.int32), slack
    )
    crop = tf.where(scaled >= size, offset, 0)
    pad = tf.where(scaled >= size, 0, offset)
    canvas = tf.maximum(scaled, size)
    x = tf.image.pad_to_bounding_box(x, pad[0], pad[1], canvas, canvas)
    return tf.image.crop_to_bounding_box(x, crop[0], crop[1], size, size)


def _boxes_from_masks(masks_mss: tf.Tensor) -> tf.Tensor:
    """Tight pixel-edge (x1, y1, x2, y2) of (M, S, S) bool masks; zeros for empty masks."""
    size = tf.shape(masks_mss)[-1]
    rows = tf.cast(tf.reduce_any(masks_mss, axis=2), tf.int32)  # (M, S)
    cols = tf.cast(tf.reduce_any(masks_mss, axis=1), tf.int32)
    y1 = tf.argmax(rows, axis=1, output_type=tf.int32)
    y2 = size - tf.argmax(tf.reverse(rows, [1]), axis=1, output_type=tf.int32)
    x1 = tf.argmax(cols, axis=1, output_type=tf.int32)
    x2 = size - tf.argmax(tf.reverse(cols, [1]), axis=1, output_type=tf.int32)
    boxes = tf.cast(tf.stack([x1, y1, x2, y2], axis=-1), tf.float32)
    nonempty = tf.reduce_any(rows > 0, axis=1)
    return tf.where(nonempty[:, None], boxes, 0.0)


def _preprocess(
    example: dict[str, tf.Tensor],
    seed: tf.Tensor | None,
    *,
    data_config: ml_collections.ConfigDict,
    spec: _DatasetSpec,
    augment: bool,
) -> dict[str, tf.Tensor]:
    """Augments (if ``augment``, with stateless draws from ``seed``) and formats one example."""
    size = data_config.image_size
    image = example["image"]
    label_maps = example["label_maps"]
    if augment:
        flip_seed, scale_seed, offset_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3)
        )
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
        label_maps = tf.cond(flip, lambda: tf.reverse(label_maps, [1]), lambda: label_maps)
        low, high = data_config.scale_range
        scale = tf.random.stateless_uniform([], scale_seed, minval=low, maxval=high)
        scaled = tf.maximum(tf.cast(tf.round(scale * size), tf.int32), 1)
        offset_frac = tf.random.stateless_uniform([2], offset_seed)
    else:
        scaled = tf.constant(size, tf.int32)
        offset_frac = tf.zeros([2])
    if spec.keep_aspect:
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        factor = tf.cast(scaled, tf.float32) / tf.cast(tf.maximum(height, width), tf.float32)
        resized = [
            tf.clip_by_value(
                tf.cast(tf.round(tf.cast(n, tf.float32) * factor), tf.int32), 1, scaled
            )
            for n in (height, width)
        ]
    else:
        resized = [scaled, scaled]
    image = tf.image.resize(
        tf.cast(image, tf.float32) / 255.0, resized, method="bilinear", antialias=True
    )
    label_maps = tf.image.resize(label_maps, resized, method="nearest")
    if spec.keep_aspect:
        image = tf.image.pad_to_bounding_box(image, 0, 0, scaled, scaled)
        label_maps = tf.image.pad_to_bounding_box(label_maps, 0, 0, scaled, scaled)
    image = _crop_or_pad(image, scaled, size, offset_frac)
    label_maps = _crop_or_pad(label_maps, scaled, size, offset_frac)

    out = {
        "image": tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), [size, size, 3]),
        "mask": tf.ensure_shape(
            tf.cast(label_maps[..., 0], tf.int32) - spec.label_offset, [size, size]
        ),
    }
    if spec.has_instances:
        max_instances = data_config.max_instances
        index_map = tf.cast(label_maps[..., 1], tf.int32)
        masks = tf.equal(index_map[None], tf.range(1, max_instances + 1)[:, None, None])
        # Instances beyond M are dropped; the crop may also remove instances.
        present = tf.reduce_any(masks, axis=[1, 2])
        valid = present
        labels = example["instance_labels"][:max_instances]
        labels = tf.pad(labels, [[0, max_instances - tf.shape(labels)[0]]])
        if "instance_crowd" in example:
            crowd = example["instance_crowd"][:max_instances]
            crowd = tf.pad(crowd, [[0, max_instances - tf.shape(crowd)[0]]]) & present
            valid = present & ~crowd
            out["crowd"] = tf.ensure_shape(crowd, [max_instances])
        out["boxes"] = tf.ensure_shape(_boxes_from_masks(masks), [max_instances, 4])
        out["labels"] = tf.ensure_shape(tf.where(present, labels, 0), [max_instances])
        out["instance_masks"] = tf.ensure_shape(
            tf.cast(masks, tf.uint8), [max_instances, size, size]
        )
        out["instance_valid"] = tf.ensure_shape(valid, [max_instances])
    return out


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _check_data_config(data_config: ml_collections.ConfigDict) -> None:
    if data_config.image_size <= 0:
        raise ValueError(f"config.data.image_size must be positive, got {data_config.image_size}")
    if data_config.max_instances <= 0:
        raise ValueError(
            f"config.data.max_instances must be positive, got {data_config.max_instances}"
        )
    low, high = data_config.scale_range
    if not 0 < low <= high:
        raise ValueError(f"config.data.scale_range must be 0 < min <= max, got {(low, high)}")


def create_train_iterator(
    config: ml_collections.ConfigDict, *, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator over this process's training batches, from ``start_step`` on.

    Args:
      config: uses ``config.seed``, ``config.batch_size`` (global) and ``config.data``
        (see `default_config`).
      start_step: index of the first batch to yield; batch s is the same whether
        the iterator started at 0 or at any k <= s.

    Returns:
      An iterator of dicts of numpy arrays (see the module docstring), B examples each.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    data_config = config.data
    spec = _spec(data_config)
    _check_data_config(data_config)
    _hide_gpus_from_tensorflow()
    process_index, process_count = _process_info()
    batch_size = _local_batch_size(config.batch_size, process_count)
    builder = _get_builder(data_config)
    # Equal shards (remainder dropped) so every process has the same epoch length.
    split = tfds.even_splits(data_config.train_split, n=process_count, drop_remainder=True)[
        process_index
    ]
    num_examples = _num_examples(builder, split)
    if num_examples == 0:
        raise ValueError(
            f"Split {data_config.train_split!r} leaves no examples for process "
            f"{process_index} of {process_count}"
        )

    cache = data_config.cache
    to_common = _to_common(builder, spec, decoded=cache)
    examples = _read(builder, split, spec=spec, decode=cache)
    if cache:
        examples = examples.map(to_common, num_parallel_calls=tf.data.AUTOTUNE).cache()

    base_seed = tf.constant([config.seed, 0], tf.int64)
    shuffle_key = tf.random.experimental.stateless_fold_in(base_seed, _SHUFFLE_STREAM)
    augment_key = tf.random.experimental.stateless_fold_in(base_seed, _AUGMENT_STREAM)
    buffer_size = min(data_config.shuffle_buffer, num_examples)

    def epoch(epoch_index):
        if buffer_size <= 1:
            return examples
        epoch_key = tf.random.experimental.stateless_fold_in(shuffle_key, epoch_index)
        epoch_seed = tf.random.stateless_uniform(
            [], epoch_key, minval=None, maxval=None, dtype=tf.int64
        )
        return examples.shuffle(buffer_size, seed=epoch_seed, reshuffle_each_iteration=False)

    # Whole epochs before start_step are never read; within the first epoch we
    # skip records before decoding and augmenting them.
    first_position = start_step * batch_size
    first_epoch, offset = divmod(first_position, num_examples)
    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.enumerate(start=first_epoch * num_examples).skip(offset)

    def prepare(position, example):
        if not cache:
            example = to_common(example)
        global_position = position * process_count + process_index
        seed = tf.random.experimental.stateless_fold_in(augment_key, global_position)
        return _preprocess(
            example, seed, data_config=data_config, spec=spec, augment=data_config.augment
        )

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(ds.with_options(_options()).as_numpy_iterator())


def num_eval_batches(config: ml_collections.ConfigDict) -> int:
    """Number of batches `create_eval_iterator` yields (the same on every process)."""
    _, process_count = _process_info()
    batch_size = _local_batch_size(config.batch_size, process_count)
    builder = _get_builder(config.data)
    per_process = math.ceil(_num_examples(builder, config.data.eval_split) / process_count)
    return math.ceil(per_process / batch_size)


def create_eval_iterator(config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's shard of the eval split, in a fixed order.

    Every process yields `num_eval_batches` batches of B examples (so that
    collective ops line up); examples past the end of the shard are zeros with
    ``valid`` False. No augmentation.

    Args:
      config: uses ``config.batch_size`` (global) and ``config.data``.

    Returns:
      An iterator of dicts of numpy arrays with the training keys plus ``valid`` (B,) bool.
    """
    data_config = config.data
    spec = _spec(data_config)
    _check_data_config(data_config)
    _hide_gpus_from_tensorflow()
    process_index, process_count = _process_info()
    batch_size = _local_batch_size(config.batch_size, process_count)
    builder = _get_builder(data_config)
    split = tfds.even_splits(data_config.eval_split, n=process_count, drop_remainder=False)[
        process_index
    ]
    to_common = _to_common(builder, spec, decoded=True)

    def prepare(example):
        out = _preprocess(
            to_common(example), None, data_config=data_config, spec=spec, augment=False
        )
        out["valid"] = tf.constant(True)
        return out

    ds = _read(builder, split, spec=spec, decode=True).map(
        prepare, num_parallel_calls=tf.data.AUTOTUNE
    )
    padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.take(num_eval_batches(config) * batch_size)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(ds.with_options(_options()).as_numpy_iterator())


def dataset_metadata(config: ml_collections.ConfigDict) -> DatasetMetadata:
    """Class names and split sizes of the configured data set (prepares `jfcnn_shapes`)."""
    data_config = config.data
    spec = _spec(data_config)
    _hide_gpus_from_tensorflow()
    builder = _get_builder(data_config)
    return DatasetMetadata(
        name=data_config.name,
        num_classes=len(spec.class_names),
        class_names=spec.class_names,
        image_size=data_config.image_size,
        num_train_examples=_num_examples(builder, data_config.train_split),
        num_eval_examples=_num_examples(builder, data_config.eval_split),
        has_instances=spec.has_instances,
    )


_PALETTE = np.array(
    [[0, 0, 0], [230, 60, 60], [60, 200, 60], [70, 110, 240], [240, 200, 40], [200, 80, 220]],
    dtype=np.uint8,
)


def save_preview(batch: dict[str, np.ndarray], path: str, max_examples: int = 8) -> str:
    """Saves a PNG to eyeball a batch: one row per example.

    Columns: the image; the semantic mask in color; with instances, the image
    with each valid instance's mask tinted and its box outlined (white).

    Args:
      batch: a batch from `create_train_iterator` / `create_eval_iterator`.
      path: output PNG path.
      max_examples: number of rows.

    Returns:
      ``path``.
    """
    from PIL import Image, ImageDraw

    rows = []
    for i in range(min(max_examples, len(batch["image"]))):
        image = np.round(batch["image"][i] * 255).astype(np.uint8)
        semantic = _PALETTE[np.mod(batch["mask"][i], len(_PALETTE))]
        panels = [image, semantic]
        if "instance_masks" in batch:
            tinted = image.astype(np.float32)
            for k in np.flatnonzero(batch["instance_valid"][i]):
                color = _PALETTE[1 + k % (len(_PALETTE) - 1)].astype(np.float32)
                inside = batch["instance_masks"][i, k].astype(bool)
                tinted[inside] = 0.5 * tinted[inside] + 0.5 * color
            overlay = Image.fromarray(tinted.astype(np.uint8))
            draw = ImageDraw.Draw(overlay)
            for k in np.flatnonzero(batch["instance_valid"][i]):
                x1, y1, x2, y2 = batch["boxes"][i, k]
                # Pixel-edge box -> outline on the boundary pixels.
                draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(255, 255, 255))
            panels.append(np.asarray(overlay))
        rows.append(np.concatenate(panels, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path
