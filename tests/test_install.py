"""`pip install jfcnn` (no extras) is enough for `jfcnn.ops` and `jfcnn.models`.

Builds a fresh virtual environment with the bare install, then imports and
calls the ops and a model there, and checks that the training entry point
names the extra to install instead of failing with a traceback.
"""

from __future__ import annotations

import os
import subprocess
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow

_USE_OPS_AND_MODELS = """
import sys
import jax, jax.numpy as jnp, numpy as np
import jfcnn.ops, jfcnn.models

features = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
boxes = jnp.array([[[1.0, 1.0, 5.0, 5.0]], [[0.0, 0.0, 8.0, 8.0]]])
pooled = jfcnn.ops.roi_align(features, boxes, 2, sampling_ratio=2)
# A linear ramp f(y, x) = 8 y + x is reproduced exactly by bilinear sampling.
# Bin (0, 0) of the first box (aligned: shifted by -0.5 to start at 0.5, bins of
# 2 pixels) averages the ramp at its 2 x 2 samples, 0.5 + (0.5, 1.5).
ys = xs = 0.5 + np.array([0.5, 1.5])
expected = np.mean([8 * y + x for y in ys for x in xs])
assert abs(float(pooled[0, 0, 0, 0, 0]) - expected) < 1e-5, (pooled[0, 0, 0, 0, 0], expected)

model = jfcnn.models.UNet(num_classes=3, depth=2, base_width=4, norm="group")
images = jnp.ones((1, 16, 16, 3))
variables = model.init(jax.random.PRNGKey(0), images, train=False)
logits = model.apply(variables, images, train=False)
assert logits.shape == (1, 16, 16, 3) and bool(jnp.all(jnp.isfinite(logits)))
for name in ("tensorflow", "tensorflow_datasets", "orbax", "ml_collections", "pycocotools"):
    assert name not in sys.modules, name
print("ok")
"""


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    env_dir = tmp_path_factory.mktemp("bare-venv")
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    result = subprocess.run(
        [python, "-m", "pip", "install", "-q", ROOT],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return python


def test_bare_install_runs_ops_and_models(bare_python, tmp_path):
    result = subprocess.run(
        [bare_python, "-c", _USE_OPS_AND_MODELS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # Not the checkout: the installed package must be used.
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    missing = subprocess.run(
        [bare_python, "-c", "import tensorflow"], capture_output=True, text=True, cwd=tmp_path
    )
    assert missing.returncode != 0  # The bare install really lacks the training stack.


@pytest.mark.parametrize(
    "command",
    [
        ["train.py", "--config", "configs/unet.py", "--workdir", "W"],
        ["-m", "jfcnn.evaluate", "--workdir", "W"],
    ],
)
def test_entry_points_without_the_train_extra_name_it(bare_python, command, tmp_path):
    script = os.path.join(ROOT, command[0]) if command[0].endswith(".py") else command[0]
    result = subprocess.run(
        [bare_python, script, *command[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "pip install 'jfcnn[train]'" in lines[0]
    assert not os.path.exists(tmp_path / "W")
