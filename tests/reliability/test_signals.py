"""SIGTERM and Ctrl-C always end with a checkpoint at the step the run reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from jfcnn.train import TRAIN_LOG

pytestmark = pytest.mark.slow

NEVER = 10**6


def _log(workdir) -> list[dict]:
    path = os.path.join(workdir, TRAIN_LOG)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _checkpoint_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _start(runner, workdir, log_every_steps: int) -> subprocess.Popen:
    command = runner.command(
        workdir,
        num_train_steps=NEVER,
        log_every_steps=log_every_steps,
        eval_every_steps=NEVER,
        checkpoint_every_steps=NEVER,
    )
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_training(process, workdir, log_every_steps: int) -> None:
    """Until ten steps were logged (log_every_steps=1), or a few seconds of training."""
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start within 300 s"
        records = _log(workdir)
        if log_every_steps == 1 and sum("loss" in r for r in records) >= 10:
            return
        if log_every_steps != 1 and records:  # The start record: compiling now.
            time.sleep(8)
            return
        time.sleep(0.02)


@pytest.mark.parametrize("log_every_steps", [1, 100])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_step_it_reports(runner, tmp_path, sig, log_every_steps):
    process = _start(runner, tmp_path, log_every_steps)
    _wait_until_training(process, tmp_path, log_every_steps)
    process.send_signal(sig)
    if sig == signal.SIGTERM:
        time.sleep(0.2)
        process.send_signal(sig)  # A second SIGTERM, likely during the save: ignored.
    _, stderr = process.communicate(timeout=300)
    stop = _log(tmp_path)[-1]
    assert stop["event"] == "preempted" and stop["signal"] == signal.Signals(sig).name, stderr
    assert _checkpoint_steps(tmp_path) == [stop["step"]] and stop["step"] > 0
    if sig == signal.SIGTERM:
        assert process.returncode == 0, stderr[-3000:]
    else:
        # Ctrl-C: the checkpoint is saved, then one error line and a non-zero exit.
        assert process.returncode == 130, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"at step {stop['step']}" in errors[0], stderr[-3000:]
        assert "Traceback" not in stderr


def test_second_ctrl_c_exits_at_once(runner, tmp_path):
    process = _start(runner, tmp_path, 1)
    _wait_until_training(process, tmp_path, 1)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert time.monotonic() - started < 30
    assert "Traceback" not in stderr
    # Whatever the second Ctrl-C cut short, no half-written checkpoint is listed.
    for step in _checkpoint_steps(tmp_path):
        assert os.path.exists(os.path.join(tmp_path, "checkpoints", str(step), "state"))


def test_a_sigterm_after_the_stop_cannot_kill_the_exiting_run():
    """Once a SIGTERM stopped the run, later ones are ignored until the process ends
    (a repeated notice used to kill it during interpreter shutdown: exit -15, not 0)."""
    from jfcnn.train import PreemptionHandler

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with PreemptionHandler(across_processes=False) as preemption:
            os.kill(os.getpid(), signal.SIGTERM)
            assert preemption.should_stop(1) and preemption.signal_name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # Would end pytest with the default action.

        # Without a SIGTERM, the caller's handlers come back unchanged.
        with PreemptionHandler(across_processes=False):
            pass
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with PreemptionHandler(across_processes=False) as preemption:
            os.kill(os.getpid(), signal.SIGINT)
        assert preemption.signal_name == "SIGINT"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
