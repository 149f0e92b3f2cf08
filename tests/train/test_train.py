"""End-to-end training on a shrunken config: train.py, evaluate, resume, NaN."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jfcnn import distributed, evaluate
from jfcnn.train import TRAIN_LOG

pytestmark = pytest.mark.slow


def _load_params(workdir, step=None):
    config, task, variables, restored_step = evaluate.load_trained(str(workdir), step)
    return jax.device_get(variables), restored_step


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def read_train_log(workdir) -> list[dict]:
    """The records of ``<workdir>/train_log.jsonl``: logged steps, evaluations, stops."""
    with open(os.path.join(workdir, TRAIN_LOG)) as f:
        return [json.loads(line) for line in f]


def _checkpoint_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@pytest.fixture(scope="module")
def reference_run(runner, tmp_path_factory):
    """An uninterrupted 12-step run: the baseline every resume must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    result = runner.run(workdir)
    return workdir, result


def test_training_writes_checkpoints_logs_and_config(reference_run):
    workdir, result = reference_run
    assert _checkpoint_steps(workdir) == [4, 8, 12]  # keep_checkpoints=3
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["num_train_steps"] == 12 and saved["data"]["image_size"] == 32
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    # One record per logged step (log_every_steps=4) and per evaluation (8, 12).
    log = read_train_log(workdir)
    progress = [r for r in log if "loss" in r]
    assert [r["step"] for r in progress] == [4, 8, 12]
    assert all(r["images_per_sec"] > 0 and r["learning_rate"] > 0 for r in progress)
    assert progress[-1]["loss"] < progress[0]["loss"]
    evals = [r for r in log if "eval" in r]
    assert [r["step"] for r in evals] == [8, 12]
    assert 0 < evals[-1]["eval"]["mean_iou"] <= 1
    # Alone on the CPU, train.py shards the batch of 8 over one device per core
    # (as many cores as divide 8), unless the environment fixes the count.
    if "JAX_NUM_CPU_DEVICES" not in os.environ and "device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        cores = min(len(os.sched_getaffinity(0)), distributed.MAX_CPU_DEVICES)
        per_core = max(d for d in range(1, cores + 1) if 8 % d == 0)
        assert (log[0]["event"], log[0]["devices"]) == ("start", per_core)


def test_evaluate_cli_metrics_match_independent_recomputation(runner, reference_run):
    workdir, _ = reference_run
    metrics = runner.evaluate(workdir)
    assert metrics["step"] == 12 and metrics["num_examples"] == 24
    assert os.path.exists(os.path.join(workdir, "eval", "example_00.png"))

    # Recompute mIoU from boolean masks over the whole split, without the
    # confusion matrix, from a fresh restore.
    from jfcnn import data as data_lib

    config, task, variables, _ = evaluate.load_trained(str(workdir))
    intersections = np.zeros(task.num_classes)
    unions = np.zeros(task.num_classes)
    correct = total = 0
    for batch in data_lib.create_eval_iterator(config):
        logits = task.model.apply(variables, batch["image"], train=False)
        predictions = np.argmax(np.asarray(logits), -1)
        for i in np.flatnonzero(batch["valid"]):
            truth = batch["mask"][i]
            correct += np.sum(predictions[i] == truth)
            total += truth.size
            for k in range(task.num_classes):
                intersections[k] += np.sum((predictions[i] == k) & (truth == k))
                unions[k] += np.sum((predictions[i] == k) | (truth == k))
    iou = intersections[unions > 0] / unions[unions > 0]
    assert total == 24 * 32 * 32
    assert metrics["mean_iou"] == pytest.approx(iou.mean(), abs=1e-9)
    assert metrics["pixel_accuracy"] == pytest.approx(correct / total, abs=1e-9)


def _start_and_signal(runner, workdir, sig) -> subprocess.Popen:
    """Starts a run and sends ``sig`` as soon as its step-4 checkpoint exists."""
    process = subprocess.Popen(
        runner.command(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    target = os.path.join(workdir, "checkpoints", "4")
    deadline = time.monotonic() + 300
    while not os.path.isdir(target):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(sig)
    process.wait(timeout=300)
    return process


def test_resume_after_sigkill_is_bit_exact(runner, reference_run, tmp_path):
    process = _start_and_signal(runner, tmp_path, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    interrupted_at = _checkpoint_steps(tmp_path)[-1]
    assert interrupted_at < 12
    runner.run(tmp_path)  # The same command resumes.
    reference, _ = _load_params(reference_run[0])
    resumed, step = _load_params(tmp_path)
    assert step == 12
    _assert_trees_equal(resumed, reference)


def test_sigterm_saves_current_step_and_resume_is_bit_exact(runner, reference_run, tmp_path):
    process = _start_and_signal(runner, tmp_path, signal.SIGTERM)
    stderr = process.stderr.read()
    assert process.returncode == 0, stderr[-3000:]
    stopped_at = _checkpoint_steps(tmp_path)[-1]
    stop = read_train_log(tmp_path)[-1]
    assert stop["event"] == "preempted" and stop["step"] == stopped_at
    assert stopped_at < 12
    runner.run(tmp_path)
    reference, _ = _load_params(reference_run[0])
    resumed, step = _load_params(tmp_path)
    assert step == 12
    _assert_trees_equal(resumed, reference)
    for workdir in (reference_run[0], tmp_path):
        evaluate.evaluate_workdir(str(workdir))
    metrics = []
    for workdir in (reference_run[0], tmp_path):
        with open(os.path.join(workdir, "eval", "metrics.json")) as f:
            metrics.append(json.load(f))
    assert metrics[0] == metrics[1]


def test_sigterm_is_answered_within_a_few_steps(runner, tmp_path):
    """A preempted cloud VM gets about 30 s between SIGTERM and SIGKILL.

    Dispatch is asynchronous, and with no logging, evaluation or checkpoint
    for a long time nothing else makes the loop wait for the device: if it ran
    ahead, the checkpoint at the SIGTERM would wait for every step it had
    dispatched (15 s here after 25 s of training, growing with the run). The
    step is made heavy (about 0.5 s) so that the loop could run ahead.
    """
    never = 10**6
    command = runner.command(
        tmp_path,
        num_train_steps=never,
        log_every_steps=never,
        eval_every_steps=never,
        checkpoint_every_steps=never,
        batch_size=16,
        **{"data.image_size": 64, "model.base_width": 32},
    )
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # config.json is written once the data and the initial state are ready.
    deadline = time.monotonic() + 300
    while not os.path.exists(tmp_path / "config.json"):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start within 300 s"
        time.sleep(0.05)
    time.sleep(25)  # Compile the step, then train (and dispatch) for a while.
    process.send_signal(signal.SIGTERM)
    stderr = process.stderr.read()
    process.wait(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    stopped = read_train_log(tmp_path)[-1]
    assert stopped["event"] == "preempted", stderr[-3000:]
    step, seconds = stopped["step"], stopped["seconds_after_signal"]
    assert _checkpoint_steps(tmp_path) == [step] and step > 0
    # Two steps in flight and a small checkpoint: about 1.5 s on a quiet machine.
    assert seconds < 8, f"the checkpoint came {seconds} s after SIGTERM, at step {step}"


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(runner, tmp_path):
    runner.run(tmp_path, num_train_steps=4)
    before, _ = _load_params(tmp_path, 4)
    result = subprocess.run(
        runner.command(tmp_path, num_train_steps=12, learning_rate=1e30),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert "NaN/Inf" in result.stderr and "step 4) is intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert _checkpoint_steps(tmp_path) == [4]
    after, _ = _load_params(tmp_path, 4)
    _assert_trees_equal(after, before)
    # The changed config did not overwrite the one the run started with.
    backups = [name for name in os.listdir(tmp_path) if name.startswith("config.before_step_4")]
    assert len(backups) == 1


def test_missing_checkpoint_gives_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jfcnn.evaluate", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "is not a jfcnn work directory" in result.stderr
    assert "Traceback" not in result.stderr


def _evaluate_cli(workdir, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jfcnn.evaluate", "--workdir", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_evaluate_adapts_its_batch_to_three_devices(reference_run, tmp_path):
    workdir, _ = reference_run
    one = _evaluate_cli(workdir, "--output", str(tmp_path / "one"))
    three_devices = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=3",
    }
    three = _evaluate_cli(workdir, "--output", str(tmp_path / "three"), env=three_devices)
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-3000:]
    metrics = {}
    for name in ("one", "three"):
        with open(tmp_path / name / "metrics.json") as f:
            metrics[name] = json.load(f)
    # Batch 8 does not split over 3 devices; padding to 9 changes no count.
    assert metrics["three"]["num_examples"] == metrics["one"]["num_examples"] == 24
    assert metrics["three"]["mean_iou"] == metrics["one"]["mean_iou"]
    assert metrics["three"]["pixel_accuracy"] == metrics["one"]["pixel_accuracy"]
    assert metrics["three"]["loss"] == pytest.approx(metrics["one"]["loss"], rel=1e-5)


def test_evaluate_prints_the_metrics_when_it_cannot_write_them(reference_run):
    workdir, _ = reference_run
    result = _evaluate_cli(workdir, "--output", "/proc/jfcnn-eval")
    assert result.returncode == 1
    printed = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert printed["step"] == 12 and printed["num_examples"] == 24
    assert 0 < printed["mean_iou"] <= 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/proc/jfcnn-eval" in errors[0] and "--output" in errors[0]
    assert "Traceback" not in result.stderr


def test_resume_skips_a_damaged_checkpoint_and_stays_bit_exact(runner, reference_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    # Flip 64 bytes in the middle of every data file of the latest checkpoint, so
    # that evaluation, which reads only the parameters and model state, meets
    # the damage too (which file holds which array is Orbax's business).
    state_dir = workdir / "checkpoints" / "12" / "state"
    for root, _, names in os.walk(state_dir):
        for name in names:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if size < 256:
                continue
            with open(path, "r+b") as f:
                f.seek(size // 2)
                chunk = f.read(64)
                f.seek(-len(chunk), os.SEEK_CUR)
                f.write(bytes(b ^ 0xFF for b in chunk))
    result = subprocess.run(
        [sys.executable, "-m", "jfcnn.evaluate", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step 12" in errors[0] and "damaged" in errors[0]
    assert "--step 8" in errors[0]

    runner.run(workdir)  # Resumes from step 8, the newest intact checkpoint.
    damaged = os.listdir(workdir / "checkpoints_damaged")
    assert len(damaged) == 1 and damaged[0].startswith("12-")
    reference, _ = _load_params(reference_run[0])
    resumed, step = _load_params(workdir)
    assert step == 12
    _assert_trees_equal(resumed, reference)
