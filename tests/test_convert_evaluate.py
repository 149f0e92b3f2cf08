"""``python -m jfcnn.evaluate`` on a converted torchvision Mask R-CNN scores as pycocotools
scores torchvision's own predictions.

torchvision's ``maskrcnn_resnet50_fpn`` with the parity tests' calibrated random
weights (``tests/torchvision_maskrcnn.py``) is saved, converted with ``python -m
jfcnn.convert`` (torchvision's resize at a short side of 160, a long side of at
most 256, as the predict parity test, to stay cheap) and evaluated with ``python
-m jfcnn.evaluate --data name=coco_json ...`` on a small COCO JSON file: a few
generated photos whose ground truth is torchvision's own confident detections
(score > 0.5, masks thresholded at 0.5 of at least `MIN_AREA` pixels, COCO's
category ids), every third left out so that high-scoring false positives make
the AP depend on the ranking, not only on finding the objects (and no
detection near-tied in score with one on the other side, `_ground_truth`).
The reference is pycocotools' COCOeval run on that file with torchvision's
predictions for the same images (``model(images)``: boxes scaled back and masks
pasted at the original resolution, which is where jfcnn's ``coco_json``
evaluation scores too).

An image whose resized side ends at the edge of torchvision's padded batch (a side
that is a multiple of 32, e.g. the short side of every image that ``min_size``
binds, 160 here, or COCO's 800) lies on jfcnn's larger square canvas (``max_size``
rounded up to 32) with more feature map past that edge; ROI Align is told where
torchvision's maps end (its ``valid_hw``) and clamps its samples there as
torchvision does. Before it was, a 150 x 150 photo (160 x 160 on a canvas of 256)
changed a detection's box by 5 pixels and box AP from 0.84 to 0.65 in this test;
that case is tested, more cheaply, in tests/test_convert_parity.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import coco_json_files
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jfcnn import convert
from jfcnn.data.coco import THING_CLASS_NAMES

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torchvision_maskrcnn import build_torchvision_model, photo  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_SIZE, MAX_SIZE = 160, 256
# (height, width, seed) of the photos, landscape and portrait, resized up to a long side
# of 256 (142 x 256, 256 x 140, 135 x 256), with tens of confident detections between them.
# Their short sides end inside torchvision's padded batch (160 and 160 x 256); an image
# ending at its edge is tested in tests/test_convert_parity.py (module docstring).
PHOTOS = [(100, 180, 31), (200, 110, 32), (90, 170, 23)]
GROUND_TRUTH_SCORE = 0.5
# Ground truth masks have at least this many pixels: jfcnn's masks are torchvision's up to
# a pixel here and there, which in a smaller mask could cross COCO's top IoU threshold 0.95.
MIN_AREA = 100
# Scores closer than this count as tied (jfcnn's are torchvision's within ~1e-4).
TIE = 2e-3
# jfcnn's detections are torchvision's to float precision (tests/test_convert_parity.py)
# and the ground truth is chosen so that near-ties in score and in mask IoU cannot turn
# a true positive into a false one (`_ground_truth`, MIN_AREA): the numbers should agree
# exactly (they did, to the last bit, when this was written). The tolerance is far
# below what one detection changes: one true positive of G ground truth objects of a
# class, among C classes, lost at one of the 10 IoU thresholds moves AP by about
# 1 / (10 G C), 3e-4 even for this data's largest class (G ~ 30, C ~ 10).
TOLERANCE = 1e-5
STATS = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100"]


def _torchvision_predictions(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """torchvision's detections of one uint8 image, at its original resolution, COCO's
    classes only (the slots of unused category ids, "N/A", are not classes of the file)."""
    tensor = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
    with torch.no_grad():
        out = model([tensor])[0]
    keep = np.isin(out["labels"].numpy(), convert.COCO_CATEGORY_IDS)
    return {
        "boxes": out["boxes"].numpy()[keep],
        "scores": out["scores"].numpy()[keep],
        "labels": out["labels"].numpy()[keep],
        "masks": out["masks"][:, 0].numpy()[keep] >= 0.5,
    }


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _xywh(box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _ground_truth(results: list[dict]) -> list[bool]:
    """Which detections become ground truth: the candidates, but of each class only
    whole runs of detections whose scores follow each other within `TIE`, so that
    jfcnn's scores (torchvision's to ~1e-4) cannot rank a false positive above a true
    positive that torchvision ranks below it."""
    truth = [False] * len(results)
    for category in {r["category_id"] for r in results}:
        order = sorted(
            (i for i, r in enumerate(results) if r["category_id"] == category),
            key=lambda i: -results[i]["score"],
        )
        run = [order[0]]
        for i in [*order[1:], None]:
            if i is not None and results[run[-1]]["score"] - results[i]["score"] < TIE:
                run.append(i)
                continue
            keep = all(results[j]["candidate"] for j in run)
            for j in run:
                truth[j] = keep
            run = [i]
    return truth


def _cocoeval(annotation_file: str, results: list[dict], iou_type: str) -> COCOeval:
    """COCOeval as its users run it; for masks the box is left out, so that a detection's
    area is its mask's (as tests/tasks/test_coco_json_eval.py and detectron2 do)."""
    ground_truth = COCO(annotation_file)
    results = copy.deepcopy(results)
    for result in results:
        result.pop("bbox" if iou_type == "segm" else "segmentation")
    coco_eval = COCOeval(ground_truth, ground_truth.loadRes(results), iou_type)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    """The COCO JSON set, torchvision's predictions on it, and jfcnn's eval/metrics.json."""
    root = tmp_path_factory.mktemp("convert_evaluate")
    model = build_torchvision_model()
    model.transform.min_size, model.transform.max_size = (MIN_SIZE,), MAX_SIZE
    weights = str(root / "maskrcnn.pth")
    torch.save(model.state_dict(), weights)

    image_dir = root / "images"
    image_dir.mkdir()
    images, results = [], []
    for index, (height, width, seed) in enumerate(PHOTOS):
        pixels = np.round(photo(height, width, seed) * 255).astype(np.uint8)
        image_id = 500 + 3 * index
        file_name = f"photo_{index}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        predicted = _torchvision_predictions(model, pixels)
        for n, (box, score, label, mask) in enumerate(zip(*predicted.values(), strict=True)):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "score": float(score),
                    "bbox": _xywh(box),
                    "segmentation": _rle(mask),
                    "area": float(mask.sum()),
                    # Detections come in descending score order: the confident ones first.
                    "candidate": bool(
                        score > GROUND_TRUTH_SCORE and n % 3 != 2 and mask.sum() >= MIN_AREA
                    ),
                }
            )
    annotations = []
    for result, truth in zip(results, _ground_truth(results), strict=True):
        area = result.pop("area")
        del result["candidate"]
        if truth:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": result["image_id"],
                    "category_id": result["category_id"],
                    "segmentation": result["segmentation"],
                    "area": area,
                    "bbox": result["bbox"],
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": category, "name": name}
        for category, name in zip(convert.COCO_CATEGORY_IDS, THING_CLASS_NAMES, strict=True)
    ]
    annotation_file = str(root / "photos.json")
    coco_json_files.write_json(
        annotation_file, {"images": images, "categories": categories, "annotations": annotations}
    )

    workdir = str(root / "converted")
    converted = subprocess.run(
        [
            sys.executable,
            "-m",
            "jfcnn.convert",
            "--torchvision=maskrcnn_resnet50_fpn",
            f"--weights={weights}",
            f"--workdir={workdir}",
            f"--min_size={MIN_SIZE}",
            f"--max_size={MAX_SIZE}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    # The converted run's data is COCO; these flags score it on the COCO JSON file
    # instead (coco_json reads a train and an eval file: the same one twice here).
    data = {
        "name": "coco_json",
        "train_annotations": annotation_file,
        "train_images": str(image_dir),
        "eval_annotations": annotation_file,
        "eval_images": str(image_dir),
    }
    evaluated = subprocess.run(
        [
            sys.executable,
            "-m",
            "jfcnn.evaluate",
            "--workdir",
            workdir,
            "--data_dir",
            str(root / "tfds"),
            *[f"--data={key}={value}" for key, value in data.items()],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-5000:]
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    return {
        "annotation_file": annotation_file,
        "annotations": annotations,
        "results": results,
        "metrics": metrics,
    }


@pytest.mark.parametrize(("prefix", "iou_type"), [("box", "bbox"), ("mask", "segm")])
def test_converted_workdir_scores_as_pycocotools_scores_torchvision(scored, prefix, iou_type):
    metrics = scored["metrics"]
    assert metrics["num_examples"] == len(PHOTOS) and metrics["step"] == 0
    assert len(scored["annotations"]) >= 8
    reference = _cocoeval(scored["annotation_file"], scored["results"], iou_type)
    got = {key: metrics[f"{prefix}_{key}"] for key in STATS}
    want = {key: reference.stats[index] for index, key in enumerate(STATS)}
    for key in STATS:
        if want[key] == -1:  # Undefined in COCOeval (no objects of that size): NaN -> null.
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(want[key], abs=TOLERANCE), key
    # The left-out third of the confident detections are false positives among the
    # true ones: the AP depends on the ranking and is neither 0 nor 1.
    assert 0.5 < got["AP"] < 0.95, got["AP"]
