"""Non-overlapping max pooling (window = stride), as a reshape and a max.

Letters used for shapes:
  B: batch size.
  H, W: input height and width.
  OH, OW: output height and width, ``H // KH`` and ``W // KW`` (floor, as
    PyTorch's ``max_pool2d`` and Flax's ``max_pool`` with ``VALID`` padding).
  KH, KW: window height and width, also the stride.
  C: channels.

``lax.reduce_window``, which ``flax.linen.max_pool`` uses, differentiates
through ``select_and_scatter``, which XLA's CPU backend expands into index
arithmetic and a scatter: in the U-Net's training step on a 2-core CPU the
three 2x2 poolings' backward pass took about 15% of the step. When the window
is its own stride every input belongs to exactly one window, so a reshape
exposes the windows as two axes, the forward pass is one reduction, and the
gradient is elementwise: each window's output gradient goes to its first
maximum in row-major order, the element PyTorch's ``max_pool2d`` records as its
index (``torch.nn.functional.max_pool2d(x, k).backward()`` gives the same
gradient, ties included).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jfcnn.ops._util import pair


def max_pool(x_bhwc: jax.Array, window: int | Sequence[int]) -> jax.Array:
    """Max pooling with stride equal to the window, ``VALID`` padding.

    Args:
      x_bhwc: ``(B, H, W, C)`` array, any float dtype.
      window: ``KH`` (square) or ``(KH, KW)``, each at least 1 and at most the
        corresponding input size.

    Returns:
      ``(B, H // KH, W // KW, C)``: the maximum of each window. Rows and
      columns past the last whole window are dropped (their gradient is 0).
      A window holding a NaN gives NaN, and its gradient goes to its first NaN.

    >>> max_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """
    kh, kw = pair(window, "window", minimum=1)
    if x_bhwc.ndim != 4:
        raise ValueError(f"x_bhwc must have shape (B, H, W, C), got {x_bhwc.shape}.")
    b, h, w, c = x_bhwc.shape
    if kh > h or kw > w:
        raise ValueError(
            f"window {(kh, kw)} is larger than the input's (H, W) = {(h, w)} "
            f"(x_bhwc shape {x_bhwc.shape}); use a window of at most the input size."
        )
    oh, ow = h // kh, w // kw
    if (oh * kh, ow * kw) != (h, w):
        x_bhwc = x_bhwc[:, : oh * kh, : ow * kw]
    return _window_max(x_bhwc.reshape(b, oh, kh, ow, kw, c))


@jax.custom_vjp
def _window_max(windows: jax.Array) -> jax.Array:
    """``(B, OH, KH, OW, KW, C) -> (B, OH, OW, C)``: the maximum over axes 2 and 4."""
    return windows.max(axis=(2, 4))


def _first_max(windows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each window's maximum and the row-major position of its first maximum
    (of its first NaN, if any), found in one pass over the window."""
    kh, kw = windows.shape[2], windows.shape[4]
    best, where = (
        windows[:, :, 0, :, 0],
        jnp.zeros(windows.shape[:2] + windows.shape[3:4] + windows.shape[5:], jnp.int32),
    )
    for k in range(1, kh * kw):
        value = windows[:, :, k // kw, :, k % kw]
        later = (value > best) | (jnp.isnan(value) & ~jnp.isnan(best))
        best = jnp.where(later, value, best)
        where = jnp.where(later, k, where)
    return best, where


def _window_max_fwd(windows):
    # The gradient's position is chosen here, with the maximum, not by comparing
    # the input with the maximum afterwards: XLA may recompute a fused input with
    # other rounding, and an equality test would then find no maximum at all.
    out, where = _first_max(windows)
    return out, (where, windows.shape)


def _window_max_bwd(residuals, g):
    where, shape = residuals
    kh, kw = shape[2], shape[4]
    zero = jnp.zeros((), g.dtype)
    rows = [
        jnp.stack([jnp.where(where == i * kw + j, g, zero) for j in range(kw)], axis=3)
        for i in range(kh)
    ]  # Each (B, OH, OW, KW, C).
    return (jnp.stack(rows, axis=2),)  # (B, OH, KH, OW, KW, C)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)
