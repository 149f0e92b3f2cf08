"""Semantic segmentation: U-Net model, pixel losses, confusion-matrix metrics.

``SemanticSegmentationTask`` tells the generic loop in ``jfcnn.train`` what to
build and how to score it (the ``jfcnn.tasks.Task`` contract); the loop itself
(parallelism, checkpoints, logging) knows nothing of segmentation. The metrics
(mIoU, pixel accuracy, Dice) come from one confusion matrix accumulated over
the whole split, never from an average of per-batch scores; Boundary IoU
likewise from per-class boundary intersections and unions summed over the
split.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jfcnn import visualize
from jfcnn.models.unet import UNet
from jfcnn.tasks.base import build_model


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


# Boundary IoU's band width as a fraction of the image diagonal (Cheng et al. 2021).
BOUNDARY_DILATION_RATIO = 0.02


def boundary_width(height: int, width: int, ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Boundary IoU's band width ``d`` in pixels: ``ratio`` of the image diagonal, at least 1.

    Rounded as in the paper's code: 64x64 images give ``d = 2``, 512x512 give 14.
    """
    return max(1, int(round(ratio * math.hypot(height, width))))


def mask_boundary(masks_bhwk: jax.Array, d: int) -> jax.Array:
    """The pixels of each mask within Chebyshev distance ``d`` of its contour.

    A pixel is in the boundary of its mask if some pixel at most ``d`` rows
    and ``d`` columns away is outside the mask or outside the image, the
    paper's ``mask - erode(mask, 3x3 kernel, d times)`` with a zero border.
    Computed as a (separable) max-pool of the mask's complement padded with
    ones, so it is static-shaped and jit-able.

    Args:
      masks_bhwk: bool ``(B, H, W, K)``, one mask per image and channel.
      d: band width in pixels, ``>= 1``.

    Returns:
      bool ``(B, H, W, K)``, a subset of ``masks_bhwk``.
    """
    outside = jnp.pad(
        (~masks_bhwk).astype(jnp.int32), ((0, 0), (d, d), (d, d), (0, 0)), constant_values=1
    )
    for window in ((1, 2 * d + 1, 1, 1), (1, 1, 2 * d + 1, 1)):
        outside = jax.lax.reduce_window(outside, 0, jax.lax.max, window, (1, 1, 1, 1), "VALID")
    return masks_bhwk & (outside > 0)


def boundary_counts(
    labels: jax.Array,
    predictions: jax.Array,
    num_classes: int,
    d: int,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-class Boundary IoU intersection and union counts of a batch; jit-able.

    For class ``k``, the ground-truth mask is ``labels == k`` and the
    predicted mask ``predictions == k``; their boundaries (:func:`mask_boundary`)
    are intersected and united, and the pixels counted. Pixels whose label
    is not in ``[0, K)`` (the ignore label) are left out of both masks (so
    they are outside both, and a prediction right on every labelled pixel
    scores 1) and are not counted; nor are examples of weight 0 (padding).

    Args:
      labels: int ``(B, H, W)``.
      predictions: int ``(B, H, W)``.
      num_classes: K.
      d: band width in pixels (:func:`boundary_width`).
      weights: optional, broadcastable to ``labels``.

    Returns:
      ``(intersection, union)``, each int32 ``(K,)``, summed over the batch.
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    counted = (labels >= 0) & (labels < num_classes)
    if weights is not None:
        counted &= jnp.broadcast_to(weights, labels.shape) > 0
    labelled = ((labels >= 0) & (labels < num_classes))[..., None]
    truth = mask_boundary(labels[..., None] == classes, d)
    predictions = jnp.asarray(predictions).astype(jnp.int32)
    predicted = mask_boundary((predictions[..., None] == classes) & labelled, d)
    counted = counted[..., None]
    intersection = jnp.sum(truth & predicted & counted, axis=(0, 1, 2), dtype=jnp.int32)
    union = jnp.sum((truth | predicted) & counted, axis=(0, 1, 2), dtype=jnp.int32)
    return intersection, union


def boundary_iou(intersection: np.ndarray, union: np.ndarray) -> dict[str, float | list[float]]:
    """Boundary IoU per class and its mean over classes with a non-empty union (as mIoU)."""
    intersection = np.asarray(intersection, np.float64)
    union = np.asarray(union, np.float64)
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, intersection / union, np.nan)
    return {
        "boundary_iou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "per_class_boundary_iou": [float(v) for v in iou],
    }


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over each example's labelled pixels, shape ``(B,)``.

    Pixels whose label is not a class id in ``[0, K)`` (the ignore label,
    padding) are left out; an example without labelled pixels has loss 0.
    Per example, so that the batch mean decomposes over devices.
    """
    num_classes = logits.shape[-1]
    labelled = (labels >= 0) & (labels < num_classes)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(labelled, labels, 0)
    )
    count = jnp.sum(labelled, axis=(1, 2))
    return jnp.sum(jnp.where(labelled, per_pixel, 0.0), axis=(1, 2)) / jnp.maximum(count, 1)


def soft_dice_loss(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """``1 - mean Dice`` of softmax probabilities, per example, shape ``(B,)``.

    Pixels whose label is not in ``[0, num_classes)`` (the ignore label) count
    neither in the prediction nor in the ground truth. Computed per example
    (not over the batch) so that it decomposes over devices: the mean over a
    sharded batch equals the single-device value.
    """
    labelled = (labels >= 0) & (labels < num_classes)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * labelled[..., None]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    intersection = jnp.sum(probs * onehot, axis=(1, 2))
    denominator = jnp.sum(probs, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
    dice = (2.0 * intersection + 1.0) / (denominator + 1.0)
    return 1.0 - jnp.mean(dice, axis=-1)


class SemanticSegmentationTask:
    """Per-pixel classification with a U-Net."""

    name = "semantic"
    # The registry of this task's models: config.model.name -> flax module.
    models: dict[str, type[nn.Module]] = {"unet": UNet}
    needs_instances = False  # Images and per-pixel labels are all it reads.

    def __init__(self, config: ml_collections.ConfigDict, metadata: Any, *, axis_name=None):
        self.config = config
        self.metadata = metadata
        self.num_classes = metadata.num_classes
        self.model = build_model(config, self.num_classes, self.models, bn_axis_name=axis_name)

    # -- model -------------------------------------------------------------
    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        size = self.config.data.image_size
        dummy = jnp.zeros((1, size, size, 3), jnp.float32)
        return dict(self.model.init(rng, dummy, train=False))

    def _apply(self, params, model_state, images, *, train: bool):
        variables = {"params": params, **model_state}
        if train and model_state:
            logits, new_state = self.model.apply(
                variables, images, train=True, mutable=list(model_state)
            )
            return logits, dict(new_state)
        return self.model.apply(variables, images, train=train), model_state

    # -- training ----------------------------------------------------------
    def loss_fn(self, params, model_state, batch, example_keys):
        """Mean loss over the (local) batch, new model state, and metrics."""
        del example_keys  # The U-Net has no stochastic layers.
        logits, new_state = self._apply(params, model_state, batch["image"], train=True)
        logits = logits.astype(jnp.float32)
        labels = batch["mask"]
        cross_entropy = pixel_cross_entropy(logits, labels)
        loss = cross_entropy
        metrics = {"cross_entropy": cross_entropy.mean()}
        if self.config.loss.get("dice_weight", 0.0):
            dice = soft_dice_loss(logits, labels, self.num_classes)
            loss = loss + self.config.loss.dice_weight * dice
            metrics["dice_loss"] = dice.mean()
        labelled = (labels >= 0) & (labels < self.num_classes)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) & labelled)
        metrics["pixel_accuracy"] = correct / jnp.maximum(jnp.sum(labelled), 1)
        return loss.mean(), (new_state, metrics)

    # -- evaluation --------------------------------------------------------
    def eval_step(self, variables, batch) -> dict[str, jax.Array]:
        params = variables["params"]
        model_state = {k: v for k, v in variables.items() if k != "params"}
        logits, _ = self._apply(params, model_state, batch["image"], train=False)
        predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        valid = batch["valid"].astype(jnp.float32)
        pixel_ce = pixel_cross_entropy(logits, batch["mask"])
        height, width = batch["mask"].shape[1:3]
        boundary_intersection, boundary_union = boundary_counts(
            batch["mask"],
            predictions,
            self.num_classes,
            boundary_width(height, width),
            weights=valid[:, None, None],
        )
        return {
            "confusion": confusion_matrix(
                batch["mask"], predictions, self.num_classes, weights=valid[:, None, None]
            ),
            "boundary_intersection": boundary_intersection,
            "boundary_union": boundary_union,
            "loss_sum": jnp.sum(pixel_ce * valid),
            "count": jnp.sum(valid),
            "predictions": predictions,
        }

    def new_evaluator(self, num_images: int) -> SemanticEvaluator:
        return SemanticEvaluator(self.num_classes, num_images)


class SemanticEvaluator:
    """Accumulates eval-step outputs over a split on the host."""

    def __init__(self, num_classes: int, num_images: int):
        self.num_classes = num_classes
        self.num_images = num_images
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.boundary_intersection = np.zeros(num_classes, np.int64)
        self.boundary_union = np.zeros(num_classes, np.int64)
        self.loss_sum = 0.0
        self.count = 0.0
        self.images: list[np.ndarray] = []

    def update(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> None:
        self.confusion += np.asarray(outputs["confusion"], np.int64)
        self.boundary_intersection += np.asarray(outputs["boundary_intersection"], np.int64)
        self.boundary_union += np.asarray(outputs["boundary_union"], np.int64)
        self.loss_sum += float(outputs["loss_sum"])
        self.count += float(outputs["count"])
        for i in np.flatnonzero(batch["valid"]):
            if len(self.images) >= self.num_images:
                break
            self.images.append(
                visualize.segmentation_panel(
                    batch["image"][i],
                    batch["mask"][i],
                    np.asarray(outputs["predictions"][i]),
                    self.num_classes,
                )
            )

    def result(self) -> dict[str, Any]:
        result = segmentation_metrics(self.confusion)
        result.update(boundary_iou(self.boundary_intersection, self.boundary_union))
        result["loss"] = self.loss_sum / max(self.count, 1.0)
        result["num_examples"] = int(self.count)
        return result
