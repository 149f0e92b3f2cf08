"""Pictures for TensorBoard and evaluation: input | ground truth | prediction."""

from __future__ import annotations

import numpy as np


def palette(num_colors: int) -> np.ndarray:
    """A fixed ``(num_colors, 3)`` uint8 palette; color 0 (background) is black."""
    rng = np.random.default_rng(0)
    colors = rng.integers(64, 256, size=(max(num_colors, 1), 3), dtype=np.uint8)
    base = np.array(
        [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]],
        np.uint8,
    )
    colors[: min(len(base), num_colors)] = base[:num_colors]
    return colors


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (or uint8) to uint8 ``(H, W, 3)``."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def overlay(
    image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5
) -> np.ndarray:
    """Blends class colors of ``mask (H, W)`` over ``image``; class 0 stays unpainted."""
    image = to_uint8(image).astype(np.float32)
    colors = palette(num_classes)[np.clip(mask, 0, num_classes - 1)].astype(np.float32)
    painted = (mask > 0)[..., None]
    blended = np.where(painted, (1 - alpha) * image + alpha * colors, image)
    return np.round(blended).astype(np.uint8)


def segmentation_panel(
    image: np.ndarray, label: np.ndarray, prediction: np.ndarray, num_classes: int
) -> np.ndarray:
    """``(H, 3W + 4, 3)`` uint8: input | ground truth overlay | prediction overlay."""
    image8 = to_uint8(image)
    gap = np.full((image8.shape[0], 2, 3), 255, np.uint8)
    return np.concatenate(
        [
            image8,
            gap,
            overlay(image8, label, num_classes),
            gap,
            overlay(image8, prediction, num_classes),
        ],
        axis=1,
    )


def save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(to_uint8(image)).save(path)
