"""Checkpoints that are damaged on disk, or that belong to another model.

Each test damages real Orbax checkpoints of a small train state (a two-layer
Dense model with Adam, through a stand-in task) the way disks and people do,
then checks that restoring says which checkpoint is damaged and how, falls
back to an older one when training resumes, and never restores wrong numbers.
Before checksums existed, the flipped bytes of test (a) restored silently (one
array off by ~1e33), a truncated or garbage file printed a 150-line TensorStore
traceback, and a deleted metadata file was reported as a config mismatch.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jfcnn import checkpoint as ckpt
from jfcnn import train_state as state_lib
from jfcnn.errors import CheckpointMismatchError, CorruptCheckpointError

STEPS = (1, 2, 3)


class _DenseTask:
    """The part of the Task protocol that building and restoring a state uses."""

    def __init__(self, hidden: int = 64):
        self.model = nn.Sequential([nn.Dense(hidden), nn.Dense(3)])

    def init_variables(self, rng):
        return {"params": self.model.init(rng, jnp.zeros((1, 64)))["params"]}


TX = optax.adam(1e-3)


def _states(task) -> dict[int, state_lib.TrainState]:
    """A distinct state per step: params shifted by the step, a step-dependent RNG."""
    base = state_lib.create_train_state(task, TX, jax.random.PRNGKey(0))
    return {
        s: base.replace(
            step=jnp.int32(s),
            params=jax.tree.map(lambda p, s=s: p + s, base.params),
            rng=jax.random.fold_in(base.rng, s),
        )
        for s in STEPS
    }


def _save_run(workdir, task=None) -> dict[int, state_lib.TrainState]:
    states = _states(task or _DenseTask())
    manager = ckpt.create_manager(str(workdir))
    for step, state in states.items():
        ckpt.save(manager, step, state)
    manager.close()
    return jax.device_get(states)


def _manager(workdir, **kwargs) -> ocp.CheckpointManager:
    return ckpt.create_manager(str(workdir), **kwargs)


def _assert_bit_exact(restored, expected):
    restored, expected = jax.device_get(restored), jax.device_get(expected)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def _largest_data_file(workdir, step) -> str:
    files = glob.glob(
        os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True
    )
    return max(files, key=os.path.getsize)


def _flip_middle(path, count=64):
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _garbage(path):
    size = os.path.getsize(path)
    open(path, "wb").write(np.random.default_rng(0).bytes(size))


def _snapshot(workdir) -> dict[str, int]:
    """``{relative path: CRC-32}`` of every file under ``workdir``."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, workdir)] = zlib.crc32(open(path, "rb").read())
    return out


def _damaged_copies(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, ckpt.DAMAGED_DIR)))


# ---------------------------------------------------------------------------
# (a) flipped bytes: silently wrong numbers before


def test_flipped_bytes_are_caught_moved_aside_and_the_previous_step_resumes(tmp_path, caplog):
    states = _save_run(tmp_path)
    data_file = _largest_data_file(tmp_path, 3)
    _flip_middle(data_file)
    damaged_bytes = open(data_file, "rb").read()
    task = _DenseTask()

    manager = _manager(tmp_path)
    with caplog.at_level(logging.WARNING):
        restored = state_lib.restore_latest_intact(manager, task, TX)

    _assert_bit_exact(restored, states[2])
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "step 3" in warnings and "does not match the checksum" in warnings
    assert "Moved the damaged checkpoint of step 3" in warnings
    # Moved aside, not deleted; Orbax no longer lists it.
    assert sorted(manager.all_steps()) == [1, 2]
    assert not os.path.exists(tmp_path / "checkpoints" / "3")
    (moved,) = _damaged_copies(tmp_path)
    assert moved.startswith("3-") and moved[2:].isdigit()
    moved_file = os.path.join(
        tmp_path,
        ckpt.DAMAGED_DIR,
        moved,
        os.path.relpath(data_file, tmp_path / "checkpoints" / "3"),
    )
    assert open(moved_file, "rb").read() == damaged_bytes

    # Training reaches step 3 again: the new checkpoint is saved and restores,
    # and the damaged copy is kept.
    ckpt.save(manager, 3, states[3])
    _assert_bit_exact(state_lib.restore_state(manager, task, TX, 3), states[3])
    assert _damaged_copies(tmp_path) == [moved]


def test_flipped_bytes_restore_wrong_numbers_without_the_checksums(tmp_path):
    """The failure the checksums fix: Orbax itself reads the flipped file without complaint."""
    states = _save_run(tmp_path)
    _flip_middle(_largest_data_file(tmp_path, 3))
    abstract = ckpt.abstract_like(states[3], state_lib.replicated())
    args = ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
    )
    manager = _manager(tmp_path)
    raw = jax.device_get(manager.restore(3, args=ocp.args.Composite(state=args))["state"])
    differs = [
        not np.array_equal(a, b, equal_nan=True)
        for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(states[3]), strict=True)
    ]
    assert any(differs)
    with pytest.raises(CorruptCheckpointError):
        state_lib.restore_state(manager, _DenseTask(), TX, 3)


def test_evaluation_names_the_damaged_checkpoint_and_the_other_steps(tmp_path):
    states = _save_run(tmp_path)
    _flip_middle(_largest_data_file(tmp_path, 3))
    before = _snapshot(tmp_path)
    manager = _manager(tmp_path, read_only=True)
    task = _DenseTask()

    with pytest.raises(CorruptCheckpointError) as caught:
        state_lib.restore_variables(manager, task)
    error = caught.value
    assert error.step == 3 and error.path == os.path.join(tmp_path, "checkpoints", "3")
    message = str(error)
    assert f"The checkpoint at step 3 in {error.path} is damaged" in message
    assert "Evaluate another checkpoint with --step 2 or --step 1." in message
    assert _snapshot(tmp_path) == before  # Evaluation never moves anything.

    variables, step = state_lib.restore_variables(manager, task, 2)
    assert step == 2
    _assert_bit_exact(variables, {"params": states[2].params})


def test_partial_restore_verifies_only_the_arrays_it_reads(tmp_path):
    """A bad checksum of an optimizer array stops a resume, not an evaluation."""
    states = _save_run(tmp_path)
    path = tmp_path / "checkpoints" / "3" / "checksums" / "metadata"
    manifest = json.loads(path.read_text())
    key = "opt_state/0/mu/layers_0/kernel"
    manifest["arrays"][key]["crc32"] ^= 1
    path.write_text(json.dumps(manifest))
    manager = _manager(tmp_path)
    task = _DenseTask()

    variables, step = state_lib.restore_variables(manager, task, 3)
    assert step == 3
    _assert_bit_exact(variables, {"params": states[3].params})
    with pytest.raises(CorruptCheckpointError, match=f"array '{key}' does not match the checksum"):
        state_lib.restore_state(manager, task, TX, 3)


def test_checksums_are_stored_inside_the_checkpoint(tmp_path):
    states = _save_run(tmp_path)
    manifest = json.loads((tmp_path / "checkpoints" / "2" / "checksums" / "metadata").read_text())
    assert manifest["format"] == 1
    kernel = np.asarray(states[2].params["layers_0"]["kernel"])
    assert manifest["arrays"]["params/layers_0/kernel"] == {
        "shape": [64, 64],
        "dtype": "float32",
        "crc32": zlib.crc32(kernel.tobytes()),
    }
    assert manifest["arrays"]["step"]["crc32"] == zlib.crc32(np.int32(2).tobytes())
    assert len(manifest["arrays"]) == len(jax.tree.leaves(states[2]))


# ---------------------------------------------------------------------------
# (b)-(d) unreadable files: a TensorStore traceback, or a "config mismatch", before


def _delete_state_metadata(workdir, step):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))


def _delete_ocdbt_manifest(workdir, step):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "manifest.ocdbt"))


def _delete_checksums(workdir, step):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "checksums", "metadata"))


def _garble_checksums(workdir, step):
    _garbage(os.path.join(workdir, "checkpoints", str(step), "checksums", "metadata"))


DAMAGES = {
    "flipped": lambda w, s: _flip_middle(_largest_data_file(w, s)),
    "truncated": lambda w, s: _truncate(_largest_data_file(w, s)),
    "garbage": lambda w, s: _garbage(_largest_data_file(w, s)),
    "state_metadata_deleted": _delete_state_metadata,
    "ocdbt_manifest_deleted": _delete_ocdbt_manifest,
    "checksums_deleted": _delete_checksums,
    "checksums_garbled": _garble_checksums,
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_latest_checkpoint_is_a_one_line_error_and_resume_falls_back(tmp_path, damage):
    states = _save_run(tmp_path)
    DAMAGES[damage](tmp_path, 3)
    manager = _manager(tmp_path)
    task = _DenseTask()

    with pytest.raises(CorruptCheckpointError) as caught:
        state_lib.restore_state(manager, task, TX, 3)
    message = str(caught.value)
    assert message.startswith(f"The checkpoint at step 3 in {tmp_path}/checkpoints/3 is damaged: ")
    assert "\n" not in message and len(message) < 700

    _assert_bit_exact(state_lib.restore_latest_intact(manager, task, TX), states[2])
    assert sorted(manager.all_steps()) == [1, 2]
    assert [name.split("-")[0] for name in _damaged_copies(tmp_path)] == ["3"]


def test_two_damaged_checkpoints_fall_back_two_steps(tmp_path):
    states = _save_run(tmp_path)
    _flip_middle(_largest_data_file(tmp_path, 3))
    _truncate(_largest_data_file(tmp_path, 2))
    manager = _manager(tmp_path)
    _assert_bit_exact(state_lib.restore_latest_intact(manager, _DenseTask(), TX), states[1])
    assert sorted(manager.all_steps()) == [1]
    assert sorted(name.split("-")[0] for name in _damaged_copies(tmp_path)) == ["2", "3"]


def test_without_quarantine_damaged_checkpoints_stay_in_place(tmp_path):
    states = _save_run(tmp_path)
    _flip_middle(_largest_data_file(tmp_path, 3))
    manager = _manager(tmp_path)
    restored = state_lib.restore_latest_intact(manager, _DenseTask(), TX, quarantine=False)
    _assert_bit_exact(restored, states[2])
    assert sorted(manager.all_steps()) == [1, 2, 3]
    assert not os.path.exists(tmp_path / ckpt.DAMAGED_DIR)


# ---------------------------------------------------------------------------
# (e) another model


def test_checkpoint_of_another_model_is_a_mismatch_naming_the_first_key(tmp_path):
    _save_run(tmp_path, _DenseTask(hidden=64))
    # A damaged data file too: the mismatch is found before any array is read.
    _garbage(_largest_data_file(tmp_path, 3))
    before = _snapshot(tmp_path)
    manager = _manager(tmp_path)
    other = _DenseTask(hidden=32)

    with pytest.raises(CheckpointMismatchError) as caught:
        state_lib.restore_latest_intact(manager, other, TX)
    error = caught.value
    assert error.key == "params/layers_0/bias" and error.step == 3
    assert str(error) == (
        f"The checkpoint at step 3 in {tmp_path}/checkpoints/3 does not match the model built "
        "from this config: array 'params/layers_0/bias' is float32[64] in the checkpoint but "
        "float32[32] in the model. Resume with the config the run started with (saved in "
        f"{tmp_path}/config.json), or use a new --workdir."
    )
    assert _snapshot(tmp_path) == before  # No fallback, nothing moved.
    with pytest.raises(CheckpointMismatchError, match="'params/layers_0/bias'"):
        state_lib.restore_variables(manager, other, 2)


def test_a_missing_array_is_a_mismatch(tmp_path):
    """A model with a layer the checkpoint lacks (another architecture)."""

    class Deeper(_DenseTask):
        def __init__(self):
            self.model = nn.Sequential([nn.Dense(64), nn.Dense(3), nn.Dense(3)])

    _save_run(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="model has an array 'params/layers_2/bias'"):
        state_lib.restore_state(_manager(tmp_path), Deeper(), TX)


# ---------------------------------------------------------------------------
# (f) checkpoints written before the checksums


def _save_old_format(workdir, task=None) -> dict[int, state_lib.TrainState]:
    """Checkpoints as jfcnn wrote them before: the state item only."""
    states = _states(task or _DenseTask())
    manager = _manager(workdir)
    for step, state in states.items():
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)), force=True)
        manager.wait_until_finished()
    manager.close()
    return jax.device_get(states)


def test_old_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
    states = _save_old_format(tmp_path)
    assert not os.path.exists(tmp_path / "checkpoints" / "3" / "checksums")
    manager = _manager(tmp_path)
    task = _DenseTask()
    with caplog.at_level(logging.WARNING):
        restored = state_lib.restore_latest_intact(manager, task, TX)
    _assert_bit_exact(restored, states[3])
    assert any(
        "has no checksums" in r.getMessage() and "cannot be verified" in r.getMessage()
        for r in caplog.records
    )
    variables, step = state_lib.restore_variables(manager, task, 2)
    assert step == 2
    _assert_bit_exact(variables, {"params": states[2].params})


def test_old_checkpoint_of_another_model_is_a_mismatch(tmp_path):
    _save_old_format(tmp_path, _DenseTask(hidden=64))
    with pytest.raises(CheckpointMismatchError, match="'params/layers_0/bias' is float32\\[64\\]"):
        state_lib.restore_latest_intact(_manager(tmp_path), _DenseTask(hidden=32), TX)


def test_old_checkpoint_without_metadata_is_damaged_not_a_mismatch(tmp_path):
    states = _save_old_format(tmp_path)
    _delete_state_metadata(tmp_path, 3)
    manager = _manager(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="step 3 .* is damaged"):
        state_lib.restore_state(manager, _DenseTask(), TX, 3)
    _assert_bit_exact(state_lib.restore_latest_intact(manager, _DenseTask(), TX), states[2])


# ---------------------------------------------------------------------------
# (g) nothing intact; nothing at all


def test_every_checkpoint_damaged_raises_and_changes_nothing(tmp_path):
    _save_run(tmp_path)
    for step in STEPS:
        _flip_middle(_largest_data_file(tmp_path, step))
    before = _snapshot(tmp_path)
    manager = _manager(tmp_path)

    with pytest.raises(CorruptCheckpointError) as caught:
        state_lib.restore_latest_intact(manager, _DenseTask(), TX)
    message = str(caught.value)
    assert message.startswith(
        f"All 3 checkpoints in {tmp_path}/checkpoints (steps [1, 2, 3]) are damaged"
    )
    for step in STEPS:
        assert (
            f"The checkpoint at step {step} in {tmp_path}/checkpoints/{step} is damaged" in message
        )
    assert "Nothing was moved or deleted." in message
    assert _snapshot(tmp_path) == before
    assert sorted(manager.all_steps()) == list(STEPS)


def test_no_checkpoint_restores_to_none(tmp_path):
    assert state_lib.restore_latest_intact(_manager(tmp_path), _DenseTask(), TX) is None
