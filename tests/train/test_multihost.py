"""Multi-process runs on one machine: processes joined by `jax.distributed` over 127.0.0.1.

Each process is a real ``train.py`` (or ``python -m jfcnn.evaluate``) with
its own faked CPU devices; their collectives run over TCP with gloo, as they
would across hosts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jfcnn import checkpoint as ckpt
from jfcnn import distributed, evaluate, train
from jfcnn.errors import ConfigError
from jfcnn.train import TRAIN_LOG

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


def start_processes(commands: list[list[str]], *, devices: int) -> list[subprocess.Popen]:
    return [
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


def run_processes(
    commands: list[list[str]], *, devices: int, timeout: float = 900, signal_when=None
):
    """Starts ``commands`` together; waits for all; returns their (returncode, stderr).

    ``signal_when(procs)``, if given, is called once they are started (to signal them).
    """
    procs = start_processes(commands, devices=devices)
    results = []
    try:
        if signal_when is not None:
            signal_when(procs)
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

# Plain SGD at a constant rate and group norm, as in test_parallel: parameters then
# differ only by the order of cross-device sums.
EQUIVALENCE = {
    "num_train_steps": 6,
    "checkpoint_every_steps": 3,
    "eval_every_steps": 6,
    "optimizer": "sgd",
    "learning_rate": 0.1,
    "lr_schedule": "constant",
    "model.norm": "group",
}
CLOSE = {"rtol": 2e-4, "atol": 2e-5}


def copy_run(source, destination, step: int):
    """A copy of the work directory ``source`` as it was after its step-``step`` checkpoint."""
    shutil.copytree(source, destination)
    os.remove(destination / TRAIN_LOG)
    for name in os.listdir(destination / "checkpoints"):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(destination / "checkpoints" / name)
    return destination


def signal_once_training(workdir, sig, *, targets: tuple[int, ...]):
    """``signal_when`` for `run_processes`: ``sig`` to ``targets`` once process 0 has
    restored the state (the train log's first record), before the first step."""

    def send(procs):
        deadline = time.monotonic() + 600
        while not os.path.exists(workdir / TRAIN_LOG) or not os.path.getsize(workdir / TRAIN_LOG):
            assert all(p.poll() is None for p in procs), "a process ended before training"
            assert time.monotonic() < deadline, "no training within 600 s"
            time.sleep(0.02)
        for i in targets:
            procs[i].send_signal(sig)

    return send


def stopped_at(stderr: str) -> int:
    steps = re.findall(r"Stopped at step (\d+)", stderr)
    assert len(steps) == 1, stderr[-5000:]
    return int(steps[0])


def last_eval(workdir) -> dict:
    with open(workdir / TRAIN_LOG) as f:
        return [r for r in map(json.loads, f) if "eval" in r][-1]


def train_in_this_process(workdir, data_dir: str):
    """``train_and_evaluate`` here, on this process's one device, with the run's saved config."""
    config = ckpt.load_config(str(workdir))
    assert config.data.data_dir == data_dir
    train.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_processes_train_evaluate_stop_and_resume_as_one(runner, shapes_data_dir, tmp_path):
    # 1 process x 4 devices writes the checkpoint at step 3; from it, 2 processes x
    # 2 devices train on (a checkpoint of 1 process restores in 2): the same global
    # batches, the same parameters, and an evaluation over the whole split by either.
    one = tmp_path / "one_process"
    runner.run(one, env=devices_env(4), **EQUIVALENCE)
    two = copy_run(one, tmp_path / "two_processes", 3)

    def commands(workdir):
        port = free_port()
        return [runner.command(workdir, **EQUIVALENCE) + process_flags(port, i) for i in range(2)]

    results = run_processes(commands(two), devices=2)
    for i, (code, stderr) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{stderr[-5000:]}"
    # Process 0 logs progress and evaluations; process 1 only what goes wrong.
    assert "step 6/6" in results[0][1] and "eval step 6" in results[0][1]
    assert "step 6/6" not in results[1][1] and "eval step" not in results[1][1]

    # A SIGTERM to one process (here before the first step, the latest moment a
    # test can aim at) stops both after the same step, each taking part in one
    # checkpoint, and both exit 0.
    stopped = copy_run(one, tmp_path / "stopped", 3)
    results = run_processes(
        commands(stopped),
        devices=2,
        signal_when=signal_once_training(stopped, signal.SIGTERM, targets=(1,)),
    )
    for i, (code, stderr) in enumerate(results):
        assert code == 0, f"process {i} failed after SIGTERM:\n{stderr[-5000:]}"
    step = stopped_at(results[0][1])
    assert stopped_at(results[1][1]) == step and 3 < step < 6
    with open(stopped / TRAIN_LOG) as f:
        stop = [json.loads(line) for line in f][-1]
    assert stop["event"] == "preempted" and stop["signal"] == "SIGTERM" and stop["step"] == step
    assert sorted(int(n) for n in os.listdir(stopped / "checkpoints")) == [3, step]

    # The checkpoint of 2 processes resumes training in 1 (this test's one device).
    alone = copy_run(stopped, tmp_path / "alone", step)
    train_in_this_process(alone, shapes_data_dir)

    # The same commands again resume where both stopped, as if never stopped.
    results = run_processes(commands(stopped), devices=2)
    for i, (code, stderr) in enumerate(results):
        assert code == 0, f"resumed process {i} failed:\n{stderr[-5000:]}"
    assert f"Resuming from the checkpoint at step {step}" in results[0][1]

    assert jax.device_count() == 1  # All restore here, on one device.
    params = {}
    for workdir in (one, two, stopped, alone):
        _, _, variables, restored = evaluate.load_trained(str(workdir))
        assert restored == 6
        params[workdir.name] = jax.tree.leaves(jax.device_get(variables["params"]))
    for name in ("one_process", "alone"):
        for ours, ref in zip(params[name], params["two_processes"], strict=True):
            np.testing.assert_allclose(ours, ref, **CLOSE, err_msg=name)
    for ours, ref in zip(params["stopped"], params["two_processes"], strict=True):
        np.testing.assert_array_equal(ours, ref)
    assert last_eval(stopped) == last_eval(two)

    # Evaluating the 2-process checkpoint with 2 processes scores every example once:
    # the metrics of a 1-process evaluation of the same checkpoint.
    port = free_port()
    command = [sys.executable, "-m", "jfcnn.evaluate", "--workdir", str(two)]
    results = run_processes([command + process_flags(port, i) for i in range(2)], devices=2)
    for i, (code, stderr) in enumerate(results):
        assert code == 0, f"evaluation process {i} failed:\n{stderr[-5000:]}"
    with open(two / "eval" / "metrics.json") as f:
        together = json.load(f)
    alone_metrics = evaluate.evaluate_run(str(two))[0]
    assert together["num_examples"] == alone_metrics["num_examples"] == 24
    for key in ("mean_iou", "pixel_accuracy", "mean_dice"):
        assert together[key] == pytest.approx(alone_metrics[key], abs=1e-6), key


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
