"""Segmentation metrics from a confusion matrix accumulated over a whole split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, num_classes: int, weights: jax.Array | None = None
) -> jax.Array:
    """Counts ``(label, prediction)`` pairs; static-shaped, jit-able.

    Args:
      labels: int array of any shape with values in ``[0, num_classes)``;
        other values (e.g. an ignore label) are not counted.
      predictions: int array of the same shape.
      num_classes: K.
      weights: optional array broadcastable to ``labels``; 0 excludes a pixel
        (padded examples of the last evaluation batch).

    Returns:
      ``(K, K)`` int32 matrix, rows are ground truth, columns predictions.
    """
    if weights is not None:
        weights = jnp.broadcast_to(weights, labels.shape).reshape(-1)
    labels = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
    predictions = jnp.asarray(predictions).reshape(-1).astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    if weights is not None:
        valid &= weights > 0
    index = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(valid.astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, float | list[float]]:
    """mIoU, pixel accuracy and Dice from a ``(K, K)`` confusion matrix.

    Classes absent from both ground truth and predictions have no defined IoU;
    they are reported as NaN in ``per_class_iou`` and left out of the means.
    """
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    ground_truth = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    union = ground_truth + predicted - true_positive
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, true_positive / union, np.nan)
        dice = np.where(present, 2 * true_positive / (ground_truth + predicted), np.nan)
    total = confusion.sum()
    return {
        "mean_iou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "mean_dice": float(np.nanmean(dice)) if present.any() else float("nan"),
        "per_class_iou": [float(v) for v in iou],
        "per_class_dice": [float(v) for v in dice],
    }
