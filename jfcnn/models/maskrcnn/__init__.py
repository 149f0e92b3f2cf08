"""Mask R-CNN (He et al., 2017) in Flax linen, with static shapes throughout.

A ResNet backbone (optionally with an FPN) feeds a region proposal network
(RPN); the proposals are refined by a box head (class scores and
class-specific box deltas) and segmented by a mask head. Two ROI heads
designs, chosen by ``MaskRCNN.roi_heads``:

* ``"fpn"`` (torchvision's ``maskrcnn_resnet50_fpn``,
  :class:`StandardROIHeads`): RPN on P2-P6; box head = ROI Align 7x7 from
  the pyramid level that fits each box -> two fully connected layers; mask
  head = ROI Align 14x14 -> ``mask_head_convs`` 3x3 convolutions ->
  transposed convolution (k2, s2) -> 28x28 -> 1x1 convolution to one mask
  per class.
* ``"c4"`` (the original ResNet-C4 design, :class:`Res5ROIHeads`): RPN on
  res4 (stride 16); ROI Align 14x14 from res4 -> the res5 stage (stride 2)
  -> 7x7 features shared by the box predictor (after average pooling) and
  the mask head (transposed convolution (k2, s2) -> 14x14 -> 1x1
  convolution to one mask per class).

Everything that torchvision does with variable-length tensors runs on fixed
shapes with validity masks (see :mod:`jfcnn.ops.detection`): a fixed number of
proposals per image (top-k + NMS, padded), a fixed number of sampled ROIs per
image (positives first, so the mask head runs on a fixed slice of them) and a
fixed number of detections. So training and inference each compile once.

Modules, like torchvision's and detectron2's:

* :mod:`~jfcnn.models.maskrcnn.model`: :class:`MaskRCNN`, backbone + FPN and the glue.
* :mod:`~jfcnn.models.maskrcnn.rpn`: :class:`RPN` (head, anchors, proposals, loss).
* :mod:`~jfcnn.models.maskrcnn.roi_heads`: ROI sampling, the box head and
  its loss, and the two designs.
* :mod:`~jfcnn.models.maskrcnn.mask_head`: the mask head's layers, loss and inference.

Methods of :class:`MaskRCNN` (call through ``model.apply(variables, ..., method=...)``):

* ``__call__(images)``: inference; returns detections with pasted masks.
* ``losses(images, targets, example_keys, train=True)``: per-image losses.
* ``initialize(images)``: creates all variables cheaply (no proposals, NMS or
  ROI Align), for ``model.init``.

>>> model = MaskRCNN(num_classes=3, roi_heads="c4", depth=18, width=8,
...                  anchor_sizes=((32, 64, 128),))
>>> model.mask_size
14
"""

from jfcnn.models.maskrcnn.common import SMOOTH_L1_BETA, select_class, smooth_l1
from jfcnn.models.maskrcnn.mask_head import MaskHead, mask_rcnn_inference, mask_rcnn_loss
from jfcnn.models.maskrcnn.model import IMAGE_MEAN, IMAGE_STD, RENAMED_FIELDS, MaskRCNN
from jfcnn.models.maskrcnn.roi_heads import (
    ROI_ALIGN_MODES,
    ROI_BOX_WEIGHTS,
    ROI_HEADS,
    ROI_POOLERS,
    FastRCNNPredictor,
    FPNBoxHead,
    Res5ROIHeads,
    ROIHeads,
    StandardROIHeads,
    fast_rcnn_losses,
    sample_training_rois,
)
from jfcnn.models.maskrcnn.rpn import RPN, RPN_BOX_WEIGHTS, rpn_losses

__all__ = [
    "FPNBoxHead",
    "FastRCNNPredictor",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MaskHead",
    "MaskRCNN",
    "RENAMED_FIELDS",
    "ROIHeads",
    "ROI_ALIGN_MODES",
    "ROI_BOX_WEIGHTS",
    "ROI_HEADS",
    "ROI_POOLERS",
    "RPN",
    "RPN_BOX_WEIGHTS",
    "Res5ROIHeads",
    "SMOOTH_L1_BETA",
    "StandardROIHeads",
    "fast_rcnn_losses",
    "mask_rcnn_inference",
    "mask_rcnn_loss",
    "rpn_losses",
    "sample_training_rois",
    "select_class",
    "smooth_l1",
]
