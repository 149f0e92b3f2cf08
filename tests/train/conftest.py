"""Shrunken end-to-end training runs shared by the training tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def train_command(workdir, data_dir: str, **overrides) -> list[str]:
    """``python train.py ...`` with the tiny config and extra overrides."""
    values = {**TINY_OVERRIDES, "data.data_dir": data_dir, **overrides}
    flags = [f"--config.{key}={value}" for key, value in values.items()]
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "unet.py"),
        "--workdir",
        str(workdir),
        *flags,
    ]


def run_train(workdir, data_dir: str, *, env=None, **overrides) -> subprocess.CompletedProcess:
    result = subprocess.run(
        train_command(workdir, data_dir, **overrides),
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
    """Runs ``train.py`` on the tiny config against the session's data set."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir

    def command(self, workdir, **overrides) -> list[str]:
        return train_command(workdir, self.data_dir, **overrides)

    def run(self, workdir, *, env=None, **overrides) -> subprocess.CompletedProcess:
        return run_train(workdir, self.data_dir, env=env, **overrides)


@pytest.fixture(scope="session")
def runner(shapes_data_dir) -> Runner:
    return Runner(shapes_data_dir)
