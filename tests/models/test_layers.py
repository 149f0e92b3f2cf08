"""Tests for jfcnn.models.layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.models.layers import (
    ConvTranspose,
    FrozenBatchNorm,
    GroupNorm,
    group_norm_groups,
    norm_layer,
)
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


def test_group_norm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 5, 6, 12)) * 3.0 + 1.5).astype(np.float32)
    params = {
        "scale": rng.standard_normal(12).astype(np.float32),
        "bias": rng.standard_normal(12).astype(np.float32),
    }
    theirs = torch.nn.GroupNorm(3, 12, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(params["scale"]))
        theirs.bias.copy_(torch.from_numpy(params["bias"]))
        expected = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    out = GroupNorm(num_groups=3, epsilon=1e-5).apply({"params": params}, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_group_norm_groups():
    channels = (1, 2, 3, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 2048, 37, 74)
    # Largest divisor <= 32 with >= 2 channels per group, by hand.
    expected = (1, 1, 1, 2, 4, 6, 8, 12, 16, 24, 32, 32, 32, 32, 32, 1, 2)
    assert [group_norm_groups(c) for c in channels] == list(expected)
    for c in range(1, 300):
        groups = group_norm_groups(c)
        assert c % groups == 0 and groups <= 32
        assert groups == 1 or c // groups >= 2


def test_frozen_batch_norm_hand_computed():
    x = jnp.asarray([[[[1.0, 2.0], [3.0, -4.0]]]])  # (1, 1, 2, 2)
    stats = {
        "scale": jnp.asarray([2.0, 0.5]),
        "bias": jnp.asarray([1.0, -1.0]),
        "mean": jnp.asarray([1.0, 0.0]),
        "var": jnp.asarray([4.0 - 1e-5, 0.25 - 1e-5]),
    }
    out = FrozenBatchNorm().apply({"batch_stats": stats}, x)
    # (x - mean) / sqrt(var + eps) * scale + bias:
    # channel 0 is (x - 1) / 2 * 2 + 1, channel 1 is x / 0.5 * 0.5 - 1.
    np.testing.assert_allclose(out, [[[[1.0, 1.0], [3.0, -5.0]]]], rtol=1e-6, atol=1e-6)
    out16 = FrozenBatchNorm(dtype=jnp.bfloat16).apply({"batch_stats": stats}, x)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out16, np.float32), [[[[1.0, 1.0], [3.0, -5.0]]]])


def test_frozen_batch_norm_matches_torchvision():
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    stats = {
        "scale": rng.uniform(0.5, 1.5, 5).astype(np.float32),
        "bias": rng.standard_normal(5).astype(np.float32),
        "mean": rng.standard_normal(5).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, 5).astype(np.float32),
    }
    theirs = ops.FrozenBatchNorm2d(5, eps=1e-5)
    for ours_name, torch_name in (
        ("scale", "weight"),
        ("bias", "bias"),
        ("mean", "running_mean"),
        ("var", "running_var"),
    ):
        getattr(theirs, torch_name).copy_(torch.from_numpy(stats[ours_name]))
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    out = FrozenBatchNorm().apply({"batch_stats": stats}, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


class _Norm(nn.Module):
    """One ``norm_layer`` as a module, to init and apply it."""

    kind: str
    channels: int
    train: bool = False

    @nn.compact
    def __call__(self, x):
        return norm_layer(self.kind, channels=self.channels, train=self.train, name="norm")(x)


def test_norm_layer_kinds_and_variables():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 3, 16)), jnp.float32)
    shapes = {
        kind: jax.tree.map(jnp.shape, jax.eval_shape(_Norm(kind, 16).init, jax.random.key(0), x))
        for kind in ("batch", "group", "frozen_batch")
    }
    assert shapes["batch"] == {
        "params": {"norm": {"scale": (16,), "bias": (16,)}},
        "batch_stats": {"norm": {"mean": (16,), "var": (16,)}},
    }
    assert shapes["group"] == {"params": {"norm": {"scale": (16,), "bias": (16,)}}}
    assert shapes["frozen_batch"] == {
        "batch_stats": {"norm": {"scale": (16,), "bias": (16,), "mean": (16,), "var": (16,)}}
    }
    # "none" is the identity and has no variables.
    variables = _Norm("none", 16).init(jax.random.key(0), x)
    assert not jax.tree.leaves(variables)
    np.testing.assert_array_equal(_Norm("none", 16).apply(variables, x), x)
    with pytest.raises(ValueError, match=r"norm must be one of .* got 'layer'"):
        _Norm("layer", 16).init(jax.random.key(0), x)


def test_norm_layer_group_uses_the_group_rule_and_epsilon():
    # 16 channels -> 8 groups of 2 channels, epsilon 1e-5.
    x = np.random.default_rng(5).standard_normal((2, 4, 3, 16)).astype(np.float32) + 2.0
    params = {"scale": np.linspace(0.5, 1.5, 16, dtype=np.float32), "bias": np.ones(16, np.float32)}
    out = _Norm("group", 16).apply({"params": {"norm": params}}, x)
    expected = group_norm_numpy(x, params["scale"], params["bias"], 8, 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_norm_layer_batch_matches_torch_train_and_eval():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((4, 3, 5, 6)) * 2.0 + 1.0).astype(np.float32)
    params = {"scale": rng.uniform(0.5, 1.5, 6), "bias": rng.standard_normal(6)}
    stats = {"mean": rng.standard_normal(6), "var": rng.uniform(0.5, 2.0, 6)}
    params, stats = jax.tree.map(lambda a: a.astype(np.float32), (params, stats))
    theirs = torch.nn.BatchNorm2d(6, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        for src, dst in ((params["scale"], theirs.weight), (params["bias"], theirs.bias)):
            dst.copy_(torch.from_numpy(src))
        theirs.running_mean.copy_(torch.from_numpy(stats["mean"]))
        theirs.running_var.copy_(torch.from_numpy(stats["var"]))
    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))
    variables = {"params": {"norm": params}, "batch_stats": {"norm": stats}}

    with torch.no_grad():
        expected_eval = theirs.eval()(x_torch).numpy().transpose(0, 2, 3, 1)
        expected_train = theirs.train()(x_torch).numpy().transpose(0, 2, 3, 1)
    out_eval = _Norm("batch", 6).apply(variables, x)
    np.testing.assert_allclose(out_eval, expected_eval, rtol=1e-5, atol=1e-5)
    out_train, updates = _Norm("batch", 6, train=True).apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(out_train, expected_train, rtol=1e-5, atol=1e-5)
    new = updates["batch_stats"]["norm"]
    np.testing.assert_allclose(new["mean"], theirs.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    # flax keeps the biased batch variance in its running average, PyTorch the unbiased one.
    count = x.shape[0] * x.shape[1] * x.shape[2]
    biased = x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(new["var"], 0.9 * stats["var"] + 0.1 * biased, rtol=1e-5)
    np.testing.assert_allclose(
        theirs.running_var.numpy(),
        0.9 * stats["var"] + 0.1 * biased * count / (count - 1),
        rtol=1e-5,
    )
