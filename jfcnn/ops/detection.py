"""Static-shape building blocks of a two-stage detector (Faster / Mask R-CNN).

Everything torchvision's detection models do with boolean indexing and
variable-length lists is done here on fixed shapes, with validity masks:

* :func:`match_boxes`: torchvision's ``Matcher`` (IoU thresholds, optional
  low-quality matches).
* :func:`sample_balanced` and :func:`sample_rois`: torchvision's
  ``BalancedPositiveNegativeSampler`` as masks (RPN anchors) or as a fixed
  number of slots with the positives first (ROI heads).
* :func:`select_proposals`: the RPN's per-level top-k, decoding, clipping and
  NMS, padded to a fixed count.
* :func:`select_detections`: score threshold, per-class NMS and a fixed
  maximum number of detections.
* :func:`crop_mask_targets`: mask targets cropped from the ground-truth
  instance masks by :func:`jfcnn.ops.roi_align` itself.
* :func:`paste_masks`: per-box mask predictions resized into their boxes in
  the full image and thresholded.

ROI Align itself, in both its gather and dense forms, lives in
:mod:`jfcnn.ops.roi_align`.

The per-image functions take one image's arrays; ``jax.vmap`` them over a
batch. :func:`crop_mask_targets` and :func:`paste_masks` are batched
already, because :func:`jfcnn.ops.roi_align` is fastest on all boxes at once.

Dimension letters used in the docstrings:

* ``N``: candidate boxes (anchors or proposals) of one image.
* ``M``: ground-truth instances (padded) of one image.
* ``R``: sampled ROIs of one image.
* ``K``: classes, background (class 0) included.
* ``D``: detections per image.
* ``B``: images.
* ``H``, ``W``: image size; ``PH``, ``PW``: mask size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jfcnn.ops._util import over_batch_shards
from jfcnn.ops.boxes import clip_boxes, decode_boxes, min_size_mask
from jfcnn.ops.nms import batched_nms
from jfcnn.ops.roi_align import roi_align

__all__ = [
    "crop_mask_targets",
    "match_boxes",
    "paste_masks",
    "paste_masks_torchvision",
    "sample_balanced",
    "sample_rois",
    "select_detections",
    "select_proposals",
]

# Labels returned by `match_boxes`.
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


def match_boxes(
    iou: jax.Array,
    *,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool = False,
    gt_valid: jax.Array | None = None,
    candidate_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Matches each candidate box to its best ground-truth box, torchvision's ``Matcher``.

    A candidate whose best IoU is ``>= high_threshold`` is positive,
    ``< low_threshold`` negative, in between ignored. With
    ``allow_low_quality_matches`` (the RPN's setting) every candidate that
    has the highest IoU of some ground-truth box (ties included) is positive
    too, so each ground-truth box gets at least one positive; a ground-truth
    box that overlaps no candidate at all makes none positive.

    Args:
      iou: ``(N, M)`` IoU of candidates with ground-truth boxes.
      high_threshold: IoU from which a candidate is positive.
      low_threshold: IoU below which a candidate is negative
        (``<= high_threshold``; equal means nothing is ignored).
      allow_low_quality_matches: also make each ground-truth box's best
        candidates positive.
      gt_valid: ``(M,)`` bool; padding ground truth (False) is never matched.
      candidate_valid: ``(N,)`` bool; padding candidates (False) are ignored.

    Returns:
      ``(matched, labels)``: ``matched`` ``(N,)`` int32, the index of the best
      valid ground-truth box (0 if there is none; only meaningful for
      positives); ``labels`` ``(N,)`` int32, 1 positive, 0 negative,
      -1 ignored. Without valid ground truth every valid candidate is negative.

    Raises:
      ValueError: if ``iou`` is not 2-D, a mask has the wrong shape, or
        ``low_threshold > high_threshold``.

    >>> iou = jnp.array([[0.8, 0.1], [0.4, 0.2], [0.1, 0.6]])
    >>> match_boxes(iou, high_threshold=0.7, low_threshold=0.3)
    (Array([0, 0, 1], dtype=int32), Array([ 1, -1, -1], dtype=int32))
    """
    iou = jnp.asarray(iou)
    if iou.ndim != 2:
        raise ValueError(f"iou must have shape (N, M), got {iou.shape}")
    if low_threshold > high_threshold:
        raise ValueError(
            f"low_threshold {low_threshold} must not exceed high_threshold {high_threshold}"
        )
    n, m = iou.shape
    if gt_valid is not None and jnp.shape(gt_valid) != (m,):
        raise ValueError(f"gt_valid must have shape ({m},), got {jnp.shape(gt_valid)}")
    if candidate_valid is not None and jnp.shape(candidate_valid) != (n,):
        raise ValueError(
            f"candidate_valid must have shape ({n},), got {jnp.shape(candidate_valid)}"
        )
    if m == 0:
        matched = jnp.zeros((n,), jnp.int32)
        labels = jnp.full((n,), NEGATIVE, jnp.int32)
    else:
        gt_valid = jnp.ones((m,), bool) if gt_valid is None else jnp.asarray(gt_valid, bool)
        usable = gt_valid[None, :]
        if candidate_valid is not None:
            # Padding candidates must not be any ground truth's best match either.
            usable = usable & jnp.asarray(candidate_valid, bool)[:, None]
        iou = jnp.where(usable, iou, -1.0)
        matched = jnp.argmax(iou, axis=1).astype(jnp.int32)
        best = jnp.max(iou, axis=1)
        labels = jnp.where(
            best >= high_threshold, POSITIVE, jnp.where(best < low_threshold, NEGATIVE, IGNORED)
        ).astype(jnp.int32)
        if allow_low_quality_matches:
            highest_per_gt = jnp.max(iou, axis=0)
            is_best = (iou == highest_per_gt[None, :]) & (highest_per_gt[None, :] > 0)
            labels = jnp.where(jnp.any(is_best & usable, axis=1), POSITIVE, labels)
    if candidate_valid is not None:
        labels = jnp.where(jnp.asarray(candidate_valid, bool), labels, IGNORED)
    return matched, labels


def _random_ranks(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of ``1 .. n``: distinct random ranks without ties."""
    return jax.random.permutation(key, n).astype(jnp.int32) + 1


def _pick(ranks: jax.Array, eligible: jax.Array, max_count: int) -> tuple[jax.Array, jax.Array]:
    """Up to ``max_count`` eligible entries in random order: ``(indices, count)``.

    ``indices`` ``(max_count,)``; the first ``count = min(max_count,
    sum(eligible))`` are distinct eligible entries, the rest are arbitrary.
    """
    scores = jnp.where(eligible, ranks, 0)
    _, indices = jax.lax.top_k(scores, max_count)
    count = jnp.minimum(jnp.sum(eligible, dtype=jnp.int32), max_count)
    return indices.astype(jnp.int32), count


def _check_sampling(labels: jax.Array, num_samples: int, positive_fraction: float) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {labels.shape}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")


def sample_balanced(
    key: jax.Array, labels: jax.Array, num_samples: int, positive_fraction: float
) -> tuple[jax.Array, jax.Array]:
    """Random positives and negatives as masks, torchvision's ``BalancedPositiveNegativeSampler``.

    Takes ``P = min(int(num_samples * positive_fraction), #positives)``
    positives and ``min(num_samples - P, #negatives)`` negatives, uniformly at
    random without replacement.

    Args:
      key: PRNG key.
      labels: ``(N,)`` int, 1 positive, 0 negative, anything else ignored (as
        returned by :func:`match_boxes`).
      num_samples: total number of samples wanted.
      positive_fraction: largest share of positives.

    Returns:
      ``(positive, negative)``, ``(N,)`` bool masks of the sampled entries.

    Raises:
      ValueError: if ``labels`` is not 1-D or the counts are out of range.

    >>> labels = jnp.array([1, 1, 1, 0, 0, 0, 0, -1])
    >>> pos, neg = sample_balanced(jax.random.key(0), labels, 4, 0.5)
    >>> int(pos.sum()), int(neg.sum()), bool(jnp.all(labels[pos] == 1))
    (2, 2, True)
    """
    labels = jnp.asarray(labels)
    _check_sampling(labels, num_samples, positive_fraction)
    n = labels.shape[0]
    ranks = _random_ranks(key, n)
    max_positive = min(int(num_samples * positive_fraction), n)
    positive = labels == POSITIVE
    negative = labels == NEGATIVE
    if max_positive > 0:
        pos_idx, num_pos = _pick(ranks, positive, max_positive)
        chosen = jnp.arange(max_positive) < num_pos
        pos_mask = jnp.zeros((n,), bool).at[pos_idx].set(chosen)
    else:
        num_pos = jnp.zeros((), jnp.int32)
        pos_mask = jnp.zeros((n,), bool)
    max_negative = min(num_samples, n)
    neg_idx, num_neg = _pick(ranks, negative, max_negative)
    chosen = jnp.arange(max_negative) < jnp.minimum(num_neg, num_samples - num_pos)
    neg_mask = jnp.zeros((n,), bool).at[neg_idx].set(chosen)
    return pos_mask, neg_mask


def sample_rois(
    key: jax.Array, labels: jax.Array, num_samples: int, positive_fraction: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A fixed number of sampled candidates, positives first.

    The same draw as :func:`sample_balanced` (up to ``int(num_samples *
    positive_fraction)`` positives, negatives for the rest), laid out as
    ``R = num_samples`` slots: the sampled positives, then the sampled
    negatives, then padding. So the first ``int(R * positive_fraction)``
    slots hold every sampled positive, and a mask head can run on those slots
    alone.

    Args:
      key: PRNG key.
      labels: ``(N,)`` int, 1 positive, 0 negative, anything else ignored.
        Needs ``N >= R``.
      num_samples: ``R``.
      positive_fraction: largest share of positives.

    Returns:
      ``(indices, positive, valid)``, each ``(R,)``: int32 indices into the
      candidates, bool positive, bool valid (False for padding slots, whose
      index is arbitrary).

    Raises:
      ValueError: if ``labels`` is not 1-D, ``N < R`` or the fraction is out
        of range.

    >>> labels = jnp.array([0, 1, 0, -1, 1, 0])
    >>> idx, pos, ok = sample_rois(jax.random.key(0), labels, 4, 0.5)
    >>> pos.tolist(), ok.tolist(), sorted(idx[:2].tolist())
    ([True, True, False, False], [True, True, True, True], [1, 4])
    """
    labels = jnp.asarray(labels)
    _check_sampling(labels, num_samples, positive_fraction)
    n = labels.shape[0]
    if n < num_samples:
        raise ValueError(
            f"need at least num_samples={num_samples} candidates, got labels {labels.shape}"
        )
    ranks = _random_ranks(key, n)
    max_positive = int(num_samples * positive_fraction)
    slot = jnp.arange(num_samples)
    neg_idx, num_neg = _pick(ranks, labels == NEGATIVE, num_samples)
    if max_positive > 0:
        pos_idx, num_pos = _pick(ranks, labels == POSITIVE, max_positive)
        from_pos = pos_idx[jnp.minimum(slot, max_positive - 1)]
    else:
        num_pos = jnp.zeros((), jnp.int32)
        from_pos = jnp.zeros((num_samples,), jnp.int32)
    num_neg = jnp.minimum(num_neg, num_samples - num_pos)
    from_neg = neg_idx[jnp.clip(slot - num_pos, 0, num_samples - 1)]
    positive = slot < num_pos
    indices = jnp.where(positive, from_pos, from_neg)
    valid = slot < num_pos + num_neg
    return indices, positive, valid


def select_proposals(
    anchors: jax.Array,
    objectness: jax.Array,
    deltas: jax.Array,
    level_sizes: Sequence[int],
    image_size: Sequence[int],
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_threshold: float,
    min_size: float = 1e-3,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Region proposals of one image, torchvision's ``RegionProposalNetwork.filter_proposals``.

    Per level the ``pre_nms_top_n`` anchors of highest objectness are decoded,
    clipped to the image and dropped when a side is shorter than
    ``min_size``; NMS then runs per level (boxes of different levels never
    suppress each other) and the ``post_nms_top_n`` best survivors of all
    levels are kept. Nothing here is differentiable (the proposals are
    constants for the ROI heads, as in torchvision): pass
    ``lax.stop_gradient``-ed inputs.

    Args:
      anchors: ``(N, 4)`` anchors of all levels, level after level.
      objectness: ``(N,)`` objectness logits.
      deltas: ``(N, 4)`` box deltas relative to the anchors.
      level_sizes: anchors per level (summing to ``N``), static.
      image_size: ``(H, W)`` for clipping, static or traced.
      pre_nms_top_n: candidates kept per level before NMS.
      post_nms_top_n: ``P``, proposals returned.
      nms_threshold: NMS IoU threshold.
      min_size: smallest side a proposal may have.
      weights: box coder weights of the deltas.

    Returns:
      ``(boxes, scores, valid)``: ``(P, 4)`` proposals in descending score
      order, ``(P,)`` sigmoid objectness and ``(P,)`` bool; padding slots
      have zero boxes and scores.

    Raises:
      ValueError: on inconsistent shapes.
    """
    anchors, objectness, deltas = map(jnp.asarray, (anchors, objectness, deltas))
    n = anchors.shape[0]
    if anchors.shape != (n, 4) or deltas.shape != (n, 4) or objectness.shape != (n,):
        raise ValueError(
            f"need anchors (N, 4), objectness (N,), deltas (N, 4); got {anchors.shape}, "
            f"{objectness.shape}, {deltas.shape}"
        )
    if sum(level_sizes) != n:
        raise ValueError(f"level_sizes {tuple(level_sizes)} do not sum to the {n} anchors")
    indices, levels = [], []
    start = 0
    for level, size in enumerate(level_sizes):
        k = min(pre_nms_top_n, size)
        _, top = jax.lax.top_k(objectness[start : start + size], k)
        indices.append(top + start)
        levels.append(jnp.full((k,), level, jnp.int32))
        start += size
    index = jnp.concatenate(indices)
    level_ids = jnp.concatenate(levels)
    logits = objectness[index]
    boxes = clip_boxes(decode_boxes(deltas[index], anchors[index], weights), image_size)
    valid = min_size_mask(boxes, min_size) & jnp.isfinite(logits)
    scores = jax.nn.sigmoid(logits)
    keep, keep_valid = batched_nms(boxes, scores, level_ids, nms_threshold, post_nms_top_n, valid)
    boxes = jnp.where(keep_valid[:, None], boxes[keep], 0.0)
    scores = jnp.where(keep_valid, scores[keep], 0.0)
    return boxes, scores, keep_valid


def select_detections(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    image_size: Sequence[int],
    *,
    score_threshold: float,
    nms_threshold: float,
    max_detections: int,
    weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    min_size: float = 1e-2,
    max_candidates: int = 4096,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Final detections of one image, torchvision's ``RoIHeads.postprocess_detections``.

    Every (proposal, foreground class) pair is a candidate with the class's
    softmax score and the proposal decoded by that class's deltas (clipped to
    the image). Candidates scoring ``<= score_threshold`` or with a side
    shorter than ``min_size`` are dropped; per-class NMS keeps the best
    ``D = max_detections``. To bound the work when there are many classes,
    only the ``max_candidates`` best-scoring candidates enter NMS (a
    difference from torchvision only when more than that pass the threshold).

    Args:
      class_logits: ``(N, K)`` class logits (class 0 is background).
      box_deltas: ``(N, K, 4)`` class-specific deltas.
      proposals: ``(N, 4)`` boxes the deltas refer to.
      proposal_valid: ``(N,)`` bool.
      image_size: ``(H, W)``.
      score_threshold: smallest score kept (exclusive).
      nms_threshold: per-class NMS IoU threshold.
      max_detections: ``D``.
      weights: box coder weights.
      min_size: smallest side a detection may have.
      max_candidates: largest number of candidates entering NMS.

    Returns:
      ``(boxes, scores, classes, valid)``: ``(D, 4)``, ``(D,)`` float,
      ``(D,)`` int32 in ``1 .. K-1``, ``(D,)`` bool, best first; padding
      slots have zero boxes, scores and classes.
    """
    class_logits, box_deltas, proposals = map(jnp.asarray, (class_logits, box_deltas, proposals))
    n, k = class_logits.shape
    if box_deltas.shape != (n, k, 4) or proposals.shape != (n, 4):
        raise ValueError(
            f"need class_logits (N, K), box_deltas (N, K, 4), proposals (N, 4); got "
            f"{class_logits.shape}, {box_deltas.shape}, {proposals.shape}"
        )
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]
    boxes = decode_boxes(box_deltas[:, 1:].astype(jnp.float32), proposals[:, None], weights)
    boxes = clip_boxes(boxes, image_size)
    classes = jnp.broadcast_to(jnp.arange(1, k, dtype=jnp.int32), (n, k - 1))
    valid = (
        (scores > score_threshold)
        & min_size_mask(boxes, min_size)
        & jnp.asarray(proposal_valid, bool)[:, None]
    )
    scores, boxes, classes, valid = (
        scores.reshape(-1),
        boxes.reshape(-1, 4),
        classes.reshape(-1),
        valid.reshape(-1),
    )
    if scores.shape[0] > max_candidates:
        _, top = jax.lax.top_k(jnp.where(valid, scores, -1.0), max_candidates)
        scores, boxes, classes, valid = scores[top], boxes[top], classes[top], valid[top]
    keep, keep_valid = batched_nms(boxes, scores, classes, nms_threshold, max_detections, valid)
    return (
        jnp.where(keep_valid[:, None], boxes[keep], 0.0),
        jnp.where(keep_valid, scores[keep], 0.0),
        jnp.where(keep_valid, classes[keep], 0),
        keep_valid,
    )


def crop_mask_targets(
    instance_masks: jax.Array,
    boxes: jax.Array,
    gt_index: jax.Array,
    output_size: int | tuple[int, int],
    *,
    threshold: float | None = 0.5,
    sampling_ratio: int = 2,
) -> jax.Array:
    """Mask targets: each box's ground-truth mask resampled to ``(PH, PW)`` by ROI Align.

    ``roi_align`` (``aligned=True``, the geometry of :func:`paste_masks`)
    of the 0/1 mask of instance ``gt_index`` over the box, then, as in
    detectron2, thresholded at ``threshold`` (``>=``). A square mask cropped
    by its own pixel-edge box gives all ones.

    Args:
      instance_masks: ``(B, M, H, W)`` ground-truth masks (any numeric dtype,
        0/1).
      boxes: ``(B, R, 4)`` boxes ``(x1, y1, x2, y2)`` in pixels.
      gt_index: ``(B, R)`` int, the instance of each box.
      output_size: ``PH`` = ``PW`` or ``(PH, PW)``.
      threshold: binarization threshold; None returns the soft values.
      sampling_ratio: ROI Align samples per bin and axis.

    Returns:
      ``(B, R, PH, PW)`` float32 targets.

    Raises:
      ValueError: on inconsistent shapes.

    >>> masks = jnp.zeros((1, 1, 8, 8)).at[0, 0, 2:6, 2:6].set(1)
    >>> crop_mask_targets(masks, jnp.array([[[2.0, 2.0, 6.0, 6.0]]]), jnp.zeros((1, 1), int), 2)
    Array([[[[1., 1.],
             [1., 1.]]]], dtype=float32)
    """
    instance_masks, boxes, gt_index = map(jnp.asarray, (instance_masks, boxes, gt_index))
    if instance_masks.ndim != 4:
        raise ValueError(f"instance_masks must have shape (B, M, H, W), got {instance_masks.shape}")
    b, m, h, w = instance_masks.shape
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
        raise ValueError(f"boxes must have shape ({b}, R, 4), got {boxes.shape}")
    if gt_index.shape != boxes.shape[:2]:
        raise ValueError(f"gt_index must have shape {boxes.shape[:2]}, got {gt_index.shape}")

    def crop(instance_masks, boxes, gt_index):
        b = instance_masks.shape[0]  # The images of this device (over_batch_shards).
        canvas = instance_masks.reshape(b * m, h, w, 1).astype(jnp.float32)
        image = jnp.arange(b, dtype=jnp.int32)[:, None] * m + gt_index.astype(jnp.int32)
        soft = roi_align(
            canvas,
            boxes.reshape(-1, 4).astype(jnp.float32),
            output_size,
            box_indices=image.reshape(-1),
            sampling_ratio=sampling_ratio,
            aligned=True,
        )
        return soft.reshape(*boxes.shape[:2], *soft.shape[1:3])

    soft = over_batch_shards(crop, instance_masks, boxes, gt_index)
    if threshold is None:
        return soft
    return (soft >= threshold).astype(jnp.float32)


def _paste_weights(start: jax.Array, end: jax.Array, mask_size: int, image_size: int) -> jax.Array:
    """``(..., image_size, mask_size)`` bilinear weights along one axis."""
    length = jnp.maximum(end - start, 1e-6)
    centers = jnp.arange(image_size, dtype=jnp.float32) + 0.5
    # Pixel center -> continuous mask coordinate (mask pixel m covers [m, m + 1)).
    position = (centers - start[..., None]) / length[..., None] * mask_size - 0.5
    # Bilinear interpolation with zero padding is a hat function of the distance.
    cells = jnp.arange(mask_size, dtype=jnp.float32)
    return jnp.maximum(0.0, 1.0 - jnp.abs(position[..., None] - cells))


def paste_masks(
    masks: jax.Array,
    boxes: jax.Array,
    image_size: Sequence[int],
    *,
    threshold: float | None = 0.5,
) -> jax.Array:
    """Resizes per-box mask probabilities into their boxes in the full image.

    detectron2's ``paste_masks_in_image``: image pixel ``(y, x)`` reads the
    mask by bilinear interpolation at its center's position in the box,
    ``my = (y + 0.5 - y1) / (y2 - y1) * PH - 0.5`` (likewise ``mx``), with
    zeros outside the mask (``grid_sample`` with ``align_corners=False`` and
    zero padding); so no pixel whose center lies outside the box can reach
    0.5. Computed as ``Wy @ mask @ Wx^T`` with two small interpolation
    matrices per box: no gather, no data-dependent shapes.

    Args:
      masks: ``(..., PH, PW)`` mask probabilities in ``[0, 1]``.
      boxes: ``(..., 4)`` boxes ``(x1, y1, x2, y2)`` in image pixels.
      image_size: ``(H, W)``, static.
      threshold: pixels with a value ``>= threshold`` are 1; None returns the
        interpolated probabilities.

    Returns:
      ``(..., H, W)``: uint8 0/1, or float32 probabilities if ``threshold`` is
      None.

    Raises:
      ValueError: if the leading dimensions of ``masks`` and ``boxes`` differ.

    >>> paste_masks(jnp.ones((1, 2, 2)), jnp.array([[1.0, 0.0, 3.0, 2.0]]), (3, 4))
    Array([[[0, 1, 1, 0],
            [0, 1, 1, 0],
            [0, 0, 0, 0]]], dtype=uint8)
    """
    masks, boxes = jnp.asarray(masks), jnp.asarray(boxes)
    if masks.ndim < 2 or boxes.shape != (*masks.shape[:-2], 4):
        raise ValueError(
            f"masks (..., PH, PW) and boxes (..., 4) need the same leading dimensions, got "
            f"{masks.shape} and {boxes.shape}"
        )
    height, width = (int(s) for s in image_size)
    boxes = boxes.astype(jnp.float32)
    wy = _paste_weights(boxes[..., 1], boxes[..., 3], masks.shape[-2], height)
    wx = _paste_weights(boxes[..., 0], boxes[..., 2], masks.shape[-1], width)
    pasted = jnp.einsum("...ym,...mn,...xn->...yx", wy, masks.astype(jnp.float32), wx)
    if threshold is None:
        return pasted
    return (pasted >= threshold).astype(jnp.uint8)


def _torchvision_paste_weights(
    start: jax.Array, end: jax.Array, mask_size: int, image_size: int
) -> jax.Array:
    """``(..., image_size, mask_size)`` weights of torchvision's paste along one axis.

    The box (already expanded by one mask pixel each side) is truncated to
    ints ``b0 .. b1``; its ``n = b1 - b0 + 1`` pixels read the zero-padded
    ``mask_size + 2`` mask resized to ``n`` by ``F.interpolate`` (bilinear,
    ``align_corners=False``: source ``max((u + 0.5) * (M + 2) / n - 0.5, 0)``).
    """
    first = jnp.trunc(start).astype(jnp.int32)
    count = jnp.maximum(jnp.trunc(end).astype(jnp.int32) - first + 1, 1)
    padded = mask_size + 2
    u = jnp.arange(image_size, dtype=jnp.int32) - first[..., None]
    inside = (u >= 0) & (u < count[..., None])
    scale = padded / count[..., None].astype(jnp.float32)
    source = jnp.maximum((u.astype(jnp.float32) + 0.5) * scale - 0.5, 0.0)
    low = jnp.minimum(jnp.floor(source), padded - 1)
    high = jnp.minimum(low + 1, padded - 1)
    frac = source - low
    cells = jnp.arange(padded, dtype=jnp.float32)
    weights = (cells == low[..., None]) * (1.0 - frac[..., None]) + (
        cells == high[..., None]
    ) * frac[..., None]
    # The padding cells hold zeros: drop them.
    return jnp.where(inside[..., None], weights, 0.0)[..., 1:-1]


def paste_masks_torchvision(
    masks: jax.Array,
    boxes: jax.Array,
    image_size: Sequence[int],
    *,
    threshold: float | None = 0.5,
) -> jax.Array:
    """torchvision's ``paste_masks_in_image``, with static shapes.

    Each ``PH x PW`` mask is zero-padded by one pixel, its box scaled by
    ``(P + 2) / P`` about its center (``expand_masks``/``expand_boxes``), the
    box truncated to integer pixels, and the padded mask resized bilinearly
    (``align_corners=False``) onto the box's pixels; pixels outside the box
    are zero. The values of :func:`paste_masks`' other convention differ by
    up to a pixel at mask edges; this one reproduces torchvision's output.

    Args:
      masks: ``(..., PH, PW)`` mask probabilities.
      boxes: ``(..., 4)`` boxes ``(x1, y1, x2, y2)`` in image pixels.
      image_size: ``(H, W)``, static.
      threshold: pixels ``>= threshold`` are 1; None returns probabilities.

    Returns:
      ``(..., H, W)`` uint8 0/1, or float32 if ``threshold`` is None.

    >>> paste_masks_torchvision(jnp.ones((1, 2, 2)), jnp.array([[1.0, 0.0, 3.0, 2.0]]), (3, 4))
    Array([[[0, 0, 1, 0],
            [0, 1, 1, 1],
            [0, 0, 1, 0]]], dtype=uint8)
    """
    masks, boxes = jnp.asarray(masks), jnp.asarray(boxes, jnp.float32)
    if masks.ndim < 2 or boxes.shape != (*masks.shape[:-2], 4):
        raise ValueError(
            f"masks (..., PH, PW) and boxes (..., 4) need the same leading dimensions, got "
            f"{masks.shape} and {boxes.shape}"
        )
    height, width = (int(s) for s in image_size)
    ph, pw = masks.shape[-2:]
    # expand_boxes: half sizes scaled by (P + 2) / P about the center.
    cx, cy = (boxes[..., 0] + boxes[..., 2]) * 0.5, (boxes[..., 1] + boxes[..., 3]) * 0.5
    half_w = (boxes[..., 2] - boxes[..., 0]) * 0.5 * ((pw + 2) / pw)
    half_h = (boxes[..., 3] - boxes[..., 1]) * 0.5 * ((ph + 2) / ph)
    wy = _torchvision_paste_weights(cy - half_h, cy + half_h, ph, height)
    wx = _torchvision_paste_weights(cx - half_w, cx + half_w, pw, width)
    pasted = jnp.einsum("...ym,...mn,...xn->...yx", wy, masks.astype(jnp.float32), wx)
    if threshold is None:
        return pasted
    return (pasted >= threshold).astype(jnp.uint8)
