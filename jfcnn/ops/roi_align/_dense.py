"""ROI Align in its dense form: two small matrix products per box.

`roi_align_dense` and `multilevel_roi_align_dense` give the values of
`roi_align` (batched form) and `multilevel_roi_align` (up to float rounding)
without gathers or scatters: ROI Align is separable, so the bins of one box
are `Wy @ F @ Wx^T`, where `Wy (PH, H)` and `Wx (PW, W)` hold each bin's
summed bilinear sample weights, built from the same sample geometry
(`_geometry`). The work is `B * N * PH * H * W * C` multiply-adds whatever the
box sizes, and the feature gradient is two more matrix products; this suits
matrix units and small maps (tens of pixels a side). Neither form is
differentiable with respect to the boxes. A box with a NaN or infinite
coordinate pools zeros with a zero feature gradient, as in the gather form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jfcnn.ops._util import pair
from jfcnn.ops.roi_align._geometry import (
    MULTILEVEL_MAX_SAMPLING_RATIO,
    axis_samples,
    check_pyramid,
    check_valid_hw,
    fpn_levels,
    grid_count,
    kept_boxes,
    level_extents,
)


def _align_weights(
    start: jax.Array,
    end: jax.Array,
    size: int,
    pooled: int,
    extent: jax.Array | int,
    *,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    max_sampling_ratio: int,
) -> jax.Array:
    """``(..., pooled, size)``: each bin's ROI Align weights on the rows (or columns).

    The samples of :func:`jfcnn.ops.roi_align` (torchvision's positions and
    border rules), each spread over its two bilinear taps; a bin is the mean
    of its ``grid`` samples per axis. ``extent`` (broadcastable to ``start``,
    ``<= size``) is where each box's map ends for those rules.
    """
    offset = 0.5 if aligned else 0.0
    start = start * spatial_scale - offset
    end = end * spatial_scale - offset
    grid = grid_count(end - start, pooled, sampling_ratio, max_sampling_ratio, aligned)
    slots = sampling_ratio if sampling_ratio > 0 else max_sampling_ratio

    def samples(start, end, grid, extent):
        return axis_samples(start, end, extent, pooled, grid, slots, aligned)

    for _ in range(start.ndim):  # axis_samples takes one box.
        samples = jax.vmap(samples)
    extent = jnp.broadcast_to(jnp.asarray(extent, jnp.int32), start.shape)
    lo, hi, frac, valid = samples(start, end, grid, extent)
    cells = jnp.arange(size)
    weights = (lo[..., None] == cells) * (1.0 - frac)[..., None]
    weights += (hi[..., None] == cells) * frac[..., None]
    weights = jnp.sum(weights * valid[..., None], axis=-2)
    # torchvision averages over grid_h * grid_w samples: 1 / grid per axis.
    return weights / jnp.maximum(grid, 1).astype(weights.dtype)[..., None, None]


def _check_dense_inputs(features: jax.Array, boxes: jax.Array) -> None:
    if features.ndim != 4:
        raise ValueError(f"features must have shape (B, H, W, C), got {features.shape}")
    if boxes.ndim != 3 or boxes.shape[0] != features.shape[0] or boxes.shape[2] != 4:
        raise ValueError(f"boxes must have shape ({features.shape[0]}, N, 4), got {boxes.shape}")


def _dense_pool(features_bhwc, boxes_bn4, output_size, box_weight_bn, extent_b2, **kwargs):
    """`(B, N, PH, PW, C)` in the accumulation dtype; `box_weight_bn` scales each box.

    `extent_b2`: each image's map size for the sampling rules (None: `(H, W)`).
    """
    _, h, w, _ = features_bhwc.shape
    extent_h, extent_w = h, w
    if extent_b2 is not None:
        extent_b2 = jnp.clip(extent_b2, 1, jnp.asarray([h, w], jnp.int32))
        extent_h, extent_w = extent_b2[:, None, 0], extent_b2[:, None, 1]
    ph, pw = pair(output_size, "output_size", minimum=1)
    dtype = features_bhwc.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    # Boxes with a non-finite coordinate get weight 0 (their weights stay
    # finite, so the product is 0, not NaN).
    boxes_bn4, kept_bn = kept_boxes(boxes_bn4.astype(acc))
    kept_bn = kept_bn.astype(acc)
    box_weight_bn = kept_bn if box_weight_bn is None else box_weight_bn * kept_bn
    wy_bnph = _align_weights(boxes_bn4[..., 1], boxes_bn4[..., 3], h, ph, extent_h, **kwargs)
    wx_bnqw = _align_weights(boxes_bn4[..., 0], boxes_bn4[..., 2], w, pw, extent_w, **kwargs)
    wy_bnph = wy_bnph * box_weight_bn[..., None, None]
    wy_bnph, wx_bnqw = wy_bnph.astype(dtype), wx_bnqw.astype(dtype)
    rows_bnpwc = jnp.einsum("bnph,bhwc->bnpwc", wy_bnph, features_bhwc, preferred_element_type=acc)
    return jnp.einsum(
        "bnpwc,bnqw->bnpqc", rows_bnpwc.astype(dtype), wx_bnqw, preferred_element_type=acc
    )


def roi_align_dense(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    *,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
    max_sampling_ratio: int = 8,
    valid_hw: jax.Array | None = None,
) -> jax.Array:
    """:func:`jfcnn.ops.roi_align` (batched form) as two matrix products per box.

    Same arguments and values as ``roi_align(features, boxes, ...)`` with
    per-image boxes (up to float rounding), computed as ``Wy @ F @ Wx^T``
    where ``Wy`` ``(PH, H)`` and ``Wx`` ``(PW, W)`` hold each bin's summed
    bilinear sample weights (ROI Align is separable). The work is
    ``B * N * PH * H * W * C`` multiply-adds, independent of the box sizes,
    and the gradient is two more matrix products, with no gather or scatter,
    which suits matrix units; the work grows with the map size, so it is for
    small maps (tens of pixels a side). Not differentiable with respect to
    ``boxes`` (pass constants). A box with a NaN or infinite coordinate pools
    zeros with a zero feature gradient, as in ``roi_align``.

    Args:
      features: ``(B, H, W, C)`` feature maps.
      boxes: ``(B, N, 4)`` boxes ``(x1, y1, x2, y2)`` in image coordinates.
      output_size: ``PH`` = ``PW`` or ``(PH, PW)``.
      spatial_scale, sampling_ratio, aligned, max_sampling_ratio: as in
        :func:`jfcnn.ops.roi_align`, with its defaults (`aligned=True`,
        detectron2's `ROIAlignV2`; torchvision's `roi_align` defaults to
        False).
      valid_hw: optional ``(B, 2)`` int: where each image's map ends, in
        feature pixels, as in :func:`jfcnn.ops.roi_align`.

    Returns:
      ``(B, N, PH, PW, C)`` in the dtype of ``features``.

    Raises:
      ValueError: on inconsistent shapes or a bad `output_size`.

    >>> features = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> boxes = jnp.array([[[0.5, 0.5, 2.5, 2.5]]])
    >>> roi_align_dense(features, boxes, 2, sampling_ratio=1)[0, 0, ..., 0]
    Array([[2.5, 3.5],
           [6.5, 7.5]], dtype=float32)
    """
    features, boxes = jnp.asarray(features), jnp.asarray(boxes)
    _check_dense_inputs(features, boxes)
    valid_hw = check_valid_hw(valid_hw, (features.shape[0], 2))
    out = _dense_pool(
        features,
        jax.lax.stop_gradient(boxes),
        output_size,
        None,
        valid_hw,
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=max_sampling_ratio,
    )
    return out.astype(features.dtype)


def multilevel_roi_align_dense(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    *,
    strides: Sequence[int],
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    valid_hw: jax.Array | None = None,
) -> jax.Array:
    """:func:`jfcnn.ops.multilevel_roi_align` with :func:`roi_align_dense` per level.

    Each box is pooled from its FPN level (the same level rule); every level
    is visited with the boxes of other levels weighted by zero, so the cost
    is the sum over levels of :func:`roi_align_dense`'s.

    Args:
      features: ``L`` maps ``(B, Hl, Wl, C)``, finest first.
      boxes: ``(B, N, 4)`` boxes in image coordinates.
      output_size: ``PH`` = ``PW`` or ``(PH, PW)``.
      strides: stride of each level (powers of two, doubling).
      sampling_ratio, aligned, canonical_scale, canonical_level: as in
        :func:`jfcnn.ops.multilevel_roi_align`, with its defaults
        (`aligned=False`, torchvision's `MultiScaleRoIAlign`, which its
        pretrained Mask R-CNN weights need).
      valid_hw: optional ``(B, 2)`` int: each image's extent in input-image
        pixels, as in :func:`jfcnn.ops.multilevel_roi_align`.

    Returns:
      ``(B, N, PH, PW, C)`` in the dtype of the features.
    """
    features, boxes, strides = check_pyramid(features, boxes, strides)
    valid_hw = check_valid_hw(valid_hw, (boxes.shape[0], 2))
    boxes = jax.lax.stop_gradient(boxes)
    k_min, k_max = int(math.log2(strides[0])), int(math.log2(strides[-1]))
    level = fpn_levels(
        boxes.astype(jnp.promote_types(boxes.dtype, jnp.float32)),
        k_min=k_min,
        k_max=k_max,
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
    )
    out = None
    for index, (f, stride) in enumerate(zip(features, strides, strict=True)):
        pooled = _dense_pool(
            f,
            boxes,
            output_size,
            (level == index).astype(jnp.float32),
            None if valid_hw is None else level_extents(valid_hw, stride, f.shape[1:3]),
            spatial_scale=1.0 / stride,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
            max_sampling_ratio=MULTILEVEL_MAX_SAMPLING_RATIO,
        )
        out = pooled if out is None else out + pooled
    return out.astype(features[0].dtype)
