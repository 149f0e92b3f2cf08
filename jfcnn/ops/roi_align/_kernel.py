"""The patch-gather ROI Align kernel and its custom VJP.

ROI Align is separable: the value of one bin is `sum_{y, x} wy[y] * wx[x] *
F[y, x]`, where `wy` sums the bilinear weights of the bin's samples along y
(and likewise `wx` along x). The sample geometry and these weights are
computed per box (one box at a time, `jax.vmap`-ed); then every bin gathers
the small patch of `F` where `wy` and `wx` are non-zero and weights it by
their outer product, all taps of a bin summed in one fused loop. With a fixed
`sampling_ratio` S the patch is one 2x2 pixel block per sample, exactly the
kernel's 4 S^2 reads. In the adaptive mode the samples are at most a pixel
apart and a bin's patch is one contiguous block of 3, 5 or 9 rows and columns,
chosen at run time with `lax.switch` from the boxes actually given: small
boxes do not pay for the worst case, and all shapes stay static.

The backward pass is a custom VJP: the feature gradient is accumulated patch
by patch in a loop of in-place block updates (XLA's CPU scatter is slow for
this), and the box gradient is the exact derivative of the bilinear weights
through the sample positions. Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`)
is therefore not supported.

Boxes of all images are pooled in one flat batch with an image index per box
rather than by `jax.vmap` over images: under `vmap` the run-time switch would
evaluate every branch and the in-place updates would become scatters.

Shapes: `K` boxes; a canvas `(B, Hc, Wc, C)` holding `B` images; `PH x PW`
bins, `P` of them along one axis (`PH` or `PW`); `S` sample slots per bin and
axis; `My` (`Mx`) row (column) slots of a bin's patch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jfcnn.ops.roi_align._geometry import axis_samples, grid_count, kept_boxes

# ----------------------------------------------------------------------------
# Per-bin patch weights from the samples of one box along one axis.


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
    # XLA's CPU scatter is much slower for this.
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


def patch_extent(sampling_ratio: int, max_grid: int, cap_y: int, cap_x: int) -> tuple[int, int]:
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


def roi_align_flat(
    canvas: jax.Array,
    image: jax.Array,
    boxes: jax.Array,
    *,
    scale: jax.Array,
    level_h: jax.Array | int,
    level_w: jax.Array | int,
    row_offset: jax.Array | int = 0,
    col_offset: jax.Array | int = 0,
    keep: jax.Array | None = None,
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
    map (with zero weights) by up to `patch_extent(...)` rows and columns,
    which must stay inside the canvas. Boxes with a non-finite coordinate, and
    those where the optional `(K,)` bool `keep` is False, pool zeros with zero
    gradients.
    """
    ph, pw = output_size
    acc_dtype = jnp.promote_types(canvas.dtype, jnp.float32)
    boxes, kept = kept_boxes(boxes.astype(acc_dtype), keep)
    max_grid = sampling_ratio if sampling_ratio > 0 else max_sampling_ratio
    shape_k = boxes.shape[:1]
    scale = jnp.broadcast_to(jnp.asarray(scale, acc_dtype), shape_k)
    level_h = jnp.broadcast_to(jnp.asarray(level_h, jnp.int32), shape_k)
    level_w = jnp.broadcast_to(jnp.asarray(level_w, jnp.int32), shape_k)
    row_offset = jnp.broadcast_to(jnp.asarray(row_offset, jnp.int32), shape_k)
    col_offset = jnp.broadcast_to(jnp.asarray(col_offset, jnp.int32), shape_k)

    def one_box(box, kept, scale, h, w):
        # Pixel centres sit at integer + 0.5 in image coordinates.
        x1, y1, x2, y2 = box * scale - (0.5 if aligned else 0.0)
        grid_y = grid_count(y2 - y1, ph, sampling_ratio, max_sampling_ratio, aligned)
        grid_x = grid_count(x2 - x1, pw, sampling_ratio, max_sampling_ratio, aligned)
        # A masked box keeps its (finite) taps with no valid sample: zero
        # weights, so zero values and gradients, and no patch to fit.
        *taps_y, valid_y = axis_samples(y1, y2, h, ph, grid_y, max_grid, aligned)
        *taps_x, valid_x = axis_samples(x1, x2, w, pw, grid_x, max_grid, aligned)
        sy = (*taps_y, valid_y * kept.astype(acc_dtype))
        sx = (*taps_x, valid_x * kept.astype(acc_dtype))
        count = jnp.maximum(grid_y * grid_x, 1).astype(acc_dtype)
        return sy, sx, count

    samples_y, samples_x, count = jax.vmap(one_box)(boxes, kept, scale, level_h, level_w)
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
