"""`jfcnn_shapes`: a procedurally generated segmentation data set (TFDS builder).

Each 128x128 RGB image shows 1-6 filled circles, squares and triangles on a
textured, noisy background. Colors are drawn independently of the class, so
the class can only be read from the outline; sizes, rotations and positions
vary, and instances overlap partially: later instances occlude earlier ones, each
instance mask holds the *visible* pixels only, and an instance whose visible
part becomes tiny is dropped (and not drawn) so that every pixel painted as a
shape belongs to a listed instance.

The set is built locally, in seconds and without network, the first time it
is asked for (``tfds.builder("jfcnn_shapes", data_dir=...)`` then
``download_and_prepare()``). It is deterministic given its version: example
``i`` of split ``s`` is drawn by a numpy ``Generator`` seeded with
``(_GENERATOR_SEED, split id of s, i)`` (see `generate_example`).

Features:

- ``image``: (128, 128, 3) uint8.
- ``segmentation_mask``: (128, 128, 1) uint8 semantic class ids:
  0 background, 1 circle, 2 square, 3 triangle.
- ``objects``: a sequence with, per instance (in painting order, bottom first):
  ``bbox`` (`tfds.features.BBoxFeature`: normalized ymin, xmin, ymax, xmax,
  tight around the visible mask in pixel-edge coordinates, i.e. a mask spanning
  rows r0..r1 has ymin = r0 / 128 and ymax = (r1 + 1) / 128), ``label``
  (`ClassLabel` 0 circle, 1 square, 2 triangle; **semantic class id =
  label + 1**) and ``mask`` ((128, 128, 1) uint8 0/1 visible pixels).

Visible instance masks never overlap, and the semantic mask is exactly the
union of the instance masks painted with ``label + 1``.

Importing this module registers the TFDS builder and the pipeline's
`SPEC` (``jfcnn.data.registry``; semantic class ids are the stored mask values).

>>> import tensorflow_datasets as tfds
>>> import jfcnn.data  # registers the builder
>>> builder = tfds.builder("jfcnn_shapes", data_dir="/tmp/tfds")
>>> builder.download_and_prepare()  # local generation, no network
>>> ds = builder.as_dataset(split="train[:8]")
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from jfcnn.data import registry

IMAGE_SIZE = 128
CLASS_NAMES = ("circle", "square", "triangle")
# Semantic class ids: background 0, then CLASS_NAMES in order (label + 1).
SEMANTIC_CLASS_NAMES = ("background", *CLASS_NAMES)
NUM_CLASSES = len(SEMANTIC_CLASS_NAMES)
MAX_INSTANCES = 6
SPLIT_SIZES = {"train": 2000, "validation": 200}

_GENERATOR_SEED = 20240601  # Bump VERSION when changing this or the drawing code.
_SPLIT_IDS = {"train": 0, "validation": 1}
# Size parameter R in pixels: circle radius R, square half-side 0.9 R, triangle
# circumradius 1.35 R; the three have similar areas so size says nothing of class.
_RADIUS_RANGE = (12.0, 30.0)
_SQUARE_HALF_SIDE = 0.9
_TRIANGLE_CIRCUMRADIUS = 1.35
# A new shape is moved (up to _PLACEMENT_TRIES times) while more than this
# fraction of it would cover earlier shapes.
_MAX_OVERLAP_FRACTION = 0.25
_PLACEMENT_TRIES = 8
# An instance is dropped if its visible area is below both bounds' max.
_MIN_VISIBLE_PIXELS = 64
_MIN_VISIBLE_FRACTION = 0.3
# Minimum RGB distance of a shape's color to the background base color and to
# the colors of the shapes drawn before it, so that outlines stay visible.
_MIN_COLOR_DISTANCE_BACKGROUND = 90.0
_MIN_COLOR_DISTANCE_SHAPES = 60.0
_PIXEL_NOISE_STD = 6.0


def _upsample_bilinear(coarse_hwc: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsamples a (h, w, c) grid to (size, size, c) (corner-aligned)."""

    def interpolation_matrix(n: int) -> np.ndarray:
        # Row i holds the two bilinear weights of output sample i over the n inputs.
        t = np.linspace(0.0, n - 1.0, size)
        lo = np.minimum(np.floor(t).astype(int), n - 2)
        weights = np.zeros((size, n), dtype=np.float32)
        weights[np.arange(size), lo] = 1.0 - (t - lo)
        weights[np.arange(size), lo + 1] = t - lo
        return weights

    h, w, c = coarse_hwc.shape
    rows = interpolation_matrix(h) @ coarse_hwc.reshape(h, w * c)  # (size, w * c)
    rows_ycw = rows.reshape(size, w, c).transpose(0, 2, 1)
    upsampled_ycx = rows_ycw @ interpolation_matrix(w).T
    return np.ascontiguousarray(upsampled_ycx.transpose(0, 2, 1))  # (size, size, c)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns a textured background (size, size, 3) float32 and its base color (3,)."""
    base = rng.uniform(40.0, 215.0, size=3)
    # Low-frequency blotches plus a global gradient: the background is not flat,
    # so a constant-color threshold cannot segment the shapes.
    coarse = rng.normal(0.0, rng.uniform(8.0, 20.0), size=(6, 6, 3)) + base
    background = _upsample_bilinear(coarse.astype(np.float32), size)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gradient = rng.uniform(-30.0, 30.0) * ramp[None, :] + rng.uniform(-30.0, 30.0) * ramp[:, None]
    background += gradient[..., None]
    return background, base


def _shape_mask(
    label: int, cy: float, cx: float, radius: float, angle: float, size: int
) -> np.ndarray:
    """Rasterizes one filled shape; a pixel is inside if its center is. (size, size) bool."""
    centers = np.arange(size) + 0.5
    dy = centers[:, None] - cy
    dx = centers[None, :] - cx
    if label == 0:  # circle
        return dy * dy + dx * dx <= radius * radius
    cos, sin = np.cos(angle), np.sin(angle)
    if label == 1:  # square, rotated by `angle`
        u = cos * dx + sin * dy
        v = -sin * dx + cos * dy
        half = _SQUARE_HALF_SIDE * radius
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # Equilateral triangle: inside all three edges' half-planes (vertices counter-clockwise).
    r = _TRIANGLE_CIRCUMRADIUS * radius
    angles = angle + np.array([0.0, 2.0, 4.0]) * np.pi / 3.0
    vy, vx = r * np.sin(angles), r * np.cos(angles)
    inside = np.ones((size, size), dtype=bool)
    for k in range(3):
        ay, ax = vy[k], vx[k]
        by, bx = vy[(k + 1) % 3], vx[(k + 1) % 3]
        inside &= (bx - ax) * (dy - ay) - (by - ay) * (dx - ax) >= 0.0
    return inside


def _pick_color(rng: np.random.Generator, background: np.ndarray, others: list[np.ndarray]):
    """Draws a uniform RGB color far enough from the background and earlier shapes."""
    color = rng.uniform(0.0, 255.0, size=3)
    for _ in range(50):
        if np.linalg.norm(color - background) >= _MIN_COLOR_DISTANCE_BACKGROUND and all(
            np.linalg.norm(color - o) >= _MIN_COLOR_DISTANCE_SHAPES for o in others
        ):
            break
        color = rng.uniform(0.0, 255.0, size=3)
    return color


def _visible_masks(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when painted in order (later ones on top)."""
    owner = np.full(full_masks[0].shape, -1, dtype=np.int32)
    for k, mask in enumerate(full_masks):
        owner[mask] = k
    return [owner == k for k in range(len(full_masks))]


def _mask_to_bbox(mask: np.ndarray) -> np.ndarray:
    """Tight (ymin, xmin, ymax, xmax) of a (H, W) bool mask, normalized, pixel edges."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return np.array(
        [rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w], dtype=np.float32
    )


def generate_example(split: str, index: int, size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
    """Draws example ``index`` of ``split``; deterministic in (split, index).

    Letters: N number of kept instances (1..MAX_INSTANCES), S = ``size``.

    Args:
      split: "train" or "validation" (selects an independent random stream).
      index: example index within the split.
      size: image side S in pixels (the data set uses 128).

    Returns:
      A dict of numpy arrays: ``image`` (S, S, 3) uint8, ``segmentation_mask``
      (S, S) uint8 semantic class ids, ``labels`` (N,) int64 in 0..2 (semantic
      id = label + 1), ``masks`` (N, S, S) bool visible pixels (disjoint), and
      ``bboxes`` (N, 4) float32 normalized (ymin, xmin, ymax, xmax), tight
      around ``masks`` in pixel-edge coordinates.

    >>> ex = generate_example("train", 0)
    >>> ex["image"].shape, ex["masks"].shape[1:]
    ((128, 128, 3), (128, 128))
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    rng = np.random.default_rng([_GENERATOR_SEED, _SPLIT_IDS[split], index])
    background, base_color = _background(rng, size)
    scale = size / IMAGE_SIZE

    num_instances = int(rng.integers(1, MAX_INSTANCES + 1))
    labels, full_masks, colors = [], [], []
    covered = np.zeros((size, size), dtype=bool)
    for _ in range(num_instances):
        label = int(rng.integers(0, len(CLASS_NAMES)))
        radius = rng.uniform(*_RADIUS_RANGE) * scale
        angle = rng.uniform(0.0, 2.0 * np.pi)
        # Centers keep at least ~40% of the shape's extent inside the image.
        margin = 0.6 * radius
        # Overlaps happen but stay partial, so most shapes remain recognizable:
        # retry the position while the shape would land mostly on earlier ones.
        for _ in range(_PLACEMENT_TRIES):
            cy, cx = rng.uniform(margin, size - margin, size=2)
            mask = _shape_mask(label, cy, cx, radius, angle, size)
            if (mask & covered).sum() <= _MAX_OVERLAP_FRACTION * mask.sum():
                break
        covered |= mask
        labels.append(label)
        full_masks.append(mask)
        colors.append(_pick_color(rng, base_color, colors))

    # Drop instances whose visible part is tiny; removing one only uncovers the
    # ones below it, so repeat until stable. The top instance is never occluded
    # and keeps >= ~1/4 of its area inside the image, so at least one survives.
    keep = list(range(num_instances))
    while True:
        visible = _visible_masks([full_masks[k] for k in keep])
        kept = [
            k
            for k, vis in zip(keep, visible, strict=True)
            if vis.sum() >= max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * full_masks[k].sum())
        ]
        if kept == keep:
            break
        keep = kept

    image = background
    segmentation = np.zeros((size, size), dtype=np.uint8)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    for k, vis in zip(keep, visible, strict=True):
        # A mild linear shading per shape so that shapes are not flat either.
        shade = rng.uniform(-25.0, 25.0) * ramp[None, :] + rng.uniform(-25.0, 25.0) * ramp[:, None]
        inside = full_masks[k]
        image[inside] = colors[k].astype(np.float32) + shade[inside][:, None]
        segmentation[vis] = labels[k] + 1
    image += _PIXEL_NOISE_STD * rng.standard_normal(size=image.shape, dtype=np.float32)
    masks = np.stack(visible)
    return {
        "image": np.clip(np.rint(image), 0, 255).astype(np.uint8),
        "segmentation_mask": segmentation,
        "labels": np.array([labels[k] for k in keep], dtype=np.int64),
        "masks": masks,
        "bboxes": np.stack([_mask_to_bbox(m) for m in masks]),
    }


def _png(array_hwc: np.ndarray) -> bytes:
    # PIL with light compression encodes ~10x faster than TFDS's TF-graph encoder.
    buffer = io.BytesIO()
    mode = "RGB" if array_hwc.shape[-1] == 3 else "L"
    image = Image.fromarray(array_hwc if mode == "RGB" else array_hwc[..., 0], mode=mode)
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class JfcnnShapes(tfds.core.GeneratorBasedBuilder):
    """Circles, squares and triangles with semantic and instance annotations."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        size = IMAGE_SIZE
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[1],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3)),
                    "segmentation_mask": tfds.features.Image(shape=(size, size, 1)),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                            "mask": tfds.features.Image(shape=(size, size, 1)),
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is generated locally.
        return {
            split: self._generate_examples(split, num_examples)
            for split, num_examples in SPLIT_SIZES.items()
        }

    def _generate_examples(self, split: str, num_examples: int):
        for index in range(num_examples):
            ex = generate_example(split, index)
            yield (
                index,
                {
                    "image": _png(ex["image"]),
                    "segmentation_mask": _png(ex["segmentation_mask"][..., None]),
                    "objects": {
                        "bbox": [tfds.features.BBox(*map(float, b)) for b in ex["bboxes"]],
                        "label": ex["labels"],
                        "mask": [_png(m.astype(np.uint8)[..., None]) for m in ex["masks"]],
                    },
                },
            )


def _decoding(decode: bool, instances: bool) -> tfds.decode.PartialDecoding:
    """The features the pipeline reads; images stay encoded unless ``decode``."""
    # Only the features we use are parsed: the 1-6 instance mask PNGs are most
    # of the decoding work, and semantic segmentation never needs them.
    features: dict = {"image": True, "segmentation_mask": True}
    if instances:
        features["objects"] = {"label": True, "mask": True}
    decoders = None
    if not decode:
        decoders = {"image": tfds.decode.SkipDecoding()}
        decoders["segmentation_mask"] = tfds.decode.SkipDecoding()
        if instances:
            decoders["objects"] = {"mask": tfds.decode.SkipDecoding()}
    return tfds.decode.PartialDecoding(features, decoders=decoders)


def _to_common(builder: tfds.core.DatasetBuilder, *, decoded: bool, instances: bool):
    """The map from a `jfcnn_shapes` example to the common form (``jfcnn.data.registry``)."""
    features = builder.info.features

    def decode(name, value):
        return value if decoded else features[name].decode_example(value)

    def fn(example):
        image = decode("image", example["image"])
        semantic = decode("segmentation_mask", example["segmentation_mask"])
        out = {"image": image, "label_maps": semantic}
        if instances:
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


SPEC = registry.register(
    registry.DatasetSpec(
        name="jfcnn_shapes",
        class_names=SEMANTIC_CLASS_NAMES,
        has_instances=True,
        decoding=_decoding,
        to_common=_to_common,
        builds_locally=True,
    )
)
