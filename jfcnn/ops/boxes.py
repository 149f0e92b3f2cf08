"""Box arithmetic for detection: areas, IoU, clipping, box coding, size masks.

Boxes are float arrays in ``(x1, y1, x2, y2)`` pixel coordinates, the format
of torchvision's detection models. Every function is pure, jit-able and works
on static shapes: where torchvision filters boxes (``remove_small_boxes``),
these return a boolean mask instead.

Dimension letters used in the docstrings:

* ``N``, ``M``: number of boxes.
* ``...``: any leading (batch) dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# torchvision's ``BoxCoder`` default: keeps exp() of predicted log-size
# deltas finite (1000 / 16 is the largest upscaling of a 16 px anchor).
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_boxes(name: str, boxes: jax.Array, ndim: int | None = None) -> None:
    if boxes.ndim < 1 or boxes.shape[-1] != 4 or (ndim is not None and boxes.ndim != ndim):
        want = "(N, 4)" if ndim == 2 else "(..., 4)"
        raise ValueError(f"{name} must have shape {want}, got {boxes.shape}")


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    # Half precision loses too much in products of pixel coordinates (an area
    # of 1000 x 1000 has an ulp of 8192 in bfloat16); torchvision upcasts too.
    return jnp.result_type(jnp.float32, *arrays)


def box_area(boxes: jax.Array) -> jax.Array:
    """Area of each box, ``(x2 - x1) * (y2 - y1)``.

    Args:
      boxes: ``(..., 4)`` boxes ``(x1, y1, x2, y2)``.

    Returns:
      ``(...)`` areas, in the dtype of ``boxes``. Inverted boxes (``x2 < x1``)
      get a negative area, as in torchvision.

    >>> box_area(jnp.array([[0.0, 0.0, 2.0, 3.0]]))
    Array([6.], dtype=float32)
    """
    boxes = jnp.asarray(boxes)
    _check_boxes("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    """Pairwise intersection over union of two sets of boxes.

    Same formula as ``torchvision.ops.box_iou``, except that pairs whose union
    is not positive (both boxes empty, or inverted) get IoU 0 instead of NaN.

    Args:
      boxes_a: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.
      boxes_b: ``(M, 4)`` boxes ``(x1, y1, x2, y2)``.

    Returns:
      ``(N, M)`` IoU in ``[0, 1]``, float32 or wider (half precision inputs are
      upcast).

    Raises:
      ValueError: if a box array is not ``(N, 4)``.

    >>> a = jnp.array([[0.0, 0.0, 2.0, 2.0]])
    >>> b = jnp.array([[1.0, 0.0, 3.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    >>> box_iou(a, b)
    Array([[0.33333334, 0.        ]], dtype=float32)
    """
    boxes_a, boxes_b = jnp.asarray(boxes_a), jnp.asarray(boxes_b)
    _check_boxes("boxes_a", boxes_a, ndim=2)
    _check_boxes("boxes_b", boxes_b, ndim=2)
    dtype = _compute_dtype(boxes_a, boxes_b)
    boxes_a, boxes_b = boxes_a.astype(dtype), boxes_b.astype(dtype)
    area_a = box_area(boxes_a)
    area_b = box_area(boxes_b)
    top_left = jnp.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = jnp.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    wh = jnp.maximum(bottom_right - top_left, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    positive = union > 0
    # Dividing by a safe denominator (not just masking the result) keeps NaN
    # out of the gradient as well.
    return jnp.where(positive, inter / jnp.where(positive, union, 1), 0)


def clip_boxes(boxes: jax.Array, image_size: Sequence[int] | jax.Array) -> jax.Array:
    """Clips boxes to an image: x into ``[0, w]``, y into ``[0, h]``.

    Same as ``torchvision.ops.clip_boxes_to_image``.

    Args:
      boxes: ``(..., 4)`` boxes ``(x1, y1, x2, y2)``.
      image_size: ``(h, w)``: Python ints, or a ``(2,)`` array (which may be
        traced, e.g. the true size of each padded image under ``vmap``).

    Returns:
      ``(..., 4)`` clipped boxes, same dtype as ``boxes``.

    Raises:
      ValueError: if ``boxes`` is not ``(..., 4)`` or ``image_size`` is not
        ``(2,)``.

    >>> clip_boxes(jnp.array([[-3.0, 2.0, 12.0, 30.0]]), (20, 10))
    Array([[ 0.,  2., 10., 20.]], dtype=float32)
    """
    boxes = jnp.asarray(boxes)
    _check_boxes("boxes", boxes)
    size = jnp.asarray(image_size)
    if size.shape != (2,):
        raise ValueError(f"image_size must be (h, w) with shape (2,), got {size.shape}")
    height, width = size[0].astype(boxes.dtype), size[1].astype(boxes.dtype)
    upper = jnp.stack([width, height, width, height])
    return jnp.clip(boxes, 0, upper)


def min_size_mask(boxes: jax.Array, min_size: float) -> jax.Array:
    """Which boxes have both sides at least ``min_size`` long.

    The static-shape form of ``torchvision.ops.remove_small_boxes``, which
    returns ``jnp.nonzero`` of this mask.

    Args:
      boxes: ``(..., 4)`` boxes ``(x1, y1, x2, y2)``.
      min_size: minimum width and height.

    Returns:
      ``(...)`` bool, True where ``x2 - x1 >= min_size`` and
      ``y2 - y1 >= min_size``.

    Raises:
      ValueError: if ``boxes`` is not ``(..., 4)``.

    >>> min_size_mask(jnp.array([[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 5.0, 5.0]]), 2.0)
    Array([False,  True], dtype=bool)
    """
    boxes = jnp.asarray(boxes)
    _check_boxes("boxes", boxes)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return (widths >= min_size) & (heights >= min_size)


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    if len(weights) != 4:
        raise ValueError(f"weights must be (wx, wy, ww, wh), got {weights}")
    return tuple(weights)  # type: ignore[return-value]


def encode_boxes(
    reference_boxes: jax.Array,
    proposals: jax.Array,
    weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
) -> jax.Array:
    """Regression targets that move ``proposals`` onto ``reference_boxes``.

    Exactly ``torchvision.models.detection._utils.BoxCoder.encode_single``
    (widths ``x2 - x1``, centers ``x1 + w / 2``), batched by broadcasting the
    leading dimensions of the two arrays.

    Args:
      reference_boxes: ``(..., 4)`` target (e.g. ground truth) boxes.
      proposals: ``(..., 4)`` boxes the deltas are relative to (anchors or
        proposals); leading dimensions broadcast against ``reference_boxes``.
      weights: ``(wx, wy, ww, wh)`` multipliers of the four deltas.

    Returns:
      ``(..., 4)`` deltas ``(dx, dy, dw, dh)`` with
      ``dx = wx * (gt_cx - cx) / w`` and ``dw = ww * log(gt_w / w)``. Proposals
      of zero width or height give inf or NaN, as in torchvision.

    Raises:
      ValueError: if a box array is not ``(..., 4)`` or the leading dimensions
        do not broadcast.

    >>> encode_boxes(jnp.array([[0.0, 0.0, 10.0, 10.0]]), jnp.array([[0.0, 0.0, 5.0, 5.0]]))
    Array([[5.      , 5.      , 3.465736, 3.465736]], dtype=float32)
    """
    reference_boxes, proposals = jnp.asarray(reference_boxes), jnp.asarray(proposals)
    _check_boxes("reference_boxes", reference_boxes)
    _check_boxes("proposals", proposals)
    try:
        jnp.broadcast_shapes(reference_boxes.shape, proposals.shape)
    except ValueError as e:
        raise ValueError(
            f"reference_boxes {reference_boxes.shape} and proposals {proposals.shape} "
            "do not broadcast"
        ) from e
    wx, wy, ww, wh = _check_weights(weights)
    dtype = jnp.result_type(reference_boxes, proposals)
    reference_boxes, proposals = reference_boxes.astype(dtype), proposals.astype(dtype)

    ex_widths = proposals[..., 2] - proposals[..., 0]
    ex_heights = proposals[..., 3] - proposals[..., 1]
    ex_ctr_x = proposals[..., 0] + 0.5 * ex_widths
    ex_ctr_y = proposals[..., 1] + 0.5 * ex_heights

    gt_widths = reference_boxes[..., 2] - reference_boxes[..., 0]
    gt_heights = reference_boxes[..., 3] - reference_boxes[..., 1]
    gt_ctr_x = reference_boxes[..., 0] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[..., 1] + 0.5 * gt_heights

    targets_dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
    targets_dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
    targets_dw = ww * jnp.log(gt_widths / ex_widths)
    targets_dh = wh * jnp.log(gt_heights / ex_heights)
    return jnp.stack([targets_dx, targets_dy, targets_dw, targets_dh], axis=-1).astype(dtype)


def decode_boxes(
    deltas: jax.Array,
    boxes: jax.Array,
    weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    clip: float = DEFAULT_BBOX_XFORM_CLIP,
) -> jax.Array:
    """Applies regression deltas to boxes; the inverse of :func:`encode_boxes`.

    Exactly ``torchvision.models.detection._utils.BoxCoder.decode_single``:
    ``dw`` and ``dh`` (after dividing by their weights) are clamped from above
    at ``clip`` before ``exp``. Batched by broadcasting leading dimensions, so
    class-specific deltas ``(N, K, 4)`` decode against ``boxes[:, None]``.

    Args:
      deltas: ``(..., 4)`` deltas ``(dx, dy, dw, dh)``.
      boxes: ``(..., 4)`` reference boxes (anchors or proposals); leading
        dimensions broadcast against ``deltas``. Cast to the dtype of
        ``deltas``.
      weights: ``(wx, wy, ww, wh)``, the ones used to encode.
      clip: upper bound of ``dw / ww`` and ``dh / wh``.

    Returns:
      ``(..., 4)`` decoded boxes ``(x1, y1, x2, y2)``, not clipped to the image.

    Raises:
      ValueError: if an array is not ``(..., 4)`` or the leading dimensions do
        not broadcast.

    >>> decode_boxes(jnp.array([[5.0, 0.0, 0.0, 0.0]]), jnp.array([[0.0, 0.0, 4.0, 2.0]]))
    Array([[2., 0., 6., 2.]], dtype=float32)
    """
    deltas, boxes = jnp.asarray(deltas), jnp.asarray(boxes)
    _check_boxes("deltas", deltas)
    _check_boxes("boxes", boxes)
    try:
        jnp.broadcast_shapes(deltas.shape, boxes.shape)
    except ValueError as e:
        raise ValueError(f"deltas {deltas.shape} and boxes {boxes.shape} do not broadcast") from e
    wx, wy, ww, wh = _check_weights(weights)
    boxes = boxes.astype(deltas.dtype)

    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights

    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clip)
    dh = jnp.minimum(deltas[..., 3] / wh, clip)

    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack(
        [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
        axis=-1,
    ).astype(deltas.dtype)
