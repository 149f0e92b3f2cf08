"""Fine-tuning pretrained weights (a step-0 checkpoint) on a data set with other classes.

``python -m jfcnn.convert`` writes a work directory whose checkpoint is at step
0: torchvision's COCO Mask R-CNN with 91 class slots (COCO's category ids).
``train.py --config C --workdir W`` fine-tunes it on the data set of ``C``
(your COCO JSON files, ``jfcnn_shapes``, ...). Only the layers with one row
per class depend on the classes: the box classifier (``K`` scores), the box
regressor (``4 K`` deltas) and the mask predictor (``K`` masks). They are
mapped to the data set's classes by this rule:

- the background keeps the background's row;
- a class of the data set keeps the row of the pretrained class of the same
  name (case and surrounding spaces ignored), wherever its slot was (so COCO
  classes in your COCO JSON keep COCO's rows, whatever ids your file gives
  them);
- any other class gets a freshly initialized row (the model's own
  initializer with ``config.seed``, as training from scratch would give it);
- pretrained classes the data set does not have are dropped.

Every other variable keeps the pretrained weights, and the optimizer starts
afresh. The pretrained classes are read from ``W/pretrained.json``, which
``jfcnn.convert`` writes and training never changes (``W/dataset.json`` and
``W/config.json`` become the fine-tuning run's); a work directory without it
uses ``dataset.json``, as it was before training first started.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jfcnn import checkpoint as ckpt
from jfcnn import tasks
from jfcnn import train_state as state_lib
from jfcnn.data.registry import DatasetMetadata
from jfcnn.errors import CheckpointMismatchError, WorkdirMetadataError

PRETRAINED_FILE = "pretrained.json"
# Pretrained slots that stand for no class (torchvision's unused COCO ids).
UNUSED_CLASS_NAMES = ("N/A", "__background__")


def save_pretrained_metadata(workdir: str, metadata: DatasetMetadata, source: str) -> None:
    """Records the classes of the step-0 weights in ``workdir`` (never rewritten by training)."""
    path = os.path.join(workdir, PRETRAINED_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"source": source, "metadata": metadata.to_dict()}, f, indent=2)
    os.replace(path + ".tmp", path)


def load_pretrained_metadata(workdir: str) -> DatasetMetadata | None:
    """The classes of the step-0 weights in ``workdir`` (`PRETRAINED_FILE`, else
    ``dataset.json``), or None if neither exists."""
    path = os.path.join(workdir, PRETRAINED_FILE)
    try:
        if os.path.exists(path):
            with open(path) as f:
                return DatasetMetadata.from_dict(json.load(f)["metadata"])
        stored = ckpt.load_metadata(workdir)
        return None if stored is None else DatasetMetadata.from_dict(stored)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise WorkdirMetadataError(f"{path} is not valid pretrained-class metadata ({e}).") from e


def _normalized(name: str) -> str:
    return name.strip().lower()


def class_rows(pretrained_names: tuple[str, ...], names: tuple[str, ...]) -> np.ndarray:
    """``(K,)`` int: the pretrained slot whose rows class ``k`` of ``names`` keeps, or -1.

    Slot 0 (the background) goes to class 0; other classes by name (see the
    module docstring); -1: a fresh row.
    """
    slots = {
        _normalized(name): slot
        for slot, name in enumerate(pretrained_names)
        if slot > 0 and name not in UNUSED_CLASS_NAMES
    }
    rows = np.array([slots.get(_normalized(name), -1) for name in names], np.int64)
    rows[0] = 0
    return rows


def map_class_variables(
    pretrained: Any, fresh: Any, rows: np.ndarray, num_pretrained: int
) -> dict[str, Any]:
    """``fresh`` with every variable taken from ``pretrained``, class rows by ``rows``.

    A variable whose shape is the same in both is the pretrained one. One
    whose last axis is ``num_pretrained`` (scores, mask logits) or ``4 *
    num_pretrained`` (box deltas, ``(class, coordinate)`` major to minor) in
    ``pretrained`` and ``K`` or ``4 K`` in ``fresh`` takes row ``rows[k]`` of
    the pretrained where ``rows[k] >= 0`` and keeps the fresh row otherwise.

    Raises:
      ValueError: any other difference (another architecture), naming the variable.
    """
    num_classes = len(rows)
    keep = rows >= 0
    source = np.where(keep, rows, 0)

    def one(path, old, new):
        old, new = np.asarray(old), np.asarray(new)
        if old.shape == new.shape:
            return old
        where = jax.tree_util.keystr(path)
        if old.shape[:-1] != new.shape[:-1]:
            raise ValueError(
                f"The pretrained {where} has shape {old.shape}, this model's {new.shape}."
            )
        for per_class in (1, 4):
            if old.shape[-1] == per_class * num_pretrained and new.shape[-1] == (
                per_class * num_classes
            ):
                old_r = old.reshape(*old.shape[:-1], num_pretrained, per_class)
                new_r = new.reshape(*new.shape[:-1], num_classes, per_class)
                mixed = np.where(keep[:, None], old_r[..., source, :], new_r)
                return mixed.reshape(new.shape).astype(new.dtype)
        raise ValueError(
            f"The pretrained {where} has shape {old.shape}, this model's {new.shape}: not "
            f"{num_pretrained} vs {num_classes} classes."
        )

    return jax.tree_util.tree_map_with_path(one, dict(pretrained), dict(fresh))


def step0_variables(
    config: ml_collections.ConfigDict, task: Any, manager: ocp.CheckpointManager
) -> dict[str, Any]:
    """The variables of the step-0 checkpoint for ``task``'s model, its classes mapped.

    The same classes: the checkpoint's variables as they are. Other classes:
    `map_class_variables` by `class_rows` (logged).

    Raises:
      CheckpointMismatchError: the checkpoint is not the model of ``config``
        apart from its classes; the message says what to do.
    """
    try:
        variables, _ = state_lib.restore_variables(manager, task, 0)
        return variables
    except CheckpointMismatchError as e:
        mismatch = e
    workdir = os.path.dirname(os.path.abspath(str(manager.directory)))
    pretrained = load_pretrained_metadata(workdir)
    names = tuple(task.metadata.class_names)
    if pretrained is None or tuple(pretrained.class_names) == names:
        raise mismatch
    fix = (
        f"Fine-tune it with a config whose model section is the one it was saved with "
        f"({os.path.join(workdir, ckpt.CONFIG_FILE)} before training, or the "
        "config.before_step_0.*.json backup), or train in a new --workdir."
    )
    try:
        source, _ = state_lib.restore_variables(manager, tasks.get_task(config, pretrained), 0)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(
            f"The step-0 checkpoint in {workdir} ({pretrained.num_classes} classes) is another "
            f"architecture than this config's model: {e.key!r} differs. {fix}",
            step=0,
            path=e.path,
            key=e.key,
        ) from e
    rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    # Initialization runs once: compiled unoptimized (as train.py initializes).
    init = jax.jit(task.init_variables).lower(rng)
    fresh = init.compile(compiler_options={"xla_backend_optimization_level": 0})(rng)
    rows = class_rows(tuple(pretrained.class_names), names)
    try:
        variables = map_class_variables(source, fresh, rows, pretrained.num_classes)
    except ValueError as e:
        raise CheckpointMismatchError(
            f"{e} {fix}", step=0, path=mismatch.path, key=mismatch.key
        ) from e
    kept = [name for name, row in zip(names[1:], rows[1:], strict=True) if row >= 0]
    new = [name for name, row in zip(names[1:], rows[1:], strict=True) if row < 0]
    logging.info(
        "Fine-tuning %d pretrained classes on %d classes: kept the rows of %s; new rows for %s.",
        pretrained.num_classes - 1,
        len(names) - 1,
        kept or "none",
        new or "none",
    )
    return jax.tree.map(jnp.asarray, variables)
