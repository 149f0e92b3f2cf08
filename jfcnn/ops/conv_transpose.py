"""Transposed 2-D convolution with PyTorch's padding convention.

Letters used for shapes:

  N: batch size.
  H, W: input height and width.
  OH, OW: output height and width, ``(H - 1) * SH + KH - 2 * PH`` (same for W).
  KH, KW: kernel height and width.
  SH, SW: strides.
  PH, PW: padding (PyTorch's ``padding``: rows/columns cropped from each border).
  C: input channels.
  O: output channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jfcnn.ops._util import pair

IntOrPair = int | Sequence[int]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv_transpose_output_size(n: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of a transposed convolution along one axis.

    Args:
      n: input length, at least 1.
      kernel_size: kernel length, at least 1.
      stride: stride, at least 1.
      padding: PyTorch's ``padding``, at least 0.

    Returns:
      ``(n - 1) * stride + kernel_size - 2 * padding``.

    Raises:
      ValueError: if an argument is out of range or the output would be empty.

    >>> conv_transpose_output_size(2, kernel_size=3, stride=2, padding=0)
    5
    """
    for name, value, least in (("n", n, 1), ("kernel_size", kernel_size, 1), ("stride", stride, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}.")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}.")
    size = (n - 1) * stride + kernel_size - 2 * padding
    if size < 1:
        raise ValueError(
            f"padding={padding} is too large: input length {n}, kernel_size={kernel_size}, "
            f"stride={stride} give output length {size} < 1."
        )
    return size


def _conv_transpose_dilated(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[int, int],
    preferred_element_type,
) -> jax.Array:
    """The textbook formulation: a stride-1 convolution of the zero-dilated input.

    With the kernel flipped, input dilated by S and K - 1 - P zeros on each
    border (negative values crop), each output pixel gathers exactly the
    terms the scatter definition sends to it.
    """
    kh, kw = kernel.shape[:2]
    (ph, pw) = padding
    return lax.conv_general_dilated(
        x,
        kernel[::-1, ::-1],
        window_strides=(1, 1),
        padding=((kh - 1 - ph, kh - 1 - ph), (kw - 1 - pw, kw - 1 - pw)),
        lhs_dilation=strides,
        dimension_numbers=_DIMENSION_NUMBERS,
        preferred_element_type=preferred_element_type,
    )


def _conv_transpose_matmul(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[int, int],
    preferred_element_type,
) -> jax.Array:
    """The scatter definition as one matmul plus a few shifted adds.

    The kernel is zero-padded to ``Q * S`` rows (``Q = ceil(K / S)``) and
    split into ``Q`` blocks of ``S`` rows, so tap ``a = q * S + r`` of input
    row ``i`` lands in output block ``i + q`` at offset ``r``. One einsum
    gives every input pixel's ``(QH*SH, QW*SW, O)`` patch; the ``QH * QW``
    patch blocks are added at their block shifts, the block axes are merged
    into pixels and ``P`` is cropped from each border. Unlike the dilated
    convolution it never multiplies the zeros between dilated input pixels.
    """
    n, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    (sh, sw), (ph, pw) = strides, padding
    qh, qw = -(-kh // sh), -(-kw // sw)
    kernel = jnp.pad(kernel, ((0, qh * sh - kh), (0, qw * sw - kw), (0, 0), (0, 0)))
    kernel = kernel.reshape(qh, sh, qw, sw, c, o)
    # Output axes ordered (q, p, n, i, r, j, s, o) so each block is a
    # contiguous slab and the final merge of (i, r) and (j, s) is a reshape.
    patches = jnp.einsum(
        "nijc,qrpsco->qpnirjso", x, kernel, preferred_element_type=preferred_element_type
    )
    out = None
    for q in range(qh):
        for p in range(qw):
            shifted = jnp.pad(
                patches[q, p], ((0, 0), (q, qh - 1 - q), (0, 0), (p, qw - 1 - p), (0, 0), (0, 0))
            )
            out = shifted if out is None else out + shifted
    out = out.reshape(n, (h + qh - 1) * sh, (w + qw - 1) * sw, o)
    oh = (h - 1) * sh + kh - 2 * ph
    ow = (w - 1) * sw + kw - 2 * pw
    return out[:, ph : ph + oh, pw : pw + ow, :]


def _use_matmul(kernel_hw: tuple[int, int], strides: tuple[int, int]) -> bool:
    """Whether the matmul formulation is the faster one on CPU.

    The dilated convolution spends most of its multiplies on the zeros it
    inserts between input pixels (3/4 of them for K=2, S=2, the U-Net
    default), so the matmul form wins where each output pixel meets few input
    pixels per axis: `ceil(K / S) == 1`, or `== 2` with a stride above 1.
    With stride 1 (and K > 1) there are no inserted zeros and the patch
    tensor is K*K times the output, so the plain convolution wins. The
    forward+backward timings behind this rule are in the README.
    """
    if strides[0] != strides[1]:
        # XLA's CPU compiler (jax 0.10) aborts the process on some dilated convolutions
        # whose dilation differs between the axes (e.g. K=(4, 2), S=(1, 2), P=(2, 1)):
        # the matmul form, exact for every setting, avoids them.
        return True
    return all(
        -(-k // s) == 1 or (-(-k // s) == 2 and s >= 2)
        for k, s in zip(kernel_hw, strides, strict=True)
    )


def conv_transpose(
    x: jax.Array,
    kernel: jax.Array,
    strides: IntOrPair = 1,
    padding: IntOrPair = 0,
    *,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """Transposed 2-D convolution, equal to PyTorch's ``conv_transpose2d``.

    Every input pixel scatters a copy of the kernel weighted by its value::

      out[n, i*SH + a - PH, j*SW + b - PW, o] += x[n, i, j, c] * kernel[a, b, c, o]

    (terms landing outside the output are dropped), so each spatial side
    grows to ``(H - 1) * SH + KH - 2 * PH``. It equals
    ``torch.nn.functional.conv_transpose2d(x_nchw, kernel.transpose(2, 3, 0, 1),
    stride=S, padding=P)`` up to layout. ``output_padding`` and dilation are
    not supported. Differentiable and jit-able; strides and padding are static.

    Computation happens in ``x.dtype``: the kernel is cast to it, so bfloat16
    activations with float32 parameters run in bfloat16. Pass
    ``preferred_element_type=jnp.float32`` to accumulate (and return) in
    float32 instead.

    Args:
      x: input, shape ``(N, H, W, C)``.
      kernel: weights, shape ``(KH, KW, C, O)``.
      strides: ``S`` as an int or a pair ``(SH, SW)``, each at least 1.
      padding: PyTorch's ``P`` as an int or a pair ``(PH, PW)``, each at least
        0 and small enough that the output is not empty.
      preferred_element_type: optional accumulation and output dtype.

    Returns:
      Array of shape ``(N, OH, OW, O)`` and dtype ``x.dtype`` (or
      ``preferred_element_type``).

    Raises:
      ValueError: for wrong ranks, mismatched channels, non-positive strides,
        negative padding or padding that leaves an empty output.

    >>> x = jnp.ones((1, 2, 2, 1))
    >>> kernel = jnp.ones((3, 3, 1, 1))
    >>> conv_transpose(x, kernel, strides=2, padding=0)[0, :, :, 0]
    Array([[1., 1., 2., 1., 1.],
           [1., 1., 2., 1., 1.],
           [2., 2., 4., 2., 2.],
           [1., 1., 2., 1., 1.],
           [1., 1., 2., 1., 1.]], dtype=float32)
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, H, W, C), got shape {x.shape}.")
    if kernel.ndim != 4:
        raise ValueError(f"kernel must have shape (KH, KW, C, O), got shape {kernel.shape}.")
    if kernel.shape[2] != x.shape[3]:
        raise ValueError(
            f"kernel input channels {kernel.shape[2]} (kernel shape {kernel.shape}) do not match "
            f"x channels {x.shape[3]} (x shape {x.shape})."
        )
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must have non-empty spatial dims, got shape {x.shape}.")
    strides_hw = pair(strides, "strides", minimum=1)
    padding_hw = pair(padding, "padding", minimum=0)
    for axis, n, k, s, p in zip(
        ("height", "width"), x.shape[1:3], kernel.shape[:2], strides_hw, padding_hw, strict=True
    ):
        if (n - 1) * s + k - 2 * p < 1:
            raise ValueError(
                f"padding={padding!r} is too large for input {axis} {n} (x shape {x.shape}), "
                f"kernel {k}, stride {s}: output {axis} would be {(n - 1) * s + k - 2 * p}."
            )

    kernel = kernel.astype(x.dtype)
    if _use_matmul(kernel.shape[:2], strides_hw):
        return _conv_transpose_matmul(x, kernel, strides_hw, padding_hw, preferred_element_type)
    return _conv_transpose_dilated(x, kernel, strides_hw, padding_hw, preferred_element_type)
