"""ROI heads: box and mask predictions on proposals, one class per design (detectron2 style).

* :class:`StandardROIHeads` (``roi_heads="fpn"``, torchvision's
  ``maskrcnn_resnet50_fpn``): ROI Align 7x7 from the pyramid level that fits
  each box -> :class:`FPNBoxHead` (two fully connected layers -> the
  predictor); ROI Align 14x14 -> the FPN :class:`MaskHead` -> 28x28 masks.
* :class:`Res5ROIHeads` (``roi_heads="c4"``, the original ResNet-C4
  design): ROI Align 14x14 from the stride-16 res4 map -> the res5 stage
  (stride 2) -> a 7x7 map shared by the box predictor (after mean pooling)
  and the mask head (transposed conv -> 14x14 -> 1x1 conv).

With ``roi_pooler="pool"`` both designs pool with Fast R-CNN's ROI pooling
(:func:`jfcnn.ops.roi_pool`, :func:`jfcnn.ops.multilevel_roi_pool`) wherever
they would use ROI Align, at the same sizes, scales and FPN levels.

Both share :class:`ROIHeads`: the sampling of training ROIs from the
proposals and the ground truth (a fixed number per image, positives first),
the box losses (:func:`fast_rcnn_losses`), the mask loss on the first ROI
slots and the inference (detections, then masks of the detections). A design
only says how it turns boxes into predictions.

Letters used for shapes:

  B: images.  P: proposals per image.  M: ground-truth instances (padded).
  R: sampled ROIs per image.  Q: ROI slots the mask head trains on.
  D: detections per image.  K: classes, background (0) included.
  S: mask size.  C: channels.  H, W: image size.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jfcnn.models.maskrcnn.common import Dtype, select_class, smooth_l1
from jfcnn.models.maskrcnn.mask_head import MaskHead, mask_rcnn_inference, mask_rcnn_loss
from jfcnn.models.resnet import BLOCKS, ResNetStage
from jfcnn.ops import (
    multilevel_roi_align,
    multilevel_roi_align_dense,
    multilevel_roi_pool,
    roi_align,
    roi_align_dense,
    roi_pool,
)
from jfcnn.ops.boxes import box_iou, encode_boxes
from jfcnn.ops.detection import match_boxes, sample_rois, select_detections

ROI_ALIGN_MODES = ("gather", "dense")
# How the heads pool box features: ROI Align (bilinear, averaged) or Fast R-CNN's
# ROI pooling (quantized bins, max), :func:`jfcnn.ops.roi_pool`.
ROI_POOLERS = ("align", "pool")
# The box head's deltas are weighted (10, 10, 5, 5), as torchvision's ROI heads' BoxCoder.
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Detection slots per mask-head call at inference (a group with no detection is skipped).
MASK_SLOT_GROUP = 25


class FastRCNNPredictor(nn.Module):
    """Class logits and class-specific box deltas from ROI feature vectors.

    Shapes: ``(N, F)`` -> ``(N, K)``, ``(N, K, 4)`` (float32).
    Params: ``cls_score`` (F -> K), ``bbox_pred`` (F -> 4 K, class-major as in torchvision).
    """

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.01),
            dtype=self.dtype,
            name="cls_score",
        )(x)
        deltas = nn.Dense(
            4 * self.num_classes,
            kernel_init=nn.initializers.normal(0.001),
            dtype=self.dtype,
            name="bbox_pred",
        )(x)
        return (
            logits.astype(jnp.float32),
            deltas.reshape(x.shape[0], self.num_classes, 4).astype(jnp.float32),
        )


class FPNBoxHead(nn.Module):
    """torchvision's ``TwoMLPHead`` + ``FastRCNNPredictor``.

    Shapes: ``(N, P, P, C)`` pooled features -> ``(N, K)``, ``(N, K, 4)``.
    Params: ``fc6``, ``fc7`` (``hidden_dim`` wide), ``predictor``.
    """

    num_classes: int
    hidden_dim: int = 1024
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = pooled.reshape(pooled.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc6")(x))
        x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc7")(x))
        return FastRCNNPredictor(self.num_classes, self.dtype, name="predictor")(x)


def sample_training_rois(
    key: jax.Array,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_valid: jax.Array,
    *,
    num_rois: int,
    positive_fraction: float,
    fg_iou_threshold: float,
    bg_iou_threshold: float,
) -> dict[str, jax.Array]:
    """Training ROIs of one image, torchvision's ``select_training_samples``.

    The ground-truth boxes join the proposals as candidates, the candidates
    are matched to the ground truth (IoU >= ``fg_iou_threshold`` positive,
    < ``bg_iou_threshold`` background) and ``num_rois`` slots are sampled,
    the positives first (see :func:`jfcnn.ops.detection.sample_rois`).

    Args:
      key: PRNG key of the sampling.
      proposals: ``(P, 4)``, proposal_valid ``(P,)`` bool.
      gt_boxes: ``(M, 4)`` float32; gt_labels ``(M,)`` int; gt_valid ``(M,)`` bool.

    Returns:
      ``rois`` (R, 4); ``gt_index`` (R,) matched instance; ``classes`` (R,)
      its label, 0 for background; ``box_targets`` (R, 4) weighted deltas
      (zero for background); ``positive`` and ``valid`` (R,) bool.
    """
    candidates = jnp.concatenate([proposals, gt_boxes])
    candidate_valid = jnp.concatenate([proposal_valid, gt_valid])
    matched, labels = match_boxes(
        box_iou(candidates, gt_boxes),
        high_threshold=fg_iou_threshold,
        low_threshold=bg_iou_threshold,
        gt_valid=gt_valid,
        candidate_valid=candidate_valid,
    )
    index, positive, valid = sample_rois(key, labels, num_rois, positive_fraction)
    rois = candidates[index]
    gt_index = matched[index]
    classes = jnp.where(positive, gt_labels[gt_index], 0)
    box_targets = encode_boxes(gt_boxes[gt_index], rois, ROI_BOX_WEIGHTS)
    box_targets = jnp.where(positive[:, None], box_targets, 0.0)
    return {
        "rois": rois,
        "gt_index": gt_index,
        "classes": classes,
        "box_targets": box_targets,
        "positive": positive,
        "valid": valid,
    }


def fast_rcnn_losses(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    classes: jax.Array,
    box_targets: jax.Array,
    positive: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-image box losses, torchvision's ``fastrcnn_loss``, and the ROI accuracy.

    Softmax cross-entropy over the valid ROIs and smooth L1 of the
    ground-truth class's deltas over the positive ones, both divided by the
    image's valid ROIs.

    Args:
      class_logits: ``(B, R, K)``; box_deltas ``(B, R, K, 4)``.
      classes: ``(B, R)`` int targets (0 background); box_targets ``(B, R, 4)``.
      positive, valid: ``(B, R)`` bool.

    Returns:
      ``(classification, box_regression, accuracy)``, ``(B,)`` float32 each.
    """
    num_valid = jnp.maximum(jnp.sum(valid, axis=1), 1)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(class_logits, classes)
    classification = jnp.sum(jnp.where(valid, cross_entropy, 0.0), axis=1) / num_valid
    class_deltas = select_class(box_deltas, classes)
    box_error = jnp.sum(smooth_l1(class_deltas - box_targets), axis=-1)
    box_regression = jnp.sum(jnp.where(positive, box_error, 0.0), axis=1) / num_valid
    correct = (jnp.argmax(class_logits, axis=-1) == classes) & valid
    return classification, box_regression, jnp.sum(correct, axis=1) / num_valid


class ROIHeads(nn.Module):
    """What both designs share; a design defines how boxes become predictions.

    A design implements ``box_predictions``, ``mask_predictions``,
    ``training_predictions``, ``initialize`` and ``output_mask_size``.

    Attributes:
      num_classes: ``K``, background included.
      batch_size_per_image: ``R``, ROIs sampled per image in training.
      positive_fraction: largest share of positive ROIs.
      fg_iou_threshold, bg_iou_threshold: proposal matching.
      mask_rois_per_image: ROI slots the mask head trains on (the first
        ones, which hold the sampled positives); None for all the positive
        slots, ``int(R * positive_fraction)``.
      mask_pool_size: ROI Align output size of the mask branch.
      sampling_ratio: ROI Align samples per bin axis (0 adaptive).
      roi_align: ``"gather"`` (:func:`jfcnn.ops.roi_align`) or ``"dense"``
        (:func:`jfcnn.ops.roi_align_dense`, the same values as matrix products).
      aligned: ROI Align's half-pixel shift (True); torchvision's detection
        models pool with ``aligned=False``.
      roi_pooler: ``"align"`` (ROI Align, as set by ``roi_align``,
        ``sampling_ratio`` and ``aligned``) or ``"pool"`` (ROI pooling,
        :func:`jfcnn.ops.roi_pool` / :func:`jfcnn.ops.multilevel_roi_pool`,
        with the same output sizes, scales and FPN levels; those three
        settings are then unused).
      mask_head_channels: width of the mask head.
      score_threshold, nms_threshold, detections_per_image: inference.
      dtype: computation dtype (losses and box arithmetic stay float32).
    """

    num_classes: int = 91
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_threshold: float = 0.5
    bg_iou_threshold: float = 0.5
    mask_rois_per_image: int | None = None
    mask_pool_size: int = 14
    sampling_ratio: int = 2
    roi_align: str = "gather"
    aligned: bool = True
    roi_pooler: str = "align"
    mask_head_channels: int = 256
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    dtype: Dtype = jnp.float32

    # -- what a design defines ------------------------------------------------
    @staticmethod
    def output_mask_size(mask_pool_size: int) -> int:
        """Side ``S`` of the masks for a given ``mask_pool_size``."""
        raise NotImplementedError

    def box_predictions(
        self, maps, boxes: jax.Array, train: bool, valid_hw: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Class logits ``(B, N, K)`` and deltas ``(B, N, K, 4)`` of ``(B, N, 4)`` boxes.

        ``valid_hw`` ``(B, 2)``: where each image's maps end, in image pixels
        (ROI Align's ``valid_hw``); None: the whole maps.
        """
        raise NotImplementedError

    def mask_predictions(
        self,
        maps,
        boxes: jax.Array,
        train: bool,
        valid_hw: jax.Array | None = None,
        classes: jax.Array | None = None,
    ) -> jax.Array:
        """Mask logits ``(B, N, S, S, K)`` of ``(B, N, 4)`` boxes (``valid_hw`` as above).

        With ``classes`` ``(B, N)``: ``(B, N, S, S)``, each box's class only.
        """
        raise NotImplementedError

    def training_predictions(self, maps, rois: jax.Array, num_mask_rois: int, train: bool):
        """Box predictions of all ``(B, R, 4)`` ROIs and mask logits of the first ``Q``."""
        raise NotImplementedError

    def initialize(self, batch_size: int, channels: int) -> None:
        """Creates every variable from zeros, without ROI Align."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------
    def check_pooler(self) -> None:
        """Rejects an unknown ``roi_pooler`` (called from the designs' ``setup``)."""
        if self.roi_pooler not in ROI_POOLERS:
            raise ValueError(f"roi_pooler must be one of {ROI_POOLERS}, got {self.roi_pooler!r}.")

    @property
    def mask_size(self) -> int:
        """Side ``S`` of the predicted masks."""
        return self.output_mask_size(self.mask_pool_size)

    @property
    def num_mask_rois(self) -> int:
        """``Q``: sampled ROI slots (the first ones) that the mask head trains on."""
        slots = int(self.batch_size_per_image * self.positive_fraction)
        if self.mask_rois_per_image is not None:
            slots = min(slots, self.mask_rois_per_image)
        return max(1, slots)

    def losses(
        self,
        maps: Sequence[jax.Array],
        proposals: jax.Array,
        proposal_valid: jax.Array,
        gt_boxes: jax.Array,
        gt_labels: jax.Array,
        gt_valid: jax.Array,
        instance_masks: jax.Array,
        keys: jax.Array,
        *,
        train: bool = True,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Per-image box and mask losses on ROIs sampled from the proposals.

        Args:
          maps: the feature maps ROI Align reads.
          proposals: ``(B, P, 4)`` constants; proposal_valid ``(B, P)`` bool.
          gt_boxes: ``(B, M, 4)`` float32; gt_labels ``(B, M)`` int32;
            gt_valid ``(B, M)`` bool; instance_masks ``(B, M, H, W)`` 0/1.
          keys: ``(B,)`` PRNG keys of the ROI sampling.
          train: batch-norm mode.

        Returns:
          ``(losses, stats)``, dicts of ``(B,)`` float32: ``classification``,
          ``box_regression``, ``mask``; ``roi_accuracy``, ``positive_rois``.
        """

        def sample(key, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid):
            return sample_training_rois(
                key,
                proposals,
                proposal_valid,
                gt_boxes,
                gt_labels,
                gt_valid,
                num_rois=self.batch_size_per_image,
                positive_fraction=self.positive_fraction,
                fg_iou_threshold=self.fg_iou_threshold,
                bg_iou_threshold=self.bg_iou_threshold,
            )

        rois = jax.vmap(sample)(keys, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid)
        boxes = jax.lax.stop_gradient(rois["rois"])
        q = self.num_mask_rois
        class_logits, box_deltas, mask_logits = self.training_predictions(maps, boxes, q, train)
        classification, box_regression, accuracy = fast_rcnn_losses(
            class_logits,
            box_deltas,
            rois["classes"],
            rois["box_targets"],
            rois["positive"],
            rois["valid"],
        )
        # The first Q slots hold every sampled positive (up to Q).
        mask, positive_rois = mask_rcnn_loss(
            mask_logits,
            rois["classes"][:, :q],
            rois["positive"][:, :q],
            boxes[:, :q],
            rois["gt_index"][:, :q],
            instance_masks,
            sampling_ratio=max(self.sampling_ratio, 1),
        )
        losses = {"classification": classification, "box_regression": box_regression, "mask": mask}
        stats = {"roi_accuracy": accuracy, "positive_rois": positive_rois}
        return losses, stats

    def __call__(
        self,
        maps: Sequence[jax.Array],
        proposals: jax.Array,
        proposal_valid: jax.Array,
        image_size: tuple[int, int],
        *,
        train: bool = False,
        image_sizes: jax.Array | None = None,
        padded_sizes: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Detections of ``(B, P, 4)`` proposals and their mask probabilities.

        Boxes are clipped to ``image_sizes`` ``(B, 2)`` (each image's
        ``(height, width)`` on the canvas, top-left), or to the canvas
        ``image_size`` when None. ``padded_sizes`` ``(B, 2)``: each image's
        size padded as torchvision pads a batch of it alone; ROI Align then
        samples each map as if it ended there (torchvision's feature maps,
        whose last row and column it clamps to), not at the canvas's edge.
        None: the whole maps.

        Returns:
          ``boxes`` (B, D, 4), ``scores`` (B, D), ``classes`` (B, D) int32,
          ``detection_valid`` (B, D) bool and ``mask_probs`` (B, D, S, S)
          of the detected class (zeros in padding slots).
        """
        class_logits, box_deltas = self.box_predictions(maps, proposals, train, padded_sizes)
        if image_sizes is None:
            image_sizes = jnp.broadcast_to(jnp.asarray(image_size), (proposals.shape[0], 2))

        def detections_of(class_logits, box_deltas, proposals, proposal_valid, size):
            return select_detections(
                class_logits,
                box_deltas,
                proposals,
                proposal_valid,
                size,
                score_threshold=self.score_threshold,
                nms_threshold=self.nms_threshold,
                max_detections=self.detections_per_image,
                weights=ROI_BOX_WEIGHTS,
            )

        boxes, scores, classes, valid = jax.vmap(detections_of)(
            class_logits, box_deltas, proposals, proposal_valid, image_sizes
        )
        mask_logits = self._detection_mask_logits(maps, boxes, classes, valid, padded_sizes)
        return {
            "boxes": boxes,
            "scores": scores,
            "classes": classes,
            "detection_valid": valid,
            "mask_probs": mask_rcnn_inference(mask_logits, None, valid),
        }

    def _detection_mask_logits(self, maps, boxes, classes, valid, valid_hw) -> jax.Array:
        """Mask logits ``(B, D, S, S)`` of the detected classes, zeros for empty slot groups.

        The detection slots go through the mask head in groups of
        ``MASK_SLOT_GROUP``; a group without a valid detection in any image is
        skipped (``nn.cond``), so an image with few detections does not pay
        the mask head for all ``D`` slots. Detections fill the first slots,
        so the skipped groups are the last ones.
        """
        b, d = boxes.shape[:2]
        if d <= MASK_SLOT_GROUP:
            return self.mask_predictions(maps, boxes, False, valid_hw, classes)
        size = self.mask_size

        def masks(module, maps, boxes, classes, valid_hw):
            return module.mask_predictions(maps, boxes, False, valid_hw, classes)

        groups = []
        for start in range(0, d, MASK_SLOT_GROUP):
            part = slice(start, min(start + MASK_SLOT_GROUP, d))
            shape = (b, part.stop - part.start, size, size)

            def empty(module, maps, boxes, classes, valid_hw, shape=shape):
                return jnp.zeros(shape, jnp.float32)

            operands = (maps, boxes[:, part], classes[:, part], valid_hw)
            groups.append(nn.cond(jnp.any(valid[:, part]), masks, empty, self, *operands))
        return jnp.concatenate(groups, axis=1)


class StandardROIHeads(ROIHeads):
    """FPN ROI heads: multilevel ROI Align -> box MLP head; multilevel ROI Align -> mask head.

    Input maps: the pyramid levels (strides ``strides``), ``C`` channels each.
    Box branch: ROI Align ``box_pool_size`` (7) -> :class:`FPNBoxHead`.
    Mask branch: ROI Align ``mask_pool_size`` (14) -> :class:`MaskHead` with
    ``mask_head_convs`` 3x3 convs -> ``2 * mask_pool_size`` (28) masks.

    Params: ``box_branch`` (:class:`FPNBoxHead`), ``mask_branch`` (:class:`MaskHead`).

    Attributes (besides :class:`ROIHeads`'):
      strides: stride of each input map.
      box_pool_size: ROI Align output of the box branch.
      canonical_scale, canonical_level: FPN level of a box (224, 4).
      box_head_dim: hidden width of the box head.
      mask_head_convs: 3x3 convs of the mask head.
    """

    strides: Sequence[int] = (4, 8, 16, 32)
    box_pool_size: int = 7
    canonical_scale: float = 224.0
    canonical_level: int = 4
    box_head_dim: int = 1024
    mask_head_convs: int = 4

    def setup(self):
        self.check_pooler()
        self.box_branch = FPNBoxHead(self.num_classes, self.box_head_dim, self.dtype)
        self.mask_branch = MaskHead(
            self.num_classes, self.mask_head_channels, self.mask_head_convs, self.dtype
        )

    @staticmethod
    def output_mask_size(mask_pool_size: int) -> int:
        return 2 * mask_pool_size

    def _pool(
        self,
        maps: Sequence[jax.Array],
        boxes: jax.Array,
        size: int,
        valid_hw: jax.Array | None = None,
    ) -> jax.Array:
        """ROI Align ``(B, N, 4)`` boxes -> ``(B * N, size, size, C)``; boxes are constants.

        ``valid_hw`` ``(B, 2)``: each image's extent in image pixels (ROI
        Align only; ROI pooling ignores it).
        """
        if self.roi_pooler == "pool":
            pooled = multilevel_roi_pool(
                maps,
                jax.lax.stop_gradient(boxes),
                size,
                strides=tuple(self.strides),
                canonical_scale=self.canonical_scale,
                canonical_level=self.canonical_level,
            )
            return pooled.reshape(-1, *pooled.shape[2:])
        align = multilevel_roi_align_dense if self.roi_align == "dense" else multilevel_roi_align
        pooled = align(
            maps,
            jax.lax.stop_gradient(boxes),
            size,
            strides=tuple(self.strides),
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            canonical_scale=self.canonical_scale,
            canonical_level=self.canonical_level,
            valid_hw=valid_hw,
        )
        return pooled.reshape(-1, *pooled.shape[2:])

    def box_predictions(self, maps, boxes, train, valid_hw=None):
        b, n = boxes.shape[:2]
        logits, deltas = self.box_branch(self._pool(maps, boxes, self.box_pool_size, valid_hw))
        return logits.reshape(b, n, -1), deltas.reshape(b, n, -1, 4)

    def mask_predictions(self, maps, boxes, train, valid_hw=None, classes=None):
        b, n = boxes.shape[:2]
        pooled = self._pool(maps, boxes, self.mask_pool_size, valid_hw)
        logits = self.mask_branch(pooled, None if classes is None else classes.reshape(-1))
        return logits.reshape(b, n, *logits.shape[1:])

    def training_predictions(self, maps, rois, num_mask_rois, train):
        class_logits, box_deltas = self.box_predictions(maps, rois, train)
        mask_logits = self.mask_predictions(maps, rois[:, :num_mask_rois], train)
        return class_logits, box_deltas, mask_logits

    def initialize(self, batch_size, channels):
        p, q = self.box_pool_size, self.mask_pool_size
        self.box_branch(jnp.zeros((batch_size, p, p, channels), self.dtype))
        self.mask_branch(jnp.zeros((batch_size, q, q, channels), self.dtype))


class Res5ROIHeads(ROIHeads):
    """ResNet-C4 ROI heads: ROI Align from res4 -> res5 -> shared box and mask predictions.

    Input maps: ``[res4]`` (stride ``stride``, 16). ROI Align
    ``mask_pool_size`` (14) -> the res5 stage (stride 2) -> a
    ``ceil(P / 2)`` (7) square map with ``res5_features * expansion`` (2048)
    channels, which feeds the box predictor after mean pooling and the mask
    head (no 3x3 convs: transposed conv -> ``2 ceil(P / 2)`` (14) -> 1x1 conv).
    In training the mask head reuses the box branch's res5 features of its
    ROIs, as detectron2's ``Res5ROIHeads`` does.

    Params: ``res5`` (:class:`jfcnn.models.resnet.ResNetStage`),
    ``box_predictor`` (:class:`FastRCNNPredictor`), ``mask_branch``
    (:class:`MaskHead`).

    Attributes (besides :class:`ROIHeads`'):
      stride: stride of the res4 map.
      res5_blocks, res5_features, res5_block: the res5 stage (blocks,
        ``features`` of each block, ``"basic"`` or ``"bottleneck"``).
      norm, bn_axis_name: normalization of res5 (see
        :class:`jfcnn.models.resnet.ResNetStage`).
    """

    stride: int = 16
    res5_blocks: int = 3
    res5_features: int = 512
    res5_block: str = "bottleneck"
    norm: str = "frozen_batch"
    bn_axis_name: str | None = None

    def setup(self):
        self.check_pooler()
        self.res5 = ResNetStage(
            num_blocks=self.res5_blocks,
            features=self.res5_features,
            strides=2,
            block_cls=BLOCKS[self.res5_block],
            norm=self.norm,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
        )
        self.box_predictor = FastRCNNPredictor(self.num_classes, self.dtype)
        self.mask_branch = MaskHead(self.num_classes, self.mask_head_channels, 0, self.dtype)

    @staticmethod
    def output_mask_size(mask_pool_size: int) -> int:
        return 2 * ((mask_pool_size + 1) // 2)

    def _res5_features(
        self,
        maps: Sequence[jax.Array],
        boxes: jax.Array,
        train: bool,
        valid_hw: jax.Array | None = None,
    ):
        """res5 of ROI Align of ``(B, N, 4)`` boxes: ``(B * N, 7, 7, C5)``; boxes are constants.

        ``valid_hw`` ``(B, 2)``: each image's extent in image pixels (ROI
        Align only; ROI pooling ignores it).
        """
        boxes = jax.lax.stop_gradient(boxes)
        if self.roi_pooler == "pool":
            pooled = roi_pool(maps[0], boxes, self.mask_pool_size, spatial_scale=1.0 / self.stride)
        else:
            align = roi_align_dense if self.roi_align == "dense" else roi_align
            pooled = align(
                maps[0],
                boxes,
                self.mask_pool_size,
                spatial_scale=1.0 / self.stride,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
                # torchvision's map size for that padding (roi_align clamps to the map).
                valid_hw=None if valid_hw is None else -(-valid_hw // self.stride),
            )
        return self.res5(pooled.reshape(-1, *pooled.shape[2:]), train=train)

    def _predict_boxes(self, features: jax.Array, b: int, n: int):
        logits, deltas = self.box_predictor(jnp.mean(features, axis=(1, 2)))
        return logits.reshape(b, n, -1), deltas.reshape(b, n, -1, 4)

    def _predict_masks(self, features: jax.Array, b: int, n: int, classes=None):
        logits = self.mask_branch(features, None if classes is None else classes.reshape(-1))
        return logits.reshape(b, n, *logits.shape[1:])

    def box_predictions(self, maps, boxes, train, valid_hw=None):
        b, n = boxes.shape[:2]
        return self._predict_boxes(self._res5_features(maps, boxes, train, valid_hw), b, n)

    def mask_predictions(self, maps, boxes, train, valid_hw=None, classes=None):
        b, n = boxes.shape[:2]
        features = self._res5_features(maps, boxes, train, valid_hw)
        return self._predict_masks(features, b, n, classes)

    def training_predictions(self, maps, rois, num_mask_rois, train):
        b, r = rois.shape[:2]
        features = self._res5_features(maps, rois, train)
        class_logits, box_deltas = self._predict_boxes(features, b, r)
        features = features.reshape(b, r, *features.shape[1:])[:, :num_mask_rois]
        features = features.reshape(b * num_mask_rois, *features.shape[2:])
        return class_logits, box_deltas, self._predict_masks(features, b, num_mask_rois)

    def initialize(self, batch_size, channels):
        p = self.mask_pool_size
        features = self.res5(jnp.zeros((batch_size, p, p, channels), self.dtype), train=False)
        self.box_predictor(jnp.mean(features, axis=(1, 2)))
        self.mask_branch(features)


# `MaskRCNN.roi_heads` -> the design.
ROI_HEADS: dict[str, type[ROIHeads]] = {"fpn": StandardROIHeads, "c4": Res5ROIHeads}
