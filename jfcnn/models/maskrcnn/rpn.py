"""Region proposal network: head, anchors, proposals and loss (torchvision's ``rpn.py``).

One module, :class:`RPN`, holds the head's layers and everything the RPN
does with their outputs: the anchors of the feature maps it sees, the
proposals it hands the ROI heads and its two losses. Static shapes: a fixed
number of proposals per image, padded, with a validity mask (see
:func:`jfcnn.ops.detection.select_proposals`).

Letters used for shapes:

  B: images.  Hl, Wl: size of feature map ``l``.  C: channels.
  A: anchors per location.  N: anchors of all levels (``sum_l Hl * Wl * A``).
  M: ground-truth instances per image (padded).  P: proposals per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jfcnn.models.maskrcnn.common import Dtype, smooth_l1
from jfcnn.ops.anchors import anchor_strides, generate_anchors, multilevel_anchors
from jfcnn.ops.boxes import box_iou, encode_boxes
from jfcnn.ops.detection import match_boxes, sample_balanced, select_proposals

# RPN box deltas are unweighted (torchvision's BoxCoder weights (1, 1, 1, 1)).
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def rpn_losses(
    key: jax.Array,
    anchors: jax.Array,
    objectness: jax.Array,
    deltas: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    fg_iou_threshold: float,
    bg_iou_threshold: float,
    batch_size_per_image: int,
    positive_fraction: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RPN losses of one image, torchvision's ``RegionProposalNetwork.compute_loss``.

    Anchors are matched to the ground truth (IoU >= ``fg_iou_threshold``
    positive, < ``bg_iou_threshold`` negative, and each instance's best
    anchors positive), ``batch_size_per_image`` of them sampled (at most
    ``positive_fraction`` positive), and both losses divided by the number
    sampled: binary cross-entropy of the objectness on the sampled anchors,
    smooth L1 of the deltas on the positive ones.

    Args:
      key: PRNG key of the anchor sampling.
      anchors: ``(N, 4)`` pixel ``(x1, y1, x2, y2)``.
      objectness: ``(N,)`` logits.
      deltas: ``(N, 4)`` predicted deltas relative to the anchors.
      gt_boxes: ``(M, 4)`` pixel ``(x1, y1, x2, y2)``.
      gt_valid: ``(M,)`` bool, False for padding.

    Returns:
      ``(objectness_loss, box_loss, num_positive)``, float32 scalars.
    """
    matched, labels = match_boxes(
        box_iou(anchors, gt_boxes),
        high_threshold=fg_iou_threshold,
        low_threshold=bg_iou_threshold,
        allow_low_quality_matches=True,
        gt_valid=gt_valid,
    )
    positive, negative = sample_balanced(key, labels, batch_size_per_image, positive_fraction)
    sampled = positive | negative
    num_sampled = jnp.maximum(jnp.sum(sampled), 1)
    bce = optax.sigmoid_binary_cross_entropy(objectness, positive.astype(jnp.float32))
    objectness_loss = jnp.sum(jnp.where(sampled, bce, 0.0)) / num_sampled
    anchor_targets = encode_boxes(gt_boxes[matched], anchors, RPN_BOX_WEIGHTS)
    anchor_targets = jnp.where(positive[:, None], anchor_targets, 0.0)
    box_error = jnp.sum(smooth_l1(deltas - anchor_targets), axis=-1)
    box_loss = jnp.sum(jnp.where(positive, box_error, 0.0)) / num_sampled
    return objectness_loss, box_loss, jnp.sum(positive).astype(jnp.float32)


class RPN(nn.Module):
    """Region proposal network on a list of feature maps (FPN levels, or res4 alone for C4).

    The head is shared by all levels: 3x3 conv + ReLU, then 1x1 convs to
    ``A`` objectness logits and ``4 A`` deltas per location.

    Params: ``conv`` (3x3, C -> C), ``cls`` (1x1, C -> A), ``bbox``
    (1x1, C -> 4 A); channel ``a * 4 + i`` of ``bbox`` is coordinate ``i``
    of anchor ``a``, as in torchvision (so its weights map one to one).

    Methods:

    * ``head(feature_maps)``: objectness ``(B, N)`` and deltas ``(B, N, 4)``.
    * ``anchors(feature_maps, image_size)``: ``(N, 4)`` anchors and the
      anchors per level.
    * ``__call__(feature_maps, image_size)``: inference proposals.
    * ``losses(feature_maps, image_size, gt_boxes, gt_valid, keys)``: the
      two losses and the training proposals.

    Attributes:
      anchor_sizes: one tuple of sizes (pixels) per level, the same count per level.
      aspect_ratios: anchor height / width ratios, all levels.
      pre_nms_top_n_train, pre_nms_top_n_test: candidates per level before NMS.
      post_nms_top_n_train, post_nms_top_n_test: ``P``, proposals per image.
      nms_threshold: NMS IoU of the proposals.
      fg_iou_threshold, bg_iou_threshold: anchor matching.
      batch_size_per_image, positive_fraction: anchor sampling.
      dtype: computation dtype of the head (its outputs are float32).
    """

    anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_threshold: float = 0.7
    fg_iou_threshold: float = 0.7
    bg_iou_threshold: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    dtype: Dtype = jnp.float32

    @property
    def num_anchors(self) -> int:
        """``A``, anchors per location (every level has the same count)."""
        anchors_per_level = {len(sizes) for sizes in self.anchor_sizes}
        if len(anchors_per_level) != 1:
            raise ValueError(
                f"every level needs the same number of anchor sizes, got {self.anchor_sizes}."
            )
        return len(self.aspect_ratios) * anchors_per_level.pop()

    @nn.compact
    def head(self, feature_maps: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(B, Hl, Wl, C)`` maps -> objectness ``(B, N)`` and deltas ``(B, N, 4)``, float32.

        ``N`` runs level after level in the order of
        :func:`jfcnn.ops.multilevel_anchors`.
        """
        num_anchors = self.num_anchors
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
        cls = nn.Conv(num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="cls")
        bbox = nn.Conv(4 * num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="bbox")
        logits, deltas = [], []
        for x in feature_maps:
            t = nn.relu(conv(x))
            logits.append(cls(t).reshape(x.shape[0], -1))
            deltas.append(bbox(t).reshape(x.shape[0], -1, 4))
        return (
            jnp.concatenate(logits, axis=1).astype(jnp.float32),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32),
        )

    def anchors(
        self, feature_maps: Sequence[jax.Array], image_size: tuple[int, int]
    ) -> tuple[jax.Array, list[int]]:
        """``(N, 4)`` pixel anchors of the maps' grids and the count of each level (static)."""
        if len(self.anchor_sizes) != len(feature_maps):
            raise ValueError(
                f"anchor_sizes has {len(self.anchor_sizes)} levels but the RPN sees "
                f"{len(feature_maps)} feature maps."
            )
        grids = [tuple(m.shape[1:3]) for m in feature_maps]
        anchors = multilevel_anchors(
            grids, anchor_strides(image_size, grids), self.anchor_sizes, self.aspect_ratios
        )
        per_location = len(self.aspect_ratios) * len(self.anchor_sizes[0])
        return jnp.asarray(anchors), [h * w * per_location for h, w in grids]

    def _proposals(
        self, anchors, level_sizes, objectness, deltas, image_size, *, train: bool, sizes=None
    ):
        pre_nms_top_n = self.pre_nms_top_n_train if train else self.pre_nms_top_n_test
        post_nms_top_n = self.post_nms_top_n_train if train else self.post_nms_top_n_test
        if sizes is None:
            sizes = jnp.broadcast_to(jnp.asarray(image_size), (objectness.shape[0], 2))

        def proposals_of(anchors, objectness, deltas, size):
            proposals, _, valid = select_proposals(
                anchors,
                objectness,
                deltas,
                level_sizes,
                size,
                pre_nms_top_n=pre_nms_top_n,
                post_nms_top_n=post_nms_top_n,
                nms_threshold=self.nms_threshold,
            )
            return proposals, valid

        # Anchors are shared by the batch, or (B, N, 4) per image.
        anchor_axis = 0 if anchors.ndim == 3 else None
        return jax.vmap(proposals_of, in_axes=(anchor_axis, 0, 0, 0))(
            anchors, objectness, deltas, sizes
        )

    def __call__(
        self,
        feature_maps: Sequence[jax.Array],
        image_size: tuple[int, int],
        image_sizes: jax.Array | None = None,
        padded_sizes: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Inference proposals: ``(B, P, 4)`` pixel boxes and ``(B, P)`` bool validity.

        Args:
          feature_maps: the RPN's levels, finest first.
          image_size: ``(H, W)`` of the canvas (static).
          image_sizes: ``(B, 2)`` int, each image's ``(height, width)`` on the
            canvas (top-left); proposals are clipped to it (torchvision clips
            to the resized image, not its padded batch). None: the canvas.
          padded_sizes: ``(B, 2)`` int, the region anchors may lie in (the
            image padded as torchvision pads its batch); anchors of grid
            cells past it never become proposals, so a canvas larger than
            torchvision's adds none from its padding. None: the canvas.
        """
        objectness, deltas = self.head(feature_maps)
        anchors, level_sizes = self.anchors(feature_maps, image_size)
        if padded_sizes is not None:
            anchors, inside = self._image_anchors(feature_maps, image_size, padded_sizes)
            objectness = jnp.where(inside, objectness, -jnp.inf)
        return self._proposals(
            anchors, level_sizes, objectness, deltas, image_size, train=False, sizes=image_sizes
        )

    def _image_anchors(self, feature_maps, image_size, padded_sizes):
        """Each image's anchors as torchvision places them on its padded image alone.

        torchvision's grid of a level covers ``ceil(padded / s)`` cells for the
        level's nominal stride ``s`` (4 .. 64) and its anchors step by
        ``padded // cells``, which is not ``s`` for a pooled top level (P6)
        whose grid rounds up. Cells past that grid (canvas padding) are not
        inside.

        Returns:
          ``(anchors, inside)``: ``(B, N, 4)`` float32 and ``(B, N)`` bool.
        """
        padded = jnp.asarray(padded_sizes, jnp.int32)
        batch = padded.shape[0]
        anchors, inside = [], []
        for feature_map, level_sizes in zip(feature_maps, self.anchor_sizes, strict=True):
            h, w = feature_map.shape[1:3]
            nominal = [
                2 ** round(math.log2(size / cells))
                for size, cells in zip(image_size, (h, w), strict=True)
            ]
            cells_h = -(-padded[:, 0] // nominal[0])
            cells_w = -(-padded[:, 1] // nominal[1])
            ys = (jnp.arange(h)[None] * (padded[:, 0] // cells_h)[:, None]).astype(jnp.float32)
            xs = (jnp.arange(w)[None] * (padded[:, 1] // cells_w)[:, None]).astype(jnp.float32)
            ys = jnp.broadcast_to(ys[:, :, None], (batch, h, w))
            xs = jnp.broadcast_to(xs[:, None, :], (batch, h, w))
            shifts = jnp.stack([xs, ys, xs, ys], axis=-1)
            base = jnp.asarray(generate_anchors(level_sizes, self.aspect_ratios))
            anchors.append((shifts[:, :, :, None, :] + base).reshape(batch, -1, 4))
            cells = (jnp.arange(h)[None, :, None] < cells_h[:, None, None]) & (
                jnp.arange(w)[None, None, :] < cells_w[:, None, None]
            )
            inside.append(jnp.repeat(cells.reshape(batch, -1), len(base), axis=1))
        return jnp.concatenate(anchors, axis=1), jnp.concatenate(inside, axis=1)

    def losses(
        self,
        feature_maps: Sequence[jax.Array],
        image_size: tuple[int, int],
        gt_boxes: jax.Array,
        gt_valid: jax.Array,
        keys: jax.Array,
    ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
        """Per-image RPN losses (see :func:`rpn_losses`) and the training proposals.

        Args:
          feature_maps: ``(B, Hl, Wl, C)`` maps.
          image_size: ``(H, W)``.
          gt_boxes: ``(B, M, 4)`` float32 pixel ``(x1, y1, x2, y2)``.
          gt_valid: ``(B, M)`` bool.
          keys: ``(B,)`` PRNG keys of the anchor sampling.

        Returns:
          ``(losses, positive_anchors, proposals, proposal_valid)``: ``losses``
          has ``rpn_objectness`` and ``rpn_box``, each ``(B,)``;
          ``positive_anchors`` ``(B,)`` float32; ``proposals`` ``(B, P, 4)``
          and ``proposal_valid`` ``(B, P)``, constants (no gradient flows
          back through them, as in torchvision).
        """
        objectness, deltas = self.head(feature_maps)
        anchors, level_sizes = self.anchors(feature_maps, image_size)

        def losses_of(key, objectness, deltas, gt_boxes, gt_valid):
            return rpn_losses(
                key,
                anchors,
                objectness,
                deltas,
                gt_boxes,
                gt_valid,
                fg_iou_threshold=self.fg_iou_threshold,
                bg_iou_threshold=self.bg_iou_threshold,
                batch_size_per_image=self.batch_size_per_image,
                positive_fraction=self.positive_fraction,
            )

        objectness_loss, box_loss, positive_anchors = jax.vmap(losses_of)(
            keys, objectness, deltas, gt_boxes, gt_valid
        )
        proposals, proposal_valid = self._proposals(
            anchors,
            level_sizes,
            jax.lax.stop_gradient(objectness),
            jax.lax.stop_gradient(deltas),
            image_size,
            train=True,
        )
        losses = {"rpn_objectness": objectness_loss, "rpn_box": box_loss}
        return losses, positive_anchors, proposals, proposal_valid
