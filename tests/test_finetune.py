"""Fine-tuning a step-0 checkpoint (converted weights) on a data set with other classes.

A tiny Mask R-CNN with five "pretrained" class slots (background, an unused
"N/A" slot, "Square", "person", "circle") is saved as a step-0 work
directory, as ``jfcnn.convert`` writes one; fine-tuning it on ``jfcnn_shapes``
(background, circle, square, triangle) must keep the rows of the classes of
the same name, initialize triangle's freshly and keep every other weight.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tiny_configs

from jfcnn import checkpoint as ckpt
from jfcnn import evaluate, finetune, tasks
from jfcnn import train as train_lib
from jfcnn import train_state as state_lib
from jfcnn.data.registry import DatasetMetadata
from jfcnn.errors import CheckpointMismatchError

PRETRAINED = ("background", "N/A", "Square", "person", "circle")
SHAPES = ("background", "circle", "square", "triangle")
# The rows each shapes class keeps (-1: fresh), by name.
ROWS = [0, 4, 2, -1]

TINY = {
    "data.image_size": 64,
    "data.train_split": "train[:8]",
    "data.eval_split": "validation[:2]",
    "data.shuffle_buffer": 8,
    **tiny_configs.config_overrides(tiny_configs.MASKRCNN),
    "model.frozen_batch_norm": True,
    "batch_size": 2,
    "num_train_steps": 1,
    "learning_rate": 0.0,  # The checkpoint after a step holds the mapped weights.
    "warmup_steps": 0,
    "lr_schedule": "constant",
    "log_every_steps": 1,
    "eval_every_steps": 100,
    "checkpoint_every_steps": 1,
    "num_eval_images": 0,
}


def _metadata(names) -> DatasetMetadata:
    return DatasetMetadata(
        name="pretrained",
        num_classes=len(names),
        class_names=tuple(names),
        image_size=64,
        num_train_examples=0,
        num_eval_examples=0,
        has_instances=True,
    )


def _config(**changes):
    config = tiny_configs.shipped_config("maskrcnn.py")
    for key, value in {**TINY, **changes}.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


def _init(task, rng):
    """``task.init_variables(rng)``, compiled unoptimized (as training initializes)."""
    compiled = jax.jit(task.init_variables).lower(rng).compile(train_lib.FAST_COMPILE)
    return jax.device_get(compiled(rng))


def _write_step0(workdir: str, config) -> dict:
    """A step-0 work directory of PRETRAINED classes; returns its variables."""
    pretrained = _metadata(PRETRAINED)
    task = tasks.get_task(config, pretrained)
    variables = _init(task, jax.random.PRNGKey(42))
    tx, _ = train_lib.create_optimizer(config, frozen=train_lib.frozen_param_paths(task.model))
    state = state_lib.state_at_step_0(variables, tx, jax.random.PRNGKey(1))
    ckpt.save_config(workdir, config)
    ckpt.save_metadata(workdir, pretrained.to_dict())
    finetune.save_pretrained_metadata(workdir, pretrained, "test")
    manager = ckpt.create_manager(workdir)
    try:
        ckpt.save(manager, 0, state)
    finally:
        manager.close()
    return jax.device_get(variables)


def _leaves(variables):
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
    }


def _check_mapped(mapped, pretrained, fresh):
    new, old, init = _leaves(mapped), _leaves(pretrained), _leaves(fresh)
    assert new.keys() == old.keys() == init.keys()
    per_class = {path for path in new if new[path].shape != old[path].shape}
    # The box classifier, the box regressor and the mask predictor (kernel and bias each).
    assert len(per_class) == 6, sorted(per_class)
    for path in per_class:
        value, source = new[path], old[path]
        width = value.shape[-1] // 4  # 1 entry per class, or 4 (box deltas).
        assert source.shape[-1] == 5 * width
        value = value.reshape(*value.shape[:-1], 4, width)
        source = source.reshape(*source.shape[:-1], 5, width)
        start = init[path].reshape(value.shape)
        for k, row in enumerate(ROWS):
            want = source[..., row, :] if row >= 0 else start[..., k, :]
            np.testing.assert_array_equal(value[..., k, :], want, err_msg=f"{path} class {k}")
        if start.any():  # (Biases start at zero in both.) A fresh row is no pretrained row.
            assert not np.array_equal(value[..., 3, :], source[..., 3, :])
    # Everything else is the pretrained weights.
    for path in new.keys() - per_class:
        np.testing.assert_array_equal(new[path], old[path], err_msg=path)


def test_class_rows_follow_names():
    np.testing.assert_array_equal(finetune.class_rows(PRETRAINED, SHAPES), ROWS)
    # The unused slot never gives its row, even to a class named like it.
    np.testing.assert_array_equal(finetune.class_rows(PRETRAINED, ("bg", "N/A")), [0, -1])


def test_step0_variables_map_the_class_rows(tmp_path):
    config = _config()
    pretrained = _write_step0(str(tmp_path), config)
    task = tasks.get_task(config, _metadata(SHAPES))
    manager = ckpt.create_manager(str(tmp_path))
    try:
        mapped = jax.device_get(finetune.step0_variables(config, task, manager))
    finally:
        manager.close()
    rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    fresh = _init(task, rng)
    _check_mapped(mapped, pretrained, fresh)


def test_another_architecture_is_refused_with_the_fix(tmp_path):
    _write_step0(str(tmp_path), _config())
    other = _config(**{"model.box_head_dim": 16})
    task = tasks.get_task(other, _metadata(SHAPES))
    manager = ckpt.create_manager(str(tmp_path))
    try:
        with pytest.raises(CheckpointMismatchError, match="another architecture.*new --workdir"):
            finetune.step0_variables(other, task, manager)
    finally:
        manager.close()


@pytest.mark.slow
def test_train_py_fine_tunes_a_step0_workdir_on_other_classes(runner, tmp_path):
    workdir = tmp_path / "converted"
    workdir.mkdir()
    pretrained = _write_step0(str(workdir), _config())
    result = runner.with_config("maskrcnn.py", TINY).run(workdir)
    assert "Fine-tuning 4 pretrained classes on 3 classes" in result.stderr
    _, task, mapped, step = evaluate.load_trained(str(workdir))
    assert step == 1 and task.metadata.class_names == SHAPES
    fresh = _init(task, jax.random.split(jax.random.PRNGKey(0))[0])
    _check_mapped(jax.device_get(mapped), pretrained, fresh)
