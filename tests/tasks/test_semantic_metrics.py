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


def _labels_with_ignored_pixels(seed: int, num_classes: int = 3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 5, 6, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(2, 5, 6))
    labels[0, :2] = 255  # the ignore label
    labels[1, 3, 1:4] = -1  # zero padding of a data set with a label offset
    return logits, labels


def test_pixel_cross_entropy_leaves_out_ignored_pixels():
    logits, labels = _labels_with_ignored_pixels(0)
    expected = []
    for b in range(2):
        terms = []
        for y in range(5):
            for x in range(6):
                k = labels[b, y, x]
                if 0 <= k < 3:
                    z = logits[b, y, x].astype(np.float64)
                    terms.append(np.log(np.exp(z).sum()) - z[k])
        expected.append(np.mean(terms))
    got = semantic.pixel_cross_entropy(logits, labels)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Ignored pixels get no gradient; an example without labelled pixels has loss 0.
    import jax

    grad = jax.grad(lambda z: semantic.pixel_cross_entropy(z, labels).sum())(logits)
    assert np.all(np.asarray(grad)[labels == 255] == 0) and np.all(
        np.asarray(grad)[labels == -1] == 0
    )
    assert float(semantic.pixel_cross_entropy(logits, np.full_like(labels, 255))[0]) == 0.0


def test_soft_dice_loss_ignores_pixels_like_cropping_them():
    logits, labels = _labels_with_ignored_pixels(1)
    labels[1] = np.where(labels[1] == -1, 0, labels[1])
    # Example 0 with its two ignored rows is the Dice of the remaining rows alone.
    masked = semantic.soft_dice_loss(logits[:1], labels[:1], 3)
    cropped = semantic.soft_dice_loss(logits[:1, 2:], labels[:1, 2:], 3)
    np.testing.assert_allclose(masked, cropped, rtol=1e-6)
