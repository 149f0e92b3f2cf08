"""Instance segmentation task: Mask R-CNN, detection losses, COCO-style evaluation.

The counterpart of :mod:`jfcnn.semantic` for ``config.task == "instance"``:
it tells the generic loop in ``jfcnn.train`` what to build and how to score
it.

Predicting with a trained run, outside training::

    config, task, variables, step = jfcnn.evaluate.load_trained("runs/maskrcnn")
    detections = jfcnn.instance.predict(task, variables, images)  # (B, S, S, 3) in [0, 1]
    detections["masks"]  # (B, D, S, S) uint8, one pasted mask per detection
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jfcnn.models.build import build_model
from jfcnn.models.maskrcnn import MaskRCNN

MODELS: dict[str, type[nn.Module]] = {"maskrcnn": MaskRCNN}
# The terms of the training loss, in the order they are logged.
LOSS_TERMS = ("rpn_objectness", "rpn_box", "classification", "box_regression", "mask")
# What the evaluator receives of the model's outputs.
EVAL_OUTPUTS = ("boxes", "scores", "classes", "detection_valid", "masks")


def predict(task: InstanceSegmentationTask, variables: Any, images: Any) -> dict[str, jax.Array]:
    """Detections of ``(B, S, S, 3)`` float images in ``[0, 1]`` (jitted).

    Returns the model's outputs: ``boxes`` (B, D, 4) pixel ``(x1, y1, x2,
    y2)``, ``scores`` (B, D), ``classes`` (B, D) int32 class ids (see
    ``task.metadata.class_names``), ``detection_valid`` (B, D) bool, ``masks``
    (B, D, S, S) uint8 0/1 and ``mask_probs`` (B, D, s, s) per-box mask
    probabilities.
    """
    return _jitted_apply(task.model)(variables, jnp.asarray(images, jnp.float32))


@functools.lru_cache(maxsize=8)
def _jitted_apply(model: nn.Module):
    return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


class InstanceSegmentationTask:
    """Mask R-CNN trained on boxes, labels and instance masks."""

    name = "instance"
    models = MODELS

    def __init__(self, config: ml_collections.ConfigDict, metadata: Any, *, axis_name=None):
        if not getattr(metadata, "has_instances", True):
            raise ValueError(
                f"Data set {metadata.name!r} has no instance annotations; the instance task "
                "needs boxes, labels and instance masks (e.g. data.name='jfcnn_shapes')."
            )
        self.config = config
        self.metadata = metadata
        self.num_classes = metadata.num_classes
        self.model = build_model(config, self.num_classes, MODELS, bn_axis_name=axis_name)

    # -- model -------------------------------------------------------------
    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        size = self.config.data.image_size
        dummy = jnp.zeros((1, size, size, 3), jnp.float32)
        # `initialize` touches every layer without proposals, NMS or ROI Align,
        # which keeps the one-off initialization graph small.
        return dict(self.model.init(rng, dummy, method=MaskRCNN.initialize))

    # -- training ----------------------------------------------------------
    def loss_fn(self, params, model_state, batch, example_keys):
        """Mean loss over the (local) batch, new model state, and metrics."""
        variables = {"params": params, **model_state}
        targets = {
            key: batch[key] for key in ("boxes", "labels", "instance_masks", "instance_valid")
        }
        result = self.model.apply(
            variables,
            batch["image"],
            targets,
            example_keys,
            train=True,
            method=MaskRCNN.losses,
            mutable=list(model_state),
        )
        (losses, stats), new_state = result
        per_example = sum(losses[term] for term in LOSS_TERMS)
        metrics = {term: losses[term].mean() for term in LOSS_TERMS}
        metrics.update({key: value.mean() for key, value in stats.items()})
        return per_example.mean(), (dict(new_state), metrics)

    # -- evaluation --------------------------------------------------------
    def eval_step(self, variables, batch) -> dict[str, jax.Array]:
        outputs = self.model.apply(variables, batch["image"], train=False)
        return {key: outputs[key] for key in EVAL_OUTPUTS}

    def new_evaluator(self, num_images: int):
        from jfcnn.coco_eval import CocoEvaluator

        return CocoEvaluator(self.metadata.class_names, num_images)
