"""The train state: what a run is, how it is created, where it lives, how it is restored.

Training (``jfcnn.train``) and evaluation (``jfcnn.evaluate``) both build and
restore states here, so there is one abstract target and one device mesh:

- ``TrainState``: step, params, model state, optimizer state and RNG, all a
  run needs to continue bit-exactly where it stopped;
- ``data_mesh()``: the 1-D ``data`` mesh of all devices, with
  ``replicated()`` and ``batch_sharded()`` shardings on it;
- ``restore_state(...)``: the whole state at one step;
  ``restore_latest_intact(...)``: the newest checkpoint that verifies, moving
  damaged ones aside, for resuming training;
  ``restore_variables(...)``: only what ``model.apply`` needs, for evaluation
  and prediction (no optimizer is built and its state is never read).

Checkpoints hold one unreplicated copy of every array, and restores place them
on the current devices, so a run written on 8 devices restores on 1.
"""

from __future__ import annotations

import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jfcnn import checkpoint as ckpt
from jfcnn.errors import CorruptCheckpointError
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
    return state_at_step_0(task.init_variables(init_rng), tx, state_rng)


def state_at_step_0(
    variables: Any, tx: optax.GradientTransformation, state_rng: jax.Array
) -> TrainState:
    """A step-0 state of given variables (``{"params": ..., **model_state}``), with ``tx``'s
    initial state; ``state_rng`` is the second half of ``jax.random.split(PRNGKey(seed))``,
    as `create_train_state` uses it."""
    variables = dict(variables)
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


def _abstract_state(
    task: Task, tx: optax.GradientTransformation, sharding: jax.sharding.Sharding | None
) -> TrainState:
    init = lambda rng: create_train_state(task, tx, rng)
    return ckpt.abstract_like(jax.eval_shape(init, jax.random.PRNGKey(0)), sharding or replicated())


def restore_state(
    manager: ocp.CheckpointManager,
    task: Task,
    tx: optax.GradientTransformation,
    step: int | None = None,
    *,
    sharding: jax.sharding.Sharding | None = None,
) -> TrainState:
    """The whole train state at ``step`` (latest if None), on this machine's devices.

    Every array is verified against the checksums saved with it.

    Raises:
      CheckpointNotFoundError: no checkpoint (or none at ``step``).
      CheckpointMismatchError: the checkpoint does not fit the model and
        optimizer of ``task``/``tx`` (a different config).
      CorruptCheckpointError: the checkpoint is damaged.
    """
    return ckpt.restore(manager, _abstract_state(task, tx, sharding), step)


def restore_latest_intact(
    manager: ocp.CheckpointManager,
    task: Task,
    tx: optax.GradientTransformation,
    *,
    quarantine: bool = True,
    sharding: jax.sharding.Sharding | None = None,
) -> TrainState | None:
    """The newest checkpoint that restores and verifies, or None if there is none.

    Checkpoints are tried newest first. A damaged one is named in a WARNING
    and, with ``quarantine``, moved to ``<workdir>/checkpoints_damaged/<step>-<unix
    time>/`` (never deleted) once an older one has restored: out of
    ``checkpoints/``, Orbax neither lists it again nor garbage-collects or
    overwrites it when training reaches its step again.

    Raises:
      CheckpointMismatchError: at once (no older checkpoint is tried, nothing
        is moved), if a checkpoint does not fit the model of ``task``/``tx``.
      CorruptCheckpointError: every checkpoint is damaged; nothing is moved.
    """
    abstract = _abstract_state(task, tx, sharding)
    damaged: list[CorruptCheckpointError] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = ckpt.restore(manager, abstract, step)
        except CorruptCheckpointError as e:
            logging.warning("%s Trying the next older checkpoint, if any.", e)
            damaged.append(e)
            continue
        for error in damaged:
            if quarantine:
                moved = ckpt.move_aside(manager, error.step, time.time())
                logging.warning(
                    "Moved the damaged checkpoint of step %d to %s; resuming from step %d.",
                    error.step,
                    moved,
                    step,
                )
            else:
                logging.warning(
                    "Skipped the damaged checkpoint of step %d; resuming from step %d.",
                    error.step,
                    step,
                )
        return state
    if not damaged:
        return None
    steps = [e.step for e in damaged]
    raise CorruptCheckpointError(
        f"All {len(damaged)} checkpoints in {manager.directory} (steps {sorted(steps)}) are "
        "damaged, so the run cannot resume:\n"
        + "\n".join(f"  - {e}" for e in damaged)
        + "\nNothing was moved or deleted. Restore the directory from a backup, or start "
        "again with a new --workdir.",
        step=damaged[0].step,
        path=damaged[0].path,
    )


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
    is not read; the arrays read are verified against their checksums. Nothing
    on disk is changed (evaluation may run beside a training run).

    Raises:
      CheckpointNotFoundError: no checkpoint (or none at ``step``).
      CheckpointMismatchError: the checkpoint does not fit the model of ``task``.
      CorruptCheckpointError: the checkpoint is damaged; the message lists the
        other steps to pass as ``--step``.
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
    except CorruptCheckpointError as e:
        others = [s for s in sorted(manager.all_steps(), reverse=True) if s != e.step]
        hint = (
            "Evaluate another checkpoint with " + " or ".join(f"--step {s}" for s in others) + "."
            if others
            else "There is no other checkpoint in this work directory."
        )
        raise CorruptCheckpointError(f"{e} {hint}", step=e.step, path=e.path) from e
    variables = {"params": restored["params"], **restored["model_state"]}
    return variables, int(restored["step"])
