"""Multi-process Mask R-CNN: training and prediction over processes joined on 127.0.0.1.

Apart from `test_multihost.py` (whose helpers it uses) so that test runners can
give the two files to different workers.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest
import tiny_configs
from PIL import Image
from test_multihost import (
    CLOSE,
    devices_env,
    free_port,
    last_eval,
    process_flags,
    run_processes,
    start_processes,
)

from jfcnn import evaluate
from jfcnn.train import TRAIN_LOG

# ---------------------------------------------------------------------------
# Mask R-CNN

# The tiny Mask R-CNN of tests/tiny_configs.py on 32 x 32 images, one step of plain
# SGD (see `PMAP_EQUIVALENCE` for why one) with the config's batch norm, whose
# statistics must be the global batch's whatever the process count, and its gather
# ROI Align, which runs on each device's own images (tests/ops/test_roi_align_sharded.py;
# partitioned by XLA instead, one step took 30 s over gloo).
MASKRCNN_EQUIVALENCE = {
    "data.image_size": 32,
    "data.train_split": "train[:16]",
    "data.eval_split": "validation[:4]",
    "data.shuffle_buffer": 16,
    **tiny_configs.config_overrides(tiny_configs.MASKRCNN),
    "batch_size": 4,
    "num_train_steps": 1,
    "checkpoint_every_steps": 1,
    "eval_every_steps": 1,
    "num_eval_images": 0,
    "optimizer": "sgd",
    "learning_rate": 0.02,
    "lr_schedule": "constant",
}


def trained_variables(workdir, step: int) -> list[np.ndarray]:
    """The parameters and model state (batch statistics) of ``workdir``'s checkpoint."""
    _, _, variables, restored = evaluate.load_trained(str(workdir))
    assert restored == step
    return jax.tree.leaves(jax.device_get(variables))


def logged_losses(workdir) -> list[float]:
    with open(workdir / TRAIN_LOG) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def maskrcnn_run(runner, tmp_path_factory):
    """The `MASKRCNN_EQUIVALENCE` run of 1 process on 4 devices, trained once per module."""
    workdir = tmp_path_factory.mktemp("maskrcnn_one_process_4_devices")
    runner.with_config("maskrcnn.py", MASKRCNN_EQUIVALENCE).run(workdir, env=devices_env(4))
    return workdir


@pytest.mark.slow
def test_maskrcnn_trains_across_processes_as_in_one(runner, maskrcnn_run, tmp_path):
    # 2 processes x 2 devices train as 1 process x 4 devices (both jit over 4 devices).
    maskrcnn = runner.with_config("maskrcnn.py", MASKRCNN_EQUIVALENCE)
    one = maskrcnn_run
    two = tmp_path / "two_processes_2_devices"
    port = free_port()
    results = run_processes(
        [maskrcnn.command(two) + process_flags(port, i) for i in range(2)], devices=2, timeout=600
    )
    for i, (code, stderr) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{stderr[-5000:]}"
    for workdir, processes in ((one, 1), (two, 2)):
        with open(workdir / TRAIN_LOG) as f:
            start = json.loads(f.readline())
        layout = (start["processes"], start["devices"], start["parallelism"])
        assert layout == (processes, 4, "jit"), start
    assert logged_losses(two) == pytest.approx(logged_losses(one), rel=1e-6)
    assert jax.device_count() == 1  # Both restore here, on one device.
    ours, reference = trained_variables(two, 1), trained_variables(one, 1)
    assert len(ours) == len(reference) > 0
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, b, **CLOSE)
    # The evaluation after the step scored every example once (each process read half),
    # and pycocotools saw every image: the AP of a 1-process evaluation of that checkpoint.
    together = last_eval(two)["eval"]
    assert together["num_examples"] == last_eval(one)["eval"]["num_examples"] == 4
    alone = evaluate.evaluate_run(str(two))[0]
    assert alone["num_examples"] == 4
    scores = [key for key in alone if key.startswith(("box_A", "mask_A"))]
    assert "box_AP" in scores and "mask_AP" in scores
    for key in scores:  # The log holds NaN (no object of that size) as null.
        logged = float("nan") if together[key] is None else together[key]
        assert logged == pytest.approx(alone[key], abs=1e-6, nan_ok=True), key


def blobs(height: int, width: int, seed: int) -> np.ndarray:
    """An (H, W, 3) uint8 image of smooth color blobs."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


@pytest.mark.slow
def test_processes_predict_a_share_each_into_one_directory(maskrcnn_run, tmp_path):
    # Sorted inputs: a.png, a_broken.png, b.png, c.png, d.jpg, sub/f.png; process 0
    # predicts a, b and d, process 1 the unreadable a_broken, c and sub/f.
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    sizes = {"a.png": (40, 52), "b.png": (33, 33), "c.png": (64, 24), "d.jpg": (29, 61)}
    sizes["sub/f.png"] = (50, 45)
    for seed, (name, (height, width)) in enumerate(sizes.items()):
        Image.fromarray(blobs(height, width, seed)).save(images / name, quality=95)
    (images / "a_broken.png").write_bytes(b"\x89PNG broken")

    def command(out) -> list[str]:
        return [sys.executable, "-m", "jfcnn.predict", "--workdir", str(maskrcnn_run)] + [
            "--output",
            str(out),
            "--batch_size=2",
            "--score_threshold=0",  # The barely trained model's detections all count.
            str(images),
        ]

    # One process on 2 devices beside two processes on 2 devices each: every image
    # is alone on a device in either (one per device), the same computation.
    alone, together = tmp_path / "alone", tmp_path / "together"
    port = free_port()
    commands = [command(alone)] + [command(together) + process_flags(port, i) for i in range(2)]
    procs = start_processes(commands, devices=2)
    try:
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    codes = [proc.returncode for proc in procs]
    stderrs = [stderr for _, stderr in outputs]
    # The broken file was process 1's to read; both exit 1 for it, as one process does.
    assert codes == [1, 1, 1], "\n\n".join(s[-3000:] for s in stderrs)
    errors = [[line for line in s.splitlines() if line.startswith("error:")] for s in stderrs]
    assert len(errors[0]) == 1 and "a_broken.png" in errors[0][0], stderrs[0][-3000:]
    assert errors[1] == [], stderrs[1][-3000:]
    assert len(errors[2]) == 1 and "a_broken.png" in errors[2][0], stderrs[2][-3000:]
    assert "Wrote the predictions of 5 image(s)" in outputs[0][0]
    assert "Wrote the predictions of 5 image(s)" in outputs[1][0]
    assert "Wrote" not in outputs[2][0]  # Process 0 reports for all.

    # The same files (no part of predictions.json left behind), the same predictions.json
    # byte for byte (detections in input order) and the same pictures.
    names = sorted(os.listdir(alone))
    assert names == sorted(os.listdir(together))
    overlays = [f"{os.path.splitext(os.path.basename(n))[0]}_overlay.png" for n in sizes]
    assert names == sorted(["predictions.json", *overlays])
    with open(together / "predictions.json") as f:
        entries = json.load(f)
    assert {e["file_name"] for e in entries} == set(sizes)
    file_order = [e["file_name"] for e in entries]
    assert sorted(set(file_order), key=file_order.index) == list(sizes)
    assert (together / "predictions.json").read_bytes() == (alone / "predictions.json").read_bytes()
    for name in overlays:
        with Image.open(alone / name) as a, Image.open(together / name) as b:
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=name)
