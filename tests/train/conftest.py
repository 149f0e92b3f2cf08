"""Shrunken end-to-end training runs shared by the training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Environment of a subprocess that sees 8 CPU devices.
EIGHT_DEVICES = {
    **os.environ,
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
}

# A U-Net small enough to train a few dozen steps in seconds on 2 CPU cores.
TINY_OVERRIDES = {
    "data.image_size": 32,
    "data.train_split": "train[:64]",
    "data.eval_split": "validation[:24]",
    "data.shuffle_buffer": 64,
    "model.depth": 2,
    "model.base_width": 8,
    "batch_size": 8,
    "num_train_steps": 12,
    "warmup_steps": 2,
    "log_every_steps": 4,
    "eval_every_steps": 8,
    "checkpoint_every_steps": 4,
    "num_eval_images": 2,
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
    base = TINY_OVERRIDES if base is None else base
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

    eight_devices = EIGHT_DEVICES

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
