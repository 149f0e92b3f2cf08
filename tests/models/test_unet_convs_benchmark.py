"""benchmarks/unet_convs.py times the U-Net's convolutions, the same passes in both frameworks."""

import importlib.util
import pathlib
import subprocess
import sys
from collections import Counter
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.models import UNet

PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / "unet_convs.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("unet_convs_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("depth,base_width,channels", [(3, 16, 3), (2, 4, 1), (0, 8, 3)])
def test_lists_the_unets_3x3_convolutions(depth, base_width, channels):
    """Channel pairs and counts match the 3x3 kernels of `UNet`'s params."""
    bench = _load_benchmark()
    model = UNet(num_classes=2, depth=depth, base_width=base_width, norm="none")
    images = jnp.zeros((1, 2**depth * 4, 2**depth * 4, channels))
    params = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), images)["params"]
    kernels = Counter(
        leaf.shape[2:]
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if path[-1].key == "kernel"
        and leaf.shape[:2] == (3, 3)
        and not path[0].key.startswith("up_")  # the 2x2 transposed convolutions
    )
    listed = bench.unet_convs(images.shape[1], channels, depth, base_width)
    by_channels = Counter()
    for (_, cin, cout), count in listed.items():
        by_channels[(cin, cout)] += count
    assert by_channels == kernels
    # Level l runs at image_size / 2**l: the first conv at full size, the bottleneck at
    # the smallest.
    assert (images.shape[1], channels, base_width) in listed
    smallest = images.shape[1] // 2**depth
    assert (smallest, base_width * 2**depth, base_width * 2**depth) in listed


def test_jax_and_torch_passes_compute_the_same_values():
    pytest.importorskip("torch")
    bench = _load_benchmark()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 5, 3), np.float32)
    w = rng.standard_normal((3, 3, 3, 4), np.float32)
    dy = rng.standard_normal((2, 6, 5, 4), np.float32)
    torch_args = bench.torch_inputs(x, w, dy)
    jax_fns, torch_fns = bench.jax_passes(), bench.torch_passes()
    # Each torch output back to the JAX layout: NCHW -> NHWC maps, OIHW -> HWIO filters.
    layouts = {"forward": (0, 2, 3, 1), "input grad": (0, 2, 3, 1), "filter grad": (2, 3, 1, 0)}
    for name, layout in layouts.items():
        expected = torch_fns[name](*torch_args)().numpy().transpose(layout)
        got = np.asarray(jax_fns[name](jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=name)
    # The filter gradient from its definition: sum over batch and pixels of x (padded) times dy.
    x_pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    loop = np.zeros_like(w)
    for i in range(3):
        for j in range(3):
            loop[i, j] = np.einsum("bhwc,bhwo->co", x_pad[:, i : i + 6, j : j + 5], dy)
    got = np.asarray(jax_fns["filter grad"](jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)))
    np.testing.assert_allclose(got, loop, rtol=1e-4, atol=1e-4)


def test_runs_and_prints_every_pass():
    pytest.importorskip("torch")
    args = ["--batch_size=1", "--image_size=8", "--depth=1", "--base_width=4", "--repeats=1"]
    result = subprocess.run(
        [sys.executable, str(PATH), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 8x8 |")]
    # 8x8: 3->4 (no input grad: the images), 4->4 x2 (down and dec), 8->4 (dec); 4x4: 4->8, 8->8.
    assert len(rows) == 2 + 3 + 3
    assert any(line.startswith("| all |") for line in result.stdout.splitlines())
    for row in rows:
        assert row.split("|")[5].strip() in ("YNNPACK", "Eigen")
