"""Mask R-CNN (He et al., 2017) in Flax linen, with static shapes throughout.

A ResNet backbone (optionally with an FPN) feeds a region proposal network
(RPN); the proposals are refined by a box head (class scores and
class-specific box deltas) and segmented by a mask head. Two variants, chosen
by ``mask_head``:

* ``"fpn"`` (torchvision's ``maskrcnn_resnet50_fpn``): RPN on P2-P6; box head
  = ROI Align 7x7 from the pyramid level that fits each box -> two fully
  connected layers; mask head = ROI Align 14x14 -> ``mask_head_convs`` 3x3
  convolutions -> transposed convolution (k2, s2) -> 28x28 -> 1x1 convolution
  to one mask per class.
* ``"c4"`` (the original ResNet-C4 design): RPN on res4 (stride 16); ROI
  Align 14x14 from res4 -> the res5 stage (stride 2) -> 7x7 features shared by
  the box predictor (after average pooling) and the mask head (transposed
  convolution (k2, s2) -> 14x14 -> 1x1 convolution to one mask per class).

Everything that torchvision does with variable-length tensors runs on fixed
shapes with validity masks (see :mod:`jfcnn.ops.detection`): a fixed number of
proposals per image (top-k + NMS, padded), a fixed number of sampled ROIs per
image (positives first, so the mask head runs on a fixed slice of them) and a
fixed number of detections. So training and inference each compile once.

Methods (call through ``model.apply(variables, ..., method=...)``):

* ``__call__(images)``: inference; returns detections with pasted masks.
* ``losses(images, targets, example_keys, train=True)``: per-image losses.
* ``initialize(images)``: creates all variables cheaply (no proposals, NMS or
  ROI Align), for ``model.init``.

Letters used for shapes:

  B: images.  H, W: image size.  K: classes, background (0) included.
  M: ground-truth instances per image (padded).  R: sampled ROIs per image.
  D: detections per image.  S: mask head output size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jfcnn.models.fpn import FPN
from jfcnn.models.layers import ConvTranspose
from jfcnn.models.resnet import BLOCKS, FEATURE_STRIDES, RESNET_SPECS, ResNet, ResNetStage
from jfcnn.ops.anchors import anchor_strides, multilevel_anchors
from jfcnn.ops.boxes import box_iou, encode_boxes
from jfcnn.ops.detection import (
    crop_mask_targets,
    match_boxes,
    multilevel_roi_align_dense,
    paste_masks,
    roi_align_dense,
    sample_balanced,
    sample_rois,
    select_detections,
    select_proposals,
)
from jfcnn.ops.roi_align import multilevel_roi_align, roi_align

Dtype = Any

MASK_HEADS = ("fpn", "c4")
ROI_ALIGN_MODES = ("gather", "dense")
# torchvision's normalization of [0, 1] RGB input (ImageNet statistics).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# Box coder weights: RPN deltas are unweighted, the box head's are (10, 10, 5, 5).
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# torchvision's smooth L1 beta for both box losses.
SMOOTH_L1_BETA = 1.0 / 9.0

_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def smooth_l1(x: jax.Array, beta: float = SMOOTH_L1_BETA) -> jax.Array:
    """Elementwise smooth L1 (Huber / beta) as ``torch.nn.functional.smooth_l1_loss``."""
    absolute = jnp.abs(x)
    return jnp.where(absolute < beta, 0.5 * x * x / beta, absolute - 0.5 * beta)


class RPNHead(nn.Module):
    """RPN head shared by all levels: 3x3 conv + ReLU, then 1x1 objectness and deltas.

    Shapes: input a sequence of ``(B, Hl, Wl, C)`` maps; output ``(B, N)``
    objectness logits and ``(B, N, 4)`` deltas (float32), where ``N = sum_l
    Hl * Wl * A`` in the order of :func:`jfcnn.ops.multilevel_anchors`.
    """

    num_anchors: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature_maps: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        channels = feature_maps[0].shape[-1]
        init = nn.initializers.normal(0.01)
        conv = nn.Conv(
            channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            kernel_init=init,
            dtype=self.dtype,
            name="conv",
        )
        cls = nn.Conv(self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="cls")
        bbox = nn.Conv(
            4 * self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="bbox"
        )
        logits, deltas = [], []
        for x in feature_maps:
            t = nn.relu(conv(x))
            logits.append(cls(t).reshape(x.shape[0], -1))
            # Channel a * 4 + i is coordinate i of anchor a, as in torchvision.
            deltas.append(bbox(t).reshape(x.shape[0], -1, 4))
        return (
            jnp.concatenate(logits, axis=1).astype(jnp.float32),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32),
        )


class FastRCNNPredictor(nn.Module):
    """Class logits and class-specific box deltas from ROI feature vectors.

    Shapes: ``(N, F)`` -> ``(N, K)``, ``(N, K, 4)`` (float32).
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


class MaskHead(nn.Module):
    """``num_convs`` 3x3 convs + ReLU, a 2x transposed conv + ReLU, a 1x1 conv per class.

    With ``num_convs=4`` this is the FPN mask head (14x14 -> 28x28); with
    ``num_convs=0`` the C4 one (applied to res5's 7x7 output -> 14x14).

    Shapes: ``(N, P, P, C)`` -> ``(N, 2P, 2P, K)`` float32 logits.
    """

    num_classes: int
    channels: int = 256
    num_convs: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_convs):
            x = nn.Conv(
                self.channels,
                (3, 3),
                padding=((1, 1), (1, 1)),
                kernel_init=_KAIMING_FAN_OUT,
                dtype=self.dtype,
                name=f"conv{i + 1}",
            )(x)
            x = nn.relu(x)
        x = ConvTranspose(
            self.channels,
            kernel_size=2,
            strides=2,
            kernel_init=_KAIMING_FAN_OUT,
            dtype=self.dtype,
            name="deconv",
        )(x)
        x = nn.relu(x)
        logits = nn.Conv(
            self.num_classes,
            (1, 1),
            kernel_init=nn.initializers.normal(0.001),
            dtype=self.dtype,
            name="predictor",
        )(x)
        return logits.astype(jnp.float32)


def _select_class(values: jax.Array, classes: jax.Array) -> jax.Array:
    """``values[..., c, ...]`` with ``c = classes[...]`` on class axis ``classes.ndim``.

    A one-hot product rather than ``take_along_axis``: it fuses into one
    elementwise pass, where the gather is slow on CPU.
    """
    axis = classes.ndim
    onehot = jax.nn.one_hot(classes, values.shape[axis], dtype=values.dtype)
    onehot = onehot.reshape(onehot.shape + (1,) * (values.ndim - onehot.ndim))
    return jnp.sum(values * onehot, axis=axis)


class MaskRCNN(nn.Module):
    """Mask R-CNN with a ResNet(-FPN) backbone; see the module docstring.

    Input images are ``(B, H, W, 3)`` RGB in ``[0, 1]`` (normalized inside with
    ImageNet statistics); ``H`` and ``W`` should be multiples of the coarsest
    pooled stride (32 for an FPN on res2-res5, 16 for C4), so that every
    feature map has its nominal stride.

    Attributes:
      num_classes: ``K``, background included.
      mask_head: ``"fpn"`` or ``"c4"``.
      depth, stage_sizes, width, norm: the ResNet (see
        :class:`jfcnn.models.resnet.ResNet`).
      fpn_channels: FPN output channels.
      fpn_in_features: backbone maps fed to the FPN; the RPN sees their levels
        plus one max-pooled level above, ROI Align their levels.
      anchor_sizes: one tuple of sizes per RPN level (one level for C4).
      aspect_ratios: anchor height / width ratios, all levels.
      rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test: candidates per level
        before NMS.
      rpn_post_nms_top_n_train, rpn_post_nms_top_n_test: proposals per image.
      rpn_nms_threshold: RPN NMS IoU.
      rpn_fg_iou_threshold, rpn_bg_iou_threshold: anchor matching.
      rpn_batch_size_per_image, rpn_positive_fraction: anchor sampling.
      roi_batch_size_per_image: ``R``, ROIs sampled per image in training.
      roi_positive_fraction: largest share of positive ROIs.
      roi_fg_iou_threshold, roi_bg_iou_threshold: proposal matching.
      mask_rois_per_image: ROI slots the mask head trains on (the first
        ones, which hold the sampled positives); None for all the positive
        slots, ``int(R * roi_positive_fraction)``. Fewer make training cheaper
        when images have many positive ROIs: the mask loss then sees a random
        subset of them.
      box_pool_size: ROI Align output of the FPN box head (7).
      mask_pool_size: ROI Align output of the mask head (14; for C4 also of
        the box head, before res5).
      sampling_ratio: ROI Align samples per bin axis (0 adaptive).
      roi_align: ``"gather"`` (:func:`jfcnn.ops.roi_align`) or ``"dense"``
        (:func:`jfcnn.ops.detection.roi_align_dense`: the same values as
        matrix products, no gather or scatter; its work grows with the map
        size, so only for small maps).
      canonical_scale, canonical_level: FPN level of a box (224, 4).
      box_head_dim: hidden width of the FPN box head.
      mask_head_channels, mask_head_convs: mask head width and depth (FPN;
        C4 uses the channels for its transposed conv).
      box_score_threshold, box_nms_threshold, detections_per_image: inference.
      mask_threshold: threshold of the pasted mask probabilities.
      dtype: computation dtype (losses and box arithmetic stay float32).
      bn_axis_name: cross-device axis of ``norm="batch"`` statistics.
    """

    num_classes: int = 91
    mask_head: str = "fpn"
    depth: int = 50
    stage_sizes: Sequence[int] | None = None
    width: int = 64
    norm: str = "frozen_batch"
    fpn_channels: int = 256
    fpn_in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
    anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_threshold: float = 0.7
    rpn_fg_iou_threshold: float = 0.7
    rpn_bg_iou_threshold: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_fg_iou_threshold: float = 0.5
    roi_bg_iou_threshold: float = 0.5
    mask_rois_per_image: int | None = None
    box_pool_size: int = 7
    mask_pool_size: int = 14
    sampling_ratio: int = 2
    roi_align: str = "gather"
    canonical_scale: float = 224.0
    canonical_level: int = 4
    box_head_dim: int = 1024
    mask_head_channels: int = 256
    mask_head_convs: int = 4
    box_score_threshold: float = 0.05
    box_nms_threshold: float = 0.5
    detections_per_image: int = 100
    mask_threshold: float = 0.5
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    def setup(self):
        if self.mask_head not in MASK_HEADS:
            raise ValueError(f"mask_head must be one of {MASK_HEADS}, got {self.mask_head!r}.")
        if self.roi_align not in ROI_ALIGN_MODES:
            raise ValueError(f"roi_align must be one of {ROI_ALIGN_MODES}, got {self.roi_align!r}.")
        if self.depth not in RESNET_SPECS:
            raise ValueError(f"depth must be one of {sorted(RESNET_SPECS)}, got {self.depth}.")
        anchors_per_level = {len(sizes) for sizes in self.anchor_sizes}
        if len(anchors_per_level) != 1:
            raise ValueError(
                f"every level needs the same number of anchor sizes, got {self.anchor_sizes}."
            )
        block_name, default_sizes = RESNET_SPECS[self.depth]
        stage_sizes = tuple(self.stage_sizes or default_sizes)
        common = dict(norm=self.norm, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
        if self.mask_head == "c4":
            self.backbone = ResNet(
                depth=self.depth,
                stage_sizes=stage_sizes,
                width=self.width,
                return_stages=("res4",),
                **common,
            )
            self.res5 = ResNetStage(
                num_blocks=stage_sizes[3],
                features=self.width * 8,
                strides=2,
                block_cls=BLOCKS[block_name],
                **common,
            )
            self.box_predictor = FastRCNNPredictor(self.num_classes, self.dtype)
            self.mask_branch = MaskHead(self.num_classes, self.mask_head_channels, 0, self.dtype)
        else:
            self.backbone = ResNet(
                depth=self.depth,
                stage_sizes=stage_sizes,
                width=self.width,
                return_stages=tuple(self.fpn_in_features),
                **common,
            )
            self.fpn = FPN(self.fpn_channels, tuple(self.fpn_in_features), self.dtype)
            self.box_branch = FPNBoxHead(self.num_classes, self.box_head_dim, self.dtype)
            self.mask_branch = MaskHead(
                self.num_classes, self.mask_head_channels, self.mask_head_convs, self.dtype
            )
        num_anchors = len(self.aspect_ratios) * anchors_per_level.pop()
        self.rpn = RPNHead(num_anchors, self.dtype)

    # -- shared pieces ------------------------------------------------------
    @property
    def mask_size(self) -> int:
        """Side ``S`` of the predicted masks."""
        if self.mask_head == "c4":
            return 2 * ((self.mask_pool_size + 1) // 2)
        return 2 * self.mask_pool_size

    @property
    def num_mask_rois(self) -> int:
        """Sampled ROI slots (the first ones) that the mask head trains on."""
        slots = int(self.roi_batch_size_per_image * self.roi_positive_fraction)
        if self.mask_rois_per_image is not None:
            slots = min(slots, self.mask_rois_per_image)
        return max(1, slots)

    def _pool_strides(self) -> tuple[int, ...]:
        if self.mask_head == "c4":
            return (FEATURE_STRIDES["res4"],)
        return tuple(FEATURE_STRIDES[name] for name in self.fpn_in_features)

    def _features(self, images: jax.Array, train: bool) -> tuple[list, list]:
        """``(rpn_maps, pool_maps)``: maps the RPN runs on and maps ROI Align reads."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape (B, H, W, 3), got {images.shape}.")
        mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
        std = jnp.asarray(IMAGE_STD, jnp.float32)
        x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
        features = self.backbone(x, train=train)
        if self.mask_head == "c4":
            maps = [features["res4"]]
            return maps, maps
        pyramid = self.fpn(features)
        levels = sorted(pyramid, key=lambda name: int(name[1:]))
        pool_maps = [pyramid[name] for name in levels[: len(self.fpn_in_features)]]
        return [pyramid[name] for name in levels], pool_maps

    def _anchors(self, rpn_maps: Sequence[jax.Array], image_size) -> tuple[jax.Array, list]:
        if len(self.anchor_sizes) != len(rpn_maps):
            raise ValueError(
                f"anchor_sizes has {len(self.anchor_sizes)} levels but the RPN sees "
                f"{len(rpn_maps)} feature maps."
            )
        grids = [tuple(m.shape[1:3]) for m in rpn_maps]
        anchors = multilevel_anchors(
            grids, anchor_strides(image_size, grids), self.anchor_sizes, self.aspect_ratios
        )
        per_location = len(self.aspect_ratios) * len(self.anchor_sizes[0])
        return jnp.asarray(anchors), [h * w * per_location for h, w in grids]

    def _pool(self, pool_maps: list, boxes: jax.Array, size: int) -> jax.Array:
        """ROI Align ``(B, N, 4)`` boxes -> ``(B * N, size, size, C)``; boxes are constants."""
        boxes = jax.lax.stop_gradient(boxes)
        if self.mask_head == "c4":
            align = roi_align_dense if self.roi_align == "dense" else roi_align
            pooled = align(
                pool_maps[0],
                boxes,
                size,
                spatial_scale=1.0 / self._pool_strides()[0],
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
        else:
            dense = self.roi_align == "dense"
            align = multilevel_roi_align_dense if dense else multilevel_roi_align
            pooled = align(
                pool_maps,
                boxes,
                size,
                strides=self._pool_strides(),
                sampling_ratio=self.sampling_ratio,
                aligned=True,
                canonical_scale=self.canonical_scale,
                canonical_level=self.canonical_level,
            )
        return pooled.reshape(-1, *pooled.shape[2:])

    def _box_outputs(self, pool_maps, boxes, train):
        """Class logits ``(B, N, K)``, deltas ``(B, N, K, 4)`` and, for C4, res5 features."""
        b, n = boxes.shape[:2]
        if self.mask_head == "c4":
            res5 = self.res5(self._pool(pool_maps, boxes, self.mask_pool_size), train=train)
            logits, deltas = self.box_predictor(jnp.mean(res5, axis=(1, 2)))
        else:
            res5 = None
            logits, deltas = self.box_branch(self._pool(pool_maps, boxes, self.box_pool_size))
        return logits.reshape(b, n, -1), deltas.reshape(b, n, -1, 4), res5

    def _mask_logits(self, pool_maps, boxes, train, res5=None) -> jax.Array:
        """Mask logits ``(B, N, S, S, K)`` of ``(B, N, 4)`` boxes."""
        b, n = boxes.shape[:2]
        if self.mask_head == "c4":
            if res5 is None:
                res5 = self.res5(self._pool(pool_maps, boxes, self.mask_pool_size), train=train)
            x = res5
        else:
            x = self._pool(pool_maps, boxes, self.mask_pool_size)
        logits = self.mask_branch(x)
        return logits.reshape(b, n, *logits.shape[1:])

    # -- entry points -------------------------------------------------------
    def initialize(self, images: jax.Array) -> None:
        """Creates every variable; for ``model.init(rng, images, method="initialize")``."""
        rpn_maps, pool_maps = self._features(images, train=False)
        self.rpn(rpn_maps)
        b, channels = images.shape[0], pool_maps[0].shape[-1]
        if self.mask_head == "c4":
            pooled = jnp.zeros((b, self.mask_pool_size, self.mask_pool_size, channels), self.dtype)
            res5 = self.res5(pooled, train=False)
            self.box_predictor(jnp.mean(res5, axis=(1, 2)))
            self.mask_branch(res5)
        else:
            self.box_branch(
                jnp.zeros((b, self.box_pool_size, self.box_pool_size, channels), self.dtype)
            )
            self.mask_branch(
                jnp.zeros((b, self.mask_pool_size, self.mask_pool_size, channels), self.dtype)
            )

    def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """Detections of ``(B, H, W, 3)`` images in ``[0, 1]``.

        Returns:
          ``boxes`` (B, D, 4) float32 pixel ``(x1, y1, x2, y2)``; ``scores``
          (B, D) float32; ``classes`` (B, D) int32 in ``1 .. K-1``;
          ``detection_valid`` (B, D) bool; ``masks`` (B, D, H, W) uint8 0/1
          (pasted, thresholded at ``mask_threshold``); ``mask_probs``
          (B, D, S, S) float32 per-box probabilities of the detected class.
          Padding slots (``detection_valid`` False) are all zeros.
        """
        _, height, width, _ = images.shape
        rpn_maps, pool_maps = self._features(images, train)
        anchors, level_sizes = self._anchors(rpn_maps, (height, width))
        objectness, rpn_deltas = self.rpn(rpn_maps)

        def proposals_of(objectness, deltas):
            return select_proposals(
                anchors,
                objectness,
                deltas,
                level_sizes,
                (height, width),
                pre_nms_top_n=self.rpn_pre_nms_top_n_test,
                post_nms_top_n=self.rpn_post_nms_top_n_test,
                nms_threshold=self.rpn_nms_threshold,
            )

        proposals, _, proposal_valid = jax.vmap(proposals_of)(objectness, rpn_deltas)
        class_logits, box_deltas, _ = self._box_outputs(pool_maps, proposals, train)

        def detections_of(class_logits, box_deltas, proposals, proposal_valid):
            return select_detections(
                class_logits,
                box_deltas,
                proposals,
                proposal_valid,
                (height, width),
                score_threshold=self.box_score_threshold,
                nms_threshold=self.box_nms_threshold,
                max_detections=self.detections_per_image,
                weights=ROI_BOX_WEIGHTS,
            )

        boxes, scores, classes, valid = jax.vmap(detections_of)(
            class_logits, box_deltas, proposals, proposal_valid
        )
        mask_logits = self._mask_logits(pool_maps, boxes, train)
        mask_probs = jax.nn.sigmoid(_select_class(mask_logits, classes[..., None, None]))
        mask_probs = jnp.where(valid[..., None, None], mask_probs, 0.0)
        masks = paste_masks(mask_probs, boxes, (height, width), threshold=self.mask_threshold)
        return {
            "boxes": boxes,
            "scores": scores,
            "classes": classes,
            "detection_valid": valid,
            "masks": masks,
            "mask_probs": mask_probs,
        }

    def losses(
        self,
        images: jax.Array,
        targets: Mapping[str, jax.Array],
        example_keys: jax.Array,
        *,
        train: bool = True,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Per-image training losses.

        Each loss is normalized within its image (RPN losses by the image's
        sampled anchors, box losses by its sampled ROIs, the mask loss by its
        positive ROIs' pixels), so the mean over images does not depend on
        how the batch is split over devices.

        Args:
          images: ``(B, H, W, 3)`` in ``[0, 1]``.
          targets: ``boxes`` (B, M, 4) pixel ``(x1, y1, x2, y2)``, ``labels``
            (B, M) int class ids ``1 .. K-1``, ``instance_masks`` (B, M, H, W)
            0/1, ``instance_valid`` (B, M) bool.
          example_keys: ``(B,)`` PRNG keys (or ``(B, 2)`` raw keys), one per
            image, for anchor and ROI sampling.
          train: batch-norm mode.

        Returns:
          ``(losses, stats)``: dicts of ``(B,)`` float32 arrays; ``losses`` has
          ``rpn_objectness``, ``rpn_box``, ``classification``,
          ``box_regression`` and ``mask``; ``stats`` has ``roi_accuracy``,
          ``positive_rois`` and ``positive_anchors``.
        """
        _, height, width, _ = images.shape
        rpn_maps, pool_maps = self._features(images, train)
        anchors, level_sizes = self._anchors(rpn_maps, (height, width))
        objectness, rpn_deltas = self.rpn(rpn_maps)
        gt_boxes = jnp.asarray(targets["boxes"], jnp.float32)
        gt_labels = jnp.asarray(targets["labels"], jnp.int32)
        gt_valid = jnp.asarray(targets["instance_valid"], bool)
        num_rois = self.roi_batch_size_per_image
        num_candidates = self.rpn_post_nms_top_n_train + gt_boxes.shape[1]
        if num_rois > num_candidates:
            raise ValueError(
                f"roi_batch_size_per_image={num_rois} exceeds the {num_candidates} ROI "
                f"candidates per image (rpn_post_nms_top_n_train="
                f"{self.rpn_post_nms_top_n_train} proposals + {gt_boxes.shape[1]} ground truth)."
            )

        def per_image(key, objectness, deltas, gt_boxes, gt_labels, gt_valid):
            rpn_key, roi_key = jax.random.split(key)
            # RPN: anchors vs ground truth.
            matched, labels = match_boxes(
                box_iou(anchors, gt_boxes),
                high_threshold=self.rpn_fg_iou_threshold,
                low_threshold=self.rpn_bg_iou_threshold,
                allow_low_quality_matches=True,
                gt_valid=gt_valid,
            )
            positive, negative = sample_balanced(
                rpn_key, labels, self.rpn_batch_size_per_image, self.rpn_positive_fraction
            )
            sampled = positive | negative
            num_sampled = jnp.maximum(jnp.sum(sampled), 1)
            bce = optax.sigmoid_binary_cross_entropy(objectness, positive.astype(jnp.float32))
            objectness_loss = jnp.sum(jnp.where(sampled, bce, 0.0)) / num_sampled
            anchor_targets = encode_boxes(gt_boxes[matched], anchors, RPN_BOX_WEIGHTS)
            anchor_targets = jnp.where(positive[:, None], anchor_targets, 0.0)
            rpn_box = jnp.sum(smooth_l1(deltas - anchor_targets), axis=-1)
            rpn_box_loss = jnp.sum(jnp.where(positive, rpn_box, 0.0)) / num_sampled

            # Proposals (constants from here on), with the ground truth added.
            proposals, _, proposal_valid = select_proposals(
                anchors,
                jax.lax.stop_gradient(objectness),
                jax.lax.stop_gradient(deltas),
                level_sizes,
                (height, width),
                pre_nms_top_n=self.rpn_pre_nms_top_n_train,
                post_nms_top_n=self.rpn_post_nms_top_n_train,
                nms_threshold=self.rpn_nms_threshold,
            )
            candidates = jnp.concatenate([proposals, gt_boxes])
            candidate_valid = jnp.concatenate([proposal_valid, gt_valid])
            matched, labels = match_boxes(
                box_iou(candidates, gt_boxes),
                high_threshold=self.roi_fg_iou_threshold,
                low_threshold=self.roi_bg_iou_threshold,
                gt_valid=gt_valid,
                candidate_valid=candidate_valid,
            )
            index, roi_positive, roi_valid = sample_rois(
                roi_key, labels, num_rois, self.roi_positive_fraction
            )
            rois = candidates[index]
            gt_index = matched[index]
            roi_classes = jnp.where(roi_positive, gt_labels[gt_index], 0)
            roi_targets = encode_boxes(gt_boxes[gt_index], rois, ROI_BOX_WEIGHTS)
            roi_targets = jnp.where(roi_positive[:, None], roi_targets, 0.0)
            return {
                "rpn_objectness": objectness_loss,
                "rpn_box": rpn_box_loss,
                "positive_anchors": jnp.sum(positive).astype(jnp.float32),
                "rois": rois,
                "gt_index": gt_index,
                "roi_classes": roi_classes,
                "roi_targets": roi_targets,
                "roi_positive": roi_positive,
                "roi_valid": roi_valid,
            }

        sampled = jax.vmap(per_image)(
            example_keys, objectness, rpn_deltas, gt_boxes, gt_labels, gt_valid
        )
        rois = jax.lax.stop_gradient(sampled["rois"])
        roi_classes, roi_positive, roi_valid = (
            sampled["roi_classes"],
            sampled["roi_positive"],
            sampled["roi_valid"],
        )

        # Box head on all sampled ROIs.
        class_logits, box_deltas, res5 = self._box_outputs(pool_maps, rois, train)
        num_valid = jnp.maximum(jnp.sum(roi_valid, axis=1), 1)
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(class_logits, roi_classes)
        classification = jnp.sum(jnp.where(roi_valid, cross_entropy, 0.0), axis=1) / num_valid
        class_deltas = _select_class(box_deltas, roi_classes)
        box_error = jnp.sum(smooth_l1(class_deltas - sampled["roi_targets"]), axis=-1)
        box_regression = jnp.sum(jnp.where(roi_positive, box_error, 0.0), axis=1) / num_valid
        correct = (jnp.argmax(class_logits, axis=-1) == roi_classes) & roi_valid
        roi_accuracy = jnp.sum(correct, axis=1) / num_valid

        # Mask head on the first slots, which hold every sampled positive.
        q = self.num_mask_rois
        mask_rois, mask_classes = rois[:, :q], roi_classes[:, :q]
        mask_positive = roi_positive[:, :q]
        if res5 is not None:
            b = images.shape[0]
            res5 = res5.reshape(b, num_rois, *res5.shape[1:])[:, :q]
            res5 = res5.reshape(b * q, *res5.shape[2:])
        mask_logits = _select_class(
            self._mask_logits(pool_maps, mask_rois, train, res5=res5), mask_classes[..., None, None]
        )
        mask_targets = crop_mask_targets(
            targets["instance_masks"],
            mask_rois,
            sampled["gt_index"][:, :q],
            self.mask_size,
            sampling_ratio=max(self.sampling_ratio, 1),
        )
        pixel_bce = optax.sigmoid_binary_cross_entropy(mask_logits, mask_targets).mean(axis=(2, 3))
        num_positive = jnp.sum(mask_positive, axis=1)
        mask = jnp.sum(jnp.where(mask_positive, pixel_bce, 0.0), axis=1) / jnp.maximum(
            num_positive, 1
        )
        losses = {
            "rpn_objectness": sampled["rpn_objectness"],
            "rpn_box": sampled["rpn_box"],
            "classification": classification,
            "box_regression": box_regression,
            "mask": mask,
        }
        stats = {
            "roi_accuracy": roi_accuracy,
            "positive_rois": num_positive.astype(jnp.float32),
            "positive_anchors": sampled["positive_anchors"],
        }
        return losses, stats
