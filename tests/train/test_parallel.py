"""jit and pmap on 4 faked CPU devices train to the same result as one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from jfcnn import checkpoint as ckpt
from jfcnn import data as data_lib
from jfcnn import evaluate, tasks
from jfcnn import train as train_lib
from jfcnn.train import TRAIN_LOG
from jfcnn.train_state import create_train_state

pytestmark = pytest.mark.slow


def test_jit_and_pmap_on_four_devices_match_one_device(runner, tmp_path):
    # Plain SGD keeps parameter differences proportional to gradient differences
    # (Adam's normalized step turns float noise in near-zero gradients into
    # lr-sized changes), so the comparison sees only summation order.
    steps = {
        "num_train_steps": 6,
        "checkpoint_every_steps": 6,
        "eval_every_steps": 6,
        "optimizer": "sgd",
        "learning_rate": 0.1,
        # Batch-norm statistics reduced across devices add their own rounding;
        # their cross-device sync is checked in tests/models/test_unet.py.
        "model.norm": "group",
    }
    runs = {
        # JAX_NUM_CPU_DEVICES=1: train.py would otherwise use one device per core.
        "one_device": dict(env={**os.environ, "JAX_NUM_CPU_DEVICES": "1"}, parallelism="jit"),
        "jit4": dict(env=runner.many_devices, parallelism="jit"),
        "pmap4": dict(env=runner.many_devices, parallelism="pmap"),
    }
    for name, options in runs.items():
        runner.run(tmp_path / name, **options, **steps)
        with open(tmp_path / name / TRAIN_LOG) as f:
            start = json.loads(f.readline())
        assert start["event"] == "start" and start["parallelism"] == options["parallelism"]
        assert start["devices"] == (1 if name == "one_device" else runner.faked_devices)

    # Every checkpoint restores here, on this process's single device.
    assert jax.device_count() == 1
    params = {}
    for name in runs:
        _, _, variables, step = evaluate.load_trained(str(tmp_path / name))
        assert step == 6
        params[name] = jax.device_get(variables["params"])

    reference = jax.tree.leaves(params["one_device"])
    for name in ("jit4", "pmap4"):
        for ours, ref in zip(jax.tree.leaves(params[name]), reference, strict=True):
            # Only the order of the cross-device sums differs.
            np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-5)
    # The runs really trained: parameters moved away from initialization.
    initial = _initial_params(runner, tmp_path)
    moved = [np.max(np.abs(a - b)) for a, b in zip(reference, initial, strict=True)]
    assert max(moved) > 1e-3


def _initial_params(runner, tmp_path):
    config = ckpt.load_config(str(tmp_path / "one_device"))
    task = tasks.get_task(config, data_lib.dataset_metadata(config))
    tx, _ = train_lib.create_optimizer(config)
    state = create_train_state(task, tx, jax.random.PRNGKey(config.seed))
    return jax.tree.leaves(jax.device_get(state.params))


@pytest.mark.parametrize("parallelism", ["jit", "pmap"])
@pytest.mark.parametrize(
    "processes, local_devices, batch_size, error",
    [
        (2, 4, 8, None),  # The README's 2 x 4 command: one example per device.
        (2, 4, 16, None),
        (1, 8, 8, None),
        (2, 4, 12, "must be a multiple of 8"),
        (2, 4, 4, "must be a multiple of 8"),
        (1, 2, 3, "must be a multiple of 2"),
    ],
)
def test_batch_size_is_global_across_processes(
    monkeypatch, parallelism, processes, local_devices, batch_size, error
):
    """A global batch divisible by every device of every process is accepted (it
    used to be refused on 2 x 4 devices at batch 8, each process's 4 examples
    being checked against all 8 devices)."""
    from jfcnn.errors import ConfigError

    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "local_device_count", lambda: local_devices)
    monkeypatch.setattr(jax, "device_count", lambda: processes * local_devices)
    config = ml_collections.ConfigDict({"parallelism": parallelism, "batch_size": batch_size})
    if error is None:
        assert train_lib.get_parallelism(config).name == parallelism
    else:
        with pytest.raises(ConfigError, match=error):
            train_lib.get_parallelism(config)


def test_processes_with_unequal_devices_are_named(monkeypatch):
    from jfcnn.errors import ConfigError

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "local_device_count", lambda: 3)  # And 5 in the other process.
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    config = ml_collections.ConfigDict({"parallelism": "jit", "batch_size": 8})
    with pytest.raises(ConfigError, match="its 3 devices cannot share equally; use processes"):
        train_lib.get_parallelism(config)


# Counts the traces of a step over 3 calls on a state placed by `put_state`, and
# prints them with the results as JSON. Run in a fresh process, as train.py is:
# in a test worker that had run other files, pmap once traced a second time.
_COUNT_TRACES = """
import json, sys
import jax, ml_collections, numpy as np
from jfcnn import train as train_lib

config = ml_collections.ConfigDict(
    {"parallelism": sys.argv[1], "batch_size": 2 * jax.device_count()}
)
wrapper = train_lib.get_parallelism(config)
traces = []

def step_fn(state, batch):
    traces.append(1)
    total = batch["x"].sum()
    if wrapper.axis_name:
        total = jax.lax.psum(total, wrapper.axis_name)
    return jax.tree.map(lambda p: p + total, state), {"loss": total}

step = wrapper.compile_step(step_fn)
state = wrapper.put_state({"w": np.zeros(3, np.float32), "b": np.float32(1.0)})
batch = {"x": np.arange(config.batch_size, dtype=np.float32)}
for _ in range(3):
    state, metrics = step(state, wrapper.put_batch(batch))
state = jax.device_get(wrapper.unreplicate(state))
print(json.dumps({
    "traces": len(traces),
    "total": float(batch["x"].sum()),
    "loss": float(wrapper.host_metrics(metrics)["loss"]),
    "w": state["w"].tolist(),
    "b": float(state["b"]),
}))
"""


@pytest.mark.parametrize("parallelism", ["jit", "pmap"])
def test_the_step_compiles_once(parallelism):
    """The state as ``put_state`` places it is placed as the step's own output, so
    the step is traced and compiled once. (A pmap state placed by
    ``flax.jax_utils.replicate`` was resharded by the first call and the step
    traced and compiled again on the second: minutes for a large model.)"""
    result = subprocess.run(
        [sys.executable, "-c", _COUNT_TRACES, parallelism],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_NUM_CPU_DEVICES": "2"},  # Two devices, as on this CPU.
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["traces"] == 1
    total = report["total"]
    assert report["loss"] == total
    assert report["w"] == [3 * total] * 3 and report["b"] == 1 + 3 * total
