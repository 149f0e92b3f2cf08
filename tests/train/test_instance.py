"""End-to-end Mask R-CNN: train.py on shrunken configs/maskrcnn.py, both ROI heads designs,
jit and pmap on 4 faked devices against one device, restore and predict."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_configs

from jfcnn import data as data_lib
from jfcnn import evaluate
from jfcnn.tasks import instance
from jfcnn.train import TRAIN_LOG

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# configs/maskrcnn.py shrunk to train a few steps in seconds on 2 CPU cores:
# the tiny model of tests/tiny_configs.py (with the config's batch norm and
# gather ROI Align), a small data slice and few steps.
TINY_MASKRCNN = {
    "data.image_size": 64,
    "data.train_split": "train[:32]",
    "data.eval_split": "validation[:8]",
    "data.shuffle_buffer": 32,
    **tiny_configs.config_overrides(tiny_configs.MASKRCNN),
    "batch_size": 8,
    "num_train_steps": 4,
    "warmup_steps": 1,
    "log_every_steps": 2,
    "eval_every_steps": 4,
    "checkpoint_every_steps": 2,
    "num_eval_images": 1,
}
FPN_RUN = {
    "num_train_steps": 120,
    "learning_rate": 5e-3,
    "log_every_steps": 40,
    "eval_every_steps": 120,
    "checkpoint_every_steps": 60,
}
C4 = tiny_configs.config_overrides(tiny_configs.MASKRCNN_C4)


def _train_log(workdir) -> list[dict]:
    """The records of ``<workdir>/train_log.jsonl``: start, logged steps, evaluations."""
    with open(os.path.join(workdir, TRAIN_LOG)) as f:
        return [json.loads(line) for line in f]


def _logged_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _train_log(workdir) if "loss" in r}


def _eval_steps(workdir) -> list[int]:
    return [r["step"] for r in _train_log(workdir) if "eval" in r]


@pytest.fixture(scope="module")
def maskrcnn(runner):
    """Runs ``train.py --config configs/maskrcnn.py`` with the tiny overrides."""
    return runner.with_config("maskrcnn.py", TINY_MASKRCNN)


@pytest.fixture(scope="module")
def fpn_run(maskrcnn, tmp_path_factory):
    # Long enough (~5 s of steps) to find some shapes, so the evaluation compares
    # nonzero AP; the other tiny runs stop at 4 steps.
    workdir = tmp_path_factory.mktemp("maskrcnn_fpn")
    return workdir, maskrcnn.run(workdir, **FPN_RUN)


def test_fpn_trains_restores_and_predicts(fpn_run):
    workdir, _ = fpn_run
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["task"] == "instance" and saved["model"]["name"] == "maskrcnn"
    assert saved["num_train_steps"] == 120
    start = _train_log(workdir)[0]
    assert start["event"] == "start" and start["step"] == 0
    # train.py splits the CPU into one device per core for the U-Net only.
    if "JAX_NUM_CPU_DEVICES" not in os.environ and "device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        assert start["devices"] == 1
    # Logged every 40 steps and at each checkpoint (60, 120).
    losses = _logged_losses(workdir)
    assert sorted(losses) == [40, 60, 80, 120] and losses[120] < losses[40]
    assert _eval_steps(workdir) == [120]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["60", "120"]

    config, task, variables, step = evaluate.load_trained(str(workdir))
    assert step == 120 and isinstance(task, instance.InstanceSegmentationTask)
    assert config.model.roi_heads == "fpn" and task.model.mask_size == 28
    batch = next(data_lib.create_eval_iterator(config, instances=True))
    out = jax.device_get(instance.predict(task, variables, batch["image"]))
    assert out["masks"].shape == (8, 10, 64, 64) and out["masks"].dtype == np.uint8
    assert out["boxes"].shape == (8, 10, 4) and out["classes"].dtype == np.int32
    valid = out["detection_valid"]
    assert np.all(out["masks"][~valid] == 0) and np.all(out["scores"][~valid] == 0)
    assert np.all((out["classes"][valid] >= 1) & (out["classes"][valid] <= 3))
    # eval_step hands the evaluator exactly the interface's arrays.
    outputs = jax.device_get(jax.jit(task.eval_step)(variables, batch))
    assert sorted(outputs) == sorted(instance.EVAL_OUTPUTS)
    np.testing.assert_array_equal(outputs["masks"], out["masks"])


def _pycocotools_stats(config, task, variables) -> dict[str, np.ndarray]:
    """COCOeval stats of ``predict`` on the whole eval split, straight from the arrays."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(mask):
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": encoded["size"], "counts": encoded["counts"].decode()}

    images, annotations, results = [], [], []
    for batch in data_lib.create_eval_iterator(config, instances=True):
        out = jax.device_get(instance.predict(task, variables, batch["image"]))
        for i in np.flatnonzero(batch["valid"]):
            image_id = len(images) + 1
            size = batch["image"].shape[1]
            images.append({"id": image_id, "height": size, "width": size})
            for k in np.flatnonzero(batch["instance_valid"][i]):
                x1, y1, x2, y2 = (float(v) for v in batch["boxes"][i, k])
                segmentation = rle(batch["instance_masks"][i, k])
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(batch["labels"][i, k]),
                        "segmentation": segmentation,
                        "area": float(mask_utils.area(segmentation)),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "iscrowd": 0,
                    }
                )
            for d in np.flatnonzero(out["detection_valid"][i]):
                x1, y1, x2, y2 = (float(v) for v in out["boxes"][i, d])
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(out["classes"][i, d]),
                        "score": float(out["scores"][i, d]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "segmentation": rle(out["masks"][i, d]),
                    }
                )
    names = task.metadata.class_names
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": names[c]} for c in range(1, len(names))],
        }
        ground_truth.createIndex()
        for prefix, iou_type in (("box", "bbox"), ("mask", "segm")):
            detections = [dict(r) for r in results]
            if iou_type == "bbox":
                for r in detections:
                    del r["segmentation"]
            coco_eval = COCOeval(ground_truth, ground_truth.loadRes(detections), iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
            stats[prefix] = coco_eval.stats
    return stats, len(images)


def test_evaluate_cli_writes_coco_ap_and_pictures(maskrcnn, fpn_run):
    workdir, _ = fpn_run
    metrics = maskrcnn.evaluate(workdir)
    assert metrics["step"] == 120
    config, task, variables, _ = evaluate.load_trained(str(workdir))
    stats, num_images = _pycocotools_stats(config, task, variables)
    assert metrics["num_examples"] == num_images == 8
    for prefix in ("box", "mask"):
        # COCOeval.stats: AP, AP50, AP75, AP small/medium/large, AR1, AR10, AR100.
        for key, value in zip(("AP", "AP50", "AP75"), stats[prefix][:3], strict=True):
            np.testing.assert_allclose(metrics[f"{prefix}_{key}"], value, atol=1e-12, err_msg=key)
        for key, value in zip(("AR1", "AR10", "AR100"), stats[prefix][6:9], strict=True):
            np.testing.assert_allclose(metrics[f"{prefix}_{key}"], value, atol=1e-12, err_msg=key)
    # The short run finds some shapes, so the comparison is not of zeros.
    assert metrics["box_AP50"] > 0 and metrics["mask_AP50"] > 0
    pictures = sorted(name for name in os.listdir(os.path.join(workdir, "eval")) if ".png" in name)
    assert pictures == ["example_00.png"]  # num_eval_images = 1


def test_c4_trains_end_to_end(runner, tmp_path):
    # configs/maskrcnn_c4.py itself, shrunk as the FPN runs are (its anchors scaled
    # down to the 64-pixel images).
    maskrcnn_c4 = runner.with_config("maskrcnn_c4.py", TINY_MASKRCNN)
    maskrcnn_c4.run(
        tmp_path, checkpoint_every_steps=4, **{"model.anchor_sizes": C4["model.anchor_sizes"]}
    )
    losses = _logged_losses(tmp_path)
    assert sorted(losses) == [2, 4] and all(np.isfinite(list(losses.values())))
    evals = [r for r in _train_log(tmp_path) if "eval" in r]
    assert [r["step"] for r in evals] == [4]
    assert 0 <= evals[0]["eval"]["mask_AP"] <= 1
    config, task, _, step = evaluate.load_trained(str(tmp_path))
    assert step == 4 and config.model.roi_heads == "c4" and task.model.mask_size == 14


# Trains a few steps of the shrunken config on one of the faked devices, and with
# each of the parallelisms named in argv[3] ("jit", "pmap") over all of them, from
# the same state and batch, and writes the losses and the largest parameter
# differences to a JSON file. (Whole train.py runs on several devices are covered
# by tests/train/test_parallel.py.)
_PARALLEL_DRIVER = """
import ast, functools, json, sys
import jax, numpy as np
from configs import maskrcnn
from jfcnn import data as data_lib, tasks, train
from jfcnn.train_state import create_train_state

config = maskrcnn.get_config()
config.update_from_flattened_dict(ast.literal_eval(sys.argv[1]))
metadata = data_lib.dataset_metadata(config)
batch = next(data_lib.create_train_iterator(config, instances=True))
rng = jax.random.PRNGKey(config.seed)
runs = {}
for name in ("one", *sys.argv[3].split(",")):
    config.parallelism = "pmap" if name == "pmap" else "jit"
    parallelism = None if name == "one" else train.get_parallelism(config)
    axis_name = parallelism.axis_name if parallelism else None
    task = tasks.get_task(config, metadata, axis_name=axis_name)
    tx, schedule = train.create_optimizer(config)
    init = jax.jit(functools.partial(create_train_state, task, tx))
    state = init.lower(rng).compile(compiler_options=train.FAST_COMPILE)(rng)
    step_fn = train.make_train_step(task, tx, schedule, axis_name=axis_name)
    if parallelism is None:
        device = jax.devices()[0]
        state, inputs = jax.device_put(state, device), jax.device_put(batch, device)
        step, host = jax.jit(step_fn), jax.device_get
    else:
        step = parallelism.compile_step(step_fn)
        state, inputs = parallelism.put_state(state), parallelism.put_batch(batch)
        host = parallelism.host_metrics
    losses = []
    for _ in range(2):
        state, metrics = step(state, inputs)
        losses.append(float(host(metrics)["loss"]))
    state = state if parallelism is None else parallelism.unreplicate(state)
    runs[name] = (losses, jax.tree.leaves(jax.device_get((state.params, state.model_state))))
one_losses, reference = runs["one"]
report = {"devices": jax.device_count(), "losses": {k: v[0] for k, v in runs.items()}}
for name in sys.argv[3].split(","):
    pairs = list(zip(runs[name][1], reference, strict=True))
    report[name + "_max_abs"] = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    report[name + "_max_rel"] = max(
        float(np.max(np.abs(a - b) / (2e-4 * np.abs(b) + 2e-5))) for a, b in pairs
    )
with open(sys.argv[2], "w") as f:
    json.dump(report, f)
"""

PLAIN_SGD = {"optimizer": "sgd", "learning_rate": 0.02, "lr_schedule": "constant"}
# 32 x 32 images (the smallest the FPN's stride-32 level takes): faked
# devices on two cores spend most of the time in cross-device synchronization,
# and smaller steps keep the two parity runs to about a minute each.
PARITY_SIZE = {"data.image_size": 32}


# ResNet-C4 under pmap only: jit partitions the same global-batch program
# whatever the heads, while pmap's batch norm reduces over the named axis, which
# the C4 design also uses in its ROI heads (res5, per ROI).
@pytest.mark.parametrize(
    "overrides, parallelisms", [({}, ("jit", "pmap")), (C4, ("pmap",))], ids=["fpn", "c4"]
)
def test_jit_and_pmap_on_four_devices_match_one_device(maskrcnn, overrides, parallelisms, tmp_path):
    # SGD: Adam's g / sqrt(v) turns summation-order noise in near-zero gradients
    # into full-size steps, which would hide real differences behind a loose tolerance.
    values = {
        **TINY_MASKRCNN,
        **PARITY_SIZE,
        "data.data_dir": maskrcnn.data_dir,
        **overrides,
        **PLAIN_SGD,
    }
    assert ast.literal_eval(repr(values)) == values
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _PARALLEL_DRIVER,
            repr(values),
            str(tmp_path / "report.json"),
            ",".join(parallelisms),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=maskrcnn.many_devices,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["devices"] == maskrcnn.faked_devices
    losses = report["losses"]
    # Same per-example keys and per-image losses; only the order of sums differs.
    assert sorted(losses) == sorted(("one", *parallelisms))
    for name in parallelisms:
        np.testing.assert_allclose(losses[name], losses["one"], rtol=1e-5, err_msg=name)
    assert losses["one"][-1] < losses["one"][0]  # it trained
    # |ours - reference| <= 2e-4 |reference| + 2e-5 for every parameter and statistic.
    assert all(report[name + "_max_rel"] <= 1.0 for name in parallelisms), report
