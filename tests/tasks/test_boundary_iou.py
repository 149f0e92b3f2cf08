"""Boundary IoU (Cheng et al. 2021) in the semantic task, against a per-pixel loop reference."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jfcnn.tasks import semantic

IGNORE = 255

# ---------------------------------------------------------------------------
# Reference, from the definition: a pixel of a mask is in its boundary if some
# pixel within CHEBYSHEV distance d (|dy| <= d and |dx| <= d) is outside the
# mask or outside the image. Pixels with the ignore label belong to no mask,
# ground truth or predicted, and are not counted.


def np_boundary(mask_hw: np.ndarray, d: int) -> np.ndarray:
    height, width = mask_hw.shape
    out = np.zeros_like(mask_hw, bool)
    for y in range(height):
        for x in range(width):
            if not mask_hw[y, x]:
                continue
            for dy in range(-d, d + 1):
                for dx in range(-d, d + 1):
                    qy, qx = y + dy, x + dx
                    if not (0 <= qy < height and 0 <= qx < width) or not mask_hw[qy, qx]:
                        out[y, x] = True
    return out


def np_boundary_iou(labels_bhw, predictions_bhw, num_classes, d, valid_b=None):
    """(mean Boundary IoU, per-class list), summing counts over all images first."""
    intersection = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for i, (truth, predicted) in enumerate(zip(labels_bhw, predictions_bhw, strict=True)):
        if valid_b is not None and not valid_b[i]:
            continue
        counted = (truth >= 0) & (truth < num_classes)  # ignored pixels are not counted
        for k in range(num_classes):
            gt_band = np_boundary(truth == k, d)
            # Ignored pixels are outside the predicted masks too.
            pred_band = np_boundary((predicted == k) & (truth >= 0) & (truth < num_classes), d)
            intersection[k] += np.sum(gt_band & pred_band & counted)
            union[k] += np.sum((gt_band | pred_band) & counted)
    per_class = [intersection[k] / union[k] if union[k] else np.nan for k in range(num_classes)]
    return float(np.nanmean(per_class)), per_class


def random_masks(rng, batch, height, width, num_classes, ignore_fraction=0.0):
    """Blobby label maps (random rectangles painted over each other), not pixel noise."""
    out = np.zeros((batch, height, width), np.int32)
    for b in range(batch):
        for _ in range(6):
            y0, x0 = rng.integers(0, height), rng.integers(0, width)
            y1, x1 = y0 + rng.integers(1, height), x0 + rng.integers(1, width)
            out[b, y0:y1, x0:x1] = rng.integers(0, num_classes)
    if ignore_fraction:
        out[rng.random(out.shape) < ignore_fraction] = IGNORE
    return out


def _metrics(labels, predictions, num_classes, d, weights=None):
    intersection, union = jax.jit(semantic.boundary_counts, static_argnums=(2, 3))(
        labels, predictions, num_classes, d, weights
    )
    return semantic.boundary_iou(np.asarray(intersection), np.asarray(union))


# ---------------------------------------------------------------------------


def test_boundary_width_is_two_percent_of_the_diagonal():
    assert semantic.BOUNDARY_DILATION_RATIO == 0.02
    assert semantic.boundary_width(64, 64) == 2  # 0.02 * 90.5 = 1.81
    assert semantic.boundary_width(512, 512) == 14  # 0.02 * 724 = 14.5 -> 14
    assert semantic.boundary_width(10, 10) == 1  # never below one pixel
    assert semantic.boundary_width(300, 400, ratio=0.1) == 50


def test_mask_boundary_golden():
    mask = np.zeros((1, 7, 7, 1), bool)
    mask[0, 1:6, 1:6, 0] = True  # a 5x5 square
    band = np.asarray(semantic.mask_boundary(jnp.asarray(mask), 1))[0, ..., 0]
    expected = mask[0, ..., 0].copy()
    expected[2:5, 2:5] = False  # the interior 3x3 is more than 1 pixel from outside
    np.testing.assert_array_equal(band, expected)
    # d = 2: only the square's centre is 3 pixels from the outside.
    band = np.asarray(semantic.mask_boundary(jnp.asarray(mask), 2))[0, ..., 0]
    assert band.sum() == 24 and not band[3, 3]
    # Image borders count as outside: a full-image mask's band is a frame.
    full = np.ones((1, 7, 7, 1), bool)
    band = np.asarray(semantic.mask_boundary(jnp.asarray(full), 2))[0, ..., 0]
    assert band.sum() == 49 - 9 and not band[2:5, 2:5].any()
    band = np.asarray(semantic.mask_boundary(jnp.asarray(full), 3))[0, ..., 0]
    assert band.sum() == 48 and not band[3, 3]


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("shape", [(9, 9), (8, 13)])
def test_mask_boundary_against_loop(d, shape):
    rng = np.random.default_rng(d)
    masks = random_masks(rng, 3, *shape, 2)[..., None] == 1
    masks = np.concatenate([masks, rng.random(masks.shape) < 0.6], axis=-1)  # pixel noise too
    band = np.asarray(semantic.mask_boundary(jnp.asarray(masks), d))
    for b in range(masks.shape[0]):
        for k in range(masks.shape[-1]):
            np.testing.assert_array_equal(band[b, ..., k], np_boundary(masks[b, ..., k], d))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.1])
def test_boundary_iou_against_loop_reference(seed, ignore_fraction):
    rng = np.random.default_rng(seed)
    num_classes, d = 4, 2
    labels = random_masks(rng, 3, 16, 12, num_classes, ignore_fraction)
    predictions = random_masks(rng, 3, 16, 12, num_classes)
    # Half the predictions close to the truth, so intersections are not all empty.
    predictions[0] = np.where(labels[0] == IGNORE, 0, labels[0])
    predictions[0, 4:8] = rng.integers(0, num_classes)
    valid = np.array([1.0, 1.0, 0.0])  # the last example is padding
    got = _metrics(labels, predictions, num_classes, d, valid[:, None, None])
    mean, per_class = np_boundary_iou(labels, predictions, num_classes, d, valid)
    np.testing.assert_allclose(got["per_class_boundary_iou"], per_class, rtol=1e-12)
    assert got["boundary_iou"] == pytest.approx(mean, rel=1e-12)


def test_perfect_prediction_scores_one():
    rng = np.random.default_rng(3)
    labels = random_masks(rng, 4, 32, 32, 3, ignore_fraction=0.05)
    predictions = np.where(labels == IGNORE, rng.integers(0, 3, labels.shape), labels)
    assert _metrics(labels, predictions, 3, 2)["boundary_iou"] == 1.0


def test_shifted_prediction_loses_much_more_boundary_iou_than_miou():
    labels = np.zeros((1, 64, 64), np.int32)
    labels[0, 16:48, 16:48] = 1
    predictions = np.roll(labels, (3, 3), axis=(1, 2))
    d = semantic.boundary_width(64, 64)
    boundary = _metrics(labels, predictions, 2, d)["boundary_iou"]
    miou = semantic.segmentation_metrics(semantic.confusion_matrix(labels, predictions, 2))[
        "mean_iou"
    ]
    # A 32x32 square shifted 3 pixels down and right: the squares' IoU is 0.70
    # (mIoU 0.79 with the background) but the 2-pixel bands barely overlap
    # (0.25; the background's band includes the image border, where both agree).
    assert miou > 0.75
    assert boundary < 0.3
    assert miou - boundary > 0.45
    assert boundary == pytest.approx(np_boundary_iou(labels, predictions, 2, d)[0])


class _Metadata:
    num_classes = 3


def test_task_eval_step_and_evaluator_report_boundary_iou():
    """Through the task: jit over a batch sharded across all devices, summed over batches."""
    config = ml_collections.ConfigDict(
        {
            "model": {"name": "unet", "depth": 1, "base_width": 4, "norm": "none"},
            "data": {"image_size": 16},
            "loss": {"dice_weight": 0.0},
        }
    )
    task = semantic.SemanticSegmentationTask(config, _Metadata())
    variables = task.init_variables(jax.random.key(0))
    rng = np.random.default_rng(0)
    devices = jax.device_count()
    assert devices == int(os.environ.get("JFCNN_TEST_DEVICES", devices))
    batches = []
    for _ in range(2):
        batch = {
            "image": rng.normal(size=(devices * 2, 16, 16, 3)).astype(np.float32),
            "mask": random_masks(rng, devices * 2, 16, 16, 3, ignore_fraction=0.05),
            "valid": np.ones(devices * 2, np.float32),
        }
        batch["valid"][-1] = 0.0
        batches.append(batch)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    evaluator = task.new_evaluator(0)
    eval_step = jax.jit(task.eval_step)
    all_predictions = []
    for batch in batches:
        outputs = jax.device_get(eval_step(variables, jax.device_put(batch, sharding)))
        evaluator.update(outputs, batch)
        all_predictions.append(outputs["predictions"])
    result = evaluator.result()
    mean, per_class = np_boundary_iou(
        np.concatenate([b["mask"] for b in batches]),
        np.concatenate(all_predictions),
        3,
        semantic.boundary_width(16, 16),
        np.concatenate([b["valid"] for b in batches]),
    )
    np.testing.assert_allclose(result["per_class_boundary_iou"], per_class, rtol=1e-12)
    assert result["boundary_iou"] == pytest.approx(mean, rel=1e-12)
    assert "mean_iou" in result


def test_task_eval_step_on_eight_devices():
    """The same check with the batch split over 8 (faked CPU) devices, in a fresh process."""
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
        "JFCNN_TEST_DEVICES": "8",
    }
    test = f"{__file__}::test_task_eval_step_and_evaluator_report_boundary_iou"
    result = subprocess.run(
        # -n0: the one test in this process, not in workers the addopts would start.
        [sys.executable, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", test],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
