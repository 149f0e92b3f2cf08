"""Orbax checkpointing, kept in one module because the Orbax API moves.

Layout of a work directory::

    <workdir>/config.json            the run's config (written once, by process 0)
    <workdir>/checkpoints/<step>/    one Orbax checkpoint per saved step

A checkpoint holds the whole train state (step, params, model state such as
batch statistics, optimizer state, RNG). The data position is not stored
separately: the input pipeline's order is a function of ``config.seed`` and the
step, so the step is enough to resume it exactly.

States are always saved *unreplicated* (one copy of every array) and restored
into an abstract target built on the current devices, so a checkpoint written
on 8 devices (``jit`` or ``pmap``) restores on 1 and vice versa. Orbax writes
into a temporary directory and renames it when complete, so a run killed in
the middle of a save never leaves a half-written checkpoint behind that a
restart would pick up.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from jfcnn.errors import CheckpointNotFoundError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# The checkpoint item that holds the train state (see `save`).
_STATE = "state"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(
    workdir: str, *, max_to_keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """Returns a manager of ``<workdir>/checkpoints/<step>`` directories."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        # Saves are synchronous: a checkpoint exists on disk when `save`
        # returns, which is what a SIGTERM handler that is about to exit needs.
        enable_async_checkpointing=False,
    )
    # The state is a plain pytree: the PyTree handler (the format the standard
    # handler writes) also restores a subtree of it, see `restore_subtree`.
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler()},
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves ``state`` (an unreplicated pytree of arrays) at ``step``."""
    manager.save(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(state)}), force=True)
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
    """Restores the state at ``step`` (latest if None) into ``abstract_state``.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with the
    shardings the arrays should have on this machine.
    """
    return _restore(manager, abstract_state, _existing_step(manager, step), partial=False)


def restore_subtree(
    manager: ocp.CheckpointManager, abstract_subtree: dict[str, Any], step: int | None = None
) -> dict[str, Any]:
    """Restores only the top-level fields of the saved state named in ``abstract_subtree``.

    Evaluation restores ``step``, ``params`` and ``model_state`` this way, so it
    never builds an optimizer or reads the optimizer state from disk.
    """
    return _restore(manager, abstract_subtree, _existing_step(manager, step), partial=True)


def _restore(manager: ocp.CheckpointManager, abstract: Any, step: int, *, partial: bool) -> Any:
    args = ocp.args.PyTreeRestore(
        abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial,
    )
    return manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE]


def _existing_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    """``step``, or the latest one if None; a clear error if there is none."""
    available = sorted(manager.all_steps())
    if step is None:
        if not available:
            raise CheckpointNotFoundError(
                f"No checkpoint in {manager.directory}. Train first with "
                "`python train.py --config <config> --workdir <workdir>`."
            )
        step = available[-1]
    elif step not in available:
        raise CheckpointNotFoundError(
            f"No checkpoint for step {step} in {manager.directory}; available steps: {available}."
        )
    return step


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    return manager.latest_step()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Abstract target of ``tree``'s shapes and dtypes, placed with ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the config beside the checkpoints (atomically: never half a file)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads the config a run saved in ``workdir``."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"{path} does not exist: {workdir!r} is not a jfcnn work directory "
            "(train.py writes config.json there when a run starts)."
        )
    with open(path) as f:
        return _to_config(json.load(f))


def _to_config(value: Any) -> Any:
    if isinstance(value, dict):
        return ml_collections.ConfigDict({k: _to_config(v) for k, v in value.items()})
    if isinstance(value, list):
        # JSON has no tuples; configs use tuples for fixed-size fields.
        return tuple(_to_config(v) for v in value)
    return value
