"""ROI pooling (Fast R-CNN's `RoIPool`) with `torchvision.ops.roi_pool` semantics, NHWC.

`roi_pool` takes the maximum of each of `PH x PW` quantized bins of each box;
`multilevel_roi_pool` first assigns each box to a level of a feature pyramid
(the FPN rule of `fpn_levels`, as `multilevel_roi_align`) and pools from that
level. Both are pure functions that run under `jit`, `vmap` and `grad`
(differentiable with respect to the features; the boxes are quantized, so they
get no gradient).

The maximum of a bin is separable: the kernel first takes, for every row of
the map, the maximum (and its first column) over each bin's columns, then the
maximum over each bin's rows. Both passes are masked reductions over the whole
map, so shapes are static whatever the box size, and the work grows as
`N * PW * H * W * C + N * PH * PW * H * C`: with the map size, like
`roi_align_dense`, not only with the number of bins.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfcnn.ops._util import pair
from jfcnn.ops.roi_align._geometry import check_pyramid, check_roi_inputs, fpn_levels

# torchvision starts each non-empty bin's maximum at -FLT_MAX (whatever the dtype)
# and keeps a value only if it is strictly larger.
_START = float(np.finfo(np.float32).max)
# Bounds that keep the quantized coordinates and their sums inside int32.
_INT_LIMIT = 2.0**29


def roi_pool(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    *,
    spatial_scale: float = 1.0,
    box_indices: jax.Array | None = None,
) -> jax.Array:
    """Max-pools a `(PH, PW)` grid of quantized bins of each box (Fast R-CNN's RoIPool).

    Semantics are exactly those of `torchvision.ops.roi_pool` (and Caffe's and
    detectron's `RoIPool`):

    * A box `(x1, y1, x2, y2)` in input-image coordinates is mapped to
      integer feature-map pixels `round(coord * spatial_scale)` (halves
      rounded away from zero, as C's `round`); the box covers the pixels
      `x1..x2` and `y1..y2` inclusive, so its size is
      `max(x2 - x1 + 1, 1) x max(y2 - y1 + 1, 1)`.
    * Bin `(i, j)` covers rows `y1 + floor(i * h / PH)` to
      `y1 + ceil((i + 1) * h / PH)` (exclusive), columns likewise, clipped to
      the map; bins may overlap by a pixel.
    * Each output is the maximum of its bin; a bin with no pixel inside the
      map (a box partly or wholly outside it) gives 0.
    * The gradient of an output goes to the first pixel (row-major) holding
      the maximum of its bin, as torchvision's argmax; bins that share it add
      up. NaN features are skipped; a non-empty bin with no value above
      `-FLT_MAX` (e.g. all `-inf`) gives `-FLT_MAX` and no gradient, as
      torchvision does.

    Arithmetic is done in float32 (float64 for float64 inputs) and the
    result has the dtype of `features`. A box with a NaN or infinite
    coordinate is clipped like a huge one, not treated as absent.

    Shapes, with `B` images, `N` boxes per image, `K` boxes in all, `H x W`
    the feature map, `C` channels and `PH x PW` the output grid (the three
    forms of `roi_align`):

    * `features (H, W, C)`, `boxes (N, 4)` -> `(N, PH, PW, C)`;
    * `features (B, H, W, C)`, `boxes (B, N, 4)` -> `(B, N, PH, PW, C)`;
    * `features (B, H, W, C)`, `boxes (K, 4)`, `box_indices (K,)` ->
      `(K, PH, PW, C)` (torchvision's flat form; `box_indices[k]` is the image
      of box k, clamped to `[0, B)` as JAX indexing does).

    Cost: two masked reductions over the whole map per box (see the module
    docstring), so the work grows with `H x W`; shapes never depend on the
    box sizes.

    Args:
      features: `(H, W, C)` or `(B, H, W, C)` feature map(s), NHWC.
      boxes: boxes `(x1, y1, x2, y2)` in input-image coordinates, shaped as
        above.
      output_size: `PH` = `PW` as an int, or `(PH, PW)`.
      spatial_scale: feature-map pixels per input-image pixel (1 / stride); a
        Python number or a traced scalar.
      box_indices: `(K,)` integer image index of each box, for the flat form.

    Returns:
      The pooled features, shaped as above, with the dtype of `features`.

    Raises:
      ValueError: on a wrong rank, a last box dimension other than 4,
        mismatched batch sizes, an empty map or an `output_size` that is not
        a positive int or pair of ints; TypeError on non-integer
        `box_indices` or non-floating inputs.

    Example:

    >>> import jax.numpy as jnp
    >>> features = jnp.arange(16.0).reshape(4, 4, 1)  # F[y, x] = 4 y + x
    >>> boxes = jnp.array([[0.0, 0.0, 2.6, 1.4]])      # pixels x 0..3, y 0..1
    >>> out = roi_pool(features, boxes, 2)
    >>> out.shape
    (1, 2, 2, 1)
    >>> out[0, :, :, 0].tolist()  # bins: rows {0}, {1}; columns {0, 1}, {2, 3}
    [[1.0, 3.0], [5.0, 7.0]]
    """
    output_size = pair(output_size, "output_size", minimum=1)
    features, boxes, box_indices = check_roi_inputs(features, boxes, box_indices)
    return _roi_pool_impl(features, boxes, box_indices, spatial_scale, output_size=output_size)


# Jitted here so that calls outside `jit` compile once instead of dispatching
# every small op; inside a caller's `jit` it is simply inlined.
@functools.partial(jax.jit, static_argnames=("output_size",))
def _roi_pool_impl(features, boxes, box_indices, spatial_scale, *, output_size):
    pool = functools.partial(_pool_image, spatial_scale=spatial_scale, output_size=output_size)
    if features.ndim == 3:
        return pool(features, boxes)
    if box_indices is None:
        return jax.vmap(pool)(features, boxes)
    image = jnp.clip(box_indices, 0, features.shape[0] - 1)
    return jax.vmap(lambda i, box: pool(features[i], box[None])[0])(image, boxes)


def _round_away(x: jax.Array) -> jax.Array:
    """C's `round`: halves away from zero (`jnp.round` rounds them to even)."""
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _to_int(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.nan_to_num(x), -_INT_LIMIT, _INT_LIMIT).astype(jnp.int32)


def _bin_edges(start, end, bins: int, size: int, dtype):
    """`(N, bins)` clipped start and end (exclusive) pixels of each bin along one axis."""
    extent = jnp.maximum(end - start + 1, 1)
    # torchvision divides; XLA turns a division by a constant or a broadcast scalar
    # into a product with the rounded reciprocal, which moves bin edges by a pixel
    # (7 * (1 / 3) * 3 = 7.0000005, not 7), so the divisor is a full array the
    # simplifier cannot see through (computed from `extent`, so that `vmap` batches
    # it rather than broadcasting it).
    divisor = jnp.where(extent > 0, bins, 1).astype(dtype)
    extent, divisor = jax.lax.optimization_barrier((extent.astype(dtype), divisor))
    bin_size = extent / divisor
    index = jnp.arange(bins, dtype=dtype)
    lo = _to_int(jnp.floor(index * bin_size[:, None])) + start[:, None]
    hi = _to_int(jnp.ceil((index + 1) * bin_size[:, None])) + start[:, None]
    return jnp.clip(lo, 0, size), jnp.clip(hi, 0, size)


def _pool_image(fmap, boxes, *, spatial_scale, output_size):
    """`(H, W, C)` map, `(N, 4)` boxes -> `(N, PH, PW, C)`."""
    ph, pw = output_size
    h, w, c = fmap.shape
    dtype = jnp.float64 if jnp.float64 in (fmap.dtype, boxes.dtype) else jnp.float32
    corners = _to_int(_round_away(boxes.astype(dtype) * jnp.asarray(spatial_scale, dtype)))
    x1, y1, x2, y2 = (corners[:, i] for i in range(4))
    y_lo, y_hi = _bin_edges(y1, y2, ph, h, dtype)  # (N, PH)
    x_lo, x_hi = _bin_edges(x1, x2, pw, w, dtype)  # (N, PW)
    empty = (y_hi <= y_lo)[:, :, None] | (x_hi <= x_lo)[:, None, :]  # (N, PH, PW)

    # NaN never wins torchvision's `value > max`; -inf never beats its start.
    values = jnp.where(jnp.isnan(fmap), -jnp.inf, fmap)
    cols = jnp.arange(w)
    in_cols = (cols >= x_lo[..., None]) & (cols < x_hi[..., None])  # (N, PW, W)
    # Pass 1: per row, the first column holding the maximum of each column bin.
    masked = jnp.where(in_cols[:, :, None, :, None], values[None, None], -jnp.inf)
    col_arg = jnp.argmax(masked, axis=3)  # (N, PW, H, C)
    row_max = values[jnp.arange(h)[:, None], col_arg, jnp.arange(c)]
    row_max = jnp.where(jnp.any(in_cols, axis=-1)[:, :, None, None], row_max, -jnp.inf)
    rows = jnp.arange(h)
    in_rows = (rows >= y_lo[..., None]) & (rows < y_hi[..., None])  # (N, PH, H)
    # Pass 2: the first row holding the maximum of each bin.
    masked = jnp.where(in_rows[:, :, None, :, None], row_max[:, None], -jnp.inf)
    row_arg = jnp.argmax(masked, axis=3)  # (N, PH, PW, C)
    n = boxes.shape[0]
    col_arg = col_arg[
        jnp.arange(n)[:, None, None, None], jnp.arange(pw)[:, None], row_arg, jnp.arange(c)
    ]
    best = jnp.max(masked, axis=3)
    # The gradient flows through this gather to the argmax pixel only.
    pooled = fmap[row_arg, col_arg, jnp.arange(c)]
    found = best.astype(jnp.float32) > -_START
    start = jnp.where(empty[..., None], 0.0, -_START).astype(fmap.dtype)
    return jnp.where(found & ~empty[..., None], pooled, start)


def multilevel_roi_pool(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    *,
    strides: Sequence[int],
    canonical_scale: float = 224,
    canonical_level: int = 4,
) -> jax.Array:
    """ROI pooling from a feature pyramid, each box from the level that fits it.

    Box `(x1, y1, x2, y2)` (image coordinates) is pooled with
    `roi_pool(..., spatial_scale=1 / stride)` from the level `fpn_levels`
    gives it, the rule of `multilevel_roi_align` (torchvision's
    `MultiScaleRoIAlign` with RoIPool in place of RoIAlign). Every box is
    pooled from every level and the right one kept, so the cost is that of
    one `roi_pool` per level.

    Args:
      features: sequence of `(B, Hl, Wl, C)` maps, finest first.
      boxes: `(B, N, 4)` boxes in image coordinates.
      output_size: `PH` = `PW` as an int, or `(PH, PW)`.
      strides: stride of each level, e.g. `(4, 8, 16, 32)`; consecutive levels
        must differ by a factor of 2.
      canonical_scale, canonical_level: FPN level heuristic (224 and 4).

    Returns:
      `(B, N, PH, PW, C)` pooled features, in the dtype of `features`.

    Example:

    >>> import jax.numpy as jnp
    >>> maps = [jnp.ones((1, 16, 16, 8)), jnp.ones((1, 8, 8, 8))]
    >>> boxes = jnp.array([[[0.0, 0.0, 20.0, 20.0], [4.0, 4.0, 60.0, 60.0]]])
    >>> multilevel_roi_pool(maps, boxes, 7, strides=(4, 8)).shape
    (1, 2, 7, 7, 8)
    """
    output_size = pair(output_size, "output_size", minimum=1)
    features, boxes, strides = check_pyramid(features, boxes, strides)
    return _multilevel_impl(
        tuple(features),
        boxes,
        output_size=output_size,
        strides=strides,
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
    )


@functools.partial(
    jax.jit,
    static_argnames=("output_size", "strides", "canonical_scale", "canonical_level"),
)
def _multilevel_impl(features, boxes, *, output_size, strides, canonical_scale, canonical_level):
    k_min = int(np.log2(strides[0]))
    level = fpn_levels(
        boxes,
        k_min=k_min,
        k_max=k_min + len(strides) - 1,
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
    )
    out = None
    for index, (fmap, stride) in enumerate(zip(features, strides, strict=True)):
        pooled = _roi_pool_impl(fmap, boxes, None, 1.0 / stride, output_size=output_size)
        chosen = (level == index)[:, :, None, None, None]
        out = pooled if out is None else jnp.where(chosen, pooled, out)
    return out
