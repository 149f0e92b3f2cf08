"""Shrunken model settings shared by the model tests and the end-to-end training tests.

``UNET_OVERRIDES`` shrinks ``configs/unet.py`` for the training tests. One
definition of the tiny Mask R-CNN: the model tests pass it to
``MaskRCNN(**MASKRCNN)``, the training tests as ``--config.model.x`` overrides
of ``configs/maskrcnn.py`` (``config_overrides(MASKRCNN)``), so the two
cannot drift apart. ``instance_metadata`` is the data set metadata of the tests
that build a model for given classes without any data.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jfcnn.data.registry import DatasetMetadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A U-Net run small enough to train a few dozen steps in seconds on 2 CPU cores
# (``--config.<key>`` overrides of configs/unet.py, on the first examples).
UNET_OVERRIDES: dict[str, Any] = {
    "data.image_size": 32,
    "data.train_split": "train[:64]",
    "data.eval_split": "validation[:24]",
    "data.shuffle_buffer": 64,
    "model.depth": 2,
    "model.base_width": 8,
    "batch_size": 8,
    "num_train_steps": 12,
    "warmup_steps": 2,
    "log_every_steps": 4,
    "eval_every_steps": 8,
    "checkpoint_every_steps": 4,
    "num_eval_images": 2,
}

# A Mask R-CNN small enough to compile and train a few steps in seconds on 2
# CPU cores: ResNet-18-style with one block per stage and 8 stem channels, a
# 3-level FPN (plus the pooled P5 for the RPN), and few proposals and ROIs.
# `norm` and `roi_align` are left to the caller (configs/maskrcnn.py trains
# with batch norm and the gather ROI Align).
MASKRCNN: dict[str, Any] = {
    "depth": 18,
    "stage_sizes": (1, 1, 1, 1),
    "width": 8,
    "fpn_channels": 16,
    "fpn_in_features": ("res2", "res3", "res4"),
    "anchor_sizes": ((16,), (32,), (64,), (128,)),
    "rpn_pre_nms_top_n_train": 64,
    "rpn_post_nms_top_n_train": 64,
    "rpn_pre_nms_top_n_test": 32,
    "rpn_post_nms_top_n_test": 32,
    "rpn_batch_size_per_image": 64,
    "roi_batch_size_per_image": 32,
    "mask_rois_per_image": 8,
    "box_head_dim": 32,
    "mask_head_channels": 8,
    "mask_head_convs": 2,
    "detections_per_image": 10,
}

# What turns MASKRCNN into the ResNet-C4 design: the RPN sees res4 alone, so
# one level holding all the anchor sizes.
MASKRCNN_C4: dict[str, Any] = {"roi_heads": "c4", "anchor_sizes": ((16, 32, 64),)}


def config_overrides(fields: Mapping[str, Any], section: str = "model") -> dict[str, Any]:
    """``fields`` as ``{"<section>.<name>": value}`` config overrides (``--config.model.x``).

    >>> config_overrides({"width": 8})
    {'model.width': 8}
    """
    return {f"{section}.{name}": value for name, value in fields.items()}


def shipped_config(name: str):
    """``get_config()`` of ``configs/<name>`` (configs import each other as ``configs.x``)."""
    sys.path.insert(0, ROOT)
    try:
        path = os.path.join(ROOT, "configs", name)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(ROOT)
    return module.get_config()


def instance_metadata(
    class_names: Sequence[str], category_ids: Sequence[int] = ()
) -> DatasetMetadata:
    """Metadata of an instance data set of ``class_names`` (background first) at 64 x 64.

    ``category_ids``: the class ids' category ids (default: the class ids).
    """
    # Imported here: conftest imports this module before torch, which must come
    # before TensorFlow (imported by the jfcnn.data package).
    from jfcnn.data.registry import DatasetMetadata

    return DatasetMetadata(
        name="data",
        num_classes=len(class_names),
        class_names=tuple(class_names),
        image_size=64,
        num_train_examples=0,
        num_eval_examples=0,
        has_instances=True,
        category_ids=tuple(category_ids),
    )
