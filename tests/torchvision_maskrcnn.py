"""torchvision's ``maskrcnn_resnet50_fpn`` with random but meaningful weights, for parity tests.

Built without any download: random weights whose batch-norm statistics are
calibrated on a few images (so every layer has outputs of order one) and
whose heads give confident, distinct scores (random heads would score every
class about 1/91, under the 0.05 threshold, or saturate into ties). Small
images (short side 320) keep the tests short.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_SIZE, MAX_SIZE = 320, 512
# jfcnn's settings of torchvision's inference (besides the architecture defaults).
TORCHVISION_FIELDS = dict(
    num_classes=91,
    frozen_batch_norm=True,
    roi_align_aligned=False,
    mask_paste="torchvision",
    rpn_pre_nms_top_n_test=1000,
    rpn_post_nms_top_n_test=1000,
)


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth RGB image in [0, 1] with a few bright blobs: structure at several scales."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = 0.4 + 0.1 * np.sin(6 * x[..., None] + rng.uniform(0, 6, 3)) * np.cos(4 * y[..., None])
    for _ in range(6):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        blob = np.exp(-((y - cy * height / max(height, width)) ** 2 + (x - cx) ** 2) / r**2)
        image = image + blob[..., None] * rng.uniform(-0.4, 0.5, 3)
    return np.clip(image, 0, 1).astype(np.float32)


def build_torchvision_model(seed: int = 0, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE):
    """``maskrcnn_resnet50_fpn`` with calibrated batch norm and confident, distinct heads."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=min_size, max_size=max_size
    )
    backbone = model.backbone.body
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        backbone.train()
        for i in range(2):
            images = [torch.from_numpy(photo(200, 240, 100 + i)).permute(2, 0, 1)]
            backbone(model.transform(images)[0].tensors)
        model.eval()
        heads = model.roi_heads
        # The random box head's features are large, so its default classifier is
        # already confident (top scores 0.4-0.8, all distinct); random biases
        # make the classes differ.
        heads.box_predictor.cls_score.bias.uniform_(-2.0, 2.0)
        heads.box_predictor.bbox_pred.weight.mul_(3.0)
        heads.mask_predictor.mask_fcn_logits.weight.mul_(30.0)
        # Objectness logits of a few units: distinct, not saturated sigmoids (ties).
        model.rpn.head.cls_logits.weight.mul_(2.0)
    return model


def v1_state_dict(state_dict: dict) -> dict:
    """The published v1 file's key names (before torchvision 0.13)."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                key = key.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        for i in range(4):
            key = key.replace(
                f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}."
            )
        renamed[key] = value
    return renamed
