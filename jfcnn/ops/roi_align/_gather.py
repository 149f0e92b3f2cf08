"""ROI Align in its gather form: `roi_align` and `multilevel_roi_align`.

Validation, the three input forms of `roi_align` and the pyramid canvas of
`multilevel_roi_align`; both pool with the patch-gather kernel of `_kernel`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jfcnn.ops._util import check_int, over_batch_shards, pair
from jfcnn.ops.roi_align._geometry import (
    MULTILEVEL_MAX_SAMPLING_RATIO,
    check_pyramid,
    check_roi_inputs,
    check_valid_hw,
    fpn_levels,
    level_extents,
)
from jfcnn.ops.roi_align._kernel import patch_extent, roi_align_flat


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    *,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
    box_indices: jax.Array | None = None,
    index_mode: str = "clip",
    max_sampling_ratio: int = 8,
    valid_hw: jax.Array | None = None,
) -> jax.Array:
    """Pools a `(PH, PW)` grid of bilinearly sampled features from each box.

    A box with a NaN or infinite coordinate pools zeros, with zero gradients
    for the features and the box. In the flat form, `box_indices` outside
    `[0, B)` are clamped by default (`index_mode="clip"`: index 5 of a batch
    of 2 reads image 1, as JAX indexing does); `index_mode="fill"` pools zeros
    for them, with zero gradients, and `index_mode="raise"` raises ValueError
    where `box_indices` are concrete (under `jit` or `vmap`, where they are
    traced and cannot be checked, it fills).

    Semantics are exactly those of `torchvision.ops.roi_align` (equivalently
    ONNX `RoiAlign` in average mode and detectron2's `ROIAlign`):

    * A box `(x1, y1, x2, y2)` in input-image coordinates is mapped to the
      feature map as `coord * spatial_scale`, minus 0.5 pixel if `aligned`
      (pixel centres at integer + 0.5, the correct alignment). With
      `aligned=False` (legacy Detectron) there is no shift and the box is grown
      to at least 1x1.
    * The box is split into `PH x PW` bins; each output value is the average of
      a `sampling_ratio x sampling_ratio` grid of bilinear samples placed at the
      bin's sub-cell centres.
    * A sample at `y < -1` or `y > H` (or `x < -1`, `x > W`) counts as 0 but
      still counts in the average. Otherwise `y <= 0` is read at row 0 and
      `y >= H - 1` at row `H - 1` (the kernel's low/high index rule), and
      likewise for `x`.
    * `sampling_ratio <= 0` takes `ceil(roi_height / PH) x ceil(roi_width / PW)`
      samples per bin (torchvision's adaptive mode). An empty box then has no
      samples and pools zeros, with zero gradients (never NaN). To keep static
      shapes the count per axis is capped at `max_sampling_ratio`: the result
      equals torchvision's whenever `ceil(roi_size / output) <=
      max_sampling_ratio` (for the default 8 and a 7x7 output, boxes up to 56
      feature pixels); above it that axis takes `max_sampling_ratio` evenly
      spaced samples per bin, as a fixed `sampling_ratio` of that value would.
      `max_sampling_ratio` is ignored for `sampling_ratio > 0`.
    * With `valid_hw`, each image's map is taken to end at its `(h, w)`: the
      rules above use `H = h` and `W = w` and give pixels past them zero
      weight: the result and its gradients are those of `roi_align` on
      `features[..., :h, :w, :]` (torchvision's on that map), whatever finite
      values lie past it, which get zero gradient.

    The result is differentiable with respect to `features` and `boxes` (the
    box gradient, which torchvision does not provide, is the exact derivative
    through the samples' positions: zero where a sample is clamped, undefined
    only where a sample lies exactly on a pixel row or column or a border, or
    where an adaptive count changes). Reverse mode only (`jax.grad`,
    `jax.vjp`): the op is a custom VJP. Arithmetic is done in float32 (float64
    for float64 inputs) and the result has the dtype of `features`.

    Shapes, with `B` images, `N` boxes per image, `K` boxes in all, `H x W`
    the feature map, `C` channels and `PH x PW` the output grid:

    * `features (H, W, C)`, `boxes (N, 4)` -> `(N, PH, PW, C)`;
    * `features (B, H, W, C)`, `boxes (B, N, 4)` -> `(B, N, PH, PW, C)`;
    * `features (B, H, W, C)`, `boxes (K, 4)`, `box_indices (K,)` ->
      `(K, PH, PW, C)` (torchvision's flat form; `box_indices[k]` is the image
      of box k).

    The batched forms pool all boxes in one call, which is faster than
    `jax.vmap` over images (that works too, but in the adaptive mode evaluates
    every patch size the run-time switch could pick).

    Args:
      features: `(H, W, C)` or `(B, H, W, C)` feature map(s), NHWC.
      boxes: boxes `(x1, y1, x2, y2)` in input-image coordinates, shaped as
        above.
      output_size: `PH` = `PW` as an int, or `(PH, PW)`.
      spatial_scale: feature-map pixels per input-image pixel (1 / stride); a
        Python number or a traced scalar.
      sampling_ratio: samples per bin along each axis; `<= 0` for adaptive.
      aligned: shift boxes by -0.5 pixel (True) or use the legacy Detectron
        convention (False). The default True is detectron2's `ROIAlignV2`
        (pixel centres at integer + 0.5); `torchvision.ops.roi_align`
        defaults to False, so pass `aligned=False` to reproduce a torchvision
        call that leaves it unset. (`multilevel_roi_align` defaults to False,
        as torchvision's `MultiScaleRoIAlign`.)
      box_indices: `(K,)` integer image index of each box, for the flat form.
      index_mode: what a `box_indices` entry outside `[0, B)` does, as
        `jnp.take`'s `mode`: "clip" (the default) reads the nearest image,
        "fill" pools zeros with zero gradients, "raise" raises ValueError
        naming the first bad index when `box_indices` is concrete and fills
        when it is traced. Ignored by the other forms.
      max_sampling_ratio: cap on the adaptive sample count per bin axis.
      valid_hw: optional int `(h, w)` extent of the map in feature pixels,
        `(2,)` for `(H, W, C)` features, else `(B, 2)`, one per image (the
        flat form looks it up by `box_indices`); clamped to `[1, H] x [1, W]`.
        For maps padded further than a reference's (torchvision's feature
        maps of a batch padded less). None: the whole map.

    Returns:
      The pooled features, shaped as above, with the dtype of `features`.

    Raises:
      ValueError: on a wrong rank, a last box dimension other than 4,
        mismatched batch sizes, an `output_size` that is not a positive int
        or pair of ints, an unknown `index_mode`, or (with
        `index_mode="raise"`) concrete `box_indices` outside `[0, B)`;
        TypeError on non-integer `box_indices` or non-floating inputs.

    Example:

    >>> import jax.numpy as jnp
    >>> features = jnp.arange(16.0).reshape(4, 4, 1)  # F[y, x] = 4 y + x
    >>> boxes = jnp.array([[0.5, 0.5, 2.5, 2.5]])      # centred on pixels 0..2
    >>> out = roi_align(features, boxes, 2, sampling_ratio=1)
    >>> out.shape
    (1, 2, 2, 1)
    >>> out[0, :, :, 0].tolist()  # samples at (0.5, 0.5), (0.5, 1.5), ...
    [[2.5, 3.5], [6.5, 7.5]]

    A map padded past where it ends:

    >>> padded = jnp.pad(features, ((0, 2), (0, 2), (0, 0)), constant_values=-1.0)
    >>> box = jnp.array([[1.0, 1.0, 6.0, 6.0]])
    >>> out = roi_align(padded, box, 2, sampling_ratio=1, aligned=False, valid_hw=(4, 4))
    >>> bool(jnp.all(out == roi_align(features, box, 2, sampling_ratio=1, aligned=False)))
    True

    Bad boxes and image indices:

    >>> batch = jnp.stack([features, features + 100.0])  # B = 2
    >>> boxes = jnp.array([[0.5, 0.5, 2.5, 2.5], [0.5, 0.5, jnp.inf, 2.5]])
    >>> roi_align(batch, boxes, 1, sampling_ratio=1, box_indices=jnp.array([5, 0]))[:, 0, 0, 0]
    Array([105.,   0.], dtype=float32)
    >>> roi_align(batch, boxes, 1, sampling_ratio=1, box_indices=jnp.array([5, 0]),
    ...           index_mode="fill")[:, 0, 0, 0]
    Array([0., 0.], dtype=float32)
    """
    output_size = pair(output_size, "output_size", minimum=1)
    sampling_ratio = check_int("sampling_ratio", sampling_ratio)
    max_sampling_ratio = check_int("max_sampling_ratio", max_sampling_ratio)
    if max_sampling_ratio < 1:
        raise ValueError(f"max_sampling_ratio must be >= 1, got {max_sampling_ratio}")
    if index_mode not in _INDEX_MODES:
        raise ValueError(f"index_mode must be one of {_INDEX_MODES}, got {index_mode!r}")
    features, boxes, box_indices = check_roi_inputs(features, boxes, box_indices)
    valid_hw = check_valid_hw(valid_hw, features.shape[:-3] + (2,))
    if box_indices is not None and index_mode == "raise":
        if not isinstance(box_indices, jax.core.Tracer):
            _check_indices(np.asarray(box_indices), features.shape[0])
    impl = functools.partial(
        _roi_align_impl,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=max_sampling_ratio,
        fill=index_mode != "clip",
    )
    if box_indices is None and features.ndim == 4:  # Per image: each device its own.
        return over_batch_shards(
            lambda f, b, v: impl(f, b, None, spatial_scale, v), features, boxes, valid_hw
        )
    return impl(features, boxes, box_indices, spatial_scale, valid_hw)


_INDEX_MODES = ("clip", "fill", "raise")


def _check_indices(indices: np.ndarray, batch: int) -> None:
    bad = np.flatnonzero((indices < 0) | (indices >= batch))
    if bad.size:
        k = bad[0]
        raise ValueError(
            f"box_indices[{k}] = {indices[k]} is outside [0, {batch}) for a batch of {batch} "
            f"images ({bad.size} of {indices.size} indices out of range)"
        )


# Jitted here so that calls outside `jit` compile once instead of dispatching
# every small op; inside a caller's `jit` it is simply inlined.
@functools.partial(
    jax.jit,
    static_argnames=("output_size", "sampling_ratio", "aligned", "max_sampling_ratio", "fill"),
)
def _roi_align_impl(
    features,
    boxes,
    box_indices,
    spatial_scale,
    valid_hw,
    *,
    output_size,
    sampling_ratio,
    aligned,
    max_sampling_ratio,
    fill,
):
    keep = None
    if features.ndim == 3:
        canvas, image, out_shape = (
            features[None],
            jnp.zeros(boxes.shape[:1], jnp.int32),
            boxes.shape[:1],
        )
    elif box_indices is None:
        b, n = boxes.shape[:2]
        canvas, image, out_shape = features, jnp.repeat(jnp.arange(b, dtype=jnp.int32), n), (b, n)
    else:
        # The gathers promise in-bounds indices, so clamp like JAX indexing
        # even where the box is masked out.
        image = jnp.clip(box_indices, 0, features.shape[0] - 1).astype(jnp.int32)
        if fill:
            keep = image == box_indices
        canvas, out_shape = features, boxes.shape[:1]
    _, h, w, c = canvas.shape
    level_h, level_w = h, w
    if valid_hw is not None:
        # The kernel clamps and zeroes samples at each box's level size, and
        # its patches stay within `max(level size, patch)` <= the canvas.
        extent = jnp.clip(valid_hw.reshape(-1, 2), 1, jnp.asarray([h, w], jnp.int32))[image]
        level_h, level_w = extent[:, 0], extent[:, 1]
    out = roi_align_flat(
        canvas,
        image,
        boxes.reshape(-1, 4),
        keep=keep,
        scale=spatial_scale,
        level_h=level_h,
        level_w=level_w,
        cap_y=h,
        cap_x=w,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=max_sampling_ratio,
    )
    return out.reshape(*out_shape, *output_size, c)


def multilevel_roi_align(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    *,
    strides: Sequence[int],
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    valid_hw: jax.Array | None = None,
) -> jax.Array:
    """ROI Align from a feature pyramid, each box from the level that fits it.

    Matches torchvision's `MultiScaleRoIAlign`: box `(x1, y1, x2, y2)` (image
    coordinates) is pooled with `roi_align(..., spatial_scale=1 / stride)` from
    level `floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)`
    (the eps added after the log, as torchvision's `LevelMapper` does), clamped
    to the levels given, where the finest map has level `log2(strides[0])`.

    All shapes are static: the levels are laid out one below the other on one
    zero-padded canvas per image and every box is pooled in a single call, so
    the cost is that of one `roi_align` over all boxes, not one per level.
    A box with a NaN or infinite coordinate pools zeros, with zero gradients,
    as in `roi_align`.

    Shapes: `B` images, `N` boxes per image, level `l` of size `Hl x Wl`, `C`
    channels, `PH x PW` output grid.

    Args:
      features: sequence of `(B, Hl, Wl, C)` maps, finest first.
      boxes: `(B, N, 4)` boxes in image coordinates.
      output_size: `PH` = `PW` as an int, or `(PH, PW)`.
      strides: stride of each level, e.g. `(4, 8, 16, 32)`; consecutive levels
        must differ by a factor of 2.
      sampling_ratio: as in `roi_align` (`<= 0` for adaptive).
      aligned: as in `roi_align`, but False by default: torchvision's
        `MultiScaleRoIAlign` (the box and mask poolers of its Faster and Mask
        R-CNN) always pools with `aligned=False`, so torchvision's pretrained
        Mask R-CNN weights need False. detectron2's FPN heads (`ROIAlignV2`)
        and `roi_align`'s default use True.
      canonical_scale, canonical_level: FPN level heuristic (224 and 4).
      valid_hw: optional `(B, 2)` int `(h, w)` of each image in input-image
        pixels: the level of stride `s` is pooled as `roi_align`'s
        `valid_hw` of `ceil((h, w) / s)` (clamped to the level's size), the
        maps torchvision's `MultiScaleRoIAlign` sees for a batch padded to
        `(h, w)` (a multiple of the strides), wherever these maps are
        padded further. None: every level's whole map.

    Returns:
      `(B, N, PH, PW, C)` pooled features, in the dtype of `features`.

    Example:

    >>> import jax.numpy as jnp
    >>> maps = [jnp.ones((1, 16, 16, 8)), jnp.ones((1, 8, 8, 8))]
    >>> boxes = jnp.array([[[0.0, 0.0, 20.0, 20.0], [4.0, 4.0, 60.0, 60.0]]])
    >>> multilevel_roi_align(maps, boxes, 7, strides=(4, 8)).shape
    (1, 2, 7, 7, 8)
    """
    output_size = pair(output_size, "output_size", minimum=1)
    sampling_ratio = check_int("sampling_ratio", sampling_ratio)
    features, boxes, strides = check_pyramid(features, boxes, strides)
    valid_hw = check_valid_hw(valid_hw, (boxes.shape[0], 2))

    impl = functools.partial(
        _multilevel_impl,
        output_size=output_size,
        strides=strides,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
    )
    return over_batch_shards(impl, tuple(features), boxes, valid_hw)


@functools.partial(
    jax.jit,
    static_argnames=(
        "output_size",
        "strides",
        "sampling_ratio",
        "aligned",
        "canonical_scale",
        "canonical_level",
    ),
)
def _multilevel_impl(
    features,
    boxes,
    valid_hw,
    *,
    output_size,
    strides,
    sampling_ratio,
    aligned,
    canonical_scale,
    canonical_level,
):
    first = features[0]
    b, n = boxes.shape[:2]
    c = first.shape[3]
    k_min = int(-math.log2(1.0 / strides[0]))
    k_max = int(-math.log2(1.0 / strides[-1]))
    flat_boxes = boxes.reshape(-1, 4)
    level = fpn_levels(
        flat_boxes,
        k_min=k_min,
        k_max=k_max,
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
    )
    heights = [f.shape[1] for f in features]
    widths = [f.shape[2] for f in features]
    cap_y, cap_x = max(heights), max(widths)
    max_grid = sampling_ratio if sampling_ratio > 0 else MULTILEVEL_MAX_SAMPLING_RATIO
    if len(features) == 1:
        canvas, row_offsets, col_offsets = first, [0], [0]
    else:
        # The finest map on the left, the coarser ones stacked to its right:
        # about 1.5x the finest map's area for a pyramid whose sizes halve.
        # Zero margins let a patch start at any pixel of any map.
        pad_y, pad_x = patch_extent(sampling_ratio, max_grid, cap_y, cap_x)
        right_rows = [0, *np.cumsum(heights[1:-1]).tolist()]
        row_offsets = [0, *right_rows]
        col_offsets = [0] + [widths[0]] * (len(features) - 1)
        height = max(heights[0], sum(heights[1:])) + pad_y
        width = widths[0] + max(widths[1:]) + pad_x
        canvas = jnp.zeros((b, height, width, c), first.dtype)
        canvas = lax.dynamic_update_slice(canvas, first, (0, 0, 0, 0))
        for f, row in zip(features[1:], right_rows, strict=True):
            canvas = lax.dynamic_update_slice(canvas, f, (0, row, widths[0], 0))
    image = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n)
    level_h = jnp.asarray(heights, jnp.int32)[level]
    level_w = jnp.asarray(widths, jnp.int32)[level]
    if valid_hw is not None:
        # (B, L, 2): each image's extent on each level; patches past it stay
        # within the level's margin on the canvas.
        extents = jnp.stack(
            [
                level_extents(valid_hw, s, f.shape[1:3])
                for s, f in zip(strides, features, strict=True)
            ],
            axis=1,
        )
        extent = extents[image, level]
        level_h, level_w = extent[:, 0], extent[:, 1]
    out = roi_align_flat(
        canvas,
        image,
        flat_boxes,
        scale=jnp.asarray([1.0 / s for s in strides], jnp.float32)[level],
        level_h=level_h,
        level_w=level_w,
        row_offset=jnp.asarray(row_offsets, jnp.int32)[level],
        col_offset=jnp.asarray(col_offsets, jnp.int32)[level],
        cap_y=cap_y,
        cap_x=cap_x,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=MULTILEVEL_MAX_SAMPLING_RATIO,
    )
    return out.reshape(b, n, *output_size, c)
