"""The contract between a task and the training loop, and models from configs.

A task (``jfcnn.tasks.semantic``, ``jfcnn.tasks.instance``) is everything the
generic loop in ``jfcnn.train`` and the evaluation in ``jfcnn.evaluate`` need
to know about one kind of problem: which model to build, its loss, its eval
step and how to score a split. ``Task`` writes that down; the loop calls
nothing else. ``config.model.name`` picks a model from the task's ``models``
registry and every other field of ``config.model`` is one of its constructor
arguments, so adding a model to a task is one new module under
``jfcnn/models/`` and one line in that task's ``models`` dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Fields of a model that the task sets itself rather than the config.
_TASK_SET_FIELDS = {"parent", "name", "num_classes", "bn_axis_name"}


class Evaluator(Protocol):
    """Accumulates eval-step outputs over a split on the host."""

    images: list[np.ndarray]  # Pictures of the first examples (uint8 HxWx3).

    def update(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> None:
        """Adds one batch: ``outputs`` of ``Task.eval_step`` and the host ``batch``
        (with ``valid`` (B,) False for padding examples, which are skipped)."""

    def result(self) -> dict[str, Any]:
        """The metrics of everything added (floats, ints, lists, dicts)."""


class Task(Protocol):
    """What the training loop and evaluation need from a task.

    Every method is pure (no Python side effects), so it runs under ``jit``,
    ``pmap`` and ``jax.eval_shape``. Batches are dicts of arrays from
    ``jfcnn.data``: ``image`` (B, S, S, 3) float in [0, 1] and the task's
    labels; eval batches add ``valid`` (B,) bool.
    """

    name: str  # The value of ``config.task``.
    models: dict[str, type[nn.Module]]  # ``config.model.name`` -> module class.
    needs_instances: bool  # Whether batches must carry boxes, labels, instance masks.
    model: nn.Module
    config: ml_collections.ConfigDict
    num_classes: int

    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        """Fresh model variables: ``{"params": ..., **model_state}``."""

    def loss_fn(
        self, params: Any, model_state: Any, batch: dict[str, jax.Array], example_keys: jax.Array
    ) -> tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]:
        """``(mean loss over the local batch, (new model state, scalar metrics))``.

        ``example_keys`` (B,) holds one PRNG key per example of the batch, so
        stochastic losses agree whatever the device count.
        """

    def eval_step(self, variables: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The outputs its evaluator needs for one batch."""

    def new_evaluator(self, num_images: int) -> Evaluator:
        """An empty evaluator that keeps pictures of ``num_images`` examples."""

    # Optional: ``check_config(cls, config)``, a classmethod that raises
    # ``ConfigError`` for what only the task knows (e.g. image sizes its models
    # cannot use); ``jfcnn.tasks.validate_config`` calls it when present.


def model_fields(model_cls: type[nn.Module]) -> list[str]:
    """The constructor arguments of ``model_cls`` that a config may set."""
    return [f.name for f in dataclasses.fields(model_cls) if f.name not in _TASK_SET_FIELDS]


def _freeze(value: Any) -> Any:
    # A config restored from JSON holds lists; module fields must be hashable.
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def build_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    models: dict[str, type[nn.Module]],
    *,
    bn_axis_name: str | None = None,
) -> nn.Module:
    """Instantiates ``models[config.model.name]`` with the other model fields."""
    kwargs = {k: _freeze(v) for k, v in config.model.items() if k != "name"}
    model_cls = models[config.model.name]
    for key in ("dtype", "param_dtype"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = DTYPES[kwargs[key]]
    if "bn_axis_name" in {f.name for f in dataclasses.fields(model_cls)}:
        kwargs["bn_axis_name"] = bn_axis_name
    return model_cls(num_classes=num_classes, **kwargs)
