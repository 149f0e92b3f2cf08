"""paste_region against the bilinear paste written out as dense float64 matrices.

The pasted value of a pixel is ``wy @ mask @ wx.T`` with ``w[i, j] = max(0, 1 -
|position_i - j|)`` (the formula of ``jfcnn.ops.detection.paste_masks``);
``paste_region`` must threshold exactly that within the region it returns,
but for pixels within float32 rounding of the threshold.
"""

from __future__ import annotations

import numpy as np
import pytest

from jfcnn.tasks import instance


def reference_values(mask: np.ndarray, box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float64 pasted values over the whole image."""

    def weights(start: float, end: float, cells: int, pixels: int) -> np.ndarray:
        length = max(end - start, 1e-6)
        position = (np.arange(pixels) + 0.5 - start) / length * cells - 0.5
        return np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(cells)))

    x1, y1, x2, y2 = box
    wy = weights(y1, y2, mask.shape[0], size[0])
    wx = weights(x1, x2, mask.shape[1], size[1])
    return wy @ mask.astype(np.float64) @ wx.T


def assert_pastes_like_reference(masks, boxes, size, threshold) -> int:
    """Checks each box's paste_region; returns how many pixels are set."""
    ones = 0
    for mask, box in zip(masks, boxes, strict=True):
        values = reference_values(mask, box, size)
        row0, col0, crop = instance.paste_region(mask, box, size, threshold)
        assert crop.dtype == np.uint8
        rows, cols = slice(row0, row0 + crop.shape[0]), slice(col0, col0 + crop.shape[1])
        # The region: the box and one pixel around it, clipped to the image.
        x1, y1, x2, y2 = box
        assert (row0, col0) == (max(int(np.floor(y1)) - 1, 0), max(int(np.floor(x1)) - 1, 0))
        assert crop.shape == (
            max(min(int(np.ceil(y2)) + 1, size[0]) - row0, 0),
            max(min(int(np.ceil(x2)) + 1, size[1]) - col0, 0),
        )
        # Pixels outside the box stay below 0.5: from 0.5 on, the region holds the whole
        # paste (below, paste_region leaves out what reaches beyond it).
        outside = values.copy()
        outside[rows, cols] = 0
        assert (outside < 0.5).all()
        want = values[rows, cols] >= threshold
        undecided = np.abs(values[rows, cols] - threshold) <= 1e-5
        np.testing.assert_array_equal(np.where(undecided, 0, crop), np.where(undecided, 0, want))
        ones += int(crop.sum())
    return ones


def random_boxes(rng, num: int, size: tuple[int, int], scale: float) -> np.ndarray:
    """Boxes of sides up to ``scale`` pixels, some partly or wholly outside the image."""
    height, width = size
    x1 = rng.uniform(-scale - 3, width + 3, num)
    y1 = rng.uniform(-scale - 3, height + 3, num)
    return np.stack([x1, y1, x1 + rng.uniform(0, scale, num), y1 + rng.uniform(0, scale, num)], -1)


@pytest.mark.parametrize("scale", [0.7, 12.0, 60.0, 400.0])
@pytest.mark.parametrize("cells", [1, 3, 28])
def test_paste_region_is_the_dense_bilinear_paste(scale, cells):
    # Box sides below a pixel, below the mask's cells, around and far above the image.
    rng = np.random.default_rng(int(scale * 10) + cells)
    size = (37, 53)
    num = 40
    boxes = random_boxes(rng, num, size, scale)
    boxes[:3] = [[-0.4, -0.3, 0.2, 0.1], [52.9, 36.6, 53.5, 37.4], [10.5, 10.5, 10.5, 10.5]]
    masks = [
        rng.random((num, cells, cells)),  # Soft.
        (rng.random((num, cells, cells)) < 0.5).astype(np.float64),  # Hard edges.
        rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], (num, cells, cells)),  # Cells at thresholds.
        np.ones((num, cells, cells)),
    ]
    ones = 0
    for threshold in (0.5, 0.3, 0.75):
        for mask in masks:
            ones += assert_pastes_like_reference(mask.astype(np.float32), boxes, size, threshold)
    assert ones > 0


def test_paste_region_of_tall_boxes_and_wide_images():
    # Hundreds of pixel rows between two rows of cells; a box far wider than the image.
    rng = np.random.default_rng(3)
    size = (700, 9)
    masks = rng.random((3, 2, 3)).astype(np.float32)
    boxes = np.array([[1.5, 3.2, 7.7, 690.1], [-300.0, -50.0, 40.0, 800.0], [2, 0, 6, 700]])
    assert assert_pastes_like_reference(masks, boxes, size, 0.5) > 0


@pytest.mark.parametrize("mask_paste", ["centers", "torchvision"])
def test_detections_in_original_crops_are_paste_region(mask_paste):
    # Enough wide boxes that the boxes are pasted in several groups.
    rng = np.random.default_rng(4)
    size, num = (40, 500), 200
    x1, y1 = rng.uniform(-40, 400, num), rng.uniform(-10, 35, num)
    boxes = np.stack([x1, y1, x1 + rng.uniform(100, 480, num), y1 + rng.uniform(1, 40, num)], -1)
    outputs = {
        "boxes": boxes.astype(np.float32),
        "scores": rng.random(num).astype(np.float32),
        "classes": rng.integers(1, 3, num),
        "detection_valid": np.ones(num, bool),
        "mask_probs": rng.random((num, 28, 28)).astype(np.float32),
    }
    found = instance.detections_in_original(
        outputs, size, size, full_masks=False, mask_paste=mask_paste
    )
    # The detections it keeps: by descending score, boxes with area in the image.
    order = np.argsort(-outputs["scores"], kind="stable")
    clipped = np.clip(outputs["boxes"][order], 0, [500, 40, 500, 40])
    keep = order[(clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])]
    assert len(found["mask_crops"]) == len(keep) > 100
    for n, crop, region in zip(keep, found["mask_crops"], found["mask_regions"], strict=True):
        box = outputs["boxes"][n].astype(np.float64)
        row0, col0, want = instance.paste_region(
            outputs["mask_probs"][n], box, size, convention=mask_paste
        )
        assert region.tolist() == [row0, row0 + want.shape[0], col0, col0 + want.shape[1]]
        np.testing.assert_array_equal(crop, want)
    assert sum(crop.shape[1] for crop in found["mask_crops"]) > 2**15  # Several groups.


def test_pixels_exactly_at_the_threshold_are_set():
    # 0/1 masks in boxes of 2 and 1 pixels per cell: pixel centers fall between two cells,
    # so many pixels read exactly 0.5 (rising and falling edges alike).
    rng = np.random.default_rng(5)
    size = (30, 30)
    masks = (rng.random((40, 4, 4)) < 0.5).astype(np.float32)
    corners = rng.integers(-3, 25, (40, 2)).astype(np.float64)
    sides = rng.choice([2.0, 1.0], (40, 1))
    boxes = np.concatenate([corners, corners + sides], axis=1)
    for mask, box in zip(masks, boxes, strict=True):
        values = reference_values(mask, box, size)
        row0, col0, crop = instance.paste_region(mask, box, size)
        want = values[row0 : row0 + crop.shape[0], col0 : col0 + crop.shape[1]] >= 0.5
        np.testing.assert_array_equal(crop, want)
