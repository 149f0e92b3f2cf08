"""Instance segmentation: Mask R-CNN, detection losses, COCO box and mask AP.

``InstanceSegmentationTask`` tells the generic loop in ``jfcnn.train`` what to
build and how to score it (the ``jfcnn.tasks.Task`` contract);
``CocoEvaluator`` scores its detections with pycocotools.

Predicting with a trained run, outside training::

    config, task, variables, step = jfcnn.evaluate.load_trained("runs/maskrcnn")
    detections = jfcnn.tasks.instance.predict(task, variables, images)  # (B, S, S, 3) in [0, 1]
    detections["masks"]  # (B, D, S, S) uint8, one pasted mask per detection

COCO evaluation (``CocoEvaluator``): ground truth and detections are collected
batch by batch on the host, turned into a COCO annotation dict and results in
memory (masks as RLE) and scored by ``COCOeval`` for ``"bbox"`` and
``"segm"``. AP is measured at the resolution the model sees (the pipeline's
S x S images), not at the original image resolution, so the area ranges of
``*_AP_small/medium/large`` refer to areas in those images.

Data sets made from the user's COCO JSON (``data.name = "coco_json"``) are
scored against the user's own annotation file instead
(``AnnotationFileEvaluator``): detections mapped back to each original image
(`detections_in_original`), with the file's image and category ids, and
COCOeval run on that file, so the AP is exactly what pycocotools reports for
the file and these detections.

Letters in shapes: B examples per batch, S image side, M ground-truth slots,
D detection slots, K classes (background included).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jfcnn import visualize
from jfcnn.errors import ConfigError
from jfcnn.models.maskrcnn import RENAMED_FIELDS, MaskRCNN
from jfcnn.tasks.base import build_model

# The terms of the training loss, in the order they are logged.
LOSS_TERMS = ("rpn_objectness", "rpn_box", "classification", "box_regression", "mask")
# What the evaluator receives of the model's outputs.
EVAL_OUTPUTS = ("boxes", "scores", "classes", "detection_valid", "masks", "mask_probs")


def predict(task: InstanceSegmentationTask, variables: Any, images: Any) -> dict[str, jax.Array]:
    """Detections of ``(B, S, S, 3)`` float images in ``[0, 1]`` (jitted).

    Returns the model's outputs: ``boxes`` (B, D, 4) pixel ``(x1, y1, x2,
    y2)``, ``scores`` (B, D), ``classes`` (B, D) int32 class ids (see
    ``task.metadata.class_names``), ``detection_valid`` (B, D) bool, ``masks``
    (B, D, S, S) uint8 0/1 and ``mask_probs`` (B, D, s, s) per-box mask
    probabilities.
    """
    return _jitted_apply(task.model)(variables, jnp.asarray(check_image_values(images)))


def check_image_values(images: Any) -> np.ndarray:
    """``images`` as a float32 array, or a ValueError/TypeError saying what is wrong.

    The model normalizes inputs in [0, 1]; uint8 pixels (0..255) or other
    ranges would give no detections without any error. Shapes and sizes are
    checked by the model itself (``jfcnn.models.maskrcnn.check_images``).
    """
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(
            f"images must be floats in [0, 1], got dtype {images.dtype}: convert uint8 "
            "images with `images.astype(np.float32) / 255`."
        )
    if images.size:
        low, high = float(images.min()), float(images.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"images must lie in [0, 1], got values in [{low:g}, {high:g}]"
                + (": divide 0..255 pixels by 255." if high > 1 else ".")
            )
    return images.astype(np.float32, copy=False)


def _torchvision_paste_weights(
    start: float, end: float, mask_size: int, length: int
) -> tuple[int, np.ndarray]:
    """``(first, (stop - first, mask_size) weights)`` of torchvision's paste along one axis.

    The numbers of ``jfcnn.ops.detection.paste_masks_torchvision``: the box
    expanded by one mask pixel each side (float32, as torchvision computes
    it), truncated to ints ``b0 .. b1``; its ``n = b1 - b0 + 1`` pixels read
    the zero-padded ``mask_size + 2`` mask resized to ``n`` (bilinear,
    ``align_corners=False``); ``first..stop-1`` are those pixels inside the image.
    """
    center = (np.float32(start) + np.float32(end)) * np.float32(0.5)
    half = (np.float32(end) - np.float32(start)) * np.float32(0.5)
    half = half * np.float32((mask_size + 2) / mask_size)
    b0, b1 = int(np.trunc(center - half)), int(np.trunc(center + half))
    count = max(b1 - b0 + 1, 1)
    first, stop = max(b0, 0), min(b0 + count, length)
    if first >= stop:
        return first, np.zeros((0, mask_size))
    padded = mask_size + 2
    u = np.arange(first - b0, stop - b0, dtype=np.float32)
    source = np.maximum((u + np.float32(0.5)) * np.float32(padded / count) - np.float32(0.5), 0)
    low = np.minimum(np.floor(source), padded - 1)
    high = np.minimum(low + 1, padded - 1)
    frac = (source - low).astype(np.float64)
    cells = np.arange(padded)
    weights = (cells == low[:, None]) * (1.0 - frac[:, None]) + (cells == high[:, None]) * frac[
        :, None
    ]
    return first, weights[:, 1:-1]  # The padding cells hold zeros: dropped.


def _pixel_taps(
    starts: np.ndarray, ends: np.ndarray, firsts: np.ndarray, counts: np.ndarray, mask_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``first .. first + count - 1`` of each box along one axis, the boxes one after
    another, as ``(index, frac)``: a pixel is ``(1 - frac) * padded[index] + frac *
    padded[index + 1]`` of the mask zero-padded by one cell each side.

    The weights of ``jfcnn.ops.detection.paste_masks``, ``max(0, 1 - |position -
    j|)`` for cell ``j``: at most two neighbouring cells. A pixel more than a cell
    outside the mask (all weights 0) reads a padding cell. ``index + frac`` never
    decreases within a box.
    """
    offsets = np.cumsum(counts) - counts
    centers = (np.arange(counts.sum()) - np.repeat(offsets - firsts, counts)).astype(np.float64)
    centers += 0.5
    lengths = np.maximum(ends - starts, 1e-6)
    position = (centers - np.repeat(starts, counts)) / np.repeat(lengths, counts) * mask_size - 0.5
    low = np.floor(position)
    frac = position - low
    frac[low < -1] = 0.0  # Before the mask: padded[0].
    frac[low > mask_size - 1] = 1.0  # After it: padded[mask_size + 1].
    np.clip(low + 1, 0, mask_size, out=low)
    return low.astype(np.intp), frac


def _paste_regions(
    mask_probs: np.ndarray, boxes: np.ndarray, image_size: Sequence[int], threshold: float
) -> list[tuple[int, int, np.ndarray]]:
    """`paste_region` (``convention="centers"``) of ``(N, s0, s1)`` masks into ``(N, 4)`` boxes.

    The small per-box work is done for many boxes at once (`_paste_crops`): for
    typical boxes it costs more than their pixels.
    """
    height, width = (int(n) for n in image_size)
    mask_probs, boxes = np.asarray(mask_probs), np.asarray(boxes, np.float64).reshape(-1, 4)
    found: list[Any] = []
    live = []  # (n, row0, row1, col0, col1) of the boxes that reach the image.
    for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        # The box and a pixel around it: pixels whose center lies outside the box stay
        # below 0.5 (probabilities in [0, 1]), so this holds the whole paste for a
        # threshold of 0.5 or more (predict and evaluation use 0.5).
        row0, row1 = max(math.floor(y1) - 1, 0), min(math.ceil(y2) + 1, height)
        col0, col1 = max(math.floor(x1) - 1, 0), min(math.ceil(x2) + 1, width)
        if row0 < row1 and col0 < col1:
            live.append((n, row0, row1, col0, col1))
            found.append(None)
        else:
            empty = np.zeros((max(row1 - row0, 0), max(col1 - col0, 0)), np.uint8)
            found.append((row0, col0, empty))
    # Boxes of some 2**13 rows and columns at a time (a column holds 4 (s + 2) bytes of
    # values): larger temporary arrays, allocated and freed per call, were slower.
    cumulative = np.cumsum([0] + [row1 - row0 + col1 - col0 for _, row0, row1, col0, col1 in live])
    start = 0
    while start < len(live):
        group_end = np.searchsorted(cumulative, cumulative[start] + 2**13, "right")
        stop = max(start + 1, int(group_end) - 1)
        n, row0, row1, col0, col1 = (np.array(v) for v in zip(*live[start:stop], strict=True))
        crops = _paste_crops(mask_probs[n], boxes[n], row0, row1, col0, col1, threshold)
        for i, r, c, crop in zip(n.tolist(), row0.tolist(), col0.tolist(), crops, strict=True):
            found[i] = (r, c, crop)
        start = stop
    return found


def _paste_crops(
    mask_probs: np.ndarray,
    boxes: np.ndarray,
    row0: np.ndarray,
    row1: np.ndarray,
    col0: np.ndarray,
    col1: np.ndarray,
    threshold: float,
) -> list[np.ndarray]:
    """The thresholded pastes of ``(N, s0, s1)`` masks into ``(N, 4)`` boxes at rows
    ``row0..row1-1`` and columns ``col0..col1-1`` (none empty).

    The bilinear values thresholded (`_pixel_taps`), but for pixels within
    float32 rounding of ``threshold``, without computing them per pixel: down
    a column of pixels the value is linear between two rows of mask cells, so
    it crosses ``threshold`` at most once there. Each column's values are
    computed at the rows of cells only (float32, as ``paste_masks`` does) and
    the crossings between them (float64); a pixel is then the state at the
    row of cells above it, flipped if it lies past the crossing: two copies
    and a comparison per pixel, where matrix products cost 2 s multiply-adds.
    """
    s0, s1 = mask_probs.shape[1:]
    heights, widths = row1 - row0, col1 - col0
    boxes = np.asarray(boxes, np.float64)
    # Rows of all boxes one after another, each in block iy (between cell rows iy and
    # iy + 1 of the padded mask); keys increase over all rows.
    iy, fy = _pixel_taps(boxes[:, 1], boxes[:, 3], row0, heights, s0)
    ix, fx = _pixel_taps(boxes[:, 0], boxes[:, 2], col0, widths, s1)
    row_box = np.repeat(np.arange(len(boxes)), heights)
    column_box = np.repeat(np.arange(len(boxes)), widths)
    # Keys of box b lie in [b * stride, b * stride + s0 + 1]: the gap of one keeps a
    # crossing at the end of a box's last block from reaching the next box's rows.
    stride = s0 + 3
    keys = row_box * stride + iy + fy
    # The padded masks' values down each column at the rows of cells, (columns of all
    # boxes, s0 + 2), from the two columns of cells around it.
    padded = np.zeros((len(boxes), s1 + 2, s0 + 2), np.float32)
    padded[:, 1:-1, 1:-1] = mask_probs.transpose(0, 2, 1)
    padded = padded.reshape(-1, s0 + 2)
    cells = column_box * (s1 + 2) + ix
    knots = padded.take(cells + 1, axis=0)
    left = padded.take(cells, axis=0)
    knots -= left
    knots *= fx[:, None].astype(np.float32)
    knots += left
    threshold = np.float32(threshold)  # As the float32 products are compared with it.
    above = knots >= threshold
    # Blocks whose two rows of cells lie on either side of the threshold; where, as a key,
    # the value crosses it.
    crossing = np.flatnonzero(above[:, :-1] != above[:, 1:])
    column, block = np.divmod(crossing, s0 + 1)
    upper = knots.take(crossing + column).astype(np.float64)  # At the block's first row.
    lower = knots.take(crossing + column + 1).astype(np.float64)  # At its last.
    base = column_box[column] * stride + block
    at = base + (float(threshold) - upper) / (lower - upper)
    # Rows from `at` on flip. Falling (upper above, lower below), a row exactly at the
    # crossing is still above: it flips only past it.
    falling = lower < upper
    at[falling] = np.nextafter(at[falling], np.inf)
    # Each row's index from the first row of its block (in its box).
    block_starts = np.searchsorted(
        keys, (np.arange(len(boxes)) * stride)[:, None] + np.arange(s0 + 1)
    ).ravel()
    local = np.arange(len(keys)) - block_starts[row_box * (s0 + 1) + iy]
    index_dtype = np.min_scalar_type(local.max() + 1)
    no_flip = np.iinfo(index_dtype).max
    flips = np.searchsorted(keys, at) - block_starts[column_box[column] * (s0 + 1) + block]
    # Per block and column, (s0 + 1, columns of all boxes): the state at the upper row of
    # cells, and the first row (from the block's first) where it flips.
    table = np.full((len(column_box), s0 + 1), no_flip, index_dtype)
    table.ravel()[crossing] = np.clip(flips, 0, no_flip)
    table = np.ascontiguousarray(table.T)
    state = np.ascontiguousarray(above[:, :-1].T).view(np.uint8)
    local = local.astype(index_dtype)[:, None]
    flip_rows = np.empty(int((heights * widths).max()), index_dtype)
    flipped = np.empty(flip_rows.shape, bool)
    crops = []
    row_starts, column_starts = np.cumsum(heights) - heights, np.cumsum(widths) - widths
    for h, w, r, c in zip(
        heights.tolist(), widths.tolist(), row_starts.tolist(), column_starts.tolist(), strict=True
    ):
        index = iy[r : r + h]
        crop = np.take(state[:, c : c + w], index, axis=0, mode="clip")
        flip = np.take(
            table[:, c : c + w], index, axis=0, out=flip_rows[: h * w].reshape(h, w), mode="clip"
        )
        crop ^= np.less_equal(flip, local[r : r + h], out=flipped[: h * w].reshape(h, w))
        crops.append(crop)
    return crops


def paste_region(
    mask_probs: np.ndarray,
    box: Sequence[float],
    image_size: Sequence[int],
    threshold: float = 0.5,
    *,
    convention: str = "centers",
) -> tuple[int, int, np.ndarray]:
    """`paste_mask` as the only part of the image it can set: ``(row0, col0, crop)``.

    ``crop`` is ``(h, w)`` uint8 0/1, the pasted mask's rows ``row0..row0+h-1``
    and columns ``col0..col0+w-1`` (the box and one pixel around it, clipped to
    the image; ``h`` or ``w`` is 0 when the box misses the image); the mask is
    0 everywhere else. Costs the box's area, not the image's.

    ``convention="torchvision"`` pastes as torchvision's
    ``paste_masks_in_image`` does (a model's ``mask_paste="torchvision"``,
    converted models): the mask zero-padded by one pixel, its box expanded to
    match and truncated to whole pixels.
    """
    height, width = (int(n) for n in image_size)
    mask_probs = np.asarray(mask_probs)
    x1, y1, x2, y2 = (float(v) for v in box)
    if convention != "torchvision":
        return _paste_regions(
            mask_probs[None], np.array([[x1, y1, x2, y2]]), image_size, threshold
        )[0]
    row0, wy = _torchvision_paste_weights(y1, y2, mask_probs.shape[0], height)
    col0, wx = _torchvision_paste_weights(x1, x2, mask_probs.shape[1], width)
    row1, col1 = row0 + len(wy), col0 + len(wx)
    if row0 >= row1 or col0 >= col1:
        return row0, col0, np.zeros((max(row1 - row0, 0), max(col1 - col0, 0)), np.uint8)
    # float32, as paste_masks computes on the device (and half the time of float64):
    # the mask's columns first, (s, w), then each block of rows, (rows, w). Blocks
    # small enough that OpenBLAS computes each on the calling thread (m * n * k <=
    # 2**18): its own threads, contending with the predictor's on a busy machine,
    # made one large box cost ~10 ms instead of ~0.1.
    probs, wx = mask_probs.astype(np.float32), wx.astype(np.float32)
    step = max(1, 2**18 // (probs.shape[0] * probs.shape[1]))
    columns = np.concatenate(
        [probs @ wx[start : start + step].T for start in range(0, len(wx), step)], axis=1
    )
    wy = wy.astype(np.float32)
    rows = max(1, 2**18 // (mask_probs.shape[0] * max(wx.shape[0], mask_probs.shape[1])))
    crop = np.empty((row1 - row0, col1 - col0), np.uint8)
    for start in range(0, row1 - row0, rows):
        np.greater_equal(
            wy[start : start + rows] @ columns,
            threshold,
            out=crop[start : start + rows],
            casting="unsafe",
        )
    return row0, col0, crop


def paste_mask(
    mask_probs: np.ndarray, box: Sequence[float], image_size: Sequence[int], threshold: float = 0.5
) -> np.ndarray:
    """One box's mask probabilities pasted into an image of any size, on the host.

    The values of ``jfcnn.ops.detection.paste_masks`` (bilinear, pixel
    centers, zero outside the mask), computed only over the rows and columns
    the box can reach (`paste_region`), so that a large photo costs no more
    than its boxes.

    Args:
      mask_probs: ``(PH, PW)`` probabilities in [0, 1].
      box: ``(x1, y1, x2, y2)`` in the image's pixels.
      image_size: ``(H, W)``.
      threshold: pixels with a value ``>= threshold`` are 1.

    Returns:
      ``(H, W)`` uint8 0/1.
    """
    out = np.zeros(tuple(int(n) for n in image_size), np.uint8)
    row0, col0, crop = paste_region(mask_probs, box, image_size, threshold)
    out[row0 : row0 + crop.shape[0], col0 : col0 + crop.shape[1]] = crop
    return out


def detections_in_original(
    outputs: dict[str, np.ndarray],
    resized_size: Sequence[int],
    original_size: Sequence[int],
    *,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    full_masks: bool = True,
    mask_paste: str = "centers",
) -> dict[str, Any]:
    """One image's detections on the model's canvas, mapped back to the original image.

    The image was resized from ``original_size`` to ``resized_size`` and
    placed top-left on the S x S canvas (``jfcnn.data.pipeline.fit_image``).
    Boxes are scaled back and clipped to the image; masks are the per-box
    mask probabilities pasted at the original resolution (as torchvision's
    ``paste_masks_in_image`` does), not the canvas masks resized. A mask is
    pasted into the box the model predicted it for, scaled but not clipped
    (a box reaching into the canvas padding keeps its mask's proportions);
    a detection that lies wholly in the padding (no area left once clipped
    to the image) is dropped. Each mask costs its box's area
    (`paste_region`), not the image's.

    Args:
      outputs: one image's model outputs: ``boxes`` (D, 4), ``scores`` (D,),
        ``classes`` (D,), ``detection_valid`` (D,), ``mask_probs`` (D, s, s).
      resized_size: ``(h, w)`` of the image on the canvas.
      original_size: ``(H, W)`` of the original image.
      score_threshold: detections scoring below it are dropped.
      mask_threshold: threshold of the pasted probabilities.
      full_masks: also return ``masks``, the crops pasted into full-size
        images (N x H x W bytes: 30 MB for 100 detections on a 640 x 480
        photo; without them a detection costs its region).
      mask_paste: the model's ``mask_paste`` (``"torchvision"``: torchvision's
        pasting, see `paste_region`).

    Returns:
      ``boxes`` (N, 4) float64 ``(x1, y1, x2, y2)`` original pixels,
      ``scores`` (N,), ``classes`` (N,) int class ids, ``masks`` (N, H, W)
      uint8 (if ``full_masks``), in descending score order; ``mask_regions``
      (N, 4) int64 ``(row0, row1, col0, col1)``: mask ``n`` is 0 outside rows
      ``row0..row1-1`` and columns ``col0..col1-1``; and ``mask_crops``, N
      uint8 arrays: mask ``n`` in its region.
    """
    height, width = (int(n) for n in original_size)
    scale_y = height / float(resized_size[0])
    scale_x = width / float(resized_size[1])
    scores = np.asarray(outputs["scores"], np.float64)
    keep = np.flatnonzero(
        np.asarray(outputs["detection_valid"], bool) & (scores >= score_threshold)
    )
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    scale = np.array([scale_x, scale_y, scale_x, scale_y])
    pasted_boxes = np.asarray(outputs["boxes"], np.float64)[keep] * scale
    boxes = np.clip(pasted_boxes, 0.0, [width, height, width, height])
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep, boxes, pasted_boxes = keep[inside], boxes[inside], pasted_boxes[inside]
    mask_probs = np.asarray(outputs["mask_probs"])[keep]
    if mask_paste == "torchvision":
        pasted = [
            paste_region(probs, box, (height, width), mask_threshold, convention="torchvision")
            for probs, box in zip(mask_probs, pasted_boxes, strict=True)
        ]
    else:
        pasted = _paste_regions(mask_probs, pasted_boxes, (height, width), mask_threshold)
    crops = []
    regions = np.zeros((len(keep), 4), np.int64)
    for n, (row0, col0, crop) in enumerate(pasted):
        crops.append(crop)
        regions[n] = row0, row0 + crop.shape[0], col0, col0 + crop.shape[1]
    found = {
        "boxes": boxes,
        "scores": scores[keep],
        "classes": np.asarray(outputs["classes"])[keep].astype(np.int64),
        "mask_regions": regions,
        "mask_crops": crops,
    }
    if full_masks:
        found["masks"] = masks_from_crops(crops, regions, (height, width))
    return found


def masks_from_crops(
    crops: Sequence[np.ndarray], regions: np.ndarray, image_size: Sequence[int]
) -> np.ndarray:
    """``(N, H, W)`` uint8 masks, mask ``n`` being ``crops[n]`` at its region and 0 elsewhere.

    ``regions`` holds ``(row0, row1, col0, col1)`` per crop, as
    `detections_in_original` returns them.
    """
    height, width = (int(n) for n in image_size)
    masks = np.zeros((len(crops), height, width), np.uint8)
    for mask, crop, (row0, row1, col0, col1) in zip(masks, crops, regions.tolist(), strict=True):
        mask[row0:row1, col0:col1] = crop
    return masks


@functools.lru_cache(maxsize=8)
def _jitted_apply(model: nn.Module):
    return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


class InstanceSegmentationTask:
    """Mask R-CNN trained on boxes, labels and instance masks."""

    name = "instance"
    # The registry of this task's models: config.model.name -> flax module.
    models: dict[str, type[nn.Module]] = {"maskrcnn": MaskRCNN}
    renamed_model_fields = RENAMED_FIELDS  # Old config keys, named in the error.
    needs_instances = True  # The input pipeline emits boxes, labels and instance masks.

    def __init__(self, config: ml_collections.ConfigDict, metadata: Any, *, axis_name=None):
        if not getattr(metadata, "has_instances", True):
            raise ConfigError(
                f"Data set {metadata.name!r} has no instance annotations; the instance task "
                "needs boxes, labels and instance masks (e.g. data.name='jfcnn_shapes')."
            )
        self.config = config
        self.metadata = metadata
        self.num_classes = metadata.num_classes
        self.model = build_model(config, self.num_classes, self.models, bn_axis_name=axis_name)
        # Whether evaluation and prediction pass each image's size on its canvas to the
        # model (``config.data.resize = "torchvision"``, see jfcnn.data.pipeline).
        self.image_sizes_known = config.data.get("resize") == "torchvision"

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Rejects image sizes the model cannot use (see ``MaskRCNN.size_divisor``)."""
        model = build_model(config, 2, cls.models)
        size, divisor = config.data.image_size, model.size_divisor
        if size % divisor:
            below = max(1, size // divisor) * divisor
            raise ConfigError(
                f"Config key `data.image_size` is {size}; this Mask R-CNN needs a multiple of "
                f"{divisor} (e.g. {below} or {below + divisor})."
            )

    # -- model -------------------------------------------------------------
    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        size = self.config.data.image_size
        dummy = jnp.zeros((1, size, size, 3), jnp.float32)
        # `initialize` touches every layer without proposals, NMS or ROI Align,
        # which keeps the one-off initialization graph small.
        return dict(self.model.init(rng, dummy, method=MaskRCNN.initialize))

    # -- training ----------------------------------------------------------
    def loss_fn(self, params, model_state, batch, example_keys):
        """Mean loss over the (local) batch, new model state, and metrics."""
        variables = {"params": params, **model_state}
        targets = {
            key: batch[key] for key in ("boxes", "labels", "instance_masks", "instance_valid")
        }
        result = self.model.apply(
            variables,
            batch["image"],
            targets,
            example_keys,
            train=True,
            method=MaskRCNN.losses,
            mutable=list(model_state),
        )
        (losses, stats), new_state = result
        per_example = sum(losses[term] for term in LOSS_TERMS)
        metrics = {term: losses[term].mean() for term in LOSS_TERMS}
        metrics.update({key: value.mean() for key, value in stats.items()})
        return per_example.mean(), (dict(new_state), metrics)

    # -- evaluation --------------------------------------------------------
    def eval_step(self, variables, batch) -> dict[str, jax.Array]:
        # Resized as torchvision does (converted models), the model is told where each
        # image ends on the canvas, so the padding adds no proposals (as in torchvision).
        image_sizes = batch.get("resized_size") if self.image_sizes_known else None
        outputs = self.model.apply(variables, batch["image"], train=False, image_sizes=image_sizes)
        return {key: outputs[key] for key in EVAL_OUTPUTS}

    def new_evaluator(self, num_images: int) -> CocoEvaluator | AnnotationFileEvaluator:
        data = self.config.data
        if data.name == "coco_json":  # Scored against the user's own annotation file.
            split = str(data.get("eval_split", "validation"))
            key = "train_annotations" if split.startswith("train") else "eval_annotations"
            return AnnotationFileEvaluator(
                data[key], self.metadata, num_images, mask_paste=self.model.mask_paste
            )
        return CocoEvaluator(self.metadata.class_names, num_images)


# ---------------------------------------------------------------------------
# COCO evaluation

# Index of each summary number in COCOeval.stats (see COCOeval.summarize).
_STATS = {
    "AP": 0,
    "AP50": 1,
    "AP75": 2,
    "AP_small": 3,
    "AP_medium": 4,
    "AP_large": 5,
    "AR1": 6,
    "AR10": 7,
    "AR100": 8,
}
_IOU_TYPES = {"box": "bbox", "mask": "segm"}


def encode_masks(masks_nhw: np.ndarray) -> list[dict[str, Any]]:
    """COCO compressed RLEs (``{"size": [H, W], "counts": str}``) of (N, H, W) 0/1 masks."""
    masks_nhw = np.asarray(masks_nhw)
    if masks_nhw.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks_nhw.shape}")
    if not len(masks_nhw):
        return []
    # pycocotools reads column-major (H, W, N) uint8.
    rles = mask_utils.encode(np.asfortranarray(masks_nhw.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # JSON-serializable
    return rles


def _xywh(boxes_n4: np.ndarray) -> list[list[float]]:
    boxes = np.asarray(boxes_n4, np.float64)
    return np.stack(
        [boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=-1
    ).tolist()


def _picture(
    outputs: dict[str, np.ndarray],
    batch: dict[str, np.ndarray],
    i: int,
    class_names: Sequence[str],
    score_threshold: float,
) -> np.ndarray:
    """`visualize.instance_panel` of example ``i`` of a batch (canvas resolution)."""
    return visualize.instance_panel(
        batch["image"][i],
        outputs["boxes"][i],
        outputs["classes"][i],
        outputs["scores"][i],
        outputs["masks"][i],
        outputs["detection_valid"][i],
        class_names,
        gt_boxes=batch["boxes"][i],
        gt_classes=batch["labels"][i],
        gt_masks=batch["instance_masks"][i],
        gt_valid=batch["instance_valid"][i],
        score_threshold=score_threshold,
    )


def _check_shapes(outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> None:
    b, m = np.shape(batch["labels"])
    s = np.shape(batch["image"])[1]
    expected = {
        "image": (b, s, s, 3),
        "boxes": (b, m, 4),
        "instance_masks": (b, m, s, s),
        "instance_valid": (b, m),
        "valid": (b,),
    }
    for key, shape in expected.items():
        if np.shape(batch[key]) != shape:
            raise ValueError(f"batch[{key!r}] must have shape {shape}, got {np.shape(batch[key])}")
    d = np.shape(outputs["scores"])[-1]
    expected = {
        "boxes": (b, d, 4),
        "scores": (b, d),
        "classes": (b, d),
        "detection_valid": (b, d),
        "masks": (b, d, s, s),
    }
    for key, shape in expected.items():
        if np.shape(outputs[key]) != shape:
            raise ValueError(
                f"outputs[{key!r}] must have shape {shape}, got {np.shape(outputs[key])}"
            )


class CocoEvaluator:
    """Accumulates instance predictions over an eval split; COCO AP via pycocotools.

    Category ids are the class ids 1..K-1, named ``class_names[1:]``
    (``class_names[0]`` is the background). Ground-truth slots with
    ``instance_valid`` become annotations; slots marked ``crowd`` (``iscrowd``,
    optional batch key) become crowd annotations, which COCOeval uses only to
    ignore the detections that fall on them. Padding examples (``valid``
    False) and invalid detections are skipped.

    With several processes each one sees only its shard: the result then
    covers this process's examples only.

    Attributes:
      images: uint8 `visualize.instance_panel` pictures of the first
        ``num_images`` valid examples (detections scoring at least
        ``image_score_threshold``).
    """

    def __init__(
        self, class_names: Sequence[str], num_images: int, *, image_score_threshold: float = 0.5
    ):
        if len(class_names) < 2:
            raise ValueError(
                f"class_names must hold the background and at least one class, got {class_names}"
            )
        self.class_names = tuple(class_names)
        self.num_images = num_images
        self.image_score_threshold = image_score_threshold
        self.images: list[np.ndarray] = []
        self._image_infos: list[dict[str, Any]] = []
        self._annotations: list[dict[str, Any]] = []
        self._detections: list[dict[str, Any]] = []

    @property
    def num_examples(self) -> int:
        return len(self._image_infos)

    def update(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> None:
        """Adds one batch.

        Args:
          outputs: ``boxes`` (B, D, 4) pixel (x1, y1, x2, y2), ``scores`` (B, D),
            ``classes`` (B, D) int class ids 1..K-1, ``detection_valid`` (B, D)
            bool, ``masks`` (B, D, S, S) 0/1.
          batch: ``image`` (B, S, S, 3), ``boxes`` (B, M, 4) pixel-edge
            (x1, y1, x2, y2), ``labels`` (B, M) class ids, ``instance_masks``
            (B, M, S, S) 0/1, ``instance_valid`` (B, M) bool, ``valid`` (B,)
            bool, optional ``crowd`` (B, M) bool.
        """
        outputs = {k: np.asarray(v) for k, v in outputs.items()}
        batch = {k: np.asarray(v) for k, v in batch.items()}
        _check_shapes(outputs, batch)
        num_classes = len(self.class_names)
        crowd = batch.get("crowd", np.zeros_like(batch["instance_valid"]))
        height, width = batch["image"].shape[1:3]
        for i in np.flatnonzero(batch["valid"]):
            image_id = len(self._image_infos) + 1
            self._image_infos.append({"id": image_id, "height": height, "width": width})

            is_crowd = crowd[i].astype(bool)
            gt = np.flatnonzero(batch["instance_valid"][i].astype(bool) | is_crowd)
            labels = batch["labels"][i, gt]
            if np.any((labels < 1) | (labels >= num_classes)):
                raise ValueError(f"Ground-truth labels must be in 1..{num_classes - 1}: {labels}")
            gt_masks = batch["instance_masks"][i, gt]
            for k, rle, box, area in zip(
                gt,
                encode_masks(gt_masks),
                _xywh(batch["boxes"][i, gt]),
                gt_masks.sum(axis=(1, 2)).tolist(),
                strict=True,
            ):
                self._annotations.append(
                    {
                        "id": len(self._annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(batch["labels"][i, k]),
                        "segmentation": rle,
                        "area": float(area),
                        "bbox": box,
                        "iscrowd": int(is_crowd[k]),
                    }
                )

            det = np.flatnonzero(outputs["detection_valid"][i])
            classes = outputs["classes"][i, det]
            if np.any((classes < 1) | (classes >= num_classes)):
                raise ValueError(f"Detected classes must be in 1..{num_classes - 1}: {classes}")
            for k, rle, box in zip(
                det,
                encode_masks(outputs["masks"][i, det]),
                _xywh(outputs["boxes"][i, det]),
                strict=True,
            ):
                self._detections.append(
                    {
                        "image_id": image_id,
                        "category_id": int(outputs["classes"][i, k]),
                        "score": float(outputs["scores"][i, k]),
                        "bbox": box,
                        "segmentation": rle,
                    }
                )

            if len(self.images) < self.num_images:
                self.images.append(
                    _picture(outputs, batch, i, self.class_names, self.image_score_threshold)
                )

    def coco_ground_truth(self) -> dict[str, Any]:
        """The accumulated ground truth as a COCO annotation-file dict."""
        return {
            "images": list(self._image_infos),
            "annotations": list(self._annotations),
            "categories": [
                {"id": c, "name": name} for c, name in enumerate(self.class_names) if c > 0
            ],
        }

    def coco_detections(self) -> list[dict[str, Any]]:
        """The accumulated detections as a COCO results list (bbox and segmentation)."""
        return list(self._detections)

    def result(self) -> dict[str, Any]:
        """COCO metrics: ``{box,mask}_{AP,AP50,AP75,AP_small,AP_medium,AP_large,AR1,AR10,AR100}``.

        Also ``num_examples`` and ``{box,mask}_AP_per_class`` (class name -> AP).
        AP is 0 when there is ground truth but no detection, and NaN where it is
        undefined (no ground truth of any class, or of that class).
        """
        names = self.class_names[1:]
        result: dict[str, Any] = {"num_examples": self.num_examples}
        if not self._image_infos:
            for prefix in _IOU_TYPES:
                result.update({f"{prefix}_{key}": float("nan") for key in _STATS})
                result[f"{prefix}_AP_per_class"] = {name: float("nan") for name in names}
            return result
        # pycocotools prints progress and the summary table on stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth = COCO()
            ground_truth.dataset = self.coco_ground_truth()
            ground_truth.createIndex()
            for prefix, iou_type in _IOU_TYPES.items():
                stats, per_class = _evaluate(ground_truth, self._detections, iou_type)
                result.update({f"{prefix}_{key}": stats[index] for key, index in _STATS.items()})
                result[f"{prefix}_AP_per_class"] = dict(zip(names, per_class, strict=True))
        return result


def load_ground_truth(annotation_file: str) -> COCO:
    """The user's COCO annotation file as a pycocotools ``COCO``, ready for COCOeval.

    What COCOeval needs but exports may leave out is filled in as pycocotools
    computes it: a missing ``area`` is the mask's area (``COCO.annToRLE``), a
    missing ``bbox`` the mask's box, a missing ``iscrowd`` 0. Annotations
    that carry them are used as they are.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress.
        ground_truth = COCO(annotation_file)
        for annotation in ground_truth.dataset.get("annotations", []):
            annotation.setdefault("iscrowd", 0)
            if "area" not in annotation or not annotation.get("bbox"):
                rle = ground_truth.annToRLE(annotation)
                annotation.setdefault("area", float(mask_utils.area(rle)))
                if not annotation.get("bbox"):
                    annotation["bbox"] = mask_utils.toBbox(rle).tolist()
        ground_truth.createIndex()
    return ground_truth


class AnnotationFileEvaluator:
    """Scores detections against the user's own COCO annotation file (``coco_json`` data).

    Each valid example's detections are mapped back to its original image by
    `detections_in_original` (boxes scaled, masks pasted at the original
    resolution), their class ids turned into the file's category ids
    (``metadata.category_ids``) and tagged with the example's ``image_id``
    (batch key). `result` runs COCOeval on the file's ground truth, restricted
    to the images seen, so its AP is what pycocotools gives for that file and
    these detections (crowd regions ignored, areas as the file gives them).
    The metric keys are `CocoEvaluator`'s, so ``metrics.json`` reads the same.

    Attributes:
      images: pictures of the first ``num_images`` valid examples at the
        model's resolution, as `CocoEvaluator` draws them.
    """

    def __init__(
        self,
        annotation_file: str,
        metadata: Any,
        num_images: int,
        *,
        image_score_threshold: float = 0.5,
        mask_paste: str = "centers",
    ):
        self.mask_paste = mask_paste  # The model's (see `detections_in_original`).
        if not annotation_file:
            raise ConfigError(
                "Config key `data.eval_annotations` is not set; scoring a coco_json data set "
                "needs the COCO annotation file of its eval images."
            )
        self.annotation_file = str(annotation_file)
        self.class_names = tuple(metadata.class_names)
        self.category_ids = tuple(int(c) for c in metadata.category_ids)
        self.num_images = num_images
        self.image_score_threshold = image_score_threshold
        self.images: list[np.ndarray] = []
        self.ground_truth = load_ground_truth(self.annotation_file)
        self._image_ids: list[int] = []
        self._detections: list[dict[str, Any]] = []

    @property
    def num_examples(self) -> int:
        return len(self._image_ids)

    def update(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> None:
        """Adds one batch.

        Args:
          outputs: the model's `EVAL_OUTPUTS` (see `predict`), on the canvas.
          batch: an eval batch with ``image_id`` (B,), ``original_size`` (B, 2)
            and ``resized_size`` (B, 2), ``valid`` (B,), and the canvas ground
            truth for the pictures.
        """
        outputs = {k: np.asarray(v) for k, v in outputs.items()}
        batch = {k: np.asarray(v) for k, v in batch.items()}
        if "image_id" not in batch:
            raise ValueError("Eval batches must carry `image_id` to score against a file.")
        num_classes = len(self.class_names)
        for i in np.flatnonzero(batch["valid"]):
            image_id = int(batch["image_id"][i])
            self._check_image(image_id, batch["original_size"][i])
            self._image_ids.append(image_id)
            found = detections_in_original(
                {key: value[i] for key, value in outputs.items()},
                batch["resized_size"][i],
                batch["original_size"][i],
                mask_paste=self.mask_paste,
            )
            classes = found["classes"]
            if np.any((classes < 1) | (classes >= num_classes)):
                raise ValueError(f"Detected classes must be in 1..{num_classes - 1}: {classes}")
            for class_id, score, box, rle in zip(
                classes.tolist(),
                found["scores"].tolist(),
                _xywh(found["boxes"]),
                encode_masks(found["masks"]),
                strict=True,
            ):
                self._detections.append(
                    {
                        "image_id": image_id,
                        "category_id": self.category_ids[class_id],
                        "score": float(score),
                        "bbox": box,
                        "segmentation": rle,
                    }
                )
            if len(self.images) < self.num_images:
                self.images.append(
                    _picture(outputs, batch, i, self.class_names, self.image_score_threshold)
                )

    def _check_image(self, image_id: int, original_size: Sequence[int]) -> None:
        """Stops scoring images against a file that is not theirs (ids alone would match)."""
        record = self.ground_truth.imgs.get(image_id)
        size = [int(n) for n in original_size]
        if record is None or [record["height"], record["width"]] != size:
            listed = (
                "not listed"
                if record is None
                else (f"{record['height']}x{record['width']} (height x width) there")
            )
            raise ConfigError(
                f"The eval data has an image {image_id} of {size[0]}x{size[1]} pixels, but in "
                f"{self.annotation_file} image {image_id} is {listed}: the eval images are not "
                "that file's. Set data.eval_annotations to the file the eval images come from."
            )

    def coco_detections(self) -> list[dict[str, Any]]:
        """The detections as a COCO results list (original pixels, the file's ids)."""
        return list(self._detections)

    def result(self) -> dict[str, Any]:
        """COCO metrics with `CocoEvaluator.result`'s keys, against the annotation file."""
        names = self.class_names[1:]
        result: dict[str, Any] = {"num_examples": self.num_examples}
        if not self._image_ids:
            for prefix in _IOU_TYPES:
                result.update({f"{prefix}_{key}": float("nan") for key in _STATS})
                result[f"{prefix}_AP_per_class"] = {name: float("nan") for name in names}
            return result
        with contextlib.redirect_stdout(io.StringIO()):
            for prefix, iou_type in _IOU_TYPES.items():
                stats, per_class = _evaluate(
                    self.ground_truth,
                    self._detections,
                    iou_type,
                    image_ids=set(self._image_ids),
                    category_ids=self.category_ids[1:],
                )
                result.update({f"{prefix}_{key}": stats[index] for key, index in _STATS.items()})
                result[f"{prefix}_AP_per_class"] = dict(zip(names, per_class, strict=True))
        return result


def _evaluate(
    ground_truth: COCO,
    detections: list[dict[str, Any]],
    iou_type: str,
    *,
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
) -> tuple[list[float], list[float]]:
    """Runs COCOeval; returns its 12 summary numbers and the AP of each category.

    ``image_ids`` and ``category_ids`` restrict the evaluation (COCOeval's
    ``params.imgIds`` / ``catIds``); None: all of ``ground_truth``'s.
    """
    if detections:
        results = copy.deepcopy(detections)  # loadRes writes into the dicts.
        if iou_type == "segm":
            # With a bbox present, loadRes takes the box area as the detection's
            # area; without it, the mask area (as for mask AP elsewhere).
            for det in results:
                del det["bbox"]
        else:
            for det in results:
                del det["segmentation"]
        predicted = ground_truth.loadRes(results)
    else:
        # loadRes rejects an empty list; an empty result set scores 0 AP.
        predicted = COCO()
        predicted.dataset = {
            "images": ground_truth.dataset["images"],
            "categories": ground_truth.dataset["categories"],
            "annotations": [],
        }
        predicted.createIndex()
    coco_eval = COCOeval(ground_truth, predicted, iou_type)
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(image_ids)
    if category_ids is not None:
        coco_eval.params.catIds = sorted(category_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    # COCOeval marks undefined values (no ground truth) with -1.
    stats = [float(v) if v > -1 else float("nan") for v in coco_eval.stats]
    # precision: (IoU thresholds, recall thresholds, categories, area ranges, max dets);
    # area range 0 is "all", max dets -1 is 100.
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    per_class = []
    for k in range(precision.shape[2]):
        defined = precision[:, :, k][precision[:, :, k] > -1]
        per_class.append(float(defined.mean()) if defined.size else float("nan"))
    return stats, per_class
