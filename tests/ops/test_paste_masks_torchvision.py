"""paste_masks_torchvision against torchvision's own paste_masks_in_image."""

from __future__ import annotations

import numpy as np
import pytest

from jfcnn.ops.detection import paste_masks_torchvision


@pytest.mark.parametrize("mask_size", [28, 14])
def test_equals_torchvision_paste_masks_in_image(mask_size):
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rng = np.random.default_rng(mask_size)
    masks = rng.uniform(size=(200, mask_size, mask_size)).astype(np.float32)
    # Boxes inside a 100 x 130 image (torchvision fails on boxes wholly outside),
    # from under a pixel to the whole image, at fractional positions.
    a, c = rng.uniform(0, 1, size=(2, 200, 2))
    boxes = np.concatenate([np.minimum(a, c), np.maximum(a, c)], 1) * [130, 100, 130, 100]
    boxes[:5] = [
        [0, 0, 130, 100],
        [3.2, 4.7, 3.9, 5.1],
        [0, 0, 0.5, 0.5],
        [129, 99, 130, 100],
        [10.5, 20.5, 60.5, 70.5],
    ]
    boxes = boxes.astype(np.float32)
    want = paste_masks_in_image(
        torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (100, 130)
    )
    got = paste_masks_torchvision(masks, boxes, (100, 130), threshold=None)
    np.testing.assert_allclose(got, want[:, 0].numpy(), atol=1e-5)
    binary = paste_masks_torchvision(masks, boxes, (100, 130))
    np.testing.assert_array_equal(binary, (want[:, 0].numpy() >= 0.5).astype(np.uint8))
