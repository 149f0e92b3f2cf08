"""Multi-process runs on one machine: processes joined by `jax.distributed` over 127.0.0.1.

Each process is a real ``train.py`` (or ``python -m jfcnn.evaluate``, or
``python -m jfcnn.predict``) with its own faked CPU devices; their collectives
run over TCP with gloo, as they would across hosts.
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


def signal_once_training(workdir, sig, *, targets: tuple[int, ...], after_a_step: bool = False):
    """``signal_when`` for `run_processes`: ``sig`` to ``targets`` once process 0 has
    restored the state (the train log's first record), before the first step; with
    ``after_a_step``, once it has logged a step's loss (the run must log every step).

    A step's loss is the moment every process is inside the training loop: it took
    an all-reduce with all of them, and the loop's Ctrl-C handler is installed
    before its first step (a SIGINT before that is a plain KeyboardInterrupt).
    """

    def ready() -> bool:
        if not os.path.exists(workdir / TRAIN_LOG):
            return False
        with open(workdir / TRAIN_LOG) as f:
            lines = [line for line in f.read().splitlines() if line.endswith("}")]
        return any('"loss"' in line for line in lines) if after_a_step else bool(lines)

    def send(procs):
        deadline = time.monotonic() + 600
        while not ready():
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


# One step: from the same initialization, one step's parameters differ by float
# rounding (3e-8 here) whatever the layout. Later steps do not: measured with
# `EQUIVALENCE`, each of 1 device, 1 x 4 jit, 1 x 4 pmap and 2 x 2 pmap parts from
# the others by 3e-4 to 4e-4 at step 2 or 3 (losses equal to 7 digits until then),
# reaching 2e-3 to 4e-3 at step 6: rounding-level differences flip a non-smooth
# choice (a ReLU's sign, a max-pool window's maximum) and its gradient with it.
PMAP_EQUIVALENCE = {
    **EQUIVALENCE,
    "num_train_steps": 1,
    "checkpoint_every_steps": 1,
    "eval_every_steps": 1,
}


@pytest.fixture(scope="module")
def one_process_run(runner, tmp_path_factory):
    """The `PMAP_EQUIVALENCE` run of 1 process on 4 devices (jit), trained once per module."""
    workdir = tmp_path_factory.mktemp("one_process_4_devices")
    runner.run(workdir, env=devices_env(4), **PMAP_EQUIVALENCE)
    with open(workdir / TRAIN_LOG) as f:
        start = json.loads(f.readline())
    # train.py picks its own CPU device count unless told: this run must be 1 x 4.
    assert (start["processes"], start["devices"], start["parallelism"]) == (1, 4, "jit"), start
    return workdir


def final_params(workdir) -> list[np.ndarray]:
    _, _, variables, restored = evaluate.load_trained(str(workdir))
    assert restored == PMAP_EQUIVALENCE["num_train_steps"]
    return jax.tree.leaves(jax.device_get(variables["params"]))


@pytest.mark.slow
def test_pmap_across_processes_trains_as_jit_in_one(runner, one_process_run, tmp_path):
    # 2 processes x 2 devices with pmap (each pmaps over its own devices, gradients
    # pmean'ed over all four) train as 1 process x 4 devices with jit.
    workdir = tmp_path / "pmap_2x2"
    port = free_port()
    commands = [
        runner.command(workdir, **PMAP_EQUIVALENCE, parallelism="pmap") + process_flags(port, i)
        for i in range(2)
    ]
    results = run_processes(commands, devices=2)
    for i, (code, stderr) in enumerate(results):
        assert code == 0, f"pmap process {i} failed:\n{stderr[-5000:]}"
    with open(workdir / TRAIN_LOG) as f:
        start = json.loads(f.readline())
    assert (start["processes"], start["devices"], start["parallelism"]) == (2, 4, "pmap"), start
    assert jax.device_count() == 1  # Both restore here, on one device.
    pmapped, jitted = final_params(workdir), final_params(one_process_run)
    for ours, ref in zip(pmapped, jitted, strict=True):
        np.testing.assert_allclose(ours, ref, **CLOSE)
    # Evaluated by both processes (the pmap state made one array over all devices).
    assert last_eval(workdir)["eval"]["loss"] == pytest.approx(
        last_eval(one_process_run)["eval"]["loss"], rel=1e-5
    )


# Long enough that a signal sent after the first logged step stops the run well
# before its end; one checkpoint, at the stop or the end. The programs are those
# of `EQUIVALENCE` on 2 x 2 devices (its schedule is constant), compiled once per
# session for every test here (the JAX compilation cache, see conftest.py).
SIGNALLED = {
    **EQUIVALENCE,
    "num_train_steps": 30,
    "log_every_steps": 1,
    "checkpoint_every_steps": 30,
    "eval_every_steps": 30,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, targets",
    [
        pytest.param(signal.SIGTERM, (0, 1), id="sigterm_to_all"),
        pytest.param(signal.SIGINT, (1,), id="ctrl_c_in_one"),
    ],
)
def test_a_signal_mid_training_stops_every_process_at_one_step(runner, tmp_path, sig, targets):
    workdir = tmp_path / "w"

    def commands():
        port = free_port()
        return [runner.command(workdir, **SIGNALLED) + process_flags(port, i) for i in range(2)]

    results = run_processes(
        commands(),
        devices=2,
        signal_when=signal_once_training(workdir, sig, targets=targets, after_a_step=True),
    )
    with open(workdir / TRAIN_LOG) as f:
        records = [json.loads(line) for line in f]
    first_logged = min(r["step"] for r in records if "loss" in r)
    step = stopped_at(results[0][1])
    assert stopped_at(results[1][1]) == step, results[1][1][-5000:]
    assert first_logged < step < SIGNALLED["num_train_steps"], (first_logged, step)
    stop = records[-1]
    assert stop["event"] == "preempted" and stop["step"] == step, stop
    # Every process took part in one checkpoint, at the agreed step.
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints")) == [step]

    for i, (code, stderr) in enumerate(results):
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        if sig == signal.SIGINT and i in targets:
            # A person stopped the run: that process says so, once, and exits 130.
            assert code == 130, f"process {i} exited {code}:\n{stderr[-5000:]}"
            assert len(errors) == 1 and f"at step {step}" in errors[0], stderr[-5000:]
        else:
            assert code == 0, f"process {i} exited {code}:\n{stderr[-5000:]}"
            assert errors == [], stderr[-5000:]
    if sig == signal.SIGTERM:
        # JAX's runtime, not jfcnn's handler, received the SIGTERM: no time is known.
        assert stop["signal"] == "SIGTERM" and stop["seconds_after_signal"] is None, stop
        # The same commands again resume at the stop and train to the end.
        results = run_processes(commands(), devices=2)
        for i, (code, stderr) in enumerate(results):
            assert code == 0, f"resumed process {i} failed:\n{stderr[-5000:]}"
        assert f"Resuming from the checkpoint at step {step}" in results[0][1]
        assert f"step {SIGNALLED['num_train_steps']}/" in results[0][1]
        steps = sorted(int(n) for n in os.listdir(workdir / "checkpoints"))
        assert steps == [step, SIGNALLED["num_train_steps"]]
