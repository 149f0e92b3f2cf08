"""Checks a run config before anything expensive happens.

ml_collections already rejects ``--config.unknown=1`` overrides and ill-typed
overrides of existing fields, but not a misspelled field written in a config
file, a ``None`` where a number is needed, or a value outside its choices.
This module catches those with a message that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from jfcnn.errors import ConfigError

_NUMBER = (int, float)
_SECTION = (ml_collections.ConfigDict, Mapping)
_SEQUENCE = (tuple, list)


@dataclasses.dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    choices: tuple[Any, ...] | None = None
    optional: bool = False  # None allowed
    minimum: float | None = None


def _f(types, *, choices=None, optional=False, minimum=None) -> Field:
    types = types if isinstance(types, tuple) else (types,)
    return Field(types, choices, optional, minimum)


# Top-level fields shared by every task.
COMMON: dict[str, Field] = {
    "task": _f(str),  # Choices: the task registry (jfcnn.tasks.TASKS).
    "seed": _f(int),
    "batch_size": _f(int, minimum=1),
    "num_train_steps": _f(int, minimum=0),
    "learning_rate": _f(_NUMBER, minimum=0),
    "lr_schedule": _f(str, choices=("constant", "cosine", "warmup_cosine")),
    "warmup_steps": _f(int, minimum=0),
    "optimizer": _f(str, choices=("adam", "adamw", "sgd")),
    "momentum": _f(_NUMBER, minimum=0),
    "weight_decay": _f(_NUMBER, minimum=0),
    "grad_clip_norm": _f(_NUMBER, minimum=0),
    "checkpoint_every_steps": _f(int, minimum=1),
    "keep_checkpoints": _f(int, minimum=1),
    "eval_every_steps": _f(int, minimum=1),
    "log_every_steps": _f(int, minimum=1),
    "parallelism": _f(str, choices=("jit", "pmap")),
    "num_eval_images": _f(int, minimum=0),
    "model": _f(_SECTION),
    "data": _f(_SECTION),
    "loss": _f(_SECTION),
}

DATA: dict[str, Field] = {
    "name": _f(str),
    "data_dir": _f(str, optional=True),
    "image_size": _f(int, minimum=8),
    "train_split": _f(str),
    "eval_split": _f(str),
    "shuffle_buffer": _f(int, minimum=1),
    "augment": _f(bool),
    "scale_range": _f(_SEQUENCE),
    "max_instances": _f(int, minimum=1),
    "cache": _f(bool),
    "ignore_label": _f(int, minimum=0),
    # torchvision's detection resize (converted models; jfcnn.data.pipeline.torchvision_resize).
    "resize": _f(str, choices=("fit", "torchvision"), optional=True),
    "min_size": _f(int, minimum=1, optional=True),
    "max_size": _f(int, minimum=1, optional=True),
    # Data sets made from the user's files (jfcnn/data/folder.py, coco_json.py).
    "folder": _f(str, optional=True),
    "train_annotations": _f(str, optional=True),
    "train_images": _f(str, optional=True),
    "eval_annotations": _f(str, optional=True),
    "eval_images": _f(str, optional=True),
}

LOSS: dict[str, Field] = {
    "dice_weight": _f(_NUMBER, minimum=0),
}


def _check_section(
    section: Mapping[str, Any], schema: Mapping[str, Field], prefix: str, *, required: bool = True
) -> None:
    for key in section:
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" Did you mean `{prefix}{close[0]}`?" if close else ""
            raise ConfigError(
                f"Unknown config key `{prefix}{key}`.{hint} "
                f"Known keys here: {', '.join(sorted(schema))}."
            )
    for key, field in schema.items():
        name = f"{prefix}{key}"
        if key not in section:
            if required and not field.optional:
                raise ConfigError(f"Config key `{name}` is missing; add it to the config file.")
            continue
        value = section[key]
        if value is None:
            if field.optional:
                continue
            raise ConfigError(f"Config key `{name}` is None; it needs a value.")
        # bool is an int subclass; do not let True pass as a step count.
        ok = isinstance(value, field.types) and not (
            isinstance(value, bool) and bool not in field.types
        )
        if not ok:
            expected = " or ".join(t.__name__ for t in field.types)
            shown = "" if isinstance(value, _SECTION) else f" {value!r}"
            raise ConfigError(
                f"Config key `{name}` must be {expected}, got {type(value).__name__}{shown}."
            )
        if field.choices is not None and value not in field.choices:
            raise ConfigError(
                f"Config key `{name}` is {value!r}; choose one of {list(field.choices)}."
            )
        if field.minimum is not None and value < field.minimum:
            raise ConfigError(f"Config key `{name}` is {value!r}; it must be >= {field.minimum}.")


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    tasks: tuple[str, ...] | None = None,
    model_fields: Sequence[str] | None = None,
    model_choices: Mapping[str, Sequence[Any]] | None = None,
    renamed_model_fields: Mapping[str, str] | None = None,
) -> None:
    """Raises ``ConfigError`` naming the first bad key of ``config``.

    Args:
      config: a run config (see ``configs/``).
      tasks: the valid values of ``config.task``.
      model_fields: the keyword arguments the task's model accepts (besides
        ``name``); when given, ``config.model`` keys are checked against them.
      model_choices: model key -> its allowed values (the model's ``FIELD_CHOICES``).
      renamed_model_fields: old model key -> new key, for a clear message when
        a config still uses the old name.
    """
    _check_section(config, COMMON, "")
    if tasks is not None and config.task not in tasks:
        raise ConfigError(f"Config key `task` is {config.task!r}; choose one of {list(tasks)}.")
    _check_section(config.data, DATA, "data.", required=False)
    for key in ("name", "image_size", "train_split", "eval_split"):
        if key not in config.data:
            raise ConfigError(f"Config key `data.{key}` is missing; add it to the config file.")
    _check_section(config.loss, LOSS, "loss.", required=False)
    if "name" not in config.model:
        raise ConfigError("Config key `model.name` is missing (e.g. 'unet').")
    for old, new in (renamed_model_fields or {}).items():
        if old in config.model:
            raise ConfigError(
                f"Config key `model.{old}` was renamed to `model.{new}`; "
                f"set `model.{new}` instead (e.g. --config.model.{new}=...)."
            )
    if model_fields is not None:
        schema = {"name": _f(str)}
        choices = model_choices or {}
        for key in model_fields:
            allowed = tuple(choices[key]) if key in choices else None
            # Any value (the model checks its own); bool named so flags such as
            # `frozen_batch_norm` pass the step-count guard above.
            schema[key] = Field((object, bool), choices=allowed, optional=True)
        _check_section(config.model, schema, "model.", required=False)
