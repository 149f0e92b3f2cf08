"""Session-wide test setup.

torch (the CUDA build that the `test` extra installs) segfaults when it is
imported after TensorFlow in the same process, so it is imported here first,
before any test module or fixture imports TensorFlow.

Under CI (``CI`` set), a skipped test fails the run: the torchvision
cross-checks are the strongest parity evidence and must never be silently
skipped because an optional dependency is missing.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

# One JAX compilation cache for the whole session, this process and every
# train.py / evaluate / predict subprocess it starts (they inherit the
# environment): most subprocess runs compile a program an earlier run already
# compiled, and on two cores compiling is most of their time. A fresh directory
# per session, so nothing carries over between runs of the suite.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="jfcnn-test-jax-cache-")
    atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE

import pytest  # noqa: E402
import tiny_configs  # noqa: E402

try:  # Import order matters; see the module docstring.
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:  # Outside CI the torch cross-checks skip without torch.
    pass


# ---------------------------------------------------------------------------
# Shrunken end-to-end training runs, shared by tests/train and tests/reliability.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Data-parallel tests fake this many CPU devices in a subprocess. Four test
# what eight would (every cross-device sum and pmean, a batch split in shards)
# at half the cost: on a 2-core machine each faked device is a thread, and the
# step time of many devices on few cores is mostly their synchronization.
FAKED_DEVICES = 4
# Environment of a subprocess that sees FAKED_DEVICES CPU devices.
MANY_DEVICES = {
    **os.environ,
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={FAKED_DEVICES}",
}


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    """The first examples of the built-in data set, generated once per session."""
    import tensorflow_datasets as tfds

    import jfcnn.data  # noqa: F401  (registers the builder)

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    # The tiny config reads train[:64] and validation[:24]: build only those.
    tfds.builder("jfcnn_shapes", data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            max_examples_per_split=64, try_download_gcs=False
        )
    )
    return data_dir


def train_command(
    workdir, data_dir: str, *, config: str = "unet.py", base: dict | None = None, **overrides
) -> list[str]:
    """``python train.py --config configs/<config>`` with ``base`` (the tiny
    U-Net overrides by default) and extra overrides."""
    base = tiny_configs.UNET_OVERRIDES if base is None else base
    values = {**base, "data.data_dir": data_dir, **overrides}
    flags = [f"--config.{key}={value}" for key, value in values.items()]
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", config),
        "--workdir",
        str(workdir),
        *flags,
    ]


def run_train(workdir, data_dir: str, *, env=None, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        train_command(workdir, data_dir, **kwargs),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if result.returncode != 0:
        raise AssertionError(f"training failed:\n{result.stderr[-5000:]}")
    return result


class Runner:
    """Runs ``train.py`` on a tiny config against the session's data set."""

    faked_devices = FAKED_DEVICES
    many_devices = MANY_DEVICES  # The environment of a run on faked_devices devices.

    def __init__(self, data_dir: str, config: str = "unet.py", base: dict | None = None):
        self.data_dir, self.config, self.base = data_dir, config, base

    def with_config(self, config: str, base: dict) -> Runner:
        """The same runner for ``configs/<config>`` shrunk by ``base``."""
        return Runner(self.data_dir, config, base)

    def command(self, workdir, **overrides) -> list[str]:
        return train_command(
            workdir, self.data_dir, config=self.config, base=self.base, **overrides
        )

    def run(self, workdir, *, env=None, **overrides) -> subprocess.CompletedProcess:
        return run_train(
            workdir, self.data_dir, env=env, config=self.config, base=self.base, **overrides
        )

    @staticmethod
    def evaluate(workdir) -> dict:
        """``python -m jfcnn.evaluate --workdir W``; returns its metrics.json."""
        result = subprocess.run(
            [sys.executable, "-m", "jfcnn.evaluate", "--workdir", str(workdir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-5000:]
        with open(os.path.join(workdir, "eval", "metrics.json")) as f:
            return json.load(f)


@pytest.fixture(scope="session")
def runner(shapes_data_dir) -> Runner:
    return Runner(shapes_data_dir)


# The files that take minutes, longest first (their summed test times in a CI
# run on 2 cores). xdist's ``--dist=loadfile`` hands whole files to the workers in
# collection order (``--no-loadscope-reorder`` in pyproject.toml: by default it
# reorders files by their number of tests, which put test_convert_evaluate.py
# (two tests on one three-minute fixture) last, alone, with two workers idle).
# Starting with the longest lets the short files fill the gaps at the end.
LONGEST_FIRST = (
    "train/test_multihost.py",
    "train/test_train.py",
    "train/test_instance.py",
    "test_finetune.py",
    "train/test_multihost_maskrcnn.py",
    "test_convert_evaluate.py",
    "test_convert_parity.py",
    "test_pretrained_training.py",
    "train/test_parallel.py",
    "ops/test_roi_align.py",
    "models/test_maskrcnn.py",
    "reliability/test_signals.py",
    "test_notebooks.py",
    "ops/test_roi_align_reliability.py",
    "test_predict.py",
    "tasks/test_coco_json_eval.py",
)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: three workers per two usable cores, at least two, at most four
    (``--maxprocesses``).

    Most of a test's time is a train.py subprocess importing libraries and
    compiling, both on one thread, so a worker per core left a core idle a
    sixth of the time. Measured by CI on 2 cores: pytest took 33m47s with two
    workers, 28m53s with three (a run in which two tests were also ~1 min shorter).
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own setting.
    return max(2, (3 * len(os.sched_getaffinity(0))) // 2)


def pytest_collection_modifyitems(config, items):
    tests = os.path.join(ROOT, "tests")
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.relpath(item.path, tests), len(rank)))


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not os.environ.get("CI") or reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if skipped and exitstatus == 0:
        reporter.write_line(
            f"error: {len(skipped)} test(s) skipped under CI; install the `test` extra "
            "(it includes torch and torchvision) so that every cross-check runs.",
            red=True,
        )
        session.exitstatus = 1
