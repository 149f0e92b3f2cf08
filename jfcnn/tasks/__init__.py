"""Tasks: what to build, how to train it and how to score it, per kind of problem.

``TASKS`` is the one registry of tasks, and each task's ``models`` dict the
registry of its models; ``get_task`` and ``validate_config`` both read them,
so a model added there is buildable and its config keys are checked.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jfcnn import config_validation
from jfcnn.errors import ConfigError
from jfcnn.tasks.base import Evaluator, Task, build_model, model_fields
from jfcnn.tasks.instance import InstanceSegmentationTask
from jfcnn.tasks.semantic import SemanticSegmentationTask

TASKS: dict[str, type[Task]] = {
    "semantic": SemanticSegmentationTask,
    "instance": InstanceSegmentationTask,
}

__all__ = [
    "TASKS",
    "Evaluator",
    "Task",
    "build_model",
    "get_task",
    "model_fields",
    "validate_config",
]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first bad key, before any work starts.

    Checks the common keys, then ``config.model`` against the constructor of the
    model that ``config.task`` and ``config.model.name`` select.
    """
    config_validation.validate_config(config, tasks=tuple(TASKS))
    task_cls = TASKS[config.task]
    name = config.model.name
    if name not in task_cls.models:
        raise ConfigError(
            f"Config key `model.name` is {name!r}; the {config.task!r} task has the models "
            f"{sorted(task_cls.models)}."
        )
    model_cls = task_cls.models[name]
    config_validation.validate_config(
        config,
        tasks=tuple(TASKS),
        model_fields=model_fields(model_cls),
        model_choices=getattr(model_cls, "FIELD_CHOICES", {}),
        renamed_model_fields=getattr(task_cls, "renamed_model_fields", {}),
    )
    if hasattr(task_cls, "check_config"):  # What only the task knows (e.g. valid sizes).
        task_cls.check_config(config)


def get_task(config: ml_collections.ConfigDict, metadata: Any, *, axis_name: str | None = None):
    """The task object of ``config.task`` (its model, loss and evaluation).

    Args:
      config: a validated run config.
      metadata: the data set's ``jfcnn.data.DatasetMetadata`` (class names, ...).
      axis_name: the ``pmap`` axis, for batch-norm statistics across devices.
    """
    if config.task not in TASKS:
        raise ConfigError(f"Config key `task` is {config.task!r}; choose one of {list(TASKS)}.")
    return TASKS[config.task](config, metadata, axis_name=axis_name)
