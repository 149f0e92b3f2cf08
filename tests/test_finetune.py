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
from tiny_configs import instance_metadata as _metadata

from jfcnn import checkpoint as ckpt
from jfcnn import evaluate, finetune, tasks
from jfcnn import train as train_lib
from jfcnn import train_state as state_lib
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


def _check_mapped(mapped, pretrained, fresh, rows=ROWS):
    """``mapped`` is ``pretrained`` with class ``k``'s rows from pretrained row ``rows[k]``
    and ``fresh``'s rows where that is -1 (with ``fresh`` None: no pretrained row)."""
    new, old = _leaves(mapped), _leaves(pretrained)
    init = _leaves(fresh) if fresh is not None else None
    assert new.keys() == old.keys()
    assert init is None or init.keys() == new.keys()
    per_class = {path for path in new if new[path].shape != old[path].shape}
    # The box classifier, the box regressor and the mask predictor (kernel and bias each).
    assert len(per_class) == 6, sorted(per_class)
    num_classes = len(rows)
    for path in per_class:
        value, source = new[path], old[path]
        width = value.shape[-1] // num_classes  # 1 entry per class, or 4 (box deltas).
        num_pretrained = source.shape[-1] // width
        value = value.reshape(*value.shape[:-1], num_classes, width)
        source = source.reshape(*source.shape[:-1], num_pretrained, width)
        for k, row in enumerate(rows):
            if row >= 0:
                want = source[..., row, :]
                np.testing.assert_array_equal(value[..., k, :], want, err_msg=f"{path} class {k}")
            elif init is not None:
                start = init[path].reshape(value.shape)[..., k, :]
                np.testing.assert_array_equal(value[..., k, :], start, err_msg=f"{path} {k}")
            if row < 0 and value[..., k, :].any():  # (Biases start at zero.)
                # A fresh row is no pretrained row.
                assert not any(
                    np.array_equal(value[..., k, :], source[..., j, :])
                    for j in range(num_pretrained)
                ), (path, k)
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


# configs/maskrcnn_finetune_torchvision.py shrunk by data and step overrides only (its
# model is the converted ResNet-50-FPN): images resized as torchvision resizes them to
# 64 pixels, two steps. The warmup starts from a learning rate of 0, so step 1's
# checkpoint holds the weights training started from, step 2's one SGD step from them.
TORCHVISION_TINY = {
    "data.image_size": 64,
    "data.min_size": 64,
    "data.max_size": 64,
    "data.shuffle_buffer": 8,
    "data.max_instances": 8,
    # The converted model's sampling sizes are for 800-pixel COCO images: on
    # 64-pixel ones its 128 mask ROIs per image made a step 20 s of mask head.
    "model.rpn_pre_nms_top_n_train": 256,
    "model.rpn_post_nms_top_n_train": 256,
    "model.rpn_pre_nms_top_n_test": 128,
    "model.rpn_post_nms_top_n_test": 128,
    "model.roi_batch_size_per_image": 64,
    "model.mask_rois_per_image": 16,
    "model.detections_per_image": 10,
    "batch_size": 2,
    "num_train_steps": 2,
    "log_every_steps": 1,
    "eval_every_steps": 100,
    "checkpoint_every_steps": 1,
    "num_eval_images": 0,
}


def test_finetune_torchvision_config_is_the_converted_model():
    from jfcnn import convert

    config = tiny_configs.shipped_config("maskrcnn_finetune_torchvision.py")
    tasks.validate_config(config)
    # The published (v1) file converts with frozen batch norm epsilon 0.
    assert config.model.to_dict() == convert.maskrcnn_config(0.0).model.to_dict()
    converted = convert.maskrcnn_config(0.0).data
    for key in ("resize", "min_size", "max_size", "image_size", "scale_range"):
        assert config.data[key] == converted[key], key
    assert config.data.name == "coco_json"


@pytest.mark.slow
def test_finetune_torchvision_config_trains_a_converted_workdir(tmp_path):
    """``python -m jfcnn.convert`` then ``train.py --config
    configs/maskrcnn_finetune_torchvision.py`` on a COCO JSON export one of whose
    classes is a COCO class ("sports ball"), the other not ("square")."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    import coco_json_files as files
    from conftest import Runner
    from torchvision_maskrcnn import build_torchvision_model, v1_state_dict

    from jfcnn import convert, weights

    # torchvision's maskrcnn_resnet50_fpn, saved with the published file's key names.
    with torch.no_grad():
        state = {k: v.numpy() for k, v in build_torchvision_model().state_dict().items()}
    path = str(tmp_path / "maskrcnn.safetensors")
    weights.write_safetensors(path, v1_state_dict(state))
    workdir = str(tmp_path / "maskrcnn_tv")
    assert convert.convert_maskrcnn(path, workdir)["norm_epsilon"] == 0.0
    _, _, converted, _ = evaluate.load_trained(workdir)
    converted = jax.device_get(converted)

    export = files.write_dataset(str(tmp_path / "export"))
    for split in ("train", "eval"):
        coco = files.read_json(export[f"{split}_annotations"])
        for category in coco["categories"]:
            if category["id"] == files.DISK:
                category["name"] = "sports ball"
        files.write_json(export[f"{split}_annotations"], coco)
    paths = {
        f"data.{key}": export[key]
        for key in ("train_annotations", "train_images", "eval_annotations", "eval_images")
    }
    runner = Runner(str(tmp_path / "tfds"), "maskrcnn_finetune_torchvision.py", TORCHVISION_TINY)
    result = runner.run(workdir, **paths)
    assert "kept the rows of ['sports ball']; new rows for ['square']" in result.stderr

    # Training started from the converted weights: COCO's rows for the background and
    # "sports ball" (COCO's category 37), a fresh row for "square", the rest COCO's.
    _, task, started, step = evaluate.load_trained(workdir, 1)
    assert step == 1 and task.metadata.class_names == ("background", "square", "sports ball")
    sports_ball = convert.COCO_CATEGORY_IDS[convert.THING_CLASS_NAMES.index("sports ball")]
    assert sports_ball == 37
    _check_mapped(jax.device_get(started), converted, None, rows=[0, -1, sports_ball])

    # And trained: the trainable layers moved, the frozen ones (stem, res2, every
    # frozen batch norm) did not.
    _, _, trained, step = evaluate.load_trained(workdir, 2)
    assert step == 2
    frozen = train_lib.frozen_param_paths(task.model)
    assert frozen
    moved = []
    for (key_path, before), after in zip(
        jax.tree_util.tree_leaves_with_path(jax.device_get(started)),
        jax.tree.leaves(jax.device_get(trained)),
        strict=True,
    ):
        keys = tuple(str(getattr(entry, "key", entry)) for entry in key_path)
        is_frozen = keys[0] != "params" or any(keys[1 : 1 + len(p)] == p for p in frozen)
        assert np.isfinite(after).all(), keys
        if is_frozen:
            np.testing.assert_array_equal(after, before, err_msg=str(keys))
        elif not np.array_equal(after, before):
            moved.append(keys)
    assert len(moved) > 10, moved
