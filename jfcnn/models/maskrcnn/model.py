"""Mask R-CNN: the backbone (+ FPN) and the glue between the RPN and the ROI heads.

Letters used for shapes:

  B: images.  H, W: image size.  K: classes, background (0) included.
  M: ground-truth instances per image (padded).  D: detections per image.
  S: mask size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfcnn.models.fpn import FPN
from jfcnn.models.layers import NORM_EPSILON
from jfcnn.models.maskrcnn.common import Dtype
from jfcnn.models.maskrcnn.roi_heads import (
    ROI_ALIGN_MODES,
    ROI_HEADS,
    ROI_POOLERS,
    Res5ROIHeads,
    ROIHeads,
    StandardROIHeads,
)
from jfcnn.models.maskrcnn.rpn import RPN
from jfcnn.models.resnet import FEATURE_STRIDES, NORMS, RESNET_SPECS, ResNet
from jfcnn.ops.detection import paste_masks, paste_masks_torchvision

MASK_PASTE_MODES = ("centers", "torchvision")
# Config fields that were renamed: old name -> new name (for config validation's message).
RENAMED_FIELDS = {"mask_head": "roi_heads"}
# torchvision's normalization of [0, 1] RGB input (ImageNet statistics).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def check_images(images: jax.Array, size_divisor: int) -> None:
    """Rejects (at trace time) images the model was not built for: shape and dtype.

    Values cannot be checked under ``jit``; ``jfcnn.tasks.instance.predict``
    checks that they lie in [0, 1] before it calls the model.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (B, H, W, 3), got {images.shape}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"images must be floats in [0, 1], got dtype {images.dtype}: convert uint8 "
            "images with `images.astype(np.float32) / 255`."
        )
    height, width = images.shape[1:3]
    if height % size_divisor or width % size_divisor:
        below = max(1, max(height, width) // size_divisor) * size_divisor
        raise ValueError(
            f"images are {height}x{width}; this Mask R-CNN needs sides that are multiples of "
            f"{size_divisor} (e.g. {below} or {below + size_divisor}): resize or zero-pad them."
        )


@contextlib.contextmanager
def _batch_edges(image_sizes: jax.Array | None, canvas_hw: Sequence[int], divisor: int):
    """Within the block, every layer's output is zero beyond each image's padded size.

    torchvision runs an image on a batch padded only to a multiple of
    ``divisor``: its convolutions see zeros (their own padding) beyond that
    edge. On a larger canvas the layers would see features computed from the
    canvas padding there instead, which changes the features near the edge
    (with random weights, most of them). Zeroing every 4-D output of a
    submodule (convolutions, norms, blocks) at its resolution beyond the
    padded size, rounded up, gives each layer torchvision's inputs. Without
    ``image_sizes`` nothing changes.
    """
    if image_sizes is None:
        yield
        return
    canvas = jnp.asarray(canvas_hw, jnp.int32)
    padded = -(-image_sizes // divisor) * divisor

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(out, jax.Array) or out.ndim != 4:
            return out
        h, w = out.shape[1:3]
        if canvas_hw[0] % h or canvas_hw[1] % w:
            return out
        valid = -(-padded * jnp.asarray([h, w], jnp.int32) // canvas)  # (B, 2), rounded up
        rows = jnp.arange(h)[None, :, None] < valid[:, None, None, 0]
        cols = jnp.arange(w)[None, None, :] < valid[:, None, None, 1]
        return jnp.where((rows & cols)[..., None], out, jnp.zeros((), out.dtype))

    with nn.intercept_methods(interceptor):
        yield


class MaskRCNN(nn.Module):
    """Mask R-CNN with a ResNet(-FPN) backbone; see :mod:`jfcnn.models.maskrcnn`.

    Input images are ``(B, H, W, 3)`` RGB in ``[0, 1]`` (normalized inside with
    ImageNet statistics); ``H`` and ``W`` should be multiples of the coarsest
    pooled stride (32 for an FPN on res2-res5, 16 for C4), so that every
    feature map has its nominal stride.

    Params: ``backbone``, ``fpn`` (FPN design only), ``rpn``, and the ROI
    heads' own children at the top level (``box_branch`` and ``mask_branch``
    for ``"fpn"``; ``res5``, ``box_predictor`` and ``mask_branch`` for
    ``"c4"``), so the parameter tree does not depend on how the code is split
    into modules.

    Attributes:
      num_classes: ``K``, background included.
      roi_heads: the ROI heads design, ``"fpn"``
        (:class:`~jfcnn.models.maskrcnn.roi_heads.StandardROIHeads`) or
        ``"c4"`` (:class:`~jfcnn.models.maskrcnn.roi_heads.Res5ROIHeads`).
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
        (:func:`jfcnn.ops.roi_align_dense`: the same values as matrix
        products, no gather or scatter; its work grows with the map size, so
        only for small maps).
      roi_align_aligned: ROI Align's half-pixel shift of the box and mask
        heads (True, detectron2's); torchvision's ``maskrcnn_resnet50_fpn``
        pools with ``aligned=False``, which its weights expect.
      roi_pooler: how the ROI heads pool box features: ``"align"`` (ROI
        Align, set by ``roi_align``, ``sampling_ratio`` and
        ``roi_align_aligned``) or ``"pool"`` (Fast R-CNN's ROI pooling,
        :func:`jfcnn.ops.roi_pool`, max over quantized bins, exactly
        ``torchvision.ops.roi_pool``) with the same output sizes, scales and
        FPN levels, in both designs and both branches.
      canonical_scale, canonical_level: FPN level of a box (224, 4).
      box_head_dim: hidden width of the FPN box head.
      mask_head_channels, mask_head_convs: mask head width and depth (FPN;
        C4 uses the channels for its transposed conv).
      box_score_threshold, box_nms_threshold, detections_per_image: inference.
      mask_threshold: threshold of the pasted mask probabilities.
      mask_paste: how masks are pasted into the image: ``"centers"``
        (:func:`jfcnn.ops.detection.paste_masks`, pixel centers read the mask
        in its box) or ``"torchvision"``
        (:func:`jfcnn.ops.detection.paste_masks_torchvision`, torchvision's
        one-pixel expansion and integer boxes).
      dtype: computation dtype (losses and box arithmetic stay float32).
      bn_axis_name: cross-device axis of ``norm="batch"`` statistics.
      frozen_batch_norm: build the backbone with frozen batch norm (statistics
        and affine fixed, torchvision's ``FrozenBatchNorm2d``) whatever
        ``norm`` says; the usual choice when fine-tuning pretrained weights.
      norm_epsilon: the backbone norms' epsilon (1e-5; 0 for torchvision's
        published v1 COCO weights, as torchvision sets when it loads them).
      backbone_weights: a torchvision ImageNet ResNet state dict
        (``.pth``, ``.safetensors`` or ``.npz``) that ``jfcnn.train`` loads into
        the backbone when a run starts from step 0; the module itself does
        not read it.
      trainable_backbone_layers: 0-5, how many backbone layers (from res5
        down to the stem) the optimizer updates; see
        :attr:`frozen_backbone_layers`.
    """

    # The values a config may give the string fields (checked before a run starts).
    FIELD_CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "roi_heads": tuple(ROI_HEADS),
        "roi_align": ROI_ALIGN_MODES,
        "roi_pooler": ROI_POOLERS,
        "mask_paste": MASK_PASTE_MODES,
        "norm": NORMS,
        "dtype": ("float32", "bfloat16", "float16"),
    }

    num_classes: int = 91
    roi_heads: str = "fpn"
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
    roi_align_aligned: bool = True
    roi_pooler: str = "align"
    canonical_scale: float = 224.0
    canonical_level: int = 4
    box_head_dim: int = 1024
    mask_head_channels: int = 256
    mask_head_convs: int = 4
    box_score_threshold: float = 0.05
    box_nms_threshold: float = 0.5
    detections_per_image: int = 100
    mask_threshold: float = 0.5
    mask_paste: str = "centers"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    frozen_batch_norm: bool = False
    norm_epsilon: float = NORM_EPSILON
    backbone_weights: str | None = None
    trainable_backbone_layers: int | None = None

    @property
    def backbone_norm(self) -> str:
        """The norm the backbone is built with (``frozen_batch_norm`` overrides ``norm``)."""
        return "frozen_batch" if self.frozen_batch_norm else self.norm

    @property
    def frozen_backbone_layers(self) -> tuple[str, ...]:
        """Backbone children whose params the optimizer leaves alone (torchvision's rule).

        The backbone's five layers, input first, are the stem (``stem_conv``,
        ``stem_norm``), ``res2`` .. ``res5``; the last
        ``trainable_backbone_layers`` of them train. ``None`` means 3 when
        ``backbone_weights`` are loaded and 5 (all) otherwise, as
        torchvision's detection builders default.
        """
        trainable = self.trainable_backbone_layers
        if trainable is None:
            trainable = 3 if self.backbone_weights else 5
        if not 0 <= trainable <= 5:
            raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable}.")
        layers = (("stem_conv", "stem_norm"), ("res2",), ("res3",), ("res4",), ("res5",))
        return tuple(name for group in layers[: 5 - trainable] for name in group)

    @property
    def frozen_param_paths(self) -> tuple[tuple[str, ...], ...]:
        """Param subtrees training leaves unchanged: :attr:`frozen_backbone_layers`' paths.

        The C4 design's res5 lives in its ROI heads, at the top level.
        """
        return tuple(
            (name,) if self.roi_heads == "c4" and name == "res5" else ("backbone", name)
            for name in self.frozen_backbone_layers
        )

    def _roi_heads_class(self) -> type[ROIHeads]:
        if self.roi_heads not in ROI_HEADS:
            raise ValueError(
                f"roi_heads must be one of {tuple(ROI_HEADS)}, got {self.roi_heads!r}."
            )
        return ROI_HEADS[self.roi_heads]

    def setup(self):
        self._roi_heads_class()
        if self.roi_align not in ROI_ALIGN_MODES:
            raise ValueError(f"roi_align must be one of {ROI_ALIGN_MODES}, got {self.roi_align!r}.")
        if self.roi_pooler not in ROI_POOLERS:
            raise ValueError(f"roi_pooler must be one of {ROI_POOLERS}, got {self.roi_pooler!r}.")
        if self.depth not in RESNET_SPECS:
            raise ValueError(f"depth must be one of {sorted(RESNET_SPECS)}, got {self.depth}.")
        block_name, default_sizes = RESNET_SPECS[self.depth]
        stage_sizes = tuple(self.stage_sizes or default_sizes)
        _ = self.frozen_backbone_layers  # Rejects a bad trainable_backbone_layers early.
        norm = self.backbone_norm
        common = dict(
            norm=norm,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            norm_epsilon=self.norm_epsilon,
        )
        heads = dict(
            num_classes=self.num_classes,
            batch_size_per_image=self.roi_batch_size_per_image,
            positive_fraction=self.roi_positive_fraction,
            fg_iou_threshold=self.roi_fg_iou_threshold,
            bg_iou_threshold=self.roi_bg_iou_threshold,
            mask_rois_per_image=self.mask_rois_per_image,
            mask_pool_size=self.mask_pool_size,
            sampling_ratio=self.sampling_ratio,
            roi_align=self.roi_align,
            aligned=self.roi_align_aligned,
            roi_pooler=self.roi_pooler,
            mask_head_channels=self.mask_head_channels,
            score_threshold=self.box_score_threshold,
            nms_threshold=self.box_nms_threshold,
            detections_per_image=self.detections_per_image,
            dtype=self.dtype,
        )
        # The one place the design picks the backbone: C4 pools res4 and runs
        # res5 per ROI; the FPN design pools the pyramid.
        if self.roi_heads == "c4":
            self.backbone = ResNet(
                depth=self.depth,
                stage_sizes=stage_sizes,
                width=self.width,
                return_stages=("res4",),
                **common,
            )
            self.heads = Res5ROIHeads(
                stride=FEATURE_STRIDES["res4"],
                res5_blocks=stage_sizes[3],
                res5_features=self.width * 8,
                res5_block=block_name,
                bn_axis_name=self.bn_axis_name,
                norm=norm,
                **heads,
            )
        else:
            self.backbone = ResNet(
                depth=self.depth,
                stage_sizes=stage_sizes,
                width=self.width,
                return_stages=tuple(self.fpn_in_features),
                **common,
            )
            self.fpn = FPN(self.fpn_channels, tuple(self.fpn_in_features), self.dtype)
            self.heads = StandardROIHeads(
                strides=tuple(FEATURE_STRIDES[name] for name in self.fpn_in_features),
                box_pool_size=self.box_pool_size,
                canonical_scale=self.canonical_scale,
                canonical_level=self.canonical_level,
                box_head_dim=self.box_head_dim,
                mask_head_convs=self.mask_head_convs,
                **heads,
            )
        # The heads' children live at the top level of the parameter tree
        # (`box_branch`, `res5`, ...), as before the heads became a module:
        # checkpoints and torchvision weight mappings keep their names.
        nn.share_scope(self, self.heads)
        self.rpn = RPN(
            anchor_sizes=self.anchor_sizes,
            aspect_ratios=self.aspect_ratios,
            pre_nms_top_n_train=self.rpn_pre_nms_top_n_train,
            pre_nms_top_n_test=self.rpn_pre_nms_top_n_test,
            post_nms_top_n_train=self.rpn_post_nms_top_n_train,
            post_nms_top_n_test=self.rpn_post_nms_top_n_test,
            nms_threshold=self.rpn_nms_threshold,
            fg_iou_threshold=self.rpn_fg_iou_threshold,
            bg_iou_threshold=self.rpn_bg_iou_threshold,
            batch_size_per_image=self.rpn_batch_size_per_image,
            positive_fraction=self.rpn_positive_fraction,
            dtype=self.dtype,
        )

    @property
    def size_divisor(self) -> int:
        """Image sides must be multiples of this: the stride of the coarsest map.

        Other sizes misalign the up-sampled FPN levels with the maps they are
        added to (and C4's res4 grid with the pixels), which silently costs
        recall, so they are rejected.
        """
        return 16 if self.roi_heads == "c4" else 32

    @property
    def mask_size(self) -> int:
        """Side ``S`` of the predicted masks (28 for ``"fpn"``, 14 for ``"c4"`` by default)."""
        return self._roi_heads_class().output_mask_size(self.mask_pool_size)

    def _features(
        self, images: jax.Array, train: bool, image_sizes: jax.Array | None = None
    ) -> tuple[list, list]:
        """``(rpn_maps, pool_maps)``: maps the RPN runs on and maps ROI Align reads.

        With ``image_sizes`` the canvas outside each image is zero after
        normalization (``IMAGE_MEAN`` before it), torchvision's padding,
        whatever the canvas held there.
        """
        check_images(images, self.size_divisor)
        mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
        std = jnp.asarray(IMAGE_STD, jnp.float32)
        x = (images.astype(jnp.float32) - mean) / std
        if image_sizes is not None:
            rows = jnp.arange(images.shape[1])[None, :, None] < image_sizes[:, None, None, 0]
            cols = jnp.arange(images.shape[2])[None, None, :] < image_sizes[:, None, None, 1]
            x = jnp.where((rows & cols)[..., None], x, 0.0)
        x = x.astype(self.dtype)
        with _batch_edges(image_sizes, images.shape[1:3], self.size_divisor):
            features = self.backbone(x, train=train)
            if self.roi_heads == "c4":
                maps = [features["res4"]]
                return maps, maps
            pyramid = self.fpn(features)
        levels = sorted(pyramid, key=lambda name: int(name[1:]))
        pool_maps = [pyramid[name] for name in levels[: len(self.fpn_in_features)]]
        return [pyramid[name] for name in levels], pool_maps

    # -- entry points -------------------------------------------------------
    def initialize(self, images: jax.Array) -> None:
        """Creates every variable; for ``model.init(rng, images, method=MaskRCNN.initialize)``.

        Cheap: no proposals, NMS or ROI Align (the heads run on zeros).
        """
        rpn_maps, pool_maps = self._features(images, train=False)
        self.rpn.head(rpn_maps)
        self.heads.initialize(images.shape[0], pool_maps[0].shape[-1])

    def __call__(
        self, images: jax.Array, *, train: bool = False, image_sizes: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """Detections of ``(B, H, W, 3)`` images in ``[0, 1]``.

        ``image_sizes`` ``(B, 2)`` int: each image's ``(height, width)`` in
        the top-left of its canvas, the rest padding. As torchvision does,
        proposals and detections are clipped to it and anchors are limited
        to it padded to a multiple of :attr:`size_divisor`, and the canvas
        outside it is set to ``IMAGE_MEAN`` (zero after normalization,
        torchvision's padding). None: the whole canvas is image.

        Returns:
          ``boxes`` (B, D, 4) float32 pixel ``(x1, y1, x2, y2)``; ``scores``
          (B, D) float32; ``classes`` (B, D) int32 in ``1 .. K-1``;
          ``detection_valid`` (B, D) bool; ``masks`` (B, D, H, W) uint8 0/1
          (pasted, thresholded at ``mask_threshold``); ``mask_probs``
          (B, D, S, S) float32 per-box probabilities of the detected class.
          Padding slots (``detection_valid`` False) are all zeros.
        """
        image_size = images.shape[1:3]
        padded_sizes = None
        if image_sizes is not None:
            image_sizes = jnp.asarray(image_sizes, jnp.int32)
            divisor = self.size_divisor
            padded_sizes = -(-image_sizes // divisor) * divisor
        rpn_maps, pool_maps = self._features(images, train, image_sizes)
        proposals, proposal_valid = self.rpn(rpn_maps, image_size, image_sizes, padded_sizes)
        detections = self.heads(
            pool_maps,
            proposals,
            proposal_valid,
            image_size,
            train=train,
            image_sizes=image_sizes,
            padded_sizes=padded_sizes,
        )
        paste = paste_masks_torchvision if self.mask_paste == "torchvision" else paste_masks
        masks = paste(
            detections["mask_probs"],
            detections["boxes"],
            image_size,
            threshold=self.mask_threshold,
        )
        return {
            "boxes": detections["boxes"],
            "scores": detections["scores"],
            "classes": detections["classes"],
            "detection_valid": detections["detection_valid"],
            "masks": masks,
            "mask_probs": detections["mask_probs"],
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
        image_size = images.shape[1:3]
        rpn_maps, pool_maps = self._features(images, train)
        # One key per image and stage, so an image's sampling does not depend on the batch.
        keys = jax.vmap(jax.random.split)(example_keys)
        rpn_losses, positive_anchors, proposals, proposal_valid = self.rpn.losses(
            rpn_maps, image_size, gt_boxes, gt_valid, keys[:, 0]
        )
        roi_losses, roi_stats = self.heads.losses(
            pool_maps,
            proposals,
            proposal_valid,
            gt_boxes,
            gt_labels,
            gt_valid,
            targets["instance_masks"],
            keys[:, 1],
            train=train,
        )
        return {**rpn_losses, **roi_losses}, {**roi_stats, "positive_anchors": positive_anchors}
