"""Tests for jfcnn.models.fpn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.models.fpn import FPN, fpn_variables_from_torchvision, nearest_indices, resize_nearest

LEVELS = ("res2", "res3", "res4", "res5")


def abstract_variables(fpn, feats):
    return jax.eval_shape(lambda f: fpn.init(jax.random.key(0), f), feats)


def apply(fpn, variables, feats):
    return jax.jit(fpn.apply)(variables, feats)


def random_features(sizes, channels, seed, batch=2):
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(size=(batch, h, w, c)).astype(np.float32)
        for name, (h, w), c in zip(LEVELS, sizes, channels, strict=True)
    }


def set_params(fpn, feats, values):
    """Variables with every param given by ``values[module][leaf]`` (shapes checked)."""
    abstract = abstract_variables(fpn, feats)["params"]
    params = {}
    for module, leaves in abstract.items():
        params[module] = {}
        for leaf, spec in leaves.items():
            value = np.asarray(values[module][leaf], np.float32).reshape(spec.shape)
            params[module][leaf] = value
    return {"params": params}


def random_variables(fpn, feats, seed):
    """Random params (biases too) of the module's structure, drawn with NumPy."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32),
        abstract_variables(fpn, feats),
    )


def np_fpn(params, feats, in_features):
    """The FPN recomputed in float64 from its description (see FPN's docstring)."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    outputs, inner = {}, None
    for name in reversed(in_features):
        level = int(name[-1])
        x = np.asarray(feats[name], np.float64)
        lateral = params[f"lateral_p{level}"]
        inner_new = x @ lateral["kernel"][0, 0] + lateral["bias"]
        if inner is not None:
            # Nearest neighbour: output row i reads input row floor(i * in / out).
            (h, w), (hi, wi) = inner_new.shape[1:3], inner.shape[1:3]
            rows, cols = (np.arange(h) * hi) // h, (np.arange(w) * wi) // w
            inner_new = inner_new + inner[:, rows][:, :, cols]
        inner = inner_new
        out = params[f"output_p{level}"]
        n, h, w, _ = inner.shape
        padded = np.pad(inner, ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = np.zeros((n, h, w, out["kernel"].shape[-1])) + out["bias"]
        for a in range(3):
            for b in range(3):
                y += padded[:, a : a + h, b : b + w] @ out["kernel"][a, b]
        outputs[f"p{level}"] = y
    top = int(in_features[-1][-1])
    outputs[f"p{top + 1}"] = outputs[f"p{top}"][:, ::2, ::2]
    return outputs


# ---------------------------------------------------------------------------
# Shapes and values against the float64 recomputation


def test_resnet50_channels_shapes_and_values():
    fpn = FPN(out_channels=256)
    feats = {
        name: np.random.default_rng(level)
        .normal(size=(2, 128 >> level, 96 >> level, c))
        .astype(np.float32)
        for name, level, c in zip(LEVELS, (2, 3, 4, 5), (256, 512, 1024, 2048), strict=True)
    }
    variables = random_variables(fpn, feats, seed=0)
    assert sorted(variables["params"]) == sorted(
        [f"lateral_p{level}" for level in (2, 3, 4, 5)]
        + [f"output_p{level}" for level in (2, 3, 4, 5)]
    )
    assert variables["params"]["lateral_p5"]["kernel"].shape == (1, 1, 2048, 256)
    assert variables["params"]["output_p5"]["kernel"].shape == (3, 3, 256, 256)
    out = apply(fpn, variables, feats)
    assert {k: v.shape for k, v in out.items()} == {
        "p2": (2, 32, 24, 256),
        "p3": (2, 16, 12, 256),
        "p4": (2, 8, 6, 256),
        "p5": (2, 4, 3, 256),
        "p6": (2, 2, 2, 256),
    }
    expected = np_fpn(variables["params"], feats, LEVELS)
    for name, ref in expected.items():
        scale = np.abs(ref).max()
        np.testing.assert_allclose(out[name], ref, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_odd_sizes_keep_each_lateral_shape_and_values():
    # A 100x100 image through a ResNet gives 25, 13, 7, 4: not exact halvings.
    sizes = [(25, 21), (13, 11), (7, 6), (4, 3)]
    feats = random_features(sizes, (3, 4, 5, 6), seed=1, batch=1)
    fpn = FPN(out_channels=4)
    variables = random_variables(fpn, feats, seed=2)
    out = apply(fpn, variables, feats)
    assert [out[f"p{level}"].shape[1:3] for level in (2, 3, 4, 5, 6)] == [*sizes, (2, 2)]
    expected = np_fpn(variables["params"], feats, LEVELS)
    for name, ref in expected.items():
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------
# Values without torch


def test_nearest_indices_goldens():
    assert nearest_indices(2, 4).tolist() == [0, 0, 1, 1]
    assert nearest_indices(2, 3).tolist() == [0, 0, 1]
    assert nearest_indices(4, 7).tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert nearest_indices(3, 5).tolist() == [0, 0, 1, 1, 2]
    assert nearest_indices(5, 5).tolist() == [0, 1, 2, 3, 4]


def test_resize_nearest_golden():
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)  # [[0, 1, 2], [3, 4, 5]]
    out = resize_nearest(x, 3, 5)[0, :, :, 0]
    np.testing.assert_array_equal(out, [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]])
    doubled = resize_nearest(x, 4, 6)[0, :, :, 0]
    np.testing.assert_array_equal(doubled, np.kron(x[0, :, :, 0], np.ones((2, 2))))


def identity_3x3():
    kernel = np.zeros((3, 3))
    kernel[1, 1] = 1.0
    return kernel


def test_identity_kernels_give_top_down_sums():
    # 1 channel, lateral 1x1 kernels 1, output 3x3 kernels the identity, biases 0:
    # P_l = C_l + up(P_{l+1}) with 2x nearest up-sampling.
    feats = {
        "res2": np.full((1, 8, 8, 1), 1000.0, np.float32),
        "res3": np.full((1, 4, 4, 1), 100.0, np.float32),
        "res4": np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1) * 10.0,
        "res5": np.array([[[[1.0]]]], np.float32),
    }
    fpn = FPN(out_channels=1)
    values = {}
    for level in (2, 3, 4, 5):
        values[f"lateral_p{level}"] = {"kernel": 1.0, "bias": 0.0}
        values[f"output_p{level}"] = {"kernel": identity_3x3(), "bias": 0.0}
    out = apply(fpn, set_params(fpn, feats, values), feats)
    p = {k: np.asarray(v[0, :, :, 0]) for k, v in out.items()}
    np.testing.assert_array_equal(p["p5"], [[1.0]])
    np.testing.assert_array_equal(p["p6"], [[1.0]])
    np.testing.assert_array_equal(p["p4"], [[1.0, 11.0], [21.0, 31.0]])
    np.testing.assert_array_equal(
        p["p3"],
        [
            [101.0, 101.0, 111.0, 111.0],
            [101.0, 101.0, 111.0, 111.0],
            [121.0, 121.0, 131.0, 131.0],
            [121.0, 121.0, 131.0, 131.0],
        ],
    )
    np.testing.assert_array_equal(p["p2"], 1000.0 + np.kron(p["p3"], np.ones((2, 2))))


def test_odd_size_shifted_output_kernel_golden():
    # Two levels; C5 is 2x2 and C4 3x3, so the top-down map is resized 2 -> 3 by
    # rows/columns [0, 0, 1]. Level 4: lateral weight 2, bias 0.5; output kernel 1 at
    # (0, 1), i.e. out[i, j] = inner[i - 1, j] with the zero padding entering row 0.
    feats = {
        "res4": np.arange(10.0, 100.0, 10.0, dtype=np.float32).reshape(1, 3, 3, 1),
        "res5": np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 2, 2, 1),
    }
    fpn = FPN(out_channels=1, in_features=("res4", "res5"))
    shift_down = np.zeros((3, 3))
    shift_down[0, 1] = 1.0
    values = {
        "lateral_p4": {"kernel": 2.0, "bias": 0.5},
        "output_p4": {"kernel": shift_down, "bias": 0.0},
        "lateral_p5": {"kernel": 1.0, "bias": 0.0},
        "output_p5": {"kernel": identity_3x3(), "bias": -1.0},
    }
    out = apply(fpn, set_params(fpn, feats, values), feats)
    assert sorted(out) == ["p4", "p5", "p6"]
    p = {k: np.asarray(v[0, :, :, 0]) for k, v in out.items()}
    # inner4 = 2 * C4 + 0.5 + [[1, 1, 2], [1, 1, 2], [3, 3, 4]]
    #        = [[21.5, 41.5, 62.5], [81.5, 101.5, 122.5], [143.5, 163.5, 184.5]]
    np.testing.assert_array_equal(
        p["p4"], [[0.0, 0.0, 0.0], [21.5, 41.5, 62.5], [81.5, 101.5, 122.5]]
    )
    # The top-down pathway uses the lateral sum, not the output conv (bias -1 unseen).
    np.testing.assert_array_equal(p["p5"], [[0.0, 1.0], [2.0, 3.0]])
    np.testing.assert_array_equal(p["p6"], [[0.0]])


def test_bfloat16_compute():
    feats = random_features([(8, 8), (4, 4), (2, 2), (1, 1)], (2, 3, 4, 5), seed=0)
    fpn32, fpn16 = FPN(out_channels=4), FPN(out_channels=4, dtype=jnp.bfloat16)
    variables = jax.tree.map(
        lambda s: np.random.default_rng(1).normal(size=s.shape).astype(np.float32),
        abstract_variables(fpn32, feats),
    )
    out16, out32 = apply(fpn16, variables, feats), apply(fpn32, variables, feats)
    for name, ref in out32.items():
        assert out16[name].dtype == jnp.bfloat16
        diff = np.asarray(out16[name], np.float32) - np.asarray(ref)
        assert np.linalg.norm(diff) <= 0.05 * np.linalg.norm(ref), name


@pytest.mark.parametrize(
    "feats,match",
    [
        ({"res2": np.zeros((1, 8, 8, 1))}, "features lack"),
        ({name: np.zeros((8, 8, 1)) for name in LEVELS}, r"got shape \(8, 8, 1\)"),
    ],
)
def test_rejects_bad_inputs(feats, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda f: FPN(out_channels=2).init(jax.random.key(0), f), feats)


def test_rejects_feature_names_without_level():
    feats = {"coarse": np.zeros((1, 2, 2, 1), np.float32)}
    with pytest.raises(ValueError, match="must end with their level"):
        abstract_variables(FPN(out_channels=2, in_features=("coarse",)), feats)


# ---------------------------------------------------------------------------
# Cross-checks against torchvision (optional)


@pytest.mark.parametrize(
    "sizes",
    [
        [(16, 12), (8, 6), (4, 3), (2, 2)],  # exact halvings (odd P5 width -> P6 ceil)
        [(25, 21), (13, 11), (7, 6), (4, 3)],  # resized top-down maps
    ],
)
def test_matches_torchvision(sizes):
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    channels = (3, 5, 6, 8)
    torch.manual_seed(0)
    net = ops.FeaturePyramidNetwork(list(channels), 7, extra_blocks=LastLevelMaxPool()).eval()
    with torch.no_grad():
        for name, tensor in net.named_parameters():
            if name.endswith("bias"):  # torchvision initializes biases to 0
                tensor.copy_(torch.randn(tensor.shape))
    feats = random_features(sizes, channels, seed=1)
    with torch.no_grad():
        expected = net({k: torch.from_numpy(v.transpose(0, 3, 1, 2)) for k, v in feats.items()})
    expected = [v.numpy().transpose(0, 2, 3, 1) for v in expected.values()]

    fpn = FPN(out_channels=7)
    variables = fpn_variables_from_torchvision(net.state_dict())
    abstract = abstract_variables(fpn, feats)
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)
    out = apply(fpn, variables, feats)
    for name, ref in zip(("p2", "p3", "p4", "p5", "p6"), expected, strict=True):
        assert out[name].shape == ref.shape, name
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_nearest_indices_match_torch_interpolate():
    torch = pytest.importorskip("torch")
    for in_size in range(1, 12):
        for out_size in range(1, 25):
            x = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size)
            ref = torch.nn.functional.interpolate(x, size=out_size, mode="nearest")
            assert nearest_indices(in_size, out_size).tolist() == ref.long().flatten().tolist()
