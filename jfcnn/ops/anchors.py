"""Anchor boxes over feature-map grids, as torchvision's ``AnchorGenerator``.

Anchors depend only on static shapes (grid sizes, strides, sizes, aspect
ratios), so they are computed with NumPy and enter a jitted function as
constants: call these at trace time, inside or outside ``jit``. The values and
their order match ``torchvision.models.detection.anchor_utils.AnchorGenerator``
exactly, so torchvision-trained RPN weights line up with them.

Dimension letters used in the docstrings:

* ``H``, ``W``: feature-map (grid) height and width.
* ``A``: anchors per location, ``len(aspect_ratios) * len(sizes)``.
* ``L``: number of feature levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jfcnn.ops._util import pair


def generate_anchors(
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    dtype: np.dtype = np.float32,
) -> np.ndarray:
    """Zero-centered cell anchors, one per (aspect ratio, size) pair.

    torchvision's ``AnchorGenerator.generate_anchors``: with ratio
    ``r = h / w``, an anchor of size ``s`` has width ``s / sqrt(r)`` and height
    ``s * sqrt(r)``; corners are rounded half to even (``torch.round``).
    Computed in float32 like torchvision, then cast to ``dtype``.

    Args:
      sizes: anchor sizes (square root of the area) in pixels.
      aspect_ratios: height / width ratios.

    Returns:
      ``(A, 4)`` boxes ``(x1, y1, x2, y2)``, ratio-major: row
      ``i * len(sizes) + j`` has ``aspect_ratios[i]`` and ``sizes[j]``.

    Raises:
      ValueError: if ``sizes`` or ``aspect_ratios`` is empty or not 1-D.

    >>> generate_anchors((32,), (0.5, 1.0, 2.0))
    array([[-23., -11.,  23.,  11.],
           [-16., -16.,  16.,  16.],
           [-11., -23.,  11.,  23.]], dtype=float32)
    """
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    if scales.ndim != 1 or scales.size == 0 or ratios.ndim != 1 or ratios.size == 0:
        raise ValueError(
            "sizes and aspect_ratios must be non-empty 1-D sequences, got shapes "
            f"{scales.shape} and {ratios.shape}"
        )
    # Same float32 operations as torchvision, so the values round identically.
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base_anchors = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
    return np.round(base_anchors).astype(dtype)  # np.round rounds half to even


def grid_anchors(
    base_anchors: np.ndarray,
    grid_size: int | Sequence[int],
    stride: int | Sequence[int],
) -> np.ndarray:
    """Places the cell anchors at every location of one feature map.

    Location ``(y, x)`` is shifted by ``(x * stride_w, y * stride_h)`` (the
    top-left corner of its cell, as torchvision; not the cell center).

    Args:
      base_anchors: ``(A, 4)`` zero-centered anchors from
        :func:`generate_anchors`.
      grid_size: ``(H, W)`` of the feature map, or one int for both.
      stride: ``(stride_h, stride_w)`` in pixels, or one int for both.

    Returns:
      ``(H * W * A, 4)`` anchors in the dtype of ``base_anchors``, row-major
      over locations with all ``A`` anchors of a location together: row
      ``(y * W + x) * A + a``.

    Raises:
      ValueError: if ``base_anchors`` is not ``(A, 4)`` or a size is not
        positive ints.

    >>> grid_anchors(np.array([[-8.0, -8.0, 8.0, 8.0]], np.float32), (1, 2), 16)
    array([[-8., -8.,  8.,  8.],
           [ 8., -8., 24.,  8.]], dtype=float32)
    """
    base_anchors = np.asarray(base_anchors)
    if base_anchors.ndim != 2 or base_anchors.shape[1] != 4:
        raise ValueError(f"base_anchors must have shape (A, 4), got {base_anchors.shape}")
    grid_h, grid_w = pair(grid_size, "grid_size", minimum=1)
    stride_h, stride_w = pair(stride, "stride", minimum=1)
    # Integer shifts first, as torchvision (int32 arange times the stride).
    shifts_x = np.arange(grid_w, dtype=np.int64) * stride_w
    shifts_y = np.arange(grid_h, dtype=np.int64) * stride_h
    shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1).astype(base_anchors.dtype)
    return (shifts[:, None, :] + base_anchors[None, :, :]).reshape(-1, 4)


def anchor_strides(
    image_size: Sequence[int], grid_sizes: Sequence[Sequence[int]]
) -> list[tuple[int, int]]:
    """Per-level strides the way torchvision derives them: ``image // grid``.

    Args:
      image_size: ``(h, w)`` of the (padded) input batch.
      grid_sizes: ``L`` feature-map sizes ``(H, W)``.

    Returns:
      ``L`` pairs ``(h // H, w // W)``.

    Raises:
      ValueError: if a size is not a pair of positive ints.

    >>> anchor_strides((800, 1216), [(200, 304), (100, 152)])
    [(4, 4), (8, 8)]
    """
    image_h, image_w = pair(tuple(image_size), "image_size", minimum=1)
    strides = []
    for grid_size in grid_sizes:
        grid_h, grid_w = pair(tuple(grid_size), "grid_size", minimum=1)
        strides.append((image_h // grid_h, image_w // grid_w))
    return strides


def multilevel_anchors(
    grid_sizes: Sequence[int | Sequence[int]],
    strides: Sequence[int | Sequence[int]],
    sizes: Sequence[Sequence[float]],
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]],
    dtype: np.dtype = np.float32,
) -> np.ndarray:
    """Anchors of all feature levels, concatenated level after level.

    The output of ``AnchorGenerator(sizes, aspect_ratios)`` for one image
    whose feature maps have ``grid_sizes`` (and strides ``strides``, see
    :func:`anchor_strides`).

    Args:
      grid_sizes: ``L`` feature-map sizes ``(H, W)`` (or ints for square maps).
      strides: ``L`` strides ``(stride_h, stride_w)`` (or ints).
      sizes: ``L`` sequences of anchor sizes, one per level, e.g.
        ``((32,), (64,), (128,), (256,), (512,))`` for an FPN.
      aspect_ratios: ``L`` sequences of ratios, or one sequence shared by all
        levels.

    Returns:
      ``(sum_l H_l * W_l * A_l, 4)`` anchors ``(x1, y1, x2, y2)`` in ``dtype``.

    Raises:
      ValueError: if the per-level sequences differ in length.

    >>> multilevel_anchors([(2, 2), (1, 1)], [16, 32], [(32,), (64,)], (1.0,)).shape
    (5, 4)
    """
    if len(aspect_ratios) > 0 and not isinstance(aspect_ratios[0], Sequence):
        aspect_ratios = [aspect_ratios] * len(sizes)  # type: ignore[list-item]
    if not len(grid_sizes) == len(strides) == len(sizes) == len(aspect_ratios):
        raise ValueError(
            "grid_sizes, strides, sizes and aspect_ratios need one entry per level, got "
            f"lengths {len(grid_sizes)}, {len(strides)}, {len(sizes)}, {len(aspect_ratios)}"
        )
    levels = [
        grid_anchors(generate_anchors(level_sizes, level_ratios), grid_size, stride)
        for grid_size, stride, level_sizes, level_ratios in zip(
            grid_sizes, strides, sizes, aspect_ratios, strict=True
        )
    ]
    return np.concatenate(levels, axis=0).astype(dtype)
