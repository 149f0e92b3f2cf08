"""Models from configs: ``config.model.name`` picks the class, every other
field of ``config.model`` is one of its constructor arguments."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Fields of a model that the task sets itself rather than the config.
_TASK_SET_FIELDS = {"parent", "name", "num_classes", "bn_axis_name"}


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
