"""Tests for jfcnn.ops.max_pool against a loop from the definition and PyTorch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.ops import max_pool


def max_pool_loop(x, g, window):
    """Forward and input gradient from the definition, in NumPy: each window's
    maximum, and its output gradient sent to the window's first maximum in
    row-major order (PyTorch's recorded index)."""
    kh, kw = (window, window) if isinstance(window, int) else window
    b, h, w, c = x.shape
    out = np.zeros((b, h // kh, w // kw, c), x.dtype)
    grad = np.zeros_like(x)
    for n in range(b):
        for i in range(h // kh):
            for j in range(w // kw):
                for k in range(c):
                    patch = x[n, i * kh : (i + 1) * kh, j * kw : (j + 1) * kw, k]
                    first = np.unravel_index(np.argmax(patch), patch.shape)  # First maximum.
                    out[n, i, j, k] = patch[first]
                    grad[n, i * kh + first[0], j * kw + first[1], k] += g[n, i, j, k]
    return out, grad


CASES = [((2, 8, 8, 3), 2), ((2, 7, 9, 3), 2), ((1, 9, 8, 2), (3, 2)), ((1, 4, 5, 2), (4, 5))]


@pytest.mark.parametrize("shape, window", CASES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_forward_and_gradient_equal_the_definition(shape, window, ties):
    rng = np.random.default_rng(0)
    # Small integers tie often (as ReLU zeros do); the gradient must pick one element.
    x = rng.integers(0, 3, shape) if ties else rng.normal(size=shape)
    x = x.astype(np.float32)
    out, vjp = jax.vjp(lambda x: max_pool(x, window), jnp.asarray(x))
    g = rng.normal(size=out.shape).astype(np.float32)
    want_out, want_grad = max_pool_loop(x, g, window)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], want_grad)
    np.testing.assert_array_equal(
        out, nn.max_pool(jnp.asarray(x), _pair(window), strides=_pair(window))
    )


def _pair(window):
    return (window, window) if isinstance(window, int) else tuple(window)


@pytest.mark.parametrize("shape, window", CASES)
def test_gradient_equals_torch_max_pool2d_with_ties(shape, window):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, shape).astype(np.float32)
    out, vjp = jax.vjp(lambda x: max_pool(x, window), jnp.asarray(x))
    g = rng.normal(size=out.shape).astype(np.float32)
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    out_t = torch.nn.functional.max_pool2d(xt, _pair(window))
    out_t.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(out, out_t.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], xt.grad.numpy().transpose(0, 2, 3, 1))


def test_jit_vmap_bfloat16_and_nan():
    x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
    batched = jax.jit(jax.vmap(lambda x: max_pool(x, 2)))(x)
    np.testing.assert_array_equal(batched, jnp.stack([max_pool(xi, 2) for xi in x]))
    low = max_pool(x[0].astype(jnp.bfloat16), 2)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(low, max_pool(x[0], 2).astype(jnp.bfloat16))
    # A NaN propagates, and the window's gradient goes to it alone.
    y = x[0].at[0, 1, 1, 0].set(jnp.nan)
    out, vjp = jax.vjp(lambda y: max_pool(y, 2), y)
    assert jnp.isnan(out[0, 0, 0, 0]) and not jnp.isnan(out[0, 0, 1, 0])
    (grad,) = vjp(jnp.ones_like(out))
    np.testing.assert_array_equal(grad[0, :2, :2, 0], [[0, 0], [0, 1]])


@pytest.mark.parametrize(
    "shape, window, match",
    [
        ((1, 4, 4, 1), 5, "larger than the input"),
        ((1, 4, 4, 1), 0, "window"),
        ((4, 4, 1), 2, r"\(B, H, W, C\)"),
    ],
)
def test_bad_arguments_name_the_problem(shape, window, match):
    with pytest.raises(ValueError, match=match):
        max_pool(jnp.zeros(shape), window)
