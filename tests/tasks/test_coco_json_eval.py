"""Training on COCO-format JSON and scoring against the user's own annotation file.

One tiny run of ``train.py --config configs/maskrcnn_coco_json.py`` on the
export of tests/coco_json_files.py (polygons, RLE, a crowd region, category
ids 3 and 7, an image without objects); then the evaluation's metrics.json
(``python -m jfcnn.evaluate``) must hold exactly what pycocotools' COCOeval
gives when run directly on the eval JSON with the predictions.json that
``python -m jfcnn.predict`` writes for the eval images from the same
checkpoint.
"""

from __future__ import annotations

import copy
import json
import os

import coco_json_files as files
import numpy as np
import pytest
import tiny_configs
from conftest import Runner
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jfcnn import evaluate, predict
from jfcnn.data import DatasetMetadata
from jfcnn.errors import ConfigError
from jfcnn.tasks import instance

pytestmark = pytest.mark.slow

# configs/maskrcnn_coco_json.py shrunk to train in seconds on 2 CPU cores.
TINY = {
    "data.image_size": 64,
    "data.shuffle_buffer": 8,
    "data.max_instances": 8,
    "data.cache": True,
    **tiny_configs.config_overrides(tiny_configs.MASKRCNN),
    "batch_size": 4,
    "num_train_steps": 60,
    "learning_rate": 5e-3,
    "warmup_steps": 5,
    "log_every_steps": 30,
    "eval_every_steps": 60,
    "checkpoint_every_steps": 60,
    "num_eval_images": 1,
}
STATS = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The export, a trained work directory, and its eval/metrics.json."""
    root = str(tmp_path_factory.mktemp("coco_json"))
    export = files.write_dataset(os.path.join(root, "export"))
    runner = Runner(os.path.join(root, "tfds"), "maskrcnn_coco_json.py", TINY)
    workdir = os.path.join(root, "workdir")
    paths = {f"data.{key}": export[key] for key in ("train_annotations", "train_images")}
    paths.update({f"data.{key}": export[key] for key in ("eval_annotations", "eval_images")})
    runner.run(workdir, **paths)
    # What `python -m jfcnn.evaluate --workdir W` runs, in this process.
    evaluate.evaluate_workdir(workdir)
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    return {"export": export, "workdir": workdir, "metrics": metrics}


def _predict(workdir: str, image_dir: str, out: str) -> list[dict]:
    """What ``python -m jfcnn.predict --score_threshold 0 --output OUT EVAL_IMAGES`` writes
    (its own functions, in this process: the test saves a second JAX start)."""
    inputs, problems = predict.collect_inputs([image_dir])
    assert not problems
    with predict.Predictor(workdir, score_threshold=0.0, batch_size=TINY["batch_size"]) as model:
        assert predict.predict_to_directory(model, inputs, out, progress=False) == 0
    with open(os.path.join(out, predict.PREDICTIONS_FILE)) as f:
        return json.load(f)


def _cocoeval(annotation_file: str, results: list[dict], iou_type: str) -> COCOeval:
    """COCOeval as its users run it; for masks the box is left out, so that a
    detection's area is its mask's (as detectron2's COCO evaluation does)."""
    ground_truth = COCO(annotation_file)
    results = copy.deepcopy(results)
    for result in results:
        result.pop("bbox" if iou_type == "segm" else "segmentation")
    coco_eval = COCOeval(ground_truth, ground_truth.loadRes(results), iou_type)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def test_metrics_equal_cocoeval_on_the_users_file_with_the_predictions(run, tmp_path):
    export, metrics = run["export"], run["metrics"]
    annotation_file = export["eval_annotations"]
    predictions = _predict(run["workdir"], export["eval_images"], str(tmp_path / "predictions"))
    coco = files.read_json(annotation_file)
    image_ids = {image["file_name"]: image["id"] for image in coco["images"]}
    results = [
        {
            "image_id": image_ids[p["file_name"]],
            "category_id": p["category_id"],
            "score": p["score"],
            "bbox": p["bbox"],
            "segmentation": p["segmentation"],
        }
        for p in predictions
    ]
    assert {p["category_id"] for p in predictions} <= {files.SQUARE, files.DISK}
    assert metrics["num_examples"] == len(coco["images"])

    for prefix, iou_type in (("box", "bbox"), ("mask", "segm")):
        reference = _cocoeval(annotation_file, results, iou_type)
        for index, key in enumerate(STATS):
            expected = reference.stats[index]
            got = metrics[f"{prefix}_{key}"]
            if expected == -1:  # Undefined in COCOeval (e.g. no large objects): NaN -> null.
                assert got is None, (prefix, key)
            else:
                assert got == pytest.approx(expected, abs=1e-12), (prefix, key)
        # Per class, in the file's category id order: square (3), disk (7).
        precision = reference.eval["precision"][:, :, :, 0, -1]
        for k, name in enumerate(["square", "disk"]):
            defined = precision[:, :, k][precision[:, :, k] > -1]
            assert metrics[f"{prefix}_AP_per_class"][name] == pytest.approx(defined.mean())
    # Trained long enough to find the objects, so the comparison is not of zeros.
    assert metrics["mask_AP50"] > 0.1 and metrics["box_AP50"] > 0.1


def test_metrics_have_the_keys_of_canvas_evaluation(run):
    canvas = instance.CocoEvaluator(files.CLASS_NAMES, 0).result()
    assert set(canvas) <= set(run["metrics"])
    with open(os.path.join(run["workdir"], "dataset.json")) as f:
        metadata = json.load(f)
    assert metadata["class_names"] == list(files.CLASS_NAMES)
    assert metadata["category_ids"] == list(files.CATEGORY_IDS)


def _one_image_outputs(num_detections: int = 2, mask_size: int = 4) -> dict[str, np.ndarray]:
    return {
        "boxes": np.array([[[4.0, 4.0, 20.0, 20.0], [30.0, 30.0, 40.0, 44.0]]]),
        "scores": np.array([[0.9, 0.4]]),
        "classes": np.array([[1, 2]]),
        "detection_valid": np.array([[True, True]]),
        "mask_probs": np.ones((1, num_detections, mask_size, mask_size), np.float32),
        "masks": np.zeros((1, num_detections, 64, 64), np.uint8),
    }


def test_evaluator_maps_detections_to_the_files_ids_and_original_pixels(run):
    export = run["export"]
    metadata = DatasetMetadata(
        name="coco_json",
        num_classes=3,
        class_names=files.CLASS_NAMES,
        image_size=64,
        num_train_examples=8,
        num_eval_examples=4,
        has_instances=True,
        category_ids=files.CATEGORY_IDS,
        keep_aspect=True,
    )
    evaluator = instance.AnnotationFileEvaluator(export["eval_annotations"], metadata, 0)
    image = files.read_json(export["eval_annotations"])["images"][1]  # 64 wide, 88 high
    batch = {
        "image_id": np.array([image["id"]]),
        "original_size": np.array([[image["height"], image["width"]]]),
        "resized_size": np.array([[64, 47]]),
        "valid": np.array([True]),
    }
    evaluator.update(_one_image_outputs(), batch)
    detections = evaluator.coco_detections()
    assert [d["category_id"] for d in detections] == [3, 7]  # class ids 1, 2 -> the file's ids
    assert all(d["image_id"] == image["id"] for d in detections)
    # Boxes scaled from the 47 x 64 canvas image back to 64 x 88.
    sx, sy = 64 / 47, 88 / 64
    np.testing.assert_allclose(detections[0]["bbox"], [4 * sx, 4 * sy, 16 * sx, 16 * sy])
    assert detections[0]["segmentation"]["size"] == [88, 64]

    # Images of another file: stopped, not scored against ids that merely match.
    wrong = dict(batch, original_size=np.array([[64, 64]]))
    with pytest.raises(ConfigError, match="the eval images are not that file's"):
        evaluator.update(_one_image_outputs(), wrong)
