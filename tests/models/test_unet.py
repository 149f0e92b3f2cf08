"""Tests for jfcnn.models.unet against a NumPy recomputation from the same params."""

import importlib.util
import pathlib
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.models import UNet
from jfcnn.models.layers import ConvTranspose, GroupNorm, group_norm_groups

# ---------------------------------------------------------------------------
# NumPy reference, written from the architecture description (float64).


def np_conv3x3(x, kernel, bias=None):
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for a in range(3):
        for b in range(3):
            out += xp[:, a : a + h, b : b + w] @ kernel[a, b]
    return out if bias is None else out + bias


def np_group_norm(x, scale, bias, groups, eps=1e-5):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_max_pool2(x):
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def np_conv_transpose(x, kernel, bias, s, p):
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    oh, ow = (h - 1) * s + kh - 2 * p, (w - 1) * s + kw - 2 * p
    out = np.zeros((n, oh, ow, o)) + bias
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    y, z = i * s + a - p, j * s + b - p
                    if 0 <= y < oh and 0 <= z < ow:
                        out[:, y, z] += x[:, i, j] @ kernel[a, b]
    return out


def np_fit(x, h, w):
    """Zero pad / center crop to (h, w): an odd extra padded row goes below,
    an odd extra cropped row comes off the top (columns: right / left)."""
    for axis, target in ((1, h), (2, w)):
        size = x.shape[axis]
        if size > target:
            start = (size - target + 1) // 2
            x = np.take(x, np.arange(start, start + target), axis=axis)
        elif size < target:
            pad = [(0, 0)] * 4
            pad[axis] = ((target - size) // 2, target - size - (target - size) // 2)
            x = np.pad(x, pad)
    return x


def np_double_conv(x, p, norm):
    for i in (1, 2):
        conv = p[f"conv{i}"]
        x = np_conv3x3(x, conv["kernel"], conv.get("bias"))
        if norm == "group":
            gn = p[f"norm{i}"]
            x = np_group_norm(x, gn["scale"], gn["bias"], group_norm_groups(x.shape[-1]))
        x = np.maximum(x, 0.0)
    return x


def np_unet(params, images, depth, k, s, p, norm):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(images, np.float64)
    skips = []
    for level in range(depth):
        x = np_double_conv(x, params[f"down_{level}"], norm)
        skips.append(x)
        x = np_max_pool2(x)
    x = np_double_conv(x, params["bottleneck"], norm)
    for level in reversed(range(depth)):
        up = params[f"up_{level}"]
        x = np.maximum(np_conv_transpose(x, up["kernel"], up["bias"], s, p), 0.0)
        skip = skips[level]
        x = np.concatenate([skip, np_fit(x, skip.shape[1], skip.shape[2])], axis=-1)
        x = np_double_conv(x, params[f"dec_{level}"], norm)
    return x @ params["head"]["kernel"][0, 0] + params["head"]["bias"]


def param_shapes(model, images):
    """The param tree as shapes and dtypes (no initializer runs, nothing compiles)."""
    return jax.eval_shape(partial(model.init, train=False), jax.random.key(0), images)["params"]


def random_params(model, images, seed):
    """N(0, 0.5) values for every param, so norm scales and biases are exercised too."""
    # NumPy draws: eager jax.random would compile a sampler for every param shape.
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype),
        param_shapes(model, images),
    )


def apply_eval(model, params, images):
    return jax.jit(partial(model.apply, train=False))({"params": params}, images)


# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth,hw,up,norm",
    [
        (1, (8, 6), (2, 2, 0), "group"),
        (1, (7, 9), (2, 2, 0), "none"),  # odd: up-sampled 6x8 is zero-padded to 7x9
        (1, (6, 8), (3, 2, 1), "group"),  # up-sampled 5x7 is padded to 6x8
        (1, (7, 6), (4, 2, 0), "none"),  # up-sampled 8x8 is center-cropped to 7x6
        (1, (5, 5), (3, 2, 1), "group"),  # up-sampled 3x3 is zero-padded to 5x5
        (2, (12, 10), (2, 2, 0), "group"),
    ],
)
def test_values_match_numpy_recomputation(depth, hw, up, norm):
    k, s, p = up
    model = UNet(
        num_classes=3,
        depth=depth,
        base_width=4,
        up_kernel_size=k,
        up_stride=s,
        up_padding=p,
        norm=norm,
    )
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, *hw, 2)), jnp.float32)
    params = random_params(model, images, seed=2)
    logits = apply_eval(model, params, images)
    assert logits.shape == (2, *hw, 3)
    assert logits.dtype == jnp.float32
    expected = np_unet(params, images, depth, k, s, p, norm)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4)


def test_output_per_class_is_one_head_column():
    # The classes share the trunk: a 1-class model whose head is column k of a
    # 5-class model's head gives that model's logits of class k.
    model5, model1 = (UNet(num_classes=k, depth=2, base_width=4) for k in (5, 1))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 12, 3)), jnp.float32)
    params5 = random_params(model5, images, seed=0)
    logits5 = apply_eval(model5, params5, images)
    assert logits5.shape == (2, 16, 12, 5)
    for k in (0, 3):
        head = params5["head"]
        params1 = {
            **params5,
            "head": {"kernel": head["kernel"][..., k : k + 1], "bias": head["bias"][k : k + 1]},
        }
        logits1 = apply_eval(model1, params1, images)
        assert logits1.shape == (2, 16, 12, 1)
        np.testing.assert_allclose(logits1[..., 0], logits5[..., k], rtol=1e-5, atol=1e-5)


def test_decoder_uses_pytorch_exact_transposed_conv():
    model = UNet(num_classes=2, depth=3, base_width=4)
    images = jnp.ones((1, 16, 16, 3))
    params = random_params(model, images, seed=0)
    assert set(params) == {
        "down_0",
        "down_1",
        "down_2",
        "bottleneck",
        "up_2",
        "up_1",
        "up_0",
        "dec_2",
        "dec_1",
        "dec_0",
        "head",
    }
    for level in range(3):
        width = 4 * 2**level
        assert params[f"up_{level}"]["kernel"].shape == (2, 2, 2 * width, width)
        assert params[f"up_{level}"]["bias"].shape == (width,)
        assert params[f"dec_{level}"]["conv1"]["kernel"].shape == (3, 3, 2 * width, width)

    called = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            called.append(type(context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(partial(model.apply, train=False), {"params": params}, images)
    assert called.count(ConvTranspose) == 3
    assert nn.ConvTranspose not in called


def expected_param_count(in_channels, num_classes, depth, width, up_kernel, norm):
    """Weights of each layer, counted by hand from the architecture."""

    def double_conv(cin, cout):
        convs = 9 * cin * cout + 9 * cout * cout
        extra = 2 * cout if norm == "none" else 2 * 2 * cout  # conv biases or norm scale+bias
        return convs + extra

    total, cin = 0, in_channels
    for level in range(depth):
        total += double_conv(cin, width * 2**level)
        cin = width * 2**level
    total += double_conv(cin, width * 2**depth)
    for level in range(depth):
        w = width * 2**level
        total += up_kernel * up_kernel * 2 * w * w + w  # up_l: (K, K, 2w, w) + bias
        total += double_conv(2 * w, w)  # dec_l on [skip, up]
    return total + width * num_classes + num_classes  # 1x1 head


@pytest.mark.parametrize(
    "depth,width,up_kernel,norm", [(1, 4, 2, "group"), (2, 4, 3, "none"), (3, 8, 2, "batch")]
)
def test_param_count(depth, width, up_kernel, norm):
    model = UNet(
        num_classes=2,
        depth=depth,
        base_width=width,
        up_kernel_size=up_kernel,
        up_padding=up_kernel // 2 - 1 + up_kernel % 2,
        norm=norm,
    )
    params = param_shapes(model, jnp.ones((1, 16, 16, 3)))
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count == expected_param_count(3, 2, depth, width, up_kernel, norm)
    if (depth, width, norm) == (1, 4, "group"):
        # down_0 108+8+144+8, bottleneck 288+16+576+16, up_0 128+4, dec_0 288+8+144+8, head 8+2.
        assert count == 268 + 896 + 132 + 448 + 10 == 1754


def test_bfloat16_compute():
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
    model32 = UNet(num_classes=3, depth=2, base_width=8)
    model16 = UNet(num_classes=3, depth=2, base_width=8, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(param_shapes(model16, images)))
    params = random_params(model16, images, seed=1)

    intermediates = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, ConvTranspose):
            intermediates.append(out.dtype)
        return out

    with nn.intercept_methods(record):
        logits16 = apply_eval(model16, params, images)
    assert intermediates == [jnp.bfloat16, jnp.bfloat16]
    assert logits16.dtype == jnp.float32
    logits32 = apply_eval(model32, params, images)
    # bfloat16 keeps ~3 significant digits; errors compound over ~12 layers.
    err = np.abs(np.asarray(logits16) - np.asarray(logits32))
    assert err.max() < 0.05 * np.abs(np.asarray(logits32)).max()
    assert np.corrcoef(np.asarray(logits16).ravel(), np.asarray(logits32).ravel())[0, 1] > 0.999


def test_batch_norm_train_eval_and_axis_name():
    images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)), jnp.float32)
    model = UNet(num_classes=2, depth=1, base_width=4, norm="batch")
    shapes = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), images)
    assert set(shapes) == {"params", "batch_stats"}
    variables = {
        "params": random_params(model, images, seed=1),
        "batch_stats": jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.full(x.shape, path[-1].key == "var", x.dtype),
            shapes["batch_stats"],
        ),
    }
    train_apply = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))
    logits, updates = train_apply(variables, images)
    mean0 = variables["batch_stats"]["down_0"]["norm1"]["mean"]
    mean1 = updates["batch_stats"]["down_0"]["norm1"]["mean"]
    assert not np.allclose(mean0, mean1)  # running statistics moved
    # Eval mode uses the (initial) running statistics: a different function.
    assert not np.allclose(jax.jit(partial(model.apply, train=False))(variables, images), logits)

    # Two shards of 2 images that average statistics over the axis equal one batch of 4.
    sharded = UNet(num_classes=2, depth=1, base_width=4, norm="batch", bn_axis_name="batch")
    logits_sharded, updates_sharded = jax.jit(
        jax.vmap(
            lambda x: sharded.apply(variables, x, train=True, mutable=["batch_stats"]),
            axis_name="batch",
        )
    )(images.reshape(2, 2, 8, 8, 3))
    np.testing.assert_allclose(logits_sharded.reshape(logits.shape), logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        updates_sharded["batch_stats"]["down_0"]["norm1"]["mean"][0], mean1, rtol=1e-5, atol=1e-6
    )


def test_group_norm_layers_and_group_counts():
    # jfcnn's GroupNorm in every block, 2 channels per group below 64 channels
    # (jfcnn.models.layers.group_norm_groups), 32 groups from 64 up.
    model = UNet(num_classes=2, depth=3, base_width=8)
    images = jnp.ones((1, 16, 16, 3))
    params = random_params(model, images, seed=0)
    groups = {}

    def record(next_fun, args, kwargs, context):
        assert not isinstance(context.module, nn.GroupNorm)
        if context.method_name == "__call__" and isinstance(context.module, GroupNorm):
            groups[args[0].shape[-1]] = context.module.num_groups
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(partial(model.apply, train=False), {"params": params}, images)
    assert groups == {8: 4, 16: 8, 32: 16, 64: 32}


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        (dict(depth=3), (1, 7, 16, 3), r"image height 7 .* the smallest height that works is 8"),
        (
            dict(depth=1, up_kernel_size=2, up_padding=1),
            (1, 2, 4, 3),
            r"image height 2 .* padding 1; the smallest height that works is 4",
        ),
        (dict(norm="layer"), (1, 16, 16, 3), r"norm must be one of .* got 'layer'"),
        (dict(up_padding=-1), (1, 16, 16, 3), r"up_padding must be >= 0, got -1"),
        (dict(), (16, 16, 3), r"got \(16, 16, 3\)"),
    ],
)
def test_rejects_bad_config_or_input(kwargs, shape, match):
    model = UNet(num_classes=2, base_width=4, **kwargs)
    with pytest.raises(ValueError, match=match):
        param_shapes(model, jnp.ones(shape))


def _load_benchmark():
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "unet_step.py"
    spec = importlib.util.spec_from_file_location("unet_step_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("depth,hw,norm", [(2, (12, 8), "group"), (1, (7, 9), "none")])
def test_matches_benchmark_torch_unet(depth, hw, norm):
    """The benchmark's PyTorch U-Net is the same function given the same weights."""
    torch = pytest.importorskip("torch")
    bench = _load_benchmark()
    model = UNet(num_classes=3, depth=depth, base_width=4, norm=norm)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, *hw, 3)), jnp.float32)
    params = random_params(model, images, seed=3)
    torch_model = bench.TorchUNet(3, 3, depth=depth, base_width=4, norm=norm)
    bench.copy_params_to_torch(params, torch_model)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()))
    logits = apply_eval(model, params, images)
    np.testing.assert_allclose(
        np.asarray(logits), expected.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4
    )
