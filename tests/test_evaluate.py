"""A work directory is self-contained; python -m jfcnn.evaluate scores other data by flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jfcnn import checkpoint as ckpt
from jfcnn import data as data_lib
from jfcnn import evaluate
from jfcnn.data import pipeline
from jfcnn.errors import ConfigError, WorkdirMetadataError

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(runner, tmp_path_factory) -> str:
    """A tiny U-Net run whose data dir was given relative to the training command's directory."""
    workdir = tmp_path_factory.mktemp("unet")
    relative = os.path.relpath(runner.data_dir, ROOT)
    assert not os.path.isabs(relative)
    runner.run(workdir, num_train_steps=4, **{"data.data_dir": relative})
    return str(workdir)


def test_config_keeps_the_data_paths_absolute(trained, runner):
    config = ckpt.load_config(trained)
    assert config.data.data_dir == os.path.abspath(runner.data_dir)


def test_loading_a_run_never_reads_its_data_set(trained, monkeypatch):
    config = ckpt.load_config(trained)
    expected = data_lib.dataset_metadata(config)
    with open(os.path.join(trained, ckpt.METADATA_FILE)) as f:
        stored = json.load(f)
    assert stored == expected.to_dict()
    assert stored["class_names"] == ["background", "circle", "square", "triangle"]
    assert stored["image_size"] == 32 and stored["ignore_label"] == 255

    def no_data(*args, **kwargs):
        raise AssertionError("loading a trained run read the data set")

    monkeypatch.setattr(pipeline, "_get_builder", no_data)
    monkeypatch.setattr(pipeline, "dataset_metadata", no_data)
    _, task, variables, step = evaluate.load_trained(trained)
    assert step == 4 and task.metadata == expected
    logits = task.model.apply(variables, np.zeros((1, 32, 32, 3), np.float32), train=False)
    assert logits.shape == (1, 32, 32, 4)


def test_damaged_metadata_is_one_clear_error(trained, tmp_path):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy)
    with open(os.path.join(copy, ckpt.METADATA_FILE), "w") as f:
        f.write('{"name": "jfcnn_shapes", "num_cla')
    with pytest.raises(WorkdirMetadataError, match="dataset.json cannot be read"):
        evaluate.load_trained(copy)


def test_other_split_and_data_values(trained):
    default, _ = evaluate.evaluate_run(trained)
    assert default["num_examples"] == 24  # tiny_configs: validation[:24]
    by_split, _ = evaluate.evaluate_run(trained, split="validation[:8]")
    by_key, _ = evaluate.evaluate_run(trained, data_overrides=["eval_split=validation[:8]"])
    assert by_split["num_examples"] == by_key["num_examples"] == 8
    assert by_split["mean_iou"] == by_key["mean_iou"]
    with pytest.raises(ConfigError, match="config.data has no key 'folders'"):
        evaluate.evaluate_run(trained, data_overrides=["folders=/x"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        evaluate.evaluate_run(trained, data_overrides=["eval_split"])


def test_evaluate_command_line_flags(trained, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jfcnn.evaluate", "--workdir", trained]
    result = subprocess.run(
        [*command, "--split", "validation[:4]", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "metrics.json") as f:
        assert json.load(f)["num_examples"] == 4
    bad = subprocess.run(
        [*command, "--data", "eval_splitt=test"], cwd=ROOT, capture_output=True, text=True
    )
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 1 and len(errors) == 1 and "eval_splitt" in errors[0], bad.stderr


def test_data_with_other_classes_is_refused(trained, tmp_path):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy)
    path = os.path.join(copy, ckpt.METADATA_FILE)
    with open(path) as f:
        metadata = json.load(f)
    metadata["class_names"][2] = "disk"
    with open(path, "w") as f:
        json.dump(metadata, f)
    with pytest.raises(
        ConfigError, match="class 2 is 'square' in the data and 'disk' in the model"
    ):
        evaluate.evaluate_run(copy)
