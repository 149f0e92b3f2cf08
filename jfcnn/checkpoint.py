"""Orbax checkpointing, kept in one module because the Orbax API moves.

Layout of a work directory::

    <workdir>/config.json                 the run's config (written once, by process 0)
    <workdir>/checkpoints/<step>/         one Orbax checkpoint per saved step
        state/                            the train state (Orbax PyTree item)
        checksums/metadata                JSON: shape, dtype and CRC-32 of every array
    <workdir>/checkpoints_damaged/<step>-<unix time>/
                                          checkpoints that failed verification, moved
                                          aside by ``jfcnn.train_state.restore_latest_intact``

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

Orbax does not notice a data file whose bytes changed on disk (a bad sector, a
partial copy, a sync tool): it restores the wrong numbers silently. So every
checkpoint also carries a manifest with the CRC-32 of each array's bytes, keyed
by the array's path in the state ("params/Conv_0/kernel"), written as a second
item of the same checkpoint so that Orbax's rename makes the two appear
together. A restore

1. compares the manifest's paths, shapes and dtypes with the target before
   reading any array: a difference is a ``CheckpointMismatchError`` (another
   config), named by its first differing path;
2. reads the arrays: a file Orbax or TensorStore cannot read (truncated,
   garbage, a deleted metadata file) is a ``CorruptCheckpointError``;
3. recomputes each restored array's CRC-32: a difference is a
   ``CorruptCheckpointError`` naming the array.

Checkpoints written before the manifest existed restore with a warning that
they cannot be verified (their paths and shapes are checked against Orbax's own
metadata instead).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jfcnn.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    WorkdirMetadataError,
)

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
CONFIG_FILE = "config.json"
# The data set's metadata (`jfcnn.data.DatasetMetadata.to_dict`), beside the config.
METADATA_FILE = "dataset.json"
# The checkpoint items: the train state, and the manifest of its arrays' checksums.
_STATE = "state"
_CHECKSUMS = "checksums"
# Bumped if the manifest's layout changes; a reader refuses a format it does not know.
_CHECKSUM_FORMAT = 1

# Exceptions that reading a damaged checkpoint raises (TensorStore and Orbax
# raise ValueError for undecodable bytes, FileNotFoundError or KeyError for a
# missing file or entry). Deliberately narrower than Exception: an
# out-of-memory or device error must not make a good checkpoint look damaged.
_READ_ERRORS = (ValueError, KeyError, TypeError, EOFError, FileNotFoundError, NotADirectoryError)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def damaged_dir(manager: ocp.CheckpointManager) -> str:
    """``<workdir>/checkpoints_damaged``: beside, not inside, the manager's directory.

    Outside ``checkpoints/`` Orbax neither lists a moved checkpoint nor
    garbage-collects or overwrites it when training reaches its step again.
    """
    return os.path.join(os.path.dirname(os.fspath(manager.directory)), DAMAGED_DIR)


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    """The directory of the checkpoint at ``step`` (managers here use plain step names)."""
    return os.path.join(os.fspath(manager.directory), str(step))


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, leaving JAX's preemption sync point to the training loop.

    During a save Orbax asks JAX's sync point whether this step is a preemption
    step, passing the global step as JAX's step count; but the loop
    (`jfcnn.train.PreemptionHandler`) counts the steps of the current run from
    1 there, and a count moved by Orbax would put the agreed stop step of a
    resumed run out of reach. Saves here are explicit (``force``), so the
    answer would change nothing but Orbax's logs.
    """

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


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
    return _Manager(
        checkpoint_dir(workdir),
        options=options,
        item_handlers={
            _STATE: ocp.PyTreeCheckpointHandler(),
            _CHECKSUMS: ocp.JsonCheckpointHandler(),
        },
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves ``state`` (an unreplicated pytree of arrays) and its checksums at ``step``."""
    manifest = {"format": _CHECKSUM_FORMAT, "arrays": checksums(state)}
    args = ocp.args.Composite(
        **{_STATE: ocp.args.PyTreeSave(state), _CHECKSUMS: ocp.args.JsonSave(manifest)}
    )
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
    """Restores the state at ``step`` (latest if None) into ``abstract_state``, verified.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with the
    shardings the arrays should have on this machine.

    Raises:
      CheckpointNotFoundError: no checkpoint (or none at ``step``).
      CheckpointMismatchError: the checkpoint's arrays differ from ``abstract_state``.
      CorruptCheckpointError: the checkpoint cannot be read or fails its checksums.
    """
    return _restore(manager, abstract_state, _existing_step(manager, step), partial=False)


def restore_subtree(
    manager: ocp.CheckpointManager, abstract_subtree: dict[str, Any], step: int | None = None
) -> dict[str, Any]:
    """Restores only the top-level fields of the saved state named in ``abstract_subtree``.

    Evaluation restores ``step``, ``params`` and ``model_state`` this way, so it
    never builds an optimizer or reads the optimizer state from disk. Only the
    arrays read are verified; raises as `restore` does.
    """
    return _restore(manager, abstract_subtree, _existing_step(manager, step), partial=True)


def _restore(manager: ocp.CheckpointManager, abstract: Any, step: int, *, partial: bool) -> Any:
    path = step_dir(manager, step)
    manifest = _read_manifest(manager, step)
    if manifest is None:
        logging.warning(
            "The checkpoint at step %d in %s has no checksums (it was written by an older "
            "jfcnn): it cannot be verified.",
            step,
            path,
        )
        saved = _orbax_shapes(manager, step)
    else:
        saved = {key: (tuple(a["shape"]), a["dtype"]) for key, a in manifest.items()}
    wanted = {key: (tuple(x.shape), _dtype_name(x.dtype)) for key, x in _flatten(abstract)}
    if partial:
        # A partial restore reads whole top-level fields (step, params, ...).
        fields = set(abstract)
        saved = {key: v for key, v in saved.items() if key.split("/")[0] in fields}
    _check_same_arrays(saved, wanted, step=step, path=path, manager=manager)

    args = ocp.args.PyTreeRestore(
        abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial,
    )
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE]
    except Exception as e:
        cause = _read_error(e)
        if cause is None:
            raise  # Not a damaged file (out of memory, a device error): let it show.
        _drop_abandoned_reads()
        raise CorruptCheckpointError(
            f"The checkpoint at step {step} in {path} is damaged: its files cannot be read "
            f"({_one_line(cause)}).",
            step=step,
            path=path,
        ) from e
    if manifest is not None:
        _verify(restored, manifest, step=step, path=path)
    return restored


# ---------------------------------------------------------------------------
# Checksums


def checksums(tree: Any) -> dict[str, dict[str, Any]]:
    """``{path: {"shape", "dtype", "crc32"}}`` of every array leaf of ``tree``.

    ``path`` joins the leaf's keys with "/" ("params/Dense_0/kernel"), so a
    dataclass state and the dict of some of its fields that a partial restore
    uses name a leaf alike. The CRC-32 is of the array's C-order host bytes.
    """
    keys = [key for key, _ in _flatten(tree)]
    # One device_get of the whole tree: its transfers overlap, unlike leaf by leaf.
    hosts = jax.device_get([_addressable(leaf) for _, leaf in _flatten(tree)])
    return {
        key: {
            "shape": list(np.shape(host)),
            "dtype": _dtype_name(np.asarray(host).dtype),
            "crc32": _crc32(np.asarray(host)),
        }
        for key, host in zip(keys, hosts, strict=True)
    }


def _crc32(host: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(host).reshape(-1).view(np.uint8))


def _addressable(leaf: Any) -> Any:
    """``leaf`` in a form ``device_get`` copies whole (one replica of a replicated array)."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable and leaf.is_fully_replicated:
            # Another process holds some devices: this one's replica is the whole array.
            leaf = leaf.addressable_shards[0].data
    return leaf


def _dtype_name(dtype: Any) -> str:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return str(dtype)
    return np.dtype(dtype).name


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(_key(path), leaf) for path, leaf in leaves]


def _key(path: tuple[Any, ...]) -> str:
    names = []
    for entry in path:
        for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
            if hasattr(entry, attribute):
                names.append(str(getattr(entry, attribute)))
                break
        else:
            names.append(str(entry))
    return "/".join(names)


def _read_manifest(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The checkpoint's ``{path: {"shape", "dtype", "crc32"}}``; None if it has none."""
    path = step_dir(manager, step)
    if not os.path.isdir(os.path.join(path, _CHECKSUMS)):
        return None  # Written before checksums existed.
    try:
        manifest = manager.restore(
            step, args=ocp.args.Composite(**{_CHECKSUMS: ocp.args.JsonRestore()})
        )[_CHECKSUMS]
        if manifest.get("format") != _CHECKSUM_FORMAT:
            raise ValueError(f"unknown checksum format {manifest.get('format')!r}")
        arrays = manifest["arrays"]
        for entry in arrays.values():
            entry["shape"], entry["dtype"], entry["crc32"]  # noqa: B018  (all present)
    except (*_READ_ERRORS, AttributeError) as e:
        raise CorruptCheckpointError(
            f"The checkpoint at step {step} in {path} is damaged: its checksum file cannot be "
            f"read ({_one_line(e)}).",
            step=step,
            path=path,
        ) from e
    return arrays


def _orbax_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[tuple, str]]:
    """``{path: (shape, dtype)}`` from Orbax's own metadata (checkpoints without checksums)."""
    path = step_dir(manager, step)
    try:
        metadata = manager.item_metadata(step)[_STATE]
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        if tree is None:
            raise FileNotFoundError("no metadata for the state")
        return {key: (tuple(leaf.shape), _dtype_name(leaf.dtype)) for key, leaf in _flatten(tree)}
    except (*_READ_ERRORS, AttributeError) as e:
        raise CorruptCheckpointError(
            f"The checkpoint at step {step} in {path} is damaged: its Orbax metadata cannot be "
            f"read ({_one_line(e)}).",
            step=step,
            path=path,
        ) from e


def _check_same_arrays(
    saved: dict[str, tuple], wanted: dict[str, tuple], *, step: int, path: str, manager
) -> None:
    """Raises CheckpointMismatchError naming the first path whose array differs."""
    # In the model's order (step, params, ...), so the first difference shown is the telling one.
    for key in [*wanted, *(k for k in saved if k not in wanted)]:
        if key not in saved:
            detail = (
                f"the model has an array {key!r} {_shown(wanted[key])} that the checkpoint lacks"
            )
        elif key not in wanted:
            detail = (
                f"the checkpoint has an array {key!r} {_shown(saved[key])} that the model lacks"
            )
        elif saved[key] != wanted[key]:
            detail = (
                f"array {key!r} is {_shown(saved[key])} in the checkpoint but "
                f"{_shown(wanted[key])} in the model"
            )
        else:
            continue
        config = os.path.join(os.path.dirname(os.fspath(manager.directory)), CONFIG_FILE)
        raise CheckpointMismatchError(
            f"The checkpoint at step {step} in {path} does not match the model built from this "
            f"config: {detail}. Resume with the config the run started with (saved in "
            f"{config}), or use a new --workdir.",
            step=step,
            path=path,
            key=key,
        )


def _shown(shape_dtype: tuple) -> str:
    shape, dtype = shape_dtype
    return f"{dtype}{list(shape)}"


def _verify(restored: Any, manifest: dict[str, Any], *, step: int, path: str) -> None:
    for key, entry in checksums(restored).items():
        got, saved = entry["crc32"], manifest[key]["crc32"]
        if got != saved:
            raise CorruptCheckpointError(
                f"The checkpoint at step {step} in {path} is damaged: array {key!r} does not "
                f"match the checksum saved with it (CRC-32 {got:08x}, saved {saved:08x}).",
                step=step,
                path=path,
            )


def _drop_abandoned_reads() -> None:
    """Silences the reads Orbax abandoned when one of them failed.

    When one array's read fails, Orbax's event loop ends with the other reads
    still pending: each re-raises as it is collected ("Exception ignored in
    <coroutine ...>", with a page of TensorStore spec), and TensorStore threads
    that finish later report "Event loop is closed". The CorruptCheckpointError
    raised in their place already says what is wrong, so from the first damaged
    checkpoint on, this process drops exactly those two reports.
    """
    if not getattr(sys.unraisablehook, "_jfcnn_drops_abandoned_reads", False):
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            abandoned_read = (
                getattr(unraisable.object, "__qualname__", "") == "_read_array_index_and_device_put"
            )
            loop_closed = (
                unraisable.object is None
                and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"
            )
            if not (abandoned_read or loop_closed):
                previous(unraisable)

        hook._jfcnn_drops_abandoned_reads = True
        sys.unraisablehook = hook
    gc.collect()  # Collects the abandoned reads now, while the filter is surely in place.


def _read_error(error: BaseException) -> BaseException | None:
    """The innermost error in ``error``'s chain that a damaged file raises, or None.

    Orbax wraps TensorStore's error (a ValueError such as "DATA_LOSS: ...") in
    a bare ``Exception``; the cause says what went wrong.
    """
    found = None
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _READ_ERRORS):
            found = error
        error = error.__cause__ or error.__context__
    return found


def _one_line(error: BaseException) -> str:
    """The first line of ``error``'s message, shortened (TensorStore's run to 150 lines)."""
    lines = str(error).strip().splitlines() or [""]
    text = f"{type(error).__name__}: {lines[0]}"
    return text if len(text) <= 300 else text[:297] + "..."


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


def move_aside(manager: ocp.CheckpointManager, step: int, now: float) -> str:
    """Moves the checkpoint at ``step`` to ``checkpoints_damaged/<step>-<now>``; returns it.

    Nothing is deleted: the files stay for a person to inspect or repair. Only
    process 0 moves (all processes share the directory); every process then
    re-reads the list of steps.
    """
    target = os.path.join(damaged_dir(manager), f"{step}-{int(now)}")
    if jax.process_index() == 0:
        os.makedirs(damaged_dir(manager), exist_ok=True)
        suffix = 0
        while os.path.exists(target):  # Two moves of one step within a second.
            suffix += 1
            target = os.path.join(damaged_dir(manager), f"{step}-{int(now)}.{suffix}")
        os.replace(step_dir(manager, step), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jfcnn_move_aside_{step}")
    manager.reload()
    return target


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


def save_metadata(workdir: str, metadata: dict[str, Any]) -> None:
    """Writes the data set's metadata dict beside the config (atomically)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, METADATA_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def load_metadata(workdir: str) -> dict[str, Any] | None:
    """The metadata dict `save_metadata` wrote, or None for a run that predates it."""
    path = os.path.join(workdir, METADATA_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirMetadataError(
            f"{path} cannot be read ({e}). It is rewritten when training resumes; to evaluate "
            "without it, delete it (the metadata is then read from the data set)."
        ) from e


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
