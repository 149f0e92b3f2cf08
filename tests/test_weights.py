"""Tests for jfcnn.weights: torchvision ResNet weights in jfcnn's ResNet, file formats, errors.

The reference is torchvision itself: a ResNet with random weights whose batch
norm statistics are calibrated on a few images (so every layer's output is of
order one, and a wrong layout or epsilon shows), converted and run on the
same non-square image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn import weights
from jfcnn.models.resnet import ResNet

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def calibrated_resnet(depth: int, seed: int = 0):
    """torchvision ``resnet{depth}``, random weights, batch-norm statistics of real activations."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                # Non-trivial affine parameters, so a scale/bias mix-up shows.
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.momentum = None  # Running averages = the plain mean over the batches.
        net.train()
        generator = torch.Generator().manual_seed(seed)
        for _ in range(2):
            net(torch.rand(2, 3, 96, 128, generator=generator))
    return net.eval()


def torch_features(net, image_bchw):
    """``res2 .. res5`` of a torchvision ResNet, as NHWC arrays."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(image_bchw))))
    out = {}
    for name, layer in zip(
        ("res2", "res3", "res4", "res5"),
        (net.layer1, net.layer2, net.layer3, net.layer4),
        strict=True,
    ):
        x = layer(x)
        out[name] = np.transpose(x.numpy(), (0, 2, 3, 1))
    return out


def _state_dict(net) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in net.state_dict().items()}


def _expected(model: ResNet, size=(64, 64)):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3)), train=False)
    )


@pytest.mark.parametrize("norm", ["frozen_batch", "batch"])
def test_converted_resnet50_features_equal_torchvision(norm):
    net = calibrated_resnet(50)
    image = torch.rand(1, 3, 80, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch_features(net, image)
    model = ResNet(depth=50, norm=norm, return_stages=("res2", "res3", "res4", "res5"))
    variables = weights.resnet_variables(_state_dict(net), _expected(model))
    got = model.apply(
        variables, jnp.asarray(np.transpose(image.numpy(), (0, 2, 3, 1))), train=False
    )
    for name in want:
        scale = np.abs(want[name]).max()
        assert scale > 0.1, name  # Calibrated: no layer has died.
        np.testing.assert_allclose(
            got[name], want[name], rtol=1e-4, atol=1e-4 * scale, err_msg=name
        )


def test_converted_resnet18_from_every_file_format(tmp_path):
    net = calibrated_resnet(18, seed=2)
    state = _state_dict(net)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    np.savez(tmp_path / "r18.npz", **state)
    weights.write_safetensors(str(tmp_path / "r18.safetensors"), state)
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = torch_features(net, image)["res5"]
    model = ResNet(depth=18, return_stages=("res5",))
    for ext in ("pth", "npz", "safetensors"):
        loaded = weights.read_state_dict(str(tmp_path / f"r18.{ext}"))
        assert sorted(loaded) == sorted(state)
        for key in state:
            np.testing.assert_array_equal(loaded[key], state[key], err_msg=f"{ext}: {key}")
        variables = weights.resnet_variables(loaded, _expected(model), source=ext)
        got = model.apply(
            variables, jnp.asarray(np.transpose(image.numpy(), (0, 2, 3, 1))), train=False
        )
        np.testing.assert_allclose(got["res5"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_safetensors_file_layout_by_hand(tmp_path):
    # The format written out by hand: 8-byte length, JSON header, raw little-endian data.
    path = tmp_path / "hand.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + np.float32([1.5, -2]).tobytes())
    np.testing.assert_array_equal(weights.read_safetensors(str(path))["a"], [1.5, -2.0])


def test_wrong_depth_names_the_first_bad_key_and_the_depth():
    state = _state_dict(torchvision.models.resnet18(weights=None))
    model = ResNet(depth=50)
    with pytest.raises(weights.WeightsError) as e:
        weights.resnet_variables(state, _expected(model), source="r18.pth")
    message = str(e.value)
    assert "'layer1.0.conv1.weight' has shape (64, 64, 3, 3), expected (64, 64, 1, 1)" in message
    assert "r18.pth holds ResNet-18" in message


def test_missing_extra_and_misshapen_keys_are_named():
    state = _state_dict(torchvision.models.resnet18(weights=None))
    expected = _expected(ResNet(depth=18))
    missing = dict(state)
    del missing["layer2.1.bn2.running_var"]
    with pytest.raises(
        weights.WeightsError, match=r"no key 'layer2.1.bn2.running_var' \(expected shape \(128,\)"
    ):
        weights.resnet_variables(missing, expected)
    extra = dict(state, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(weights.WeightsError, match=r"key 'layer5.0.conv1.weight' has no place"):
        weights.resnet_variables(extra, expected)
    misshapen = dict(state, **{"bn1.weight": np.zeros((32,), np.float32)})
    with pytest.raises(
        weights.WeightsError, match=r"'bn1.weight' has shape \(32,\), expected \(64,\)"
    ):
        weights.resnet_variables(misshapen, expected)
    # The classifier and BatchNorm's counters are not the backbone's and are skipped.
    weights.resnet_variables(state, expected)


def test_pth_without_torch_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(weights.MissingDependencyError, match="needs torch") as e:
        weights.read_state_dict(str(path))
    assert "\n" not in str(e.value)
