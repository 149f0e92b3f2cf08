"""Multi-process runs on one machine: processes joined by `jax.distributed` over 127.0.0.1.

Each process is a real ``train.py`` (or ``python -m jfcnn.evaluate``) with
its own faked CPU devices; their collectives run over TCP with gloo, as they
would across hosts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jfcnn import distributed, evaluate
from jfcnn.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def devices_env(count: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={count}"}


def process_flags(port: int, process_id: int, num_processes: int = 2) -> list[str]:
    return [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={process_id}",
        "--distributed_timeout=300",
    ]


def run_processes(commands: list[list[str]], *, devices: int, timeout: float = 900):
    """Starts ``commands`` together; waits for all; returns their (returncode, stderr)."""
    procs = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=devices_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    results = []
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=timeout)
            results.append((proc.returncode, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


# ---------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(coordinator_address="127.0.0.1:1234"), "missing --num_processes, --process_id"),
        (dict(num_processes=2, process_id=0), "missing --coordinator_address"),
        (
            dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0),
            "is not HOST:PORT",
        ),
        (
            dict(coordinator_address="h:1", num_processes=2, process_id=2),
            r"--process_id=2 is not in 0..1",
        ),
        (dict(coordinator_address="h:1", num_processes=0, process_id=0), "at least 1"),
        (
            dict(coordinator_address="h:1", num_processes=2, process_id=0, multiprocess=False),
            "contradicts",
        ),
    ],
)
def test_inconsistent_flags_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        distributed.initialize(**settings)


def test_runs_alone_unless_asked_or_in_a_cluster(monkeypatch):
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # No flags, no cluster: one process.
    assert distributed.cluster_size({"SLURM_NTASKS": "4"}) == 4
    assert distributed.cluster_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert distributed.cluster_size({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}) == 4
    assert distributed.cluster_size({"TPU_WORKER_HOSTNAMES": "localhost"}) == 1
    assert distributed.cluster_size({}) == 1
    # A cluster environment of several processes, told to run alone.
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.initialize(multiprocess=False) is False


# ---------------------------------------------------------------------------
# Real processes

# Plain SGD and group norm, as in test_parallel: parameters then differ only by the
# order of cross-device sums.
EQUIVALENCE = {
    "num_train_steps": 6,
    "checkpoint_every_steps": 6,
    "eval_every_steps": 6,
    "optimizer": "sgd",
    "learning_rate": 0.1,
    "model.norm": "group",
}


@pytest.mark.slow
def test_two_processes_train_and_evaluate_as_one(runner, tmp_path):
    # 2 processes x 2 devices against 1 process x 4: the same global batches, the
    # same parameters, and an evaluation over the whole split by either.
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    port = free_port()
    results = run_processes(
        [runner.command(two, **EQUIVALENCE) + process_flags(port, i) for i in range(2)],
        devices=2,
    )
    for i, (code, stderr) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{stderr[-5000:]}"
    # Process 0 logs progress and evaluations; process 1 only what goes wrong.
    assert "step 6/6" in results[0][1] and "eval step 6" in results[0][1]
    assert "step 6/6" not in results[1][1] and "eval step" not in results[1][1]
    runner.run(one, env=devices_env(4), **EQUIVALENCE)

    assert jax.device_count() == 1  # Both restore here, on one device.
    params = {}
    for name, workdir in (("two", two), ("one", one)):
        _, _, variables, step = evaluate.load_trained(str(workdir))
        assert step == 6
        params[name] = jax.tree.leaves(jax.device_get(variables["params"]))
    for ours, ref in zip(params["two"], params["one"], strict=True):
        np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-5)

    # Evaluating the 2-process checkpoint with 2 processes scores every example once:
    # the metrics of a 1-process evaluation of the same checkpoint.
    port = free_port()
    command = [sys.executable, "-m", "jfcnn.evaluate", "--workdir", str(two)]
    results = run_processes([command + process_flags(port, i) for i in range(2)], devices=2)
    for i, (code, stderr) in enumerate(results):
        assert code == 0, f"evaluation process {i} failed:\n{stderr[-5000:]}"
    with open(two / "eval" / "metrics.json") as f:
        together = json.load(f)
    alone = evaluate.evaluate_run(str(two))[0]
    assert together["num_examples"] == alone["num_examples"] == 24
    for key in ("mean_iou", "pixel_accuracy", "mean_dice"):
        assert together[key] == pytest.approx(alone[key], abs=1e-6), key


@pytest.mark.slow
def test_a_dead_peer_stops_the_other_process(runner, tmp_path):
    port = free_port()
    long_run = {"num_train_steps": 100000, "checkpoint_every_steps": 100000, "log_every_steps": 1}
    procs = [
        subprocess.Popen(
            runner.command(tmp_path / "w", **long_run) + process_flags(port, i),
            cwd=ROOT,
            env=devices_env(2),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        # Wait until process 0 trains (its progress lines go to stderr).
        deadline = time.monotonic() + 600
        for line in procs[0].stderr:
            if "step 2/" in line or time.monotonic() > deadline:
                break
        assert procs[0].poll() is None and procs[1].poll() is None, "a process ended early"
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, rest = procs[0].communicate(timeout=120)  # A hang fails here.
        assert time.monotonic() - killed < 120
        assert procs[0].returncode not in (0, None)
        assert "another process of this run" in rest or "heartbeat" in rest, rest[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_an_unreachable_coordinator_is_named(runner, tmp_path):
    port = free_port()  # Nobody listens there: process 0 never starts.
    flags = process_flags(port, 1)[:-1] + ["--distributed_timeout=5"]
    start = time.monotonic()
    result = subprocess.run(
        runner.command(tmp_path / "w") + flags,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert time.monotonic() - start < 120
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not reach the coordinator at 127.0.0.1:"), last
    assert f"127.0.0.1:{port}" in last and "within 5 s" in last, last
