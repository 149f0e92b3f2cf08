"""The generic tf.data input pipeline: TFDS examples to batches for the devices.

Each data set is a module of ``jfcnn.data`` that registers a
`jfcnn.data.registry.DatasetSpec` (what to read, and how to map an example to
the common form); this module only shards, shuffles, decodes, augments,
batches and pads, the same way for every data set.

Letters in shapes: B examples per process (``config.batch_size //
jax.process_count()``), S ``config.data.image_size``, M
``config.data.max_instances``.

Batches are dicts of numpy arrays:

- ``image``: (B, S, S, 3) float32 in [0, 1].
- ``mask``: (B, S, S) int32 semantic class ids (see `DatasetMetadata.class_names`),
  or ``config.data.ignore_label`` (default 255) where a pixel has no class (an
  ignore value in the data set, zero padding of a data set whose labels have
  an offset); losses and metrics skip those pixels.
- Instance ground truth, only with ``instances=True`` (which needs a data set
  with instances: ``jfcnn_shapes``, ``coco/2017_panoptic``), padded to M per
  example: ``boxes`` (B, M, 4) float32 pixel (x1, y1, x2, y2) in the output
  image, in pixel-edge coordinates (pixel (r, c) covers [c, c + 1) x [r, r + 1),
  so a mask spanning columns c0..c1 has x1 = c0 and x2 = c1 + 1), tight around
  ``instance_masks``; ``labels`` (B, M) int32 semantic class ids (0 for
  padding); ``instance_masks`` (B, M, S, S) uint8 0/1; ``instance_valid``
  (B, M) bool.
- ``crowd`` (B, M) bool, with instances of ``coco/2017_panoptic`` only: slots
  holding crowd regions (see `jfcnn.data.coco`). They have ``instance_valid``
  False (no training target) but their box, label and instance mask are
  filled, so that evaluation can ignore detections on them.
- Eval batches only: ``valid`` (B,) bool; False marks the examples that pad the
  last batch to full size (no eval example is dropped). ``original_size`` (B, 2)
  int32 the stored image's (height, width) and ``resized_size`` (B, 2) int32
  the size it was resized to before padding to S x S (see `fit_image`), so
  that predictions can be mapped back to the original pixels; ``image_id``
  (B,) int64 where the data set has ids of its own (``coco_json``).

Without instances, instance annotations are neither read nor decoded, and
``image`` and ``mask`` are bit-identical to those of ``instances=True``.

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
>>> batch = next(create_train_iterator(config, instances=True))
>>> batch["image"].shape, batch["boxes"].shape
((8, 128, 128, 3), (8, 8, 4))
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jfcnn.data.registry import DatasetMetadata, DatasetSpec, ToCommonFn, get_spec
from jfcnn.errors import ConfigError, DatasetNotFoundError

# Streams of the stateless RNG, so shuffle and augmentation draws never share keys.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the ``config.data`` section (offline synthetic data set)."""
    return ml_collections.ConfigDict(
        {
            # or "oxford_iiit_pet", "coco/2017_panoptic" (prepared with `tfds build`);
            # all registered names: jfcnn.data.dataset_names()
            "name": "jfcnn_shapes",
            "data_dir": None,  # TFDS data dir; None -> TFDS default (~/tensorflow_datasets)
            "image_size": 128,  # side of the square images and masks fed to the model
            "train_split": "train",
            "eval_split": "validation",  # "test" for oxford_iiit_pet
            "shuffle_buffer": 2048,
            "augment": True,  # random flip + scale/crop (train only)
            "scale_range": (0.75, 1.25),
            "max_instances": 8,  # instance ground truth is padded to this many (instances only)
            "ignore_label": 255,  # mask value of pixels without a class (left out of loss/metrics)
            "cache": True,  # keep decoded examples in memory (small data sets)
        }
    )


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
    """Returns the prepared builder; builds a locally generated data set if needed."""
    spec = get_spec(data_config.name)
    if spec.make_builder is not None:  # Made from the user's own files; prepares itself.
        return spec.make_builder(data_config)
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


def _classes(spec: DatasetSpec, builder: tfds.core.DatasetBuilder):
    """``(class_names, category_ids)`` of a prepared data set."""
    if spec.classes is not None:
        return spec.classes(builder)
    return spec.class_names, tuple(range(len(spec.class_names)))


def _ignore_label(data_config: ml_collections.ConfigDict) -> int:
    return int(data_config.get("ignore_label", 255))


def fitted_size(height: Any, width: Any, size: Any, keep_aspect: bool) -> list[tf.Tensor]:
    """The (height, width) an image of ``height x width`` is resized to for an S x S canvas.

    With ``keep_aspect`` the longer side becomes ``size`` and the other keeps
    the aspect ratio (rounded, at least 1); otherwise both become ``size``.
    """
    size = tf.cast(size, tf.int32)
    if not keep_aspect:
        return [size, size]
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    factor = tf.cast(size, tf.float32) / tf.cast(tf.maximum(height, width), tf.float32)
    return [
        tf.clip_by_value(tf.cast(tf.round(tf.cast(n, tf.float32) * factor), tf.int32), 1, size)
        for n in (height, width)
    ]


def torchvision_resize(data_config: Any) -> tuple[int, int] | None:
    """``(min_size, max_size)`` if ``data_config`` asks for torchvision's resize, else None.

    ``config.data.resize = "torchvision"`` (what `jfcnn.convert` writes)
    resizes images as torchvision's ``GeneralizedRCNNTransform`` does (see
    `torchvision_size`) instead of fitting their longer side to S;
    ``data.min_size`` (default 800) and ``data.max_size`` (default 1333) are
    its sizes. Any other value, or no key (every other config), is None.
    """
    if data_config.get("resize") != "torchvision":
        return None
    min_size = data_config.get("min_size") or TORCHVISION_MIN_SIZE
    max_size = data_config.get("max_size") or TORCHVISION_MAX_SIZE
    return int(min_size), int(max_size)


# GeneralizedRCNNTransform's defaults in torchvision's detection models.
TORCHVISION_MIN_SIZE, TORCHVISION_MAX_SIZE = 800, 1333


def torchvision_size(height: Any, width: Any, min_size: Any, max_size: Any) -> list[tf.Tensor]:
    """The (height, width) torchvision's detection transform resizes an image to.

    torchvision's ``_resize_image_and_masks``: the scale factor is
    ``min(min_size / shorter side, max_size / longer side)`` and each side
    becomes ``floor(side * scale)`` (``interpolate(scale_factor=...,
    recompute_scale_factor=True)``), both in double precision as Python
    computes them there, so the sizes are torchvision's exactly.
    """
    height, width = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    scale = tf.minimum(
        tf.cast(min_size, tf.float64) / tf.minimum(height, width),
        tf.cast(max_size, tf.float64) / tf.maximum(height, width),
    )
    return [tf.cast(tf.floor(n * scale), tf.int32) for n in (height, width)]


def fit_image(
    image: Any, size: int, keep_aspect: bool, *, torchvision: tuple[int, int] | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """An (H, W, 3) uint8 image as the model's (S, S, 3) float32 input in [0, 1].

    Exactly what evaluation does to an image (and training, before its random
    flip, scale and crop): resize (bilinear, antialiased) to `fitted_size`,
    zero-pad to S x S at the bottom and right. Prediction uses it too, so a
    model sees new images as it saw its training data.

    With ``torchvision=(min_size, max_size)`` (`torchvision_resize`) the image
    is resized as torchvision's detection models resize it: to
    `torchvision_size`, bilinear without antialiasing (``F.interpolate(...,
    mode="bilinear", align_corners=False)``); it must fit in S x S
    (``S >= max_size``). The model should then be told each image's
    ``resized_size`` (``image_sizes``), so the padding adds no proposals.

    Returns:
      ``(canvas, resized_size)``: the (S, S, 3) float32 canvas and the int32
      (height, width) the image occupies in it, top-left.
    """
    image = tf.convert_to_tensor(image)
    if torchvision is not None:
        resized = torchvision_size(tf.shape(image)[0], tf.shape(image)[1], *torchvision)
        antialias = False
    else:
        resized = fitted_size(tf.shape(image)[0], tf.shape(image)[1], size, keep_aspect)
        antialias = True
    canvas = tf.image.resize(
        tf.cast(image, tf.float32) / 255.0, resized, method="bilinear", antialias=antialias
    )
    canvas = tf.image.pad_to_bounding_box(canvas, 0, 0, size, size)
    canvas = tf.ensure_shape(tf.clip_by_value(canvas, 0.0, 1.0), [size, size, 3])
    return canvas, tf.stack(resized)


def check_torchvision_resize(data_config: Any) -> None:
    """Raises ``ConfigError`` if torchvision's resize is asked for and does not fit the canvas."""
    resize = data_config.get("resize")
    if resize is None:
        return
    if resize not in ("fit", "torchvision"):
        raise ConfigError(
            f"Config key `data.resize` is {resize!r}; choose 'fit' (the longer side to "
            "data.image_size) or 'torchvision' (torchvision's detection resize)."
        )
    sizes = torchvision_resize(data_config)
    if sizes is None:
        return
    min_size, max_size = sizes
    if min(min_size, max_size) < 1:
        raise ConfigError(
            f"Config keys `data.min_size` and `data.max_size` are {min_size} and {max_size}; "
            "both must be positive (torchvision's defaults: 800 and 1333)."
        )
    size = data_config.image_size
    if size < max_size:
        canvas = -(-max_size // 32) * 32
        raise ConfigError(
            f"Config key `data.image_size` is {size}, smaller than `data.max_size` {max_size}: "
            "torchvision's resize makes an image's longer side up to max_size pixels, which "
            f"must fit the canvas. Set data.image_size to {canvas} (max_size rounded up to a "
            "multiple of 32) or lower data.max_size."
        )


def _read(
    builder: tfds.core.DatasetBuilder,
    split: Any,
    *,
    spec: DatasetSpec,
    decode: bool,
    instances: bool,
) -> tf.data.Dataset:
    """Reads ``split`` in its fixed file order; images stay encoded unless ``decode``."""
    return builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=spec.decoding(decode, instances),
        # We cache ourselves, and only when asked.
        read_config=tfds.ReadConfig(try_autocache=False),
    )


def _to_common(
    builder: tfds.core.DatasetBuilder, spec: DatasetSpec, *, decoded: bool, instances: bool
) -> ToCommonFn:
    """The spec's map to the common form (``jfcnn.data.registry``), semantic part only
    unless ``instances``."""
    fn = spec.to_common(builder, decoded=decoded, instances=instances)
    if instances:
        return fn

    def semantic_only(example):
        common = fn(example)
        # Nearest-neighbour resizing and cropping treat channels independently,
        # so channel 0 comes out exactly as it would next to the index map.
        return {"image": common["image"], "label_maps": common["label_maps"][..., :1]}

    return semantic_only


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
    spec: DatasetSpec,
    num_classes: int,
    augment: bool,
    max_instances: int | None,
    eval_fields: bool = False,
) -> dict[str, tf.Tensor]:
    """Augments (if ``augment``, with stateless draws from ``seed``) and formats one example.

    Instance fields are made (padded to ``max_instances``) unless it is None;
    ``eval_fields`` adds the sizes (and ``image_id``) that evaluation maps
    predictions back with.
    """
    size = data_config.image_size
    image = example["image"]
    label_maps = example["label_maps"]
    original_size = tf.shape(image)[:2]
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
        scale = tf.constant(1.0)
        scaled = tf.constant(size, tf.int32)
        offset_frac = tf.zeros([2])
    torchvision = torchvision_resize(data_config)
    if torchvision is not None:
        # torchvision's sizes (exactly, unaugmented), scaled with the canvas when augmenting.
        min_size, max_size = (
            tf.cast(n, tf.float64) * tf.cast(scale, tf.float64) for n in torchvision
        )
        resized = [
            tf.minimum(n, scaled)
            for n in torchvision_size(original_size[0], original_size[1], min_size, max_size)
        ]
    else:
        resized = fitted_size(original_size[0], original_size[1], scaled, spec.keep_aspect)
    image = tf.image.resize(
        tf.cast(image, tf.float32) / 255.0,
        resized,
        method="bilinear",
        antialias=torchvision is None,  # torchvision interpolates without antialiasing.
    )
    label_maps = tf.image.resize(label_maps, resized, method="nearest")
    if spec.keep_aspect or torchvision is not None:
        image = tf.image.pad_to_bounding_box(image, 0, 0, scaled, scaled)
        label_maps = tf.image.pad_to_bounding_box(label_maps, 0, 0, scaled, scaled)
    image = _crop_or_pad(image, scaled, size, offset_frac)
    label_maps = _crop_or_pad(label_maps, scaled, size, offset_frac)

    semantic = tf.cast(label_maps[..., 0], tf.int32) - spec.label_offset
    is_class = (semantic >= 0) & (semantic < num_classes)
    out = {
        "image": tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), [size, size, 3]),
        "mask": tf.ensure_shape(
            tf.where(is_class, semantic, _ignore_label(data_config)), [size, size]
        ),
    }
    if eval_fields:
        out["original_size"] = tf.cast(original_size, tf.int32)
        out["resized_size"] = tf.cast(tf.stack(resized), tf.int32)
        if "image_id" in example:
            out["image_id"] = tf.cast(example["image_id"], tf.int64)
    if max_instances is not None:
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


def _check_data_config(
    data_config: ml_collections.ConfigDict, spec: DatasetSpec, instances: bool
) -> int | None:
    """Raises on a bad ``config.data``; returns M with ``instances``, else None."""
    if data_config.image_size <= 0:
        raise ValueError(f"config.data.image_size must be positive, got {data_config.image_size}")
    if not 0 <= _ignore_label(data_config) <= 255:
        raise ConfigError(
            f"Config key `data.ignore_label` is {data_config.ignore_label}; it must be in "
            "0..255 (label maps are 8-bit), e.g. 255."
        )
    low, high = data_config.scale_range
    if not 0 < low <= high:
        raise ValueError(f"config.data.scale_range must be 0 < min <= max, got {(low, high)}")
    check_torchvision_resize(data_config)
    if not instances:
        return None
    if not spec.has_instances:
        raise ConfigError(
            f"Data set {spec.name!r} has no instance annotations (boxes, instance masks); "
            "pick a data set with them for instance batches."
        )
    max_instances = data_config.get("max_instances")
    if max_instances is None:
        raise ConfigError(
            "Config key `data.max_instances` is missing; instance batches pad their "
            "ground truth to that many instances. Add it to the config file."
        )
    if max_instances <= 0:
        raise ValueError(f"config.data.max_instances must be positive, got {max_instances}")
    return max_instances


def create_train_iterator(
    config: ml_collections.ConfigDict, *, start_step: int = 0, instances: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator over this process's training batches, from ``start_step`` on.

    With P processes, global batch s is the same P * B examples (same order,
    same augmentation) whatever P is: every process reads the whole split in
    one shuffled order and yields its B slots of each global batch (process
    p has slots p * B .. (p + 1) * B - 1), skipping the others' records
    before decoding them.

    Args:
      config: uses ``config.seed``, ``config.batch_size`` (global) and ``config.data``
        (see `default_config`; ``max_instances`` only with ``instances``).
      start_step: index of the first batch to yield; batch s is the same whether
        the iterator started at 0 or at any k <= s.
      instances: whether batches carry the instance ground truth (``boxes``,
        ``labels``, ``instance_masks``, ``instance_valid``, and ``crowd`` where
        the data set has it); the data set must have instances.

    Returns:
      An iterator of dicts of numpy arrays (see the module docstring), B examples each.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    data_config = config.data
    spec = get_spec(data_config.name)
    max_instances = _check_data_config(data_config, spec, instances)
    _hide_gpus_from_tensorflow()
    process_index, process_count = _process_info()
    batch_size = _local_batch_size(config.batch_size, process_count)
    builder = _get_builder(data_config)
    num_classes = len(_classes(spec, builder)[0])
    # Every process reads the whole split in the same shuffled order (the same seeds) and
    # keeps its own part of each global batch: the global batches, and so training, do
    # not depend on the number of processes. Records of other processes are skipped
    # before they are decoded.
    split = data_config.train_split
    num_examples = _num_examples(builder, split)
    if num_examples == 0:
        raise ValueError(f"Split {data_config.train_split!r} has no examples")

    cache = data_config.cache
    to_common = _to_common(builder, spec, decoded=cache, instances=instances)
    examples = _read(builder, split, spec=spec, decode=cache, instances=instances)
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
    global_batch_size = batch_size * process_count
    first_position = start_step * global_batch_size
    first_epoch, offset = divmod(first_position, num_examples)
    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.enumerate(start=first_epoch * num_examples).skip(offset)
    if process_count > 1:  # This process's slots of each global batch.
        ds = ds.filter(
            lambda position, _: (position % global_batch_size) // batch_size == process_index
        )

    def prepare(position, example):
        if not cache:
            example = to_common(example)
        # Seeded by the example's position in the global stream: the same augmentation
        # whatever process reads it.
        seed = tf.random.experimental.stateless_fold_in(augment_key, position)
        return _preprocess(
            example,
            seed,
            data_config=data_config,
            spec=spec,
            num_classes=num_classes,
            augment=data_config.augment,
            max_instances=max_instances,
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


def create_eval_iterator(
    config: ml_collections.ConfigDict, *, instances: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's shard of the eval split, in a fixed order.

    Every process yields `num_eval_batches` batches of B examples (so that
    collective ops line up); examples past the end of the shard are zeros with
    ``valid`` False. No augmentation.

    Args:
      config: uses ``config.batch_size`` (global) and ``config.data``.
      instances: whether batches carry the instance ground truth (see
        `create_train_iterator`).

    Returns:
      An iterator of dicts of numpy arrays with the training keys plus ``valid`` (B,) bool.
    """
    data_config = config.data
    spec = get_spec(data_config.name)
    max_instances = _check_data_config(data_config, spec, instances)
    _hide_gpus_from_tensorflow()
    process_index, process_count = _process_info()
    batch_size = _local_batch_size(config.batch_size, process_count)
    builder = _get_builder(data_config)
    num_classes = len(_classes(spec, builder)[0])
    split = tfds.even_splits(data_config.eval_split, n=process_count, drop_remainder=False)[
        process_index
    ]
    to_common = _to_common(builder, spec, decoded=True, instances=instances)

    def prepare(example):
        out = _preprocess(
            to_common(example),
            None,
            data_config=data_config,
            spec=spec,
            num_classes=num_classes,
            augment=False,
            max_instances=max_instances,
            eval_fields=True,
        )
        out["valid"] = tf.constant(True)
        return out

    ds = _read(builder, split, spec=spec, decode=True, instances=instances).map(
        prepare, num_parallel_calls=tf.data.AUTOTUNE
    )
    padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.take(num_eval_batches(config) * batch_size)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(ds.with_options(_options()).as_numpy_iterator())


def dataset_metadata(config: ml_collections.ConfigDict) -> DatasetMetadata:
    """Classes, split sizes and input format of the configured data set.

    Prepares a data set that is generated here or made from the user's files.
    """
    data_config = config.data
    spec = get_spec(data_config.name)
    _hide_gpus_from_tensorflow()
    builder = _get_builder(data_config)
    class_names, category_ids = _classes(spec, builder)
    return DatasetMetadata(
        name=data_config.name,
        num_classes=len(class_names),
        class_names=tuple(class_names),
        image_size=data_config.image_size,
        num_train_examples=_num_examples(builder, data_config.train_split),
        num_eval_examples=_num_examples(builder, data_config.eval_split),
        has_instances=spec.has_instances,
        category_ids=tuple(category_ids),
        keep_aspect=spec.keep_aspect,
        ignore_label=_ignore_label(data_config),
    )
