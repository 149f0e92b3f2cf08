"""Config validation: every shipped config is valid and builds; bad keys are named."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_configs

from jfcnn import data as data_lib
from jfcnn import tasks
from jfcnn.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(
    os.path.basename(p)
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


load_config = tiny_configs.shipped_config


def test_every_config_file_is_covered():
    assert {"unet.py", "unet_pets.py", "maskrcnn.py", "maskrcnn_coco.py"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_is_valid_and_its_model_builds(name):
    config = load_config(name)
    tasks.validate_config(config)
    # The model is built abstractly: shapes only, no compute, and no data set
    # (COCO and pets are not prepared here), so the metadata comes from the spec.
    spec = data_lib.get_spec(config.data.name)
    # Data sets made from the user's files know their classes only from them.
    class_names = spec.class_names or ("class_0", "class_1")
    metadata = data_lib.DatasetMetadata(
        name=spec.name,
        num_classes=len(class_names),
        class_names=class_names,
        image_size=config.data.image_size,
        num_train_examples=0,
        num_eval_examples=0,
        has_instances=spec.has_instances,
    )
    task = tasks.get_task(config, metadata)
    variables = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    assert num_params > 1000
    # The output layer has one channel per class of the data set.
    last_bias = [x for x in jax.tree.leaves(variables["params"]) if x.ndim == 1]
    assert any(x.shape == (metadata.num_classes,) for x in last_bias)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: setattr(c, "num_train_step", 5),
            "Unknown config key `num_train_step`.*Did you mean `num_train_steps`",
        ),
        (lambda c: setattr(c.data, "imagesize", 5), "Unknown config key `data.imagesize`"),
        (lambda c: setattr(c.model, "widht", 5), "Unknown config key `model.widht`"),
        (lambda c: setattr(c.model, "name", "vgg"), "model.name.*'vgg'.*unet"),
        (lambda c: setattr(c, "task", "depth"), "`task` is 'depth'.*semantic.*instance"),
        (lambda c: setattr(c, "parallelism", "pjit"), "parallelism.*choose one of"),
        (lambda c: setattr(c, "batch_size", 0), "batch_size.*>= 1"),
        (lambda c: c.__delattr__("seed"), "`seed` is missing"),
    ],
)
def test_bad_config_names_the_key(mutate, message):
    config = load_config("unet.py")
    config.unlock()
    mutate(config)
    with pytest.raises(ConfigError, match=message):
        tasks.validate_config(config)


def test_model_of_another_task_is_rejected():
    config = load_config("unet.py")
    config.model.name = "maskrcnn"
    with pytest.raises(ConfigError, match="'semantic' task has the models \\['unet'\\]"):
        tasks.validate_config(config)


def test_renamed_mask_rcnn_key_names_the_new_one():
    config = load_config("maskrcnn.py")
    config.unlock()
    config.model.mask_head = "c4"
    with pytest.raises(ConfigError, match="`model.mask_head` was renamed to `model.roi_heads`"):
        tasks.validate_config(config)


def test_ill_typed_value_in_config_file():
    config = load_config("unet.py")
    # A config file may build a fresh ConfigDict with the wrong type.
    config.unlock()
    del config["learning_rate"]
    config.learning_rate = "fast"
    with pytest.raises(ConfigError, match="learning_rate.*must be int or float.*'fast'"):
        tasks.validate_config(config)


def test_command_line_rejects_unknown_and_ill_typed_overrides(tmp_path):
    for flag, expected in [
        ("--config.num_train_step=3", "num_train_step"),
        ("--config.batch_size=many", "batch_size"),
    ]:
        result = subprocess.run(
            [
                sys.executable,
                "train.py",
                "--config",
                "configs/unet.py",
                "--workdir",
                str(tmp_path),
                flag,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0
        assert expected in result.stderr
        assert not os.path.exists(tmp_path / "checkpoints")
