"""ROI Align with torchvision / detectron2 semantics for NHWC feature maps.

`roi_align` pools a fixed-size `(PH, PW)` grid of features from each box of a
feature map; `multilevel_roi_align` first assigns each box to a level of a
feature pyramid (FPN) and pools from that level. Both are pure functions that
run under `jit`, `vmap` and `grad`, and both are differentiable with respect to
the features and the box coordinates.

How it is computed. ROI Align is separable: the value of one bin is
`sum_{y, x} wy[y] * wx[x] * F[y, x]`, where `wy` sums the bilinear weights of
the bin's samples along y (and likewise `wx` along x). The sample geometry and
these weights are computed per box (one box at a time, `jax.vmap`-ed); then
every bin gathers the small patch of `F` where `wy` and `wx` are non-zero and
weights it by their outer product, all taps of a bin summed in one fused loop.
With a fixed `sampling_ratio` S the patch is one 2x2 pixel block per sample,
exactly the kernel's 4 S^2 reads. In the adaptive mode the samples are at most
a pixel apart and a bin's patch is one contiguous block of 3, 5 or 9 rows and
columns, chosen at run time with `lax.switch` from the boxes actually given:
small boxes do not pay for the worst case, and all shapes stay static.

The backward pass is a custom VJP: the feature gradient is accumulated patch
by patch in a loop of in-place block updates (on CPU an order of magnitude
faster than XLA's scatter), and the box gradient is the exact derivative of
the bilinear weights through the sample positions. Forward-mode autodiff
(`jax.jvp`, `jax.jacfwd`) is therefore not supported.

Boxes of all images are pooled in one flat batch with an image index per box
rather than by `jax.vmap` over images: under `vmap` the run-time switch would
evaluate every branch and the in-place updates would become scatters.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["roi_align", "multilevel_roi_align"]


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, (int, np.integer)) and not isinstance(output_size, bool):
        size = (int(output_size), int(output_size))
    elif (
        isinstance(output_size, Sequence)
        and len(output_size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in output_size)
    ):
        size = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(f"output_size must be an int or a pair of ints, got {output_size!r}")
    if min(size) < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return size


def _check_int(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------
# Sample geometry (one box, one axis), exactly the torchvision CPU kernel.


def _axis_samples(
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


def _grid_count(
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


def _support(lo: jax.Array, hi: jax.Array, valid: jax.Array) -> jax.Array:
    """Rows (or columns) spanned by each bin's valid samples, `(..., pooled)`."""
    big = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(valid > 0, lo, big), axis=-1)
    last = jnp.max(jnp.where(valid > 0, hi, -1), axis=-1)
    return jnp.maximum(last - first + 1, 0)


def _block_weights(lo, hi, frac, valid, start, patch: int):
    """Bilinear weights of samples on the `patch` rows from `start`, `(..., patch)`."""
    k = jnp.arange(patch, dtype=jnp.int32)
    w_lo = ((1.0 - frac) * valid)[..., None]
    w_hi = (frac * valid)[..., None]
    return ((lo - start)[..., None] == k) * w_lo + ((hi - start)[..., None] == k) * w_hi


def _contiguous_weights(lo, hi, frac, valid, size, offset, patch: int):
    """One `patch`-long block per bin: `(start (P, 1), weights (P, 1, patch))`."""
    first = jnp.min(jnp.where(valid > 0, lo, jnp.iinfo(jnp.int32).max), axis=-1)
    start = jnp.clip(first, 0, jnp.maximum(size - patch, 0))
    w = _block_weights(lo, hi, frac, valid, start[:, None], patch)
    return (start + offset)[:, None], jnp.sum(w, axis=1)[:, None, :]


def _pairwise_weights(lo, hi, frac, valid, size, offset, patch: int):
    """A 2-pixel block per sample: `(start (P, S), weights (P, S, patch))`."""
    # A sample clamped to the last row moves onto the block (size-2, size-1)
    # with weights (0, 1): the same value, and no derivative as in the kernel.
    start = jnp.clip(lo, 0, jnp.maximum(size - patch, 0))
    return start + offset, _block_weights(lo, hi, frac, valid, start, patch)


# ----------------------------------------------------------------------------
# Patch gather (forward) and its transpose (backward w.r.t. the features).
#
# A bin's patch is given as row slots `rows (K, PH, My)` with weights
# `wy (K, PH, My)` and column slots `cols (K, PW, Mx)` with `wx (K, PW, Mx)`:
# `out[k, p, q] = sum_{m, j} wy[k, p, m] wx[k, q, j] F[image[k], rows[k, p, m],
# cols[k, q, j]]`. The slots come in blocks of `ty` (`tx`) consecutive rows
# (columns), which the backward pass adds as whole blocks.


def _gather_pixels(canvas, image, rows, cols):
    """`canvas[image, rows, cols]` for broadcastable in-bounds index arrays."""
    shape = jnp.broadcast_shapes(image.shape, rows.shape, cols.shape)
    indices = jnp.stack([jnp.broadcast_to(i, shape) for i in (image, rows, cols)], axis=-1)
    dims = lax.GatherDimensionNumbers(
        offset_dims=(len(shape),), collapsed_slice_dims=(0, 1, 2), start_index_map=(0, 1, 2)
    )
    return lax.gather(
        canvas,
        indices,
        dims,
        slice_sizes=(1, 1, 1, canvas.shape[-1]),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


def _row_slot_sum(canvas, image, rows, wy, cols, wx, m, out):
    """Adds row slot `m` (all column slots) of every bin to `out`."""
    acc_dtype = wx.dtype
    img = image[:, None, None]
    r = lax.dynamic_index_in_dim(rows, m, axis=2, keepdims=False)[:, :, None]
    w_row = lax.dynamic_index_in_dim(wy, m, axis=2, keepdims=False)[:, :, None]
    for j in range(cols.shape[-1]):
        tap = _gather_pixels(canvas, img, r, cols[:, None, :, j]).astype(acc_dtype)
        term = (w_row * wx[:, None, :, j])[..., None] * tap
        out = term if out is None else out + term
    return out


# Patches with at most this many taps are summed fully unrolled; larger ones
# loop over their row slots.
_UNROLL_TAPS = 16
# Boxes per step of that loop: the (chunk, PH, PW, C) accumulator then stays in
# cache (1.6 MB for 7x7 bins of 256 float32 channels) across the row slots.
_CHUNK = 32


def _chunked(fn, *args):
    """`fn` over chunks of `_CHUNK` boxes (the leading axis of every arg)."""
    k = args[0].shape[0]
    if k <= _CHUNK:
        return fn(*args)
    pad = (-k) % _CHUNK
    args = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in args]
    args = [a.reshape(-1, _CHUNK, *a.shape[1:]) for a in args]
    out = lax.map(lambda a: fn(*a), args)
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:k], out)


def _pool_forward(canvas, image, rows, wy, cols, wx):
    my, mx = rows.shape[-1], cols.shape[-1]

    def unrolled(rows, wy, cols, wx, image):
        # All taps of a bin summed in one fused loop: XLA keeps each output
        # value in registers and never materialises the gathered patches.
        out = None
        for m in range(my):
            out = _row_slot_sum(canvas, image, rows, wy, cols, wx, m, out)
        return out

    def looped(rows, wy, cols, wx, image):
        # Large patches: one fused pass per row slot, so the compiled code
        # grows with the patch width only.
        init = jnp.zeros((*rows.shape[:2], cols.shape[1], canvas.shape[-1]), wx.dtype)
        body = lambda m, out: _row_slot_sum(canvas, image, rows, wy, cols, wx, m, out)
        return lax.fori_loop(0, my, body, init)

    # Chunks also keep the result a loop output: were the tap sum fused into a
    # consumer (a reduction or a matmul), XLA would materialise every tap.
    return _chunked(unrolled if my * mx <= _UNROLL_TAPS else looped, rows, wy, cols, wx, image)


def _pool_weight_cotangents(canvas, image, rows, wy, cols, wx, g):
    """Cotangents of `wy` and `wx` (for box gradients)."""

    def run(rows, wy, cols, wx, image, g):
        img = image[:, None, None, None]

        def body(dwx, m):
            r = rows[:, :, m][:, :, None, None]
            tap = _gather_pixels(canvas, img, r, cols[:, None])  # (K, PH, PW, Mx, C)
            t = jnp.einsum("kpqc,kpqjc->kpqj", g, tap.astype(g.dtype))
            dwx = dwx + jnp.einsum("kpqj,kp->kqj", t, wy[:, :, m])
            return dwx, jnp.einsum("kpqj,kqj->kp", t, wx)

        dwx, dwy = lax.scan(body, jnp.zeros_like(wx), jnp.arange(rows.shape[-1]))
        return jnp.moveaxis(dwy, 0, -1), dwx

    return _chunked(run, rows, wy, cols, wx, image, g)


def _pool_canvas_cotangent(ty, tx, canvas_shape, image, rows, wy, cols, wx, g):
    """Transpose of `_pool_forward` w.r.t. the canvas, as a loop of block adds."""
    k_boxes, ph, my = wy.shape
    _, pw, mx = wx.shape
    jys, jxs = my // ty, mx // tx
    channels = canvas_shape[-1]
    wy = wy.reshape(k_boxes, ph, jys, ty)
    wx = wx.reshape(k_boxes, pw, jxs, tx)
    start_y = rows[:, :, ::ty]
    start_x = cols[:, :, ::tx]
    zero = jnp.zeros((), jnp.int32)

    # One iteration per (box, bin row, row block, column block), the bin
    # columns unrolled. Each block is read, added to and written back in place:
    # XLA's CPU scatter is an order of magnitude slower for this.
    def body(it, acc):
        k, rest = jnp.divmod(it, ph * jys * jxs)
        p, rest = jnp.divmod(rest, jys * jxs)
        jy, jx = jnp.divmod(rest, jxs)
        g_row = lax.dynamic_index_in_dim(g, k, 0, keepdims=False)
        g_row = lax.dynamic_index_in_dim(g_row, p, 0, keepdims=False)  # (PW, C)
        w_row = wy[k, p, jy]  # (Ty,)
        w_col = wx[k, :, jx]  # (PW, Tx)
        update = (w_row[None, :, None] * w_col[:, None, :])[..., None] * g_row[:, None, None]
        row, cols_q, img = start_y[k, p, jy], start_x[k, :, jx], image[k]
        for q in range(pw):
            at = (img, row, cols_q[q], zero)
            block = lax.dynamic_slice(acc, at, (1, ty, tx, channels))
            acc = lax.dynamic_update_slice(acc, block + update[q][None], at)
        return acc

    acc = jnp.zeros(canvas_shape, g.dtype)
    if k_boxes == 0:
        return acc
    return lax.fori_loop(0, k_boxes * ph * jys * jxs, body, acc)


def _slots(start, weight):
    """Blocks `start (K, P, J)`, `weight (K, P, J, T)` -> slots `(K, P, J*T)`."""
    k, p, j, t = weight.shape
    rows = start[..., None] + jnp.arange(t, dtype=start.dtype)
    return rows.reshape(k, p, j * t), weight.reshape(k, p, j * t)


# ----------------------------------------------------------------------------
# Patch layouts and the run-time switch among them.


class _Layout(NamedTuple):
    """Static patch shape: one `ty x tx` block per bin, or per sample (`pairs`)."""

    pairs: bool
    ty: int
    tx: int


def _layouts(sampling_ratio: int, max_grid: int, cap_y: int, cap_x: int) -> list[_Layout]:
    """The static layouts the switch chooses among, smallest first."""
    pairs = _Layout(True, min(2, cap_y), min(2, cap_x))
    if sampling_ratio > 0:
        # A fixed grid: 2x2 pixels per sample is exactly the kernel's work.
        return [pairs]
    # Adaptive samples are at most a pixel apart, so a bin with g samples per
    # axis spans at most g + 1 rows: blocks of 3, 5, 9, 17, ... rows cover
    # g <= 2, 4, 8, 16, ... One more branch per doubling keeps compilation
    # short; with the default cap of 8 a patch holds at most (9/6)**2 times the
    # taps a bin needs (g = 5).
    layouts = []
    size = 3
    while True:
        layout = _Layout(False, min(size, cap_y), min(size, cap_x))
        if layout not in layouts:
            layouts.append(layout)
        if size >= max_grid + 1:
            break
        size = 2 * size - 1
    # Boxes whose count was capped at max_grid have sparser samples.
    if max_grid >= 2:
        layouts.append(pairs)
    return layouts


def _patch_extent(sampling_ratio: int, max_grid: int, cap_y: int, cap_x: int) -> tuple[int, int]:
    """Largest patch rows and columns any layout gathers."""
    layouts = _layouts(sampling_ratio, max_grid, cap_y, cap_x)
    return max(layout.ty for layout in layouts), max(layout.tx for layout in layouts)


def _layout_weights(layout, geometry, samples_y, samples_x, count):
    """Row and column slots of every bin for one layout."""
    level_h, level_w, row_offset, col_offset = geometry
    make = _pairwise_weights if layout.pairs else _contiguous_weights
    make = jax.vmap(make, in_axes=(0, 0, 0, 0, 0, 0, None))
    start_y, wy = make(*samples_y, level_h, row_offset, layout.ty)
    start_x, wx = make(*samples_x, level_w, col_offset, layout.tx)
    wy = wy / count[:, None, None, None]
    return (*_slots(start_y, wy), *_slots(start_x, wx))


def _switch(index, branches, *operands):
    if len(branches) == 1:
        return branches[0](*operands)
    return lax.switch(index, branches, *operands)


# The switch sits inside one custom VJP, so autodiff never sees its branches:
# differentiating a `lax.switch` directly makes every branch emit (zeros for)
# the residuals of all the others, a full feature map each.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pool(layouts, index, canvas, image, geometry, samples_y, samples_x, count):
    return _pool_fwd(layouts, index, canvas, image, geometry, samples_y, samples_x, count)[0]


def _pool_fwd(layouts, index, canvas, image, geometry, samples_y, samples_x, count):
    def branch(layout):
        def run(canvas, image, geometry, samples_y, samples_x, count):
            rows, wy, cols, wx = _layout_weights(layout, geometry, samples_y, samples_x, count)
            return _pool_forward(canvas, image, rows, wy, cols, wx)

        return run

    operands = (canvas, image, geometry, samples_y, samples_x, count)
    out = _switch(index, [branch(layout) for layout in layouts], *operands)
    return out, (index, *operands)


def _pool_bwd(layouts, residuals, g):
    index, canvas, image, geometry, samples_y, samples_x, count = residuals

    def branch(layout):
        def run(canvas, image, geometry, samples_y, samples_x, count, g):
            def weights(frac_y, frac_x):
                sy = (samples_y[0], samples_y[1], frac_y, samples_y[3])
                sx = (samples_x[0], samples_x[1], frac_x, samples_x[3])
                rows, wy, cols, wx = _layout_weights(layout, geometry, sy, sx, count)
                return (wy, wx), (rows, cols)

            (wy, wx), weights_vjp, (rows, cols) = jax.vjp(
                weights, samples_y[2], samples_x[2], has_aux=True
            )
            g = g.astype(wy.dtype)
            dcanvas = _pool_canvas_cotangent(
                layout.ty, layout.tx, canvas.shape, image, rows, wy, cols, wx, g
            )
            dwy, dwx = _pool_weight_cotangents(canvas, image, rows, wy, cols, wx, g)
            dfrac_y, dfrac_x = weights_vjp((dwy, dwx))
            return dcanvas.astype(canvas.dtype), dfrac_y, dfrac_x

        return run

    operands = (canvas, image, geometry, samples_y, samples_x, count, g)
    dcanvas, dfrac_y, dfrac_x = _switch(index, [branch(layout) for layout in layouts], *operands)
    # Sample indices, validity and counts are piecewise constant in the boxes.
    return (
        None,
        dcanvas,
        None,
        None,
        (None, None, dfrac_y, None),
        (None, None, dfrac_x, None),
        None,
    )


_pool.defvjp(_pool_fwd, _pool_bwd)


# ----------------------------------------------------------------------------
# Flat core: K boxes, each with its own image, level size, offset and scale.


def _roi_align_flat(
    canvas: jax.Array,
    image: jax.Array,
    boxes: jax.Array,
    *,
    scale: jax.Array,
    level_h: jax.Array | int,
    level_w: jax.Array | int,
    row_offset: jax.Array | int = 0,
    col_offset: jax.Array | int = 0,
    cap_y: int,
    cap_x: int,
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    max_sampling_ratio: int,
) -> jax.Array:
    """ROI Align of K boxes on a canvas `(B, Hc, Wc, C)`, returning `(K, PH, PW, C)`.

    Box k is pooled from the `level_h x level_w` map whose top-left pixel is at
    `(row_offset, col_offset)` of canvas image `image[k]` (each a scalar or
    `(K,)`); `cap_y` and `cap_x` bound the map sizes. A patch may run past the
    map (with zero weights) by up to `_patch_extent(...)` rows and columns,
    which must stay inside the canvas.
    """
    ph, pw = output_size
    acc_dtype = jnp.promote_types(canvas.dtype, jnp.float32)
    boxes = boxes.astype(acc_dtype)
    max_grid = sampling_ratio if sampling_ratio > 0 else max_sampling_ratio
    shape_k = boxes.shape[:1]
    scale = jnp.broadcast_to(jnp.asarray(scale, acc_dtype), shape_k)
    level_h = jnp.broadcast_to(jnp.asarray(level_h, jnp.int32), shape_k)
    level_w = jnp.broadcast_to(jnp.asarray(level_w, jnp.int32), shape_k)
    row_offset = jnp.broadcast_to(jnp.asarray(row_offset, jnp.int32), shape_k)
    col_offset = jnp.broadcast_to(jnp.asarray(col_offset, jnp.int32), shape_k)

    def one_box(box, scale, h, w):
        # Pixel centres sit at integer + 0.5 in image coordinates.
        x1, y1, x2, y2 = box * scale - (0.5 if aligned else 0.0)
        grid_y = _grid_count(y2 - y1, ph, sampling_ratio, max_sampling_ratio, aligned)
        grid_x = _grid_count(x2 - x1, pw, sampling_ratio, max_sampling_ratio, aligned)
        sy = _axis_samples(y1, y2, h, ph, grid_y, max_grid, aligned)
        sx = _axis_samples(x1, x2, w, pw, grid_x, max_grid, aligned)
        count = jnp.maximum(grid_y * grid_x, 1).astype(acc_dtype)
        return sy, sx, count

    samples_y, samples_x, count = jax.vmap(one_box)(boxes, scale, level_h, level_w)
    # The smallest layout whose blocks hold every bin's samples: contiguous
    # layouts grow monotonically, so its index is the number that are too small.
    need_y = jnp.max(_support(samples_y[0], samples_y[1], samples_y[3]), initial=0)
    need_x = jnp.max(_support(samples_x[0], samples_x[1], samples_x[3]), initial=0)
    layouts = _layouts(sampling_ratio, max_grid, cap_y, cap_x)
    index = sum(
        ((layout.ty < need_y) | (layout.tx < need_x)).astype(jnp.int32)
        for layout in layouts
        if not layout.pairs
    )
    index = jnp.minimum(index, len(layouts) - 1)
    geometry = (level_h, level_w, row_offset, col_offset)
    out = _pool(tuple(layouts), index, canvas, image, geometry, samples_y, samples_x, count)
    return out.astype(canvas.dtype)


# ----------------------------------------------------------------------------
# Public API.


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    *,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
    box_indices: jax.Array | None = None,
    max_sampling_ratio: int = 8,
) -> jax.Array:
    """Pools a `(PH, PW)` grid of bilinearly sampled features from each box.

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
    every patch size the run-time switch could pick). Image indices outside
    `[0, B)` are clamped, as JAX indexing does.

    Args:
      features: `(H, W, C)` or `(B, H, W, C)` feature map(s), NHWC.
      boxes: boxes `(x1, y1, x2, y2)` in input-image coordinates, shaped as
        above.
      output_size: `PH` = `PW` as an int, or `(PH, PW)`.
      spatial_scale: feature-map pixels per input-image pixel (1 / stride); a
        Python number or a traced scalar.
      sampling_ratio: samples per bin along each axis; `<= 0` for adaptive.
      aligned: shift boxes by -0.5 pixel (True, detectron2's default) or use
        the legacy Detectron convention (False, torchvision's default).
      box_indices: `(K,)` integer image index of each box, for the flat form.
      max_sampling_ratio: cap on the adaptive sample count per bin axis.

    Returns:
      The pooled features, shaped as above, with the dtype of `features`.

    Raises:
      ValueError: on a wrong rank, a last box dimension other than 4, or
        mismatched batch sizes; TypeError on non-integer `box_indices` or
        non-floating inputs.

    Example:

    >>> import jax.numpy as jnp
    >>> features = jnp.arange(16.0).reshape(4, 4, 1)  # F[y, x] = 4 y + x
    >>> boxes = jnp.array([[0.5, 0.5, 2.5, 2.5]])      # centred on pixels 0..2
    >>> out = roi_align(features, boxes, 2, sampling_ratio=1)
    >>> out.shape
    (1, 2, 2, 1)
    >>> out[0, :, :, 0].tolist()  # samples at (0.5, 0.5), (0.5, 1.5), ...
    [[2.5, 3.5], [6.5, 7.5]]
    """
    output_size = _pair(output_size)
    sampling_ratio = _check_int("sampling_ratio", sampling_ratio)
    max_sampling_ratio = _check_int("max_sampling_ratio", max_sampling_ratio)
    if max_sampling_ratio < 1:
        raise ValueError(f"max_sampling_ratio must be >= 1, got {max_sampling_ratio}")
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
    return _roi_align_impl(
        features,
        boxes,
        box_indices,
        spatial_scale,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=max_sampling_ratio,
    )


# Jitted here so that calls outside `jit` compile once instead of dispatching
# every small op; inside a caller's `jit` it is simply inlined.
@functools.partial(
    jax.jit, static_argnames=("output_size", "sampling_ratio", "aligned", "max_sampling_ratio")
)
def _roi_align_impl(
    features,
    boxes,
    box_indices,
    spatial_scale,
    *,
    output_size,
    sampling_ratio,
    aligned,
    max_sampling_ratio,
):
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
        # The gathers promise in-bounds indices, so clamp like JAX indexing.
        image = jnp.clip(box_indices, 0, features.shape[0] - 1).astype(jnp.int32)
        canvas, out_shape = features, boxes.shape[:1]
    _, h, w, c = canvas.shape
    out = _roi_align_flat(
        canvas,
        image,
        boxes.reshape(-1, 4),
        scale=spatial_scale,
        level_h=h,
        level_w=w,
        cap_y=h,
        cap_x=w,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=max_sampling_ratio,
    )
    return out.reshape(*out_shape, *output_size, c)


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

    Shapes: `B` images, `N` boxes per image, level `l` of size `Hl x Wl`, `C`
    channels, `PH x PW` output grid.

    Args:
      features: sequence of `(B, Hl, Wl, C)` maps, finest first.
      boxes: `(B, N, 4)` boxes in image coordinates.
      output_size: `PH` = `PW` as an int, or `(PH, PW)`.
      strides: stride of each level, e.g. `(4, 8, 16, 32)`; consecutive levels
        must differ by a factor of 2.
      sampling_ratio: as in `roi_align` (`<= 0` for adaptive).
      aligned: as in `roi_align`; False like torchvision's `MultiScaleRoIAlign`.
      canonical_scale, canonical_level: FPN level heuristic (224 and 4).

    Returns:
      `(B, N, PH, PW, C)` pooled features, in the dtype of `features`.

    Example:

    >>> import jax.numpy as jnp
    >>> maps = [jnp.ones((1, 16, 16, 8)), jnp.ones((1, 8, 8, 8))]
    >>> boxes = jnp.array([[[0.0, 0.0, 20.0, 20.0], [4.0, 4.0, 60.0, 60.0]]])
    >>> multilevel_roi_align(maps, boxes, 7, strides=(4, 8)).shape
    (1, 2, 7, 7, 8)
    """
    output_size = _pair(output_size)
    sampling_ratio = _check_int("sampling_ratio", sampling_ratio)
    features, boxes, strides = _check_pyramid(features, boxes, strides)

    return _multilevel_impl(
        tuple(features),
        boxes,
        output_size=output_size,
        strides=strides,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
    )


# Cap on the adaptive sample count per bin axis in `multilevel_roi_align`: FPN
# level assignment keeps boxes at a few feature pixels on their level.
_MULTILEVEL_MAX_SAMPLING_RATIO = 8


def _check_pyramid(
    features: Sequence[jax.Array], boxes: jax.Array, strides: Sequence[int]
) -> tuple[list[jax.Array], jax.Array, tuple[int, ...]]:
    """Validates the inputs of a multilevel ROI Align; returns them as arrays.

    Raises `ValueError` / `TypeError` naming the problem: levels and strides
    that do not pair up, strides that are not doubling powers of two, levels
    with other batch sizes, channels or dtypes, non-float inputs, and boxes
    that are not `(B, N, 4)`.
    """
    features = [jnp.asarray(f) for f in features]
    strides = tuple(_check_int("strides[i]", s) for s in strides)
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
    max_grid = sampling_ratio if sampling_ratio > 0 else _MULTILEVEL_MAX_SAMPLING_RATIO
    if len(features) == 1:
        canvas, row_offsets, col_offsets = first, [0], [0]
    else:
        # The finest map on the left, the coarser ones stacked to its right:
        # about 1.5x the finest map's area for a pyramid whose sizes halve.
        # Zero margins let a patch start at any pixel of any map.
        pad_y, pad_x = _patch_extent(sampling_ratio, max_grid, cap_y, cap_x)
        right_rows = [0, *np.cumsum(heights[1:-1]).tolist()]
        row_offsets = [0, *right_rows]
        col_offsets = [0] + [widths[0]] * (len(features) - 1)
        height = max(heights[0], sum(heights[1:])) + pad_y
        width = widths[0] + max(widths[1:]) + pad_x
        canvas = jnp.zeros((b, height, width, c), first.dtype)
        canvas = lax.dynamic_update_slice(canvas, first, (0, 0, 0, 0))
        for f, row in zip(features[1:], right_rows, strict=True):
            canvas = lax.dynamic_update_slice(canvas, f, (0, row, widths[0], 0))
    out = _roi_align_flat(
        canvas,
        jnp.repeat(jnp.arange(b, dtype=jnp.int32), n),
        flat_boxes,
        scale=jnp.asarray([1.0 / s for s in strides], jnp.float32)[level],
        level_h=jnp.asarray(heights, jnp.int32)[level],
        level_w=jnp.asarray(widths, jnp.int32)[level],
        row_offset=jnp.asarray(row_offsets, jnp.int32)[level],
        col_offset=jnp.asarray(col_offsets, jnp.int32)[level],
        cap_y=cap_y,
        cap_x=cap_x,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=_MULTILEVEL_MAX_SAMPLING_RATIO,
    )
    return out.reshape(b, n, *output_size, c)
