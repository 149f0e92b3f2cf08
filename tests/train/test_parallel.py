"""jit and pmap on 4 faked CPU devices train to the same result as one device."""

from __future__ import annotations

import json
import os

import jax
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
