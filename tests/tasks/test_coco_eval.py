"""COCO AP of jfcnn.tasks.instance.CocoEvaluator: hand-built cases and pycocotools on files."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jfcnn.tasks.instance import CocoEvaluator, encode_masks

S = 32
CLASS_NAMES = ("background", "circle", "square", "triangle")
# COCO interpolates precision at 101 recall points 0, 0.01, ..., 1. With recall
# capped at 1/2 and precision 1 up to it, 51 of them (0 .. 0.50) have precision 1.
HALF_RECALL_AP = 51 / 101
# COCOeval's precision tp / (tp + fp + eps) falls short of 1 by ~1e-16.
ONE = pytest.approx(1.0, abs=1e-12)
HALF = pytest.approx(0.5, abs=1e-12)


def box_mask(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    mask = np.zeros((S, S), np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def make_batch(examples: list[list[dict]], *, valid=None, max_instances: int = 4) -> dict:
    """A batch from per-example lists of instances {box, label, [mask], [crowd], [valid]}."""
    b = len(examples)
    batch = {
        "image": np.full((b, S, S, 3), 0.5, np.float32),
        "boxes": np.zeros((b, max_instances, 4), np.float32),
        "labels": np.zeros((b, max_instances), np.int32),
        "instance_masks": np.zeros((b, max_instances, S, S), np.uint8),
        "instance_valid": np.zeros((b, max_instances), bool),
        "crowd": np.zeros((b, max_instances), bool),
        "valid": np.ones(b, bool) if valid is None else np.asarray(valid),
    }
    for i, instances in enumerate(examples):
        for k, inst in enumerate(instances):
            batch["boxes"][i, k] = inst["box"]
            batch["labels"][i, k] = inst["label"]
            batch["instance_masks"][i, k] = (
                inst["mask"] if "mask" in inst else box_mask(*inst["box"])
            )
            batch["crowd"][i, k] = inst.get("crowd", False)
            batch["instance_valid"][i, k] = inst.get("valid", not inst.get("crowd", False))
    return batch


def make_outputs(examples: list[list[dict]], max_detections: int = 6) -> dict:
    """Outputs from per-example lists of detections {box, label, score, [mask], [valid]}."""
    b = len(examples)
    outputs = {
        "boxes": np.zeros((b, max_detections, 4), np.float32),
        "scores": np.zeros((b, max_detections), np.float32),
        "classes": np.zeros((b, max_detections), np.int32),
        "detection_valid": np.zeros((b, max_detections), bool),
        "masks": np.zeros((b, max_detections, S, S), np.uint8),
    }
    for i, detections in enumerate(examples):
        for k, det in enumerate(detections):
            outputs["boxes"][i, k] = det["box"]
            outputs["scores"][i, k] = det["score"]
            outputs["classes"][i, k] = det["label"]
            outputs["masks"][i, k] = det["mask"] if "mask" in det else box_mask(*det["box"])
            outputs["detection_valid"][i, k] = det.get("valid", True)
    return outputs


def evaluate(batches_and_outputs, num_images: int = 0) -> tuple[dict, CocoEvaluator]:
    evaluator = CocoEvaluator(CLASS_NAMES, num_images=num_images)
    for batch, outputs in batches_and_outputs:
        evaluator.update(outputs, batch)
    return evaluator.result(), evaluator


GROUND_TRUTH = [
    [
        {"box": (2, 3, 12, 15), "label": 1},
        {"box": (14, 4, 30, 12), "label": 2},
        {"box": (5, 20, 20, 30), "label": 1},
    ],
    [{"box": (0, 0, 9, 7), "label": 2}, {"box": (10, 10, 31, 31), "label": 1}],
]


def perfect_detections(ground_truth):
    return [
        [dict(inst, score=0.9 - 0.1 * k) for k, inst in enumerate(instances)]
        for instances in ground_truth
    ]


def test_perfect_detections_score_one():
    result, _ = evaluate(
        [(make_batch(GROUND_TRUTH), make_outputs(perfect_detections(GROUND_TRUTH)))]
    )
    for prefix in ("box", "mask"):
        for key in ("AP", "AP50", "AP75", "AR100"):
            assert result[f"{prefix}_{key}"] == ONE, (prefix, key)
        per_class = result[f"{prefix}_AP_per_class"]
        assert per_class["circle"] == ONE and per_class["square"] == ONE
        assert math.isnan(per_class["triangle"])  # No ground truth of this class.
    assert result["num_examples"] == 2


@pytest.mark.parametrize(
    # Detection (0, 0, 10, y2) of the 10x10 square (0, 0, 10, 10): IoU = 100 / (10 y2).
    "y2, matched_thresholds",
    [(19, 1), (16, 3)],  # IoU 0.526: only at 0.5; IoU 0.625: at 0.5, 0.55, 0.6.
)
def test_one_of_two_objects_found_at_partial_iou(y2, matched_thresholds):
    ground_truth = [[{"box": (0, 0, 10, 10), "label": 1}, {"box": (20, 20, 30, 30), "label": 1}]]
    detections = [[{"box": (0, 0, 10, y2), "label": 1, "score": 0.7}]]
    result, _ = evaluate([(make_batch(ground_truth), make_outputs(detections))])
    for prefix in ("box", "mask"):
        assert result[f"{prefix}_AP50"] == pytest.approx(HALF_RECALL_AP, abs=1e-12)
        assert result[f"{prefix}_AP75"] == 0.0
        # AP averages the 10 IoU thresholds 0.5, 0.55, ..., 0.95.
        expected = matched_thresholds * HALF_RECALL_AP / 10
        assert result[f"{prefix}_AP"] == pytest.approx(expected, abs=1e-12)
        assert result[f"{prefix}_AR100"] == pytest.approx(matched_thresholds * 0.5 / 10)


def test_shifted_masks_lower_mask_ap_only():
    ground_truth = [[{"box": (4, 4, 14, 14), "label": 1}, {"box": (18, 6, 28, 16), "label": 2}]]
    detections = [
        # Exact boxes; masks shifted 2 px right: mask IoU = 80 / 120 = 2/3, which
        # passes the IoU thresholds 0.5, 0.55, 0.6, 0.65 (4 of 10).
        [
            dict(inst, score=0.8, mask=np.roll(box_mask(*inst["box"]), 2, axis=1))
            for inst in ground_truth[0]
        ]
    ]
    result, _ = evaluate([(make_batch(ground_truth), make_outputs(detections))])
    assert result["box_AP"] == ONE and result["box_AP75"] == ONE
    assert result["mask_AP"] == pytest.approx(0.4, abs=1e-12)
    assert result["mask_AP50"] == ONE and result["mask_AP75"] == 0.0


def flat(result: dict) -> dict:
    """The result with the per-class dicts spread into top-level keys."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update({f"{key}/{name}": v for name, v in value.items()})
        else:
            out[key] = value
    return out


def test_padding_examples_and_invalid_detections_are_ignored():
    clean, _ = evaluate(
        [(make_batch(GROUND_TRUTH), make_outputs(perfect_detections(GROUND_TRUTH)))]
    )
    garbage_gt = [{"box": (0, 0, 30, 30), "label": 3}]
    garbage_det = {"box": (1, 1, 20, 20), "label": 2, "score": 0.99}
    detections = perfect_detections(GROUND_TRUTH)
    for dets in detections:
        dets.append(dict(garbage_det, valid=False))  # High-scoring but invalid.
    batch = make_batch([*GROUND_TRUTH, garbage_gt], valid=[True, True, False])
    outputs = make_outputs([*detections, [garbage_det]])
    # Invalid slots may hold anything, including class 0.
    outputs["classes"][0, -1] = 0
    noisy, evaluator = evaluate([(batch, outputs)], num_images=8)
    assert flat(noisy) == pytest.approx(flat(clean), nan_ok=True)
    assert noisy["num_examples"] == 2 and len(evaluator.images) == 2


def test_score_order_matters():
    ground_truth = [[{"box": (4, 4, 14, 14), "label": 1}]]
    false_positive = {"box": (20, 20, 30, 30), "label": 1}
    true_positive = {"box": (4, 4, 14, 14), "label": 1}
    fp_first = [[dict(false_positive, score=0.9), dict(true_positive, score=0.8)]]
    tp_first = [[dict(false_positive, score=0.8), dict(true_positive, score=0.9)]]
    result, _ = evaluate([(make_batch(ground_truth), make_outputs(fp_first))])
    # The TP comes at precision 1/2, and the interpolated precision is 1/2 everywhere.
    assert result["box_AP"] == HALF and result["mask_AP"] == HALF
    result, _ = evaluate([(make_batch(ground_truth), make_outputs(tp_first))])
    assert result["box_AP"] == ONE and result["mask_AP"] == ONE


def test_detections_on_crowd_regions_are_ignored():
    ground_truth = [
        [{"box": (4, 4, 14, 14), "label": 1}, {"box": (16, 16, 32, 32), "label": 1, "crowd": True}]
    ]
    detections = [
        [
            {"box": (18, 18, 28, 28), "label": 1, "score": 0.9},  # inside the crowd region
            {"box": (4, 4, 14, 14), "label": 1, "score": 0.8},
        ]
    ]
    batch, outputs = make_batch(ground_truth), make_outputs(detections)
    result, _ = evaluate([(batch, outputs)])
    assert result["box_AP"] == ONE and result["mask_AP"] == ONE
    # Without the crowd flag the slot is plain padding and the detection an FP.
    del batch["crowd"]
    result, _ = evaluate([(batch, outputs)])
    assert result["box_AP"] == HALF and result["mask_AP"] == HALF


def test_per_class_ap():
    ground_truth = [[{"box": (2, 2, 12, 12), "label": 1}, {"box": (16, 16, 30, 28), "label": 3}]]
    detections = [[{"box": (2, 2, 12, 12), "label": 1, "score": 0.5}]]
    result, _ = evaluate([(make_batch(ground_truth), make_outputs(detections))])
    per_class = result["mask_AP_per_class"]
    assert per_class["circle"] == ONE and per_class["triangle"] == 0.0
    assert math.isnan(per_class["square"])
    assert result["mask_AP"] == HALF and result["box_AP"] == HALF


def test_no_detections_no_ground_truth_no_examples():
    result, _ = evaluate([(make_batch(GROUND_TRUTH), make_outputs([[], []]))])
    for prefix in ("box", "mask"):
        assert result[f"{prefix}_AP"] == result[f"{prefix}_AP50"] == 0.0
        assert result[f"{prefix}_AP_per_class"]["circle"] == 0.0
    # Without ground truth AP is undefined, with or without detections.
    for detections in ([[], []], perfect_detections(GROUND_TRUTH)):
        result, _ = evaluate([(make_batch([[], []]), make_outputs(detections))])
        assert math.isnan(result["box_AP"]) and math.isnan(result["mask_AP"])
        assert result["num_examples"] == 2
    result, _ = evaluate([])
    assert result["num_examples"] == 0 and math.isnan(result["mask_AP50"])


def test_label_and_shape_errors():
    batch = make_batch(GROUND_TRUTH)
    outputs = make_outputs(perfect_detections(GROUND_TRUTH))
    evaluator = CocoEvaluator(CLASS_NAMES, num_images=0)
    with pytest.raises(ValueError, match=r"outputs\['masks'\] must have shape \(2, 6, 32, 32\)"):
        evaluator.update(dict(outputs, masks=outputs["masks"][..., :16]), batch)
    outputs["classes"][0, 0] = 4
    with pytest.raises(ValueError, match="Detected classes must be in 1..3"):
        evaluator.update(outputs, batch)
    with pytest.raises(ValueError, match="background and at least one class"):
        CocoEvaluator(("background",), num_images=0)


# pycocotools.mask.decode predates NumPy 2 copy semantics; harmless here.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_encode_masks_round_trips_asymmetric_masks():
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 7, 11)) < 0.4).astype(np.uint8)
    rles = encode_masks(masks)
    assert all(isinstance(rle["counts"], str) for rle in rles)
    decoded = mask_utils.decode(rles)  # (H, W, N)
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks)
    assert encode_masks(np.zeros((0, 7, 11))) == []


def random_case(rng: np.random.Generator, num_images: int = 4):
    """Random irregular instances and noisy detections (some FPs, some misses, a crowd)."""
    gts, dets = [], []
    for _ in range(num_images):
        instances, detections = [], []
        for k in range(int(rng.integers(0, 5))):
            x1, y1 = rng.integers(0, S - 8, size=2)
            x2, y2 = x1 + rng.integers(4, S - x1 + 1), y1 + rng.integers(4, S - y1 + 1)
            # Irregular mask: the box with random holes; the box is tight around it.
            mask = box_mask(x1, y1, x2, y2) * (rng.random((S, S)) < 0.8)
            ys, xs = np.nonzero(mask)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            crowd = k == 1 and rng.random() < 0.5
            instances.append(
                {"box": box, "label": int(rng.integers(1, 4)), "mask": mask, "crowd": crowd}
            )
            if rng.random() < 0.8:
                jitter = rng.normal(0, 1.5, size=4)
                detections.append(
                    {
                        "box": np.clip(np.array(box) + jitter, 0, S),
                        "label": instances[-1]["label"] if rng.random() < 0.9 else 1,
                        "score": float(rng.random()),
                        "mask": np.roll(mask, int(rng.integers(-2, 3)), axis=1),
                    }
                )
        if rng.random() < 0.7:
            x1, y1 = rng.integers(0, S - 6, size=2)
            detections.append(
                {
                    "box": (x1, y1, x1 + 6, y1 + 6),
                    "label": int(rng.integers(1, 4)),
                    "score": float(rng.random()),
                }
            )
        gts.append(instances)
        dets.append(detections)
    return gts, dets


def reference_stats(tmp_path, batch, outputs, iou_type: str) -> np.ndarray:
    """COCOeval stats from annotation and result JSON files built straight from the arrays."""
    images, annotations, results = [], [], []
    image_id = 0
    for i in range(len(batch["valid"])):
        if not batch["valid"][i]:
            continue
        image_id += 1
        images.append({"id": image_id, "height": S, "width": S})
        for k in range(batch["labels"].shape[1]):
            if not (batch["instance_valid"][i, k] or batch["crowd"][i, k]):
                continue
            rle = mask_utils.encode(np.asfortranarray(batch["instance_masks"][i, k]))
            x1, y1, x2, y2 = (float(v) for v in batch["boxes"][i, k])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(batch["labels"][i, k]),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": int(batch["crowd"][i, k]),
                }
            )
        for d in np.flatnonzero(outputs["detection_valid"][i]):
            result = {
                "image_id": image_id,
                "category_id": int(outputs["classes"][i, d]),
                "score": float(outputs["scores"][i, d]),
            }
            if iou_type == "bbox":
                x1, y1, x2, y2 = (float(v) for v in outputs["boxes"][i, d])
                result["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                rle = mask_utils.encode(np.asfortranarray(outputs["masks"][i, d]))
                result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            results.append(result)
    categories = [{"id": c, "name": CLASS_NAMES[c]} for c in range(1, len(CLASS_NAMES))]
    gt_path, dt_path = tmp_path / f"gt_{iou_type}.json", tmp_path / f"dt_{iou_type}.json"
    gt_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    dt_path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(dt_path)), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


@pytest.mark.parametrize("seed", [0, 1])
def test_random_case_matches_pycocotools_on_json_files(tmp_path, seed):
    rng = np.random.default_rng(seed)
    gts, dets = random_case(rng, num_images=6)
    batch = make_batch(gts, valid=[True] * 5 + [False])
    outputs = make_outputs(dets)
    assert batch["crowd"].any() and outputs["detection_valid"].sum() > 10
    # Two batches of three, so accumulation across updates is exercised.
    halves = [
        ({k: v[:3] for k, v in batch.items()}, {k: v[:3] for k, v in outputs.items()}),
        ({k: v[3:] for k, v in batch.items()}, {k: v[3:] for k, v in outputs.items()}),
    ]
    result, _ = evaluate(halves)
    keys = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")
    for prefix, iou_type in (("box", "bbox"), ("mask", "segm")):
        expected = reference_stats(tmp_path, batch, outputs, iou_type)
        actual = [result[f"{prefix}_{key}"] for key in keys]
        expected = [v if v > -1 else float("nan") for v in expected[: len(keys)]]
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12, err_msg=prefix)
        assert 0.05 < result[f"{prefix}_AP"] < 0.95  # A nontrivial case.
