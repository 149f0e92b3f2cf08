import importlib.util
import os
import subprocess
import sys

import pytest

from jfcnn import train
from jfcnn.config_validation import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name: str):
    sys.path.insert(0, ROOT)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(ROOT)
    return module.get_config()


@pytest.mark.parametrize("name", ["unet.py", "unet_pets.py"])
def test_shipped_configs_are_valid(name):
    train.validate(load_config(name))


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
        train.validate(config)


def test_ill_typed_value_in_config_file():
    config = load_config("unet.py")
    # A config file may build a fresh ConfigDict with the wrong type.
    config.unlock()
    del config["learning_rate"]
    config.learning_rate = "fast"
    with pytest.raises(ConfigError, match="learning_rate.*must be int or float.*'fast'"):
        train.validate(config)


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
