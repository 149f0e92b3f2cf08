"""Tests for jfcnn.models.layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.models.layers import ConvTranspose, GroupNorm
from jfcnn.ops import conv_transpose


def scatter_loop(x, kernel, bias, strides, padding):
    """out[n, i*S + a - P, j*S + b - P] += x[n, i, j] @ kernel[a, b], plus bias, in float64."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    (sh, sw), (ph, pw) = strides, padding
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    oh, ow = (h - 1) * sh + kh - 2 * ph, (w - 1) * sw + kw - 2 * pw
    out = np.zeros((n, oh, ow, o)) + np.asarray(bias, np.float64)
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    y, z = i * sh + a - ph, j * sw + b - pw
                    if 0 <= y < oh and 0 <= z < ow:
                        out[:, y, z] += x[:, i, j] @ kernel[a, b]
    return out


@pytest.mark.parametrize(
    "kernel_size,strides,padding,khw,shw,phw",
    [
        (2, 2, 0, (2, 2), (2, 2), (0, 0)),
        (3, 2, 1, (3, 3), (2, 2), (1, 1)),
        ((3, 2), (1, 2), (1, 0), (3, 2), (1, 2), (1, 0)),
        ((4, 4), 2, 1, (4, 4), (2, 2), (1, 1)),
    ],
)
def test_matches_op_and_loop(kernel_size, strides, padding, khw, shw, phw):
    layer = ConvTranspose(
        features=6,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        bias_init=jax.nn.initializers.normal(1.0),
    )
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    variables = layer.init(jax.random.key(1), x)
    params = variables["params"]
    assert params["kernel"].shape == (*khw, 4, 6)
    assert params["bias"].shape == (6,)
    assert params["kernel"].dtype == params["bias"].dtype == jnp.float32

    out = layer.apply(variables, x)
    oh = (3 - 1) * shw[0] + khw[0] - 2 * phw[0]
    ow = (5 - 1) * shw[1] + khw[1] - 2 * phw[1]
    assert out.shape == (2, oh, ow, 6)
    np.testing.assert_allclose(
        out, conv_transpose(x, params["kernel"], shw, phw) + params["bias"], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        out, scatter_loop(x, params["kernel"], params["bias"], shw, phw), rtol=1e-5, atol=1e-5
    )


def test_no_bias_custom_init_and_dtypes():
    layer = ConvTranspose(
        features=3,
        kernel_size=2,
        strides=2,
        use_bias=False,
        kernel_init=jax.nn.initializers.constant(0.5),
        dtype=jnp.bfloat16,
    )
    x = jnp.arange(2 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 2, 1)
    variables = layer.init(jax.random.key(0), x)
    assert set(variables["params"]) == {"kernel"}
    np.testing.assert_array_equal(variables["params"]["kernel"], np.full((2, 2, 1, 3), 0.5))
    assert variables["params"]["kernel"].dtype == jnp.float32
    out = layer.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    # K == S: each input pixel becomes a 2x2 block of 0.5 * value (exact in bfloat16).
    expected = 0.5 * np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.repeat(expected, 3, axis=-1))


def test_rejects_unbatched_input():
    layer = ConvTranspose(features=2)
    with pytest.raises(ValueError, match=r"got shape \(4, 4, 3\)"):
        layer.init(jax.random.key(0), jnp.zeros((4, 4, 3)))


def group_norm_numpy(x, scale, bias, groups, eps):
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape,groups", [((2, 5, 4, 8), 2), ((1, 3, 3, 6), 3), ((2, 4, 4, 4), 1)])
def test_group_norm_matches_numpy_and_flax(shape, groups):
    rng = np.random.default_rng(0)
    # A nonzero mean per channel, so mean removal is exercised.
    x = jnp.asarray(rng.standard_normal(shape) * 2.0 + np.arange(shape[-1]), jnp.float32)
    params = {
        "scale": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32),
    }
    ours = GroupNorm(num_groups=groups, epsilon=1e-5)
    theirs = nn.GroupNorm(num_groups=groups, epsilon=1e-5)
    theirs_params = theirs.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)["params"]) == jax.tree.map(
        jnp.shape, theirs_params
    )
    out = ours.apply({"params": params}, x)
    expected = group_norm_numpy(x, params["scale"], params["bias"], groups, 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, theirs.apply({"params": params}, x), rtol=1e-5, atol=1e-5)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x)))

    grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    grads_flax = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_flax), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_dtype_and_errors():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 4, 4)), jnp.bfloat16)
    layer = GroupNorm(num_groups=2, dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["scale"].dtype == jnp.float32
    out = layer.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    expected = group_norm_numpy(np.asarray(x, np.float32), 1.0, 0.0, 2, 1e-6)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide the 4 channels"):
        GroupNorm(num_groups=3).init(jax.random.key(0), x)
