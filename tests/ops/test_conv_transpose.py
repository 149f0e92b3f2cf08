"""Tests for jfcnn.ops.conv_transpose against a scatter-loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jfcnn.ops import conv_transpose, conv_transpose_output_size
from jfcnn.ops.conv_transpose import _conv_transpose_dilated, _conv_transpose_matmul


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_transpose_loop(x, kernel, strides, padding):
    """Slow reference straight from the scatter definition, in float64 NumPy."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    (sh, sw), (ph, pw) = _pair(strides), _pair(padding)
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    oh = (h - 1) * sh + kh - 2 * ph
    ow = (w - 1) * sw + kw - 2 * pw
    out = np.zeros((n, oh, ow, o))
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    y, z = i * sh + a - ph, j * sw + b - pw
                    if 0 <= y < oh and 0 <= z < ow:
                        out[:, y, z, :] += x[:, i, j, :] @ kernel[a, b]
    return out


def _public(x, kernel, strides, padding):
    return conv_transpose(x, kernel, strides, padding)


def _dilated(x, kernel, strides, padding):
    return _conv_transpose_dilated(x, kernel, _pair(strides), _pair(padding), None)


def _matmul(x, kernel, strides, padding):
    return _conv_transpose_matmul(x, kernel, _pair(strides), _pair(padding), None)


IMPLS = pytest.mark.parametrize("impl", [_public, _dilated, _matmul], ids=lambda f: f.__name__)

# (input H, W), (KH, KW), strides, padding: square and non-square, overlapping
# (K > S), touching (K == S) and gapped (K < S) taps, padding up to K - 1.
CASES = [
    ((3, 4), (2, 2), 2, 0),
    ((3, 4), (2, 2), 2, 1),
    ((3, 4), (3, 3), 2, 0),
    ((3, 4), (3, 3), 2, 1),
    ((3, 4), (4, 4), 2, 1),
    ((3, 4), (4, 4), 2, 3),
    ((3, 4), (3, 3), 1, 1),
    ((3, 4), (1, 1), 1, 0),
    ((3, 4), (1, 1), 3, 0),
    ((3, 4), (2, 3), (2, 1), (0, 1)),
    ((2, 5), (3, 2), (3, 2), (1, 0)),
    ((4, 3), (5, 3), (2, 3), (2, 1)),
    ((1, 1), (3, 3), 2, 1),
]


@IMPLS
@pytest.mark.parametrize("hw,khw,strides,padding", CASES)
def test_matches_loop_reference(impl, hw, khw, strides, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *hw, 3)).astype(np.float32)
    kernel = rng.standard_normal((*khw, 3, 5)).astype(np.float32)
    expected = conv_transpose_loop(x, kernel, strides, padding)
    got = impl(jnp.asarray(x), jnp.asarray(kernel), strides, padding)
    assert got.shape == expected.shape
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


# 2x2 input, 3x3 kernel, stride 2: the four scattered kernel copies overlap in
# row 2 and column 2, where the sums are written out below.
X_2X2 = np.array([[1.0, 2.0], [3.0, 4.0]])
K_3X3 = np.arange(1.0, 10.0).reshape(3, 3)
GOLDEN_5X5 = np.array(
    [
        [1, 2, 3 + 2 * 1, 2 * 2, 2 * 3],
        [4, 5, 6 + 2 * 4, 2 * 5, 2 * 6],
        [7 + 3 * 1, 8 + 3 * 2, 9 + 2 * 7 + 3 * 3 + 4 * 1, 2 * 8 + 4 * 2, 2 * 9 + 4 * 3],
        [3 * 4, 3 * 5, 3 * 6 + 4 * 4, 4 * 5, 4 * 6],
        [3 * 7, 3 * 8, 3 * 9 + 4 * 7, 4 * 8, 4 * 9],
    ],
    dtype=np.float64,
)


@IMPLS
def test_worked_example_golden(impl):
    np.testing.assert_array_equal(
        GOLDEN_5X5,
        [
            [1, 2, 5, 4, 6],
            [4, 5, 14, 10, 12],
            [10, 14, 36, 24, 30],
            [12, 15, 34, 20, 24],
            [21, 24, 55, 32, 36],
        ],
    )
    assert GOLDEN_5X5.sum() == X_2X2.sum() * K_3X3.sum()
    x = jnp.asarray(X_2X2, jnp.float32)[None, :, :, None]
    kernel = jnp.asarray(K_3X3, jnp.float32)[:, :, None, None]
    out = impl(x, kernel, 2, 0)
    assert out.shape == (1, 5, 5, 1)
    np.testing.assert_array_equal(np.asarray(out[0, :, :, 0]), GOLDEN_5X5)
    # PyTorch's padding crops P rows/columns from every border.
    out_p1 = impl(x, kernel, 2, 1)
    np.testing.assert_array_equal(np.asarray(out_p1[0, :, :, 0]), GOLDEN_5X5[1:4, 1:4])
    np.testing.assert_array_equal(GOLDEN_5X5, conv_transpose_loop(x, kernel, 2, 0)[0, :, :, 0])


@pytest.mark.parametrize(
    "n,k,s,p,expected",
    [
        (2, 3, 2, 0, 5),
        (2, 3, 2, 1, 3),
        (16, 2, 2, 0, 32),
        (7, 4, 2, 1, 14),
        (5, 3, 1, 1, 5),
        (1, 1, 1, 0, 1),
    ],
)
def test_output_size(n, k, s, p, expected):
    assert conv_transpose_output_size(n, k, s, p) == expected
    x = jnp.zeros((1, n, 1, 1))
    assert conv_transpose(x, jnp.zeros((k, 1, 1, 1)), (s, 1), (p, 0)).shape[1] == expected


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 3, 2, 0), "n must be >= 1, got 0"),
        ((2, 3, 0, 0), "stride must be >= 1, got 0"),
        ((2, 0, 2, 0), "kernel_size must be >= 1, got 0"),
        ((2, 3, 2, -1), "padding must be >= 0, got -1"),
        ((1, 2, 2, 1), "padding=1 is too large"),
    ],
)
def test_output_size_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        conv_transpose_output_size(*args)


@pytest.mark.parametrize(
    "x_shape,k_shape,strides,padding,match",
    [
        ((4, 4, 3), (2, 2, 3, 5), 2, 0, r"x must have shape \(N, H, W, C\), got shape \(4, 4, 3\)"),
        ((1, 4, 4, 3), (2, 3, 5), 2, 0, r"kernel must have shape .* got shape \(2, 3, 5\)"),
        ((1, 4, 4, 3), (2, 2, 4, 5), 2, 0, r"kernel input channels 4 .* x channels 3"),
        ((1, 4, 4, 3), (2, 2, 3, 5), 2, -1, r"padding must be >= 0, got -1"),
        ((1, 4, 4, 3), (2, 2, 3, 5), 2, (0, -2), r"padding must be >= 0, got \(0, -2\)"),
        (
            (1, 1, 4, 3),
            (2, 2, 3, 5),
            2,
            (1, 0),
            r"padding=\(1, 0\) is too large for input height 1",
        ),
        ((1, 4, 4, 3), (2, 2, 3, 5), 0, 0, r"strides must be >= 1, got 0"),
        ((1, 4, 4, 3), (2, 2, 3, 5), (2, 2, 2), 0, r"strides must be an int or a pair"),
        ((1, 4, 4, 3), (2, 2, 3, 5), 2, "same", r"padding must be an int or a pair"),
    ],
)
def test_rejects_bad_arguments(x_shape, k_shape, strides, padding, match):
    with pytest.raises(ValueError, match=match):
        conv_transpose(jnp.zeros(x_shape), jnp.zeros(k_shape), strides, padding)


@IMPLS
@pytest.mark.parametrize(
    "khw,strides,padding", [((2, 2), 2, 0), ((3, 3), 2, 1), ((3, 2), (1, 2), (1, 0))]
)
def test_gradients_float64(impl, khw, strides, padding):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.standard_normal((2, 3, 2, 2)), jnp.float64)
        kernel = jnp.asarray(rng.standard_normal((*khw, 2, 3)), jnp.float64)
        check_grads(
            lambda x, k: impl(x, k, strides, padding), (x, kernel), order=2, modes=("fwd", "rev")
        )


def test_jit_and_bfloat16():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 4)), jnp.float32)
    expected = conv_transpose_loop(x, kernel, 2, 1)
    jitted = jax.jit(conv_transpose, static_argnums=(2, 3))
    np.testing.assert_allclose(np.asarray(jitted(x, kernel, 2, 1)), expected, rtol=1e-5, atol=1e-5)

    # The kernel is cast to the input's dtype; bfloat16 has ~3 significant digits.
    out_bf16 = conv_transpose(x.astype(jnp.bfloat16), kernel, 2, 1)
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_bf16, np.float32), expected, rtol=0.05, atol=0.15)

    out_acc = conv_transpose(
        x.astype(jnp.bfloat16), kernel, 2, 1, preferred_element_type=jnp.float32
    )
    assert out_acc.dtype == jnp.float32
    bf16_ref = conv_transpose_loop(
        x.astype(jnp.bfloat16).astype(jnp.float32),
        kernel.astype(jnp.bfloat16).astype(jnp.float32),
        2,
        1,
    )
    np.testing.assert_allclose(np.asarray(out_acc), bf16_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw,khw,strides,padding", CASES[:6] + CASES[9:12])
def test_matches_torch(hw, khw, strides, padding):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, *hw, 3)).astype(np.float32)
    kernel = rng.standard_normal((*khw, 3, 4)).astype(np.float32)
    expected = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        torch.from_numpy(kernel.transpose(2, 3, 0, 1).copy()),
        stride=strides,
        padding=padding,
    ).numpy()
    got = conv_transpose(jnp.asarray(x), jnp.asarray(kernel), strides, padding)
    np.testing.assert_allclose(
        np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "hw,khw,strides,padding",
    [
        ((2, 4), (4, 2), (1, 2), (2, 1)),
        ((4, 2), (2, 4), (2, 1), (1, 2)),
        ((2, 4), (4, 2), (1, 2), (0, 1)),
        ((2, 4), (3, 2), (1, 2), (1, 1)),
    ],
)
def test_axes_with_different_strides_match_torch(hw, khw, strides, padding):
    # Settings on which XLA's CPU compiler aborted the dilated-convolution form.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, *hw, 2)).astype(np.float32)
    kernel = rng.standard_normal((*khw, 2, 3)).astype(np.float32)
    expected = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        torch.from_numpy(kernel.transpose(2, 3, 0, 1).copy()),
        stride=strides,
        padding=padding,
    ).numpy()
    got = jax.jit(conv_transpose, static_argnums=(2, 3))(
        jnp.asarray(x), jnp.asarray(kernel), strides, padding
    )
    np.testing.assert_allclose(
        np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5
    )
    grad = jax.grad(lambda v: conv_transpose(v, jnp.asarray(kernel), strides, padding).sum())
    assert np.isfinite(np.asarray(grad(jnp.asarray(x)))).all()
