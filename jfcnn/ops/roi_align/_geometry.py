"""ROI Align geometry shared by both forms: sample positions, counts, FPN levels.

Both forms first pass the boxes through `kept_boxes`, which swaps every box
with a non-finite coordinate for a zero box and masks it out, so that it
pools zeros with zero gradients. The sample geometry is computed per box and per axis, following the
torchvision CPU kernel operation by operation, so that the gather form
(`_kernel`) and the dense form (`_dense`) place their samples, and floor them,
exactly alike. The FPN level rule and the pyramid checks are shared by
`multilevel_roi_align` and `multilevel_roi_align_dense`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jfcnn.ops._util import check_int


def kept_boxes(boxes: jax.Array, keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Boxes safe to pool, and which of them pool at all.

    A box with a NaN or infinite coordinate (or with `keep` False) is replaced
    by the zero box: its sample positions and weights then stay finite, so
    masking its samples gives zeros forward and zero gradients backward,
    where `0 * inf` and `inf - inf` would have given NaN. The `where` also
    sends a zero gradient to the box itself. Finite kept boxes pass through
    unchanged, so their values and gradients are exactly those without it.

    Args:
      boxes: `(..., 4)` boxes.
      keep: optional `(...)` bool; False masks a box out as well.

    Returns:
      `(boxes, kept)`: `(..., 4)` boxes with the masked ones zeroed, and the
      `(...)` bool mask of the boxes that pool.
    """
    kept = jnp.all(jnp.isfinite(boxes), axis=-1)
    if keep is not None:
        kept = kept & keep
    return jnp.where(kept[..., None], boxes, jnp.zeros((), boxes.dtype)), kept


def axis_samples(
    start: jax.Array,
    end: jax.Array,
    size: jax.Array | int,
    pooled: int,
    grid: jax.Array,
    max_grid: int,
    aligned: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Bilinear taps of the samples of one box along one axis.

    Args:
      start, end: the box's extent on the feature map (already scaled and,
        for `aligned`, shifted by -0.5).
      size: the feature map's extent along this axis (H or W).
      pooled: number of bins along this axis (PH or PW).
      grid: number of samples per bin along this axis (dynamic, <= max_grid).
      max_grid: static number of sample slots per bin.
      aligned: whether the box is kept as is (True) or grown to >= 1 pixel.

    Returns:
      `(lo, hi, frac, valid)`, each `(pooled, max_grid)`: the sample's lower and
      upper pixel index, its weight on `hi` (`1 - frac` goes to `lo`), and 1.0
      where the slot holds a sample that counts (0.0 for unused slots and for
      samples outside `[-1, size]`).
    """
    length = end - start
    if not aligned:
        # Legacy Detectron behaviour: force malformed ROIs to be 1x1.
        length = jnp.maximum(length, 1.0)
    bin_size = length / pooled
    p = jnp.arange(pooled, dtype=start.dtype)[:, None]
    i = jnp.arange(max_grid, dtype=start.dtype)[None, :]
    # In the torchvision kernel's operation order, so that floors agree.
    pos = (start + p * bin_size) + (i + 0.5) * bin_size / jnp.maximum(grid, 1).astype(start.dtype)
    valid = (i < grid) & (pos >= -1.0) & (pos <= size)
    pos = jnp.maximum(pos, 0.0)
    lo = jnp.floor(pos)
    at_top = lo >= size - 1
    lo = jnp.where(at_top, size - 1, lo)
    pos = jnp.where(at_top, lo, pos)
    hi = jnp.where(at_top, lo, lo + 1)
    # Where lo, hi and valid are piecewise constant, only `frac` carries the
    # derivative with respect to the box.
    frac = pos - lax.stop_gradient(lo)
    return lo.astype(jnp.int32), hi.astype(jnp.int32), frac, valid.astype(start.dtype)


def grid_count(
    length: jax.Array, pooled: int, sampling_ratio: int, max_sampling_ratio: int, aligned: bool
) -> jax.Array:
    """Samples per bin along one axis of a box of extent `length` (int32).

    `sampling_ratio` if positive, else torchvision's adaptive count
    `ceil(length / pooled)` (<= 0 for an empty aligned box: no samples,
    output 0), capped at `max_sampling_ratio`.
    """
    if sampling_ratio > 0:
        return jnp.full(jnp.shape(length), sampling_ratio, jnp.int32)
    if not aligned:
        length = jnp.maximum(length, 1.0)
    grid = jnp.clip(jnp.ceil(length / pooled), 0, max_sampling_ratio)
    return lax.stop_gradient(grid).astype(jnp.int32)


def fpn_levels(
    boxes: jax.Array,
    *,
    k_min: int,
    k_max: int,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> jax.Array:
    """FPN level index (0 = `k_min`) of each box, as torchvision's `LevelMapper`.

    `clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps),
    k_min, k_max) - k_min` (Eqn. 1 of the FPN paper), computed in the boxes'
    dtype. Boxes with a negative area (x2 < x1 xor y2 < y1) go to level 0.

    Args:
      boxes: `(..., 4)` boxes `(x1, y1, x2, y2)` in image coordinates.
      k_min, k_max: pyramid levels of the finest and coarsest map (log2 stride).
      canonical_scale, canonical_level: a box of `canonical_scale` squared area
        goes to level `canonical_level`.
      eps: guards the floor against rounding at exact powers of two.

    Returns:
      `(...)` int32 level indices in `[0, k_max - k_min]`.
    """
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    s = jnp.sqrt(area)
    target = jnp.floor(canonical_level + jnp.log2(s / canonical_scale) + jnp.asarray(eps, s.dtype))
    target = jnp.where(jnp.isnan(target), k_min, target)
    target = jnp.clip(target, k_min, k_max)
    return (target - k_min).astype(jnp.int32)


# Cap on the adaptive sample count per bin axis in both multilevel forms: FPN
# level assignment keeps boxes at a few feature pixels on their level.
MULTILEVEL_MAX_SAMPLING_RATIO = 8


def check_pyramid(
    features: Sequence[jax.Array], boxes: jax.Array, strides: Sequence[int]
) -> tuple[list[jax.Array], jax.Array, tuple[int, ...]]:
    """Validates the inputs of a multilevel ROI Align; returns them as arrays.

    Raises `ValueError` / `TypeError` naming the problem: levels and strides
    that do not pair up, strides that are not doubling powers of two, levels
    with other batch sizes, channels or dtypes, non-float inputs, and boxes
    that are not `(B, N, 4)`.
    """
    features = [jnp.asarray(f) for f in features]
    strides = tuple(check_int("strides[i]", s) for s in strides)
    if not features:
        raise ValueError("features must hold at least one level")
    if len(strides) != len(features):
        raise ValueError(
            f"strides {strides} must have one entry per feature level ({len(features)} given)"
        )
    for s in strides:
        if s < 1 or s & (s - 1):
            raise ValueError(f"strides must be powers of two, got {strides}")
    if any(b != 2 * a for a, b in zip(strides[:-1], strides[1:], strict=True)):
        raise ValueError(f"consecutive strides must double (finest first), got {strides}")
    first = features[0]
    for i, f in enumerate(features):
        if f.ndim != 4:
            raise ValueError(f"features[{i}] must be (B, H, W, C), got shape {f.shape}")
        if f.shape[0] != first.shape[0] or f.shape[3] != first.shape[3]:
            raise ValueError(
                f"features[{i}] has shape {f.shape}; all levels need the B and C of "
                f"features[0] {first.shape}"
            )
        if f.dtype != first.dtype:
            raise TypeError(f"features[{i}] has dtype {f.dtype}, features[0] has {first.dtype}")
        if min(f.shape[1:3]) < 1:
            raise ValueError(f"features[{i}] has an empty spatial extent: {f.shape}")
    boxes = jnp.asarray(boxes)
    if not jnp.issubdtype(first.dtype, jnp.floating):
        raise TypeError(f"features must be floating point, got dtype {first.dtype}")
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        raise TypeError(f"boxes must be floating point, got dtype {boxes.dtype}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != first.shape[0]:
        raise ValueError(
            f"boxes must be (B, N, 4) with B = {first.shape[0]} (from features[0]), got "
            f"{boxes.shape}"
        )
    return features, boxes, strides


def check_valid_hw(valid_hw: Any, shape: tuple[int, ...]) -> jax.Array | None:
    """Checks an optional integer `valid_hw` of the given `shape`; returns it as int32.

    Raises TypeError for non-integers and ValueError (printing the shape) for
    another shape.
    """
    if valid_hw is None:
        return None
    valid_hw = jnp.asarray(valid_hw)
    if not jnp.issubdtype(valid_hw.dtype, jnp.integer):
        raise TypeError(f"valid_hw must be integers, got dtype {valid_hw.dtype}")
    if valid_hw.shape != tuple(shape):
        raise ValueError(f"valid_hw must have shape {tuple(shape)}, got {valid_hw.shape}")
    return valid_hw.astype(jnp.int32)


def level_extents(valid_hw: jax.Array, stride: int, level_hw: tuple[int, int]) -> jax.Array:
    """`(..., 2)` extent of a level of `stride` and size `level_hw` within `valid_hw`.

    `ceil(valid_hw / stride)` (torchvision's feature size on a batch padded to
    `valid_hw`; exact for a `valid_hw` that `stride` divides), clamped to
    `[1, level_hw]`.
    """
    extent = -(-valid_hw // stride)
    return jnp.clip(extent, 1, jnp.asarray(level_hw, jnp.int32))


def check_roi_inputs(features: Any, boxes: Any, box_indices: Any) -> tuple[Any, Any, Any]:
    """Checks the three input forms of `roi_align` and `roi_pool`; returns them as arrays.

    ``(H, W, C)`` features with ``(N, 4)`` boxes; ``(B, H, W, C)`` with
    ``(B, N, 4)``; or ``(B, H, W, C)`` with flat ``(K, 4)`` boxes and ``(K,)``
    integer ``box_indices``. Raises TypeError or ValueError naming the problem.
    """
    features = jnp.asarray(features)
    boxes = jnp.asarray(boxes)
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise TypeError(f"features must be floating point, got dtype {features.dtype}")
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        raise TypeError(f"boxes must be floating point, got dtype {boxes.dtype}")
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must end in a dimension of 4 (x1, y1, x2, y2), got {boxes.shape}")

    if features.ndim == 3:
        if box_indices is not None:
            raise ValueError(
                "box_indices is only for batched features (B, H, W, C), got features "
                f"of shape {features.shape}"
            )
        if boxes.ndim != 2:
            raise ValueError(f"features (H, W, C) need boxes (N, 4), got boxes {boxes.shape}")
    elif features.ndim == 4:
        if box_indices is None:
            if boxes.ndim != 3 or boxes.shape[0] != features.shape[0]:
                raise ValueError(
                    f"features {features.shape} (B, H, W, C) need per-image boxes (B, N, 4) "
                    f"with the same B, or flat boxes (K, 4) with box_indices; got boxes "
                    f"{boxes.shape}"
                )
        else:
            box_indices = jnp.asarray(box_indices)
            if not jnp.issubdtype(box_indices.dtype, jnp.integer):
                raise TypeError(f"box_indices must be integers, got dtype {box_indices.dtype}")
            if boxes.ndim != 2 or box_indices.shape != boxes.shape[:1]:
                raise ValueError(
                    f"flat form needs boxes (K, 4) and box_indices (K,), got boxes {boxes.shape} "
                    f"and box_indices {box_indices.shape}"
                )
    else:
        raise ValueError(f"features must be (H, W, C) or (B, H, W, C), got shape {features.shape}")
    if min(features.shape[-3:-1]) < 1:
        raise ValueError(f"features must have a non-empty spatial extent, got {features.shape}")
    return features, boxes, box_indices
