import numpy as np
import pytest

from jfcnn.tasks import semantic


def _reference_iou(labels, predictions, num_classes):
    """IoU per class straight from boolean masks (no confusion matrix)."""
    ious = []
    for k in range(num_classes):
        truth, pred = labels == k, predictions == k
        union = np.logical_or(truth, pred).sum()
        ious.append(np.logical_and(truth, pred).sum() / union if union else np.nan)
    return np.array(ious)


def test_confusion_matrix_matches_loop_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(3, 9, 7))
    predictions = rng.integers(0, 4, size=(3, 9, 7))
    expected = np.zeros((4, 4), np.int64)
    for t, p in zip(labels.ravel(), predictions.ravel(), strict=True):
        expected[t, p] += 1
    np.testing.assert_array_equal(semantic.confusion_matrix(labels, predictions, 4), expected)


def test_confusion_matrix_weights_and_ignore_label():
    labels = np.array([[0, 1, 255], [1, 1, 0]])
    predictions = np.array([[0, 0, 1], [1, 1, 1]])
    weights = np.array([[1], [0]])  # Second example is padding.
    confusion = semantic.confusion_matrix(labels, predictions, 2, weights=weights)
    np.testing.assert_array_equal(confusion, [[1, 0], [1, 0]])


def test_segmentation_metrics_against_mask_reference():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=(200,))
    predictions = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, size=(200,)))
    result = semantic.segmentation_metrics(semantic.confusion_matrix(labels, predictions, 3))
    iou = _reference_iou(labels, predictions, 3)
    np.testing.assert_allclose(result["per_class_iou"], iou)
    assert result["mean_iou"] == pytest.approx(np.mean(iou))
    assert result["pixel_accuracy"] == pytest.approx(np.mean(labels == predictions))
    dice = [2 * v / (1 + v) for v in iou]  # Dice = 2 IoU / (1 + IoU) per class.
    assert result["mean_dice"] == pytest.approx(np.mean(dice))


def test_absent_class_is_nan_and_left_out_of_the_mean():
    # Hand-computed: class 0 IoU 1/2 (1 hit, union 2), class 1 IoU 1/2, class 2 absent.
    confusion = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    result = semantic.segmentation_metrics(confusion)
    assert np.isnan(result["per_class_iou"][2])
    assert result["per_class_iou"][:2] == [0.5, 0.5]
    assert result["mean_iou"] == 0.5
    assert result["pixel_accuracy"] == pytest.approx(2 / 3)
