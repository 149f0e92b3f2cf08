"""Tests for jfcnn.models.resnet."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.models.layers import GroupNorm, group_norm_groups
from jfcnn.models.resnet import (
    FEATURE_STRIDES,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNetStage,
    variables_from_torchvision,
)

HIGHEST = jax.lax.Precision.HIGHEST


def count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def abstract_variables(model, shape):
    """Variables as ShapeDtypeStructs: nothing is computed at full size."""
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False)
    )


def abstract_outputs(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = abstract_variables(model, shape)
    return jax.eval_shape(lambda v, x: apply(model, v, x), variables, x)


def apply(model, variables, x, train=False, mutable=False):
    """``model.apply`` compiled as one program: far faster than op-by-op on CPU."""
    fn = lambda v, x: model.apply(v, x, train=train, mutable=mutable)
    return jax.jit(fn)(variables, x)


def random_variables(model, shape, seed):
    """Random variables of the module's structure, drawn with NumPy.

    Tests avoid ``model.init``: compiling JAX's random sampling for every
    parameter shape costs many seconds on a small CPU, NumPy costs nothing.
    Kernels have He scale so activations stay O(1) through the network;
    frozen/running statistics are non-trivial (var > 0) so every norm term
    is exercised.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.5, leaf.shape).astype(np.float32)

    return jax.tree.map_with_path(draw, abstract_variables(model, shape))


# ---------------------------------------------------------------------------
# Shapes, strides, parameter counts (values against the references further down)


@pytest.mark.parametrize(
    "depth,width,channels",
    [
        (18, 16, {"stem": 16, "res2": 16, "res3": 32, "res4": 64, "res5": 128}),
        (50, 8, {"stem": 8, "res2": 32, "res3": 64, "res4": 128, "res5": 256}),
    ],
)
def test_output_shapes_strides_and_values(depth, width, channels):
    model = ResNet(depth=depth, width=width, stage_sizes=(1, 2, 1, 1))
    x = normal((2, 64, 96, 3), seed=0)
    variables = random_variables(model, x.shape, seed=1)
    outputs = apply(model, variables, x)
    assert sorted(outputs) == ["res2", "res3", "res4", "res5", "stem"]
    expected = resnet_ref(variables, x, (1, 2, 1, 1), bottleneck=depth == 50)
    for name, out in outputs.items():
        stride = FEATURE_STRIDES[name]
        assert out.shape == (2, 64 // stride, 96 // stride, channels[name]), name
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, expected[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_odd_input_sizes_follow_pytorch_arithmetic():
    # 50 -> conv 25 -> pool 13 -> 7 -> 4 -> 2 and 70 -> 35 -> 18 -> 9 -> 5 -> 3, by
    # floor((S + 2P - K) / s) + 1 for each layer.
    model = ResNet(depth=18, width=8, stage_sizes=(1, 1, 1, 1))
    x = normal((1, 50, 70, 3), seed=2)
    variables = random_variables(model, x.shape, seed=3)
    outputs = apply(model, variables, x)
    sizes = {name: out.shape[1:3] for name, out in outputs.items()}
    assert sizes == {
        "stem": (13, 18),
        "res2": (13, 18),
        "res3": (7, 9),
        "res4": (4, 5),
        "res5": (2, 3),
    }
    expected = resnet_ref(variables, x, (1, 1, 1, 1), bottleneck=False)
    for name, out in outputs.items():
        np.testing.assert_allclose(out, expected[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_return_stages_builds_only_what_is_needed():
    model = ResNet(depth=50, width=8, stage_sizes=(1, 1, 1, 1), return_stages=("res4",))
    variables = abstract_variables(model, (1, 64, 64, 3))
    assert sorted(variables["params"]) == ["res2", "res3", "res4", "stem_conv"]
    assert sorted(variables["batch_stats"]) == ["res2", "res3", "res4", "stem_norm"]
    # The truncated network computes the full one's res4 from the same variables.
    full = ResNet(depth=50, width=8, stage_sizes=(1, 1, 1, 1))
    x = normal((1, 64, 64, 3), seed=0)
    full_variables = random_variables(full, x.shape, seed=1)
    truncated = {
        collection: {k: v for k, v in tree.items() if k != "res5"}
        for collection, tree in full_variables.items()
    }
    assert jax.tree.structure(truncated) == jax.tree.structure(variables)
    outputs = apply(model, truncated, x)
    assert {k: v.shape for k, v in outputs.items()} == {"res4": (1, 4, 4, 128)}
    np.testing.assert_allclose(
        outputs["res4"], apply(full, full_variables, x)["res4"], rtol=1e-6, atol=1e-6
    )


def test_stage_sizes_override():
    model = ResNet(depth=50, width=8, stage_sizes=(1, 2, 1, 1))
    params = abstract_variables(model, (1, 32, 32, 3))["params"]
    assert [len(params[s]) for s in ("res2", "res3", "res4", "res5")] == [1, 2, 1, 1]


# torchvision resnet50 without `fc`: conv weights + batch-norm weight/bias.
RESNET50_BACKBONE_PARAMS = 23_508_032


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet50_param_count_trainable_norms(norm):
    variables = abstract_variables(ResNet(depth=50, norm=norm), (1, 64, 64, 3))
    assert count(variables["params"]) == RESNET50_BACKBONE_PARAMS


def test_resnet50_param_count_frozen_batch():
    variables = abstract_variables(ResNet(depth=50, norm="frozen_batch"), (1, 64, 64, 3))
    params, stats = variables["params"], variables["batch_stats"]
    # Frozen: only convolution kernels are trainable; scale/bias/mean/var are state.
    assert all(path[-1].key == "kernel" for path, _ in jax.tree.flatten_with_path(params)[0])
    affine = {
        k: v for k, v in jax.tree.flatten_with_path(stats)[0] if k[-1].key in ("scale", "bias")
    }
    assert count(params) + count(list(affine.values())) == RESNET50_BACKBONE_PARAMS
    assert count(stats) == 2 * count(list(affine.values()))


def test_c4_res5_stage_on_roi_features():
    stage = ResNetStage(num_blocks=3, features=512, strides=2, block_cls=Bottleneck, norm="batch")
    variables = abstract_variables(stage, (5, 14, 14, 1024))
    out = jax.eval_shape(
        lambda v, x: apply(stage, v, x),
        variables,
        jax.ShapeDtypeStruct((5, 14, 14, 1024), jnp.float32),
    )
    assert out.shape == (5, 7, 7, 2048)
    # Hand count (torchvision resnet50.layer4): block0 has the projection shortcut.
    convs0 = 1024 * 512 + 9 * 512 * 512 + 512 * 2048 + 1024 * 2048
    convs = 2048 * 512 + 9 * 512 * 512 + 512 * 2048
    norms0, norms = 2 * (512 + 512 + 2048 + 2048), 2 * (512 + 512 + 2048)
    assert count(variables["params"]) == convs0 + norms0 + 2 * (convs + norms) == 14_964_736
    assert sorted(variables["params"]) == ["block0", "block1", "block2"]
    assert "shortcut_conv" in variables["params"]["block0"]
    assert "shortcut_conv" not in variables["params"]["block1"]


# ---------------------------------------------------------------------------
# Values without torch


def conv_ref(x, kernel, stride, pad):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST,
    )


def frozen_bn_ref(x, stats):
    return (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"] + stats["bias"]


def block_ref(x, params, stats, strides, bottleneck):
    relu = lambda t: np.maximum(t, 0.0)
    if bottleneck:
        y = relu(frozen_bn_ref(conv_ref(x, params["conv1"]["kernel"], 1, 0), stats["norm1"]))
        y = relu(frozen_bn_ref(conv_ref(y, params["conv2"]["kernel"], strides, 1), stats["norm2"]))
        y = frozen_bn_ref(conv_ref(y, params["conv3"]["kernel"], 1, 0), stats["norm3"])
    else:
        y = relu(frozen_bn_ref(conv_ref(x, params["conv1"]["kernel"], strides, 1), stats["norm1"]))
        y = frozen_bn_ref(conv_ref(y, params["conv2"]["kernel"], 1, 1), stats["norm2"])
    if "shortcut_conv" in params:
        shortcut = conv_ref(x, params["shortcut_conv"]["kernel"], strides, 0)
        shortcut = frozen_bn_ref(shortcut, stats["shortcut_norm"])
    else:
        shortcut = x
    return relu(y + shortcut)


def normal(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize(
    "block_cls,in_channels,features,strides,num_blocks",
    [
        (Bottleneck, 4, 2, 2, 1),  # projection shortcut, stride on the 3x3 conv
        (Bottleneck, 8, 2, 1, 2),  # identity shortcuts
        (BasicBlock, 3, 4, 2, 2),  # projection, then identity
    ],
)
def test_stage_matches_hand_computation(block_cls, in_channels, features, strides, num_blocks):
    stage = ResNetStage(
        num_blocks=num_blocks, features=features, strides=strides, block_cls=block_cls
    )
    x = normal((2, 9, 7, in_channels), seed=0)
    variables = random_variables(stage, x.shape, seed=1)
    out = apply(stage, variables, x)

    expected = x
    for i in range(num_blocks):
        name = f"block{i}"
        expected = block_ref(
            expected,
            variables["params"][name],
            variables["batch_stats"][name],
            strides if i == 0 else 1,
            block_cls is Bottleneck,
        )
    out_channels = features * block_cls.expansion
    assert out.shape == (2, -(-9 // strides), -(-7 // strides), out_channels)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def max_pool_ref(y):
    """3x3, stride 2, padding 1 with -inf (PyTorch's MaxPool2d(3, 2, 1)), as a loop."""
    n, h, w, c = y.shape
    padded = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    out = np.zeros((n, (h - 1) // 2 + 1, (w - 1) // 2 + 1, c), np.float32)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2))
    return out


STAGES = ("res2", "res3", "res4", "res5")


def resnet_ref(variables, x, stage_sizes, bottleneck):
    """Every feature map of a frozen-batch-norm ResNet, chained from the references above."""
    params, stats = variables["params"], variables["batch_stats"]
    y = conv_ref(x, params["stem_conv"]["kernel"], 2, 3)
    y = max_pool_ref(np.maximum(frozen_bn_ref(y, stats["stem_norm"]), 0.0))
    outputs = {"stem": y}
    for i, (name, num_blocks) in enumerate(zip(STAGES, stage_sizes, strict=True)):
        for b in range(num_blocks):
            strides = 2 if i > 0 and b == 0 else 1
            block = f"block{b}"
            y = block_ref(y, params[name][block], stats[name][block], strides, bottleneck)
        outputs[name] = y
    return outputs


def test_stem_matches_hand_computation():
    # Symmetric padding 3 (not "SAME", which pads (2, 3) here) and a -inf-padded pool.
    model = ResNet(depth=18, width=4, return_stages=("stem",))
    x = normal((1, 12, 10, 3), seed=0)
    variables = random_variables(model, x.shape, seed=1)
    out = apply(model, variables, x)["stem"]

    y = conv_ref(x, variables["params"]["stem_conv"]["kernel"], 2, 3)
    y = np.maximum(frozen_bn_ref(y, variables["batch_stats"]["stem_norm"]), 0.0)
    assert y.shape == (1, 6, 5, 4)
    assert out.shape == (1, 3, 3, 4)
    np.testing.assert_allclose(out, max_pool_ref(y), rtol=1e-5, atol=1e-5)


def test_frozen_batch_is_never_updated():
    model = ResNet(depth=18, width=4, stage_sizes=(1, 1, 1, 1))
    x = normal((2, 32, 32, 3), seed=0)
    variables = random_variables(model, x.shape, seed=1)
    out, new_state = apply(model, variables, x, train=True, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, new_state["batch_stats"], variables["batch_stats"])
    # `train` only matters for "batch"; frozen outputs are identical either way.
    np.testing.assert_allclose(
        out["res5"], apply(model, variables, x)["res5"], rtol=1e-6, atol=1e-6
    )


def test_batch_norm_trains_and_updates_running_stats():
    model = ResNet(
        depth=18, width=4, stage_sizes=(1, 1, 1, 1), norm="batch", return_stages=("stem",)
    )
    x = normal((2, 16, 16, 3), seed=0)
    variables = random_variables(model, x.shape, seed=1)
    out, new_state = apply(model, variables, x, train=True, mutable=["batch_stats"])
    conv = conv_ref(x, variables["params"]["stem_conv"]["kernel"], 2, 3)
    old, new = variables["batch_stats"]["stem_norm"], new_state["batch_stats"]["stem_norm"]
    # torchvision's momentum 0.1: new = 0.9 * old + 0.1 * batch statistic (flax keeps the
    # biased variance).
    mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-5, atol=1e-5)
    # Training mode normalizes with the batch statistics.
    params = variables["params"]["stem_norm"]
    y = (conv - mean) / np.sqrt(var + 1e-5) * params["scale"] + params["bias"]
    np.testing.assert_allclose(out["stem"], max_pool_ref(np.maximum(y, 0.0)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width,groups", [(8, 4), (32, 16)])
def test_group_norm_normalizes_groups(width, groups):
    model = ResNet(depth=18, width=width, norm="group", return_stages=("stem",))
    x = normal((2, 16, 16, 3), seed=0)
    variables = random_variables(model, x.shape, seed=1)
    assert "batch_stats" not in variables
    called = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            called.append(type(context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert GroupNorm in called and nn.GroupNorm not in called
    out = apply(model, variables, x)["stem"]
    # 2 channels per group (8 -> 4 groups, 32 -> 16 groups); statistics over
    # (H, W, channels of the group).
    y = conv_ref(x, variables["params"]["stem_conv"]["kernel"], 2, 3)
    y = y.reshape(2, 8, 8, groups, width // groups)
    y = (y - y.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
        y.var(axis=(1, 2, 4), keepdims=True) + 1e-5
    )
    params = variables["params"]["stem_norm"]
    y = y.reshape(2, 8, 8, width) * params["scale"] + params["bias"]
    np.testing.assert_allclose(out, max_pool_ref(np.maximum(y, 0.0)), rtol=1e-4, atol=1e-4)


def test_bfloat16_compute():
    kwargs = dict(depth=18, width=8, stage_sizes=(1, 1, 1, 1), return_stages=("stem", "res3"))
    model32 = ResNet(**kwargs)
    model16 = ResNet(**kwargs, dtype=jnp.bfloat16)
    x = normal((1, 32, 32, 3), seed=0)
    variables = random_variables(model32, x.shape, seed=1)
    assert jax.tree.structure(abstract_variables(model16, x.shape)) == jax.tree.structure(variables)
    out16 = apply(model16, variables, x)
    out32 = apply(model32, variables, x)
    for name in out32:
        assert out16[name].dtype == jnp.bfloat16
        a, b = np.asarray(out16[name], np.float32), np.asarray(out32[name])
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b), name


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        ({}, (32, 32, 3), r"got shape \(32, 32, 3\)"),
        ({"depth": 42}, (1, 32, 32, 3), "depth must be one of"),
        ({"norm": "layer"}, (1, 32, 32, 3), "norm must be one of"),
        ({"return_stages": ("res6",)}, (1, 32, 32, 3), "return_stages"),
        ({"stage_sizes": (1, 1, 1)}, (1, 32, 32, 3), "stage_sizes"),
    ],
)
def test_rejects_bad_arguments(kwargs, shape, match):
    model = ResNet(**{"depth": 18, "width": 4, **kwargs})
    with pytest.raises(ValueError, match=match):
        abstract_variables(model, shape)


# ---------------------------------------------------------------------------
# Cross-checks against torchvision (optional)


def randomize_torch_norms(module, seed):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                c = layer.num_features
                layer.weight.copy_(0.5 + torch.rand(c, generator=generator))
                layer.bias.copy_(0.5 * torch.randn(c, generator=generator))
                layer.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                layer.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
    return module.eval()


def assert_close_scaled(actual, expected, rtol=1e-4, name=""):
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max(), err_msg=name
    )


def test_resnet18_matches_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = randomize_torch_norms(torchvision.models.resnet18(weights=None), seed=1)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(torch.from_numpy(x)))))
        expected = {"stem": h}
        for i, name in enumerate(("res2", "res3", "res4", "res5")):
            h = getattr(net, f"layer{i + 1}")(h)
            expected[name] = h

    model = ResNet(depth=18, norm="frozen_batch")
    variables = variables_from_torchvision(net.state_dict(), norm="frozen_batch")
    # Converted variables have exactly the structure the module creates.
    abstract = abstract_variables(model, (2, 64, 64, 3))
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), abstract, variables)
    outputs = apply(model, variables, x.transpose(0, 2, 3, 1))
    for name, ref in expected.items():
        ref = ref.numpy().transpose(0, 2, 3, 1)
        assert outputs[name].shape == ref.shape
        assert_close_scaled(outputs[name], ref, name=name)


def test_bottleneck_res5_stage_matches_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet
    # Only layer4 is used: the C4 head's res5 on (R, 14, 14, 1024) ROI features.
    net = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 2])
    net = randomize_torch_norms(net, seed=2)
    x = np.random.default_rng(1).normal(size=(2, 1024, 14, 14)).astype(np.float32)
    with torch.no_grad():
        expected = net.layer4(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)

    variables = variables_from_torchvision(net.state_dict(), norm="batch")
    stage_variables = {c: variables[c]["res5"] for c in ("params", "batch_stats")}
    stage = ResNetStage(num_blocks=2, features=512, strides=2, block_cls=Bottleneck, norm="batch")
    out = apply(stage, stage_variables, x.transpose(0, 2, 3, 1))
    assert out.shape == expected.shape == (2, 7, 7, 2048)
    assert_close_scaled(out, expected)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_param_count_matches_torchvision(depth):
    pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    expected = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fc."))
    if depth == 50:
        assert expected == RESNET50_BACKBONE_PARAMS
    variables = abstract_variables(ResNet(depth=depth, norm="batch"), (1, 32, 32, 3))
    assert count(variables["params"]) == expected


def test_stage_sizes_and_odd_input_match_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet
    net = randomize_torch_norms(resnet.ResNet(resnet.Bottleneck, [1, 2, 1, 1]), seed=3)
    x = np.random.default_rng(2).normal(size=(1, 3, 50, 70)).astype(np.float32)
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(torch.from_numpy(x)))))
        expected = {"stem": h}
        for i, name in enumerate(("res2", "res3", "res4", "res5")):
            h = getattr(net, f"layer{i + 1}")(h)
            expected[name] = h

    model = ResNet(depth=50, stage_sizes=(1, 2, 1, 1))
    variables = variables_from_torchvision(net.state_dict())
    outputs = apply(model, variables, x.transpose(0, 2, 3, 1))
    for name, ref in expected.items():
        ref = ref.numpy().transpose(0, 2, 3, 1)
        assert outputs[name].shape == ref.shape, name
        assert_close_scaled(outputs[name], ref, name=name)


def test_group_norm_resnet18_matches_torchvision():
    """norm="group" (jfcnn's GroupNorm, its group rule) equals torch.nn.GroupNorm layers."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)

    def group_norm(channels):
        return torch.nn.GroupNorm(group_norm_groups(channels), channels, eps=1e-5)

    net = torchvision.models.resnet18(weights=None, norm_layer=group_norm).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, torch.nn.GroupNorm):
                assert layer.num_groups == 32  # 64 .. 512 channels
                c = layer.num_channels
                layer.weight.copy_(0.5 + torch.rand(c, generator=generator))
                layer.bias.copy_(0.5 * torch.randn(c, generator=generator))
    x = np.random.default_rng(5).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(torch.from_numpy(x)))))
        expected = {"stem": h}
        for i, name in enumerate(("res2", "res3", "res4", "res5")):
            h = getattr(net, f"layer{i + 1}")(h)
            expected[name] = h

    model = ResNet(depth=18, norm="group")
    variables = variables_from_torchvision(net.state_dict(), norm="group")
    abstract = abstract_variables(model, (2, 64, 64, 3))
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)
    outputs = apply(model, variables, x.transpose(0, 2, 3, 1))
    for name, ref in expected.items():
        assert_close_scaled(outputs[name], ref.numpy().transpose(0, 2, 3, 1), name=name)
