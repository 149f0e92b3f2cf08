"""The train state: what a run is, how it is created, where it lives, how it is restored.

Training (``jfcnn.train``) and evaluation (``jfcnn.evaluate``) both build and
restore states here, so there is one abstract target and one device mesh:

- ``TrainState``: step, params, model state, optimizer state and RNG, all a
  run needs to continue bit-exactly where it stopped;
- ``data_mesh()``: the 1-D ``data`` mesh of all devices, with
  ``replicated()`` and ``batch_sharded()`` shardings on it;
- ``restore_state(...)``: the whole state for resuming training;
  ``restore_variables(...)``: only what ``model.apply`` needs, for evaluation
  and prediction (no optimizer is built and its state is never read).

Checkpoints hold one unreplicated copy of every array, and restores place them
on the current devices, so a run written on 8 devices restores on 1.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jfcnn import checkpoint as ckpt
from jfcnn.errors import UserError
from jfcnn.tasks.base import Task

DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped."""

    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any
    model_state: Any  # non-trainable collections, e.g. {"batch_stats": ...}
    opt_state: Any
    rng: jax.Array  # base key; step and example keys are folded from it

    def variables(self) -> dict[str, Any]:
        """The variables for ``model.apply``: ``{"params": ..., **model_state}``."""
        return {"params": self.params, **self.model_state}


def create_train_state(task: Task, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state: the task's initial variables and ``tx``'s initial state."""
    init_rng, state_rng = jax.random.split(rng)
    variables = dict(task.init_variables(init_rng))
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=variables,
        opt_state=tx.init(params),
        rng=state_rng,
    )


# ---------------------------------------------------------------------------
# Where arrays live


def data_mesh() -> Mesh:
    """The 1-D ``data`` mesh of all devices (of every process)."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh | None = None) -> NamedSharding:
    """One full copy on every device of ``mesh`` (parameters, state)."""
    return NamedSharding(mesh or data_mesh(), P())


def batch_sharded(mesh: Mesh | None = None) -> NamedSharding:
    """The leading (batch) axis split over the devices of ``mesh``."""
    return NamedSharding(mesh or data_mesh(), P(DATA_AXIS))


# ---------------------------------------------------------------------------
# Restoring


def restore_state(
    manager: ocp.CheckpointManager,
    task: Task,
    tx: optax.GradientTransformation,
    step: int | None = None,
    *,
    sharding: jax.sharding.Sharding | None = None,
) -> TrainState:
    """The whole train state at ``step`` (latest if None), on this machine's devices.

    Raises:
      CheckpointNotFoundError: no checkpoint (or none at ``step``).
      UserError: the checkpoint does not fit the model and optimizer of
        ``task``/``tx`` (a different config).
    """
    init = lambda rng: create_train_state(task, tx, rng)
    abstract = ckpt.abstract_like(
        jax.eval_shape(init, jax.random.PRNGKey(0)), sharding or replicated()
    )
    try:
        return ckpt.restore(manager, abstract, step)
    except (ValueError, KeyError, TypeError) as e:
        raise _mismatch(manager, step, e) from e


def restore_variables(
    manager: ocp.CheckpointManager,
    task: Task,
    step: int | None = None,
    *,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[dict[str, Any], int]:
    """``(variables, step)`` of the checkpoint at ``step`` (latest if None).

    ``variables`` is ``{"params": ..., **model_state}`` for ``task.model.apply``,
    replicated with ``sharding`` (all devices by default). The optimizer state
    is not read.
    """
    shapes = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))
    shapes = dict(shapes)
    params = shapes.pop("params")
    abstract = ckpt.abstract_like(
        {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "model_state": shapes},
        sharding or replicated(),
    )
    try:
        restored = ckpt.restore_subtree(manager, abstract, step)
    except (ValueError, KeyError, TypeError) as e:
        raise _mismatch(manager, step, e) from e
    variables = {"params": restored["params"], **restored["model_state"]}
    return variables, int(restored["step"])


def _mismatch(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> UserError:
    shown = step if step is not None else ckpt.latest_step(manager)
    return UserError(
        f"The checkpoint at step {shown} in {manager.directory} does not match the model "
        f"built from this config ({error}). Resume with the config the run started with "
        f"(saved in {ckpt.CONFIG_FILE}), or use a new --workdir."
    )
