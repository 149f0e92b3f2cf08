"""The mask head: its layers, its loss and its inference (detectron2's ``mask_head.py``).

* :class:`MaskHead`: ``num_convs`` 3x3 convs, a 2x transposed conv and a 1x1
  conv to one mask logit map per class (or, at inference, only to the map
  of each ROI's detected class).
* :func:`mask_rcnn_loss`: per-pixel binary cross-entropy of the ground-truth
  class's channel against targets cropped from the instance masks by ROI
  Align (:func:`jfcnn.ops.detection.crop_mask_targets`), on positive ROIs.
* :func:`mask_rcnn_inference`: the detected class's channel through a sigmoid.
  Pasting the probabilities into the image is
  :func:`jfcnn.ops.detection.paste_masks`.

Letters used for shapes:

  B: images.  Q: boxes per image the head runs on.  P: pooled ROI size.
  S: mask size (``2 P``).  C: channels.  K: classes, background (0) included.
  M: ground-truth instances per image (padded).  H, W: image size.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.linen.dtypes import promote_dtype

from jfcnn.models.layers import ConvTranspose
from jfcnn.models.maskrcnn.common import Dtype, select_class
from jfcnn.ops.detection import crop_mask_targets

_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ClassConv(nn.Module):
    """A 1x1 convolution to one map per class; given classes, only each input's own map.

    ``nn.Conv(K, (1, 1))``'s parameters (``kernel`` ``(1, 1, C, K)``,
    ``bias`` ``(K,)``). ``(N, H, W, C)`` -> ``(N, H, W, K)``, or with
    ``classes`` ``(N,)`` -> ``(N, H, W)``: the ``classes[n]`` map of input
    ``n``, without computing the other ``K - 1`` (detection keeps one class
    per box, so inference needs 1/K of the full product).
    """

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, classes: jax.Array | None = None) -> jax.Array:
        shape = (1, 1, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if classes is None:
            return jnp.einsum("nhwc,ck->nhwk", x, kernel[0, 0]) + bias
        weights = jnp.take(kernel[0, 0], classes, axis=1)  # (C, N)
        return jnp.einsum("nhwc,cn->nhw", x, weights) + jnp.take(bias, classes)[:, None, None]


class MaskHead(nn.Module):
    """``num_convs`` 3x3 convs + ReLU, a 2x transposed conv + ReLU, a 1x1 conv per class.

    With ``num_convs=4`` this is the FPN mask head (14x14 -> 28x28); with
    ``num_convs=0`` the C4 one (applied to res5's 7x7 output -> 14x14).

    Shapes: ``(N, P, P, C)`` -> ``(N, 2P, 2P, K)`` float32 logits; with
    ``classes`` ``(N,)``, ``(N, 2P, 2P)``: only each ROI's ``classes[n]`` map.
    Params: ``conv1`` .. ``conv{num_convs}``, ``deconv`` (kernel ``(2, 2, C, channels)``),
    ``predictor`` (kernel ``(1, 1, channels, K)``).
    """

    num_classes: int
    channels: int = 256
    num_convs: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, classes: jax.Array | None = None) -> jax.Array:
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
        logits = ClassConv(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.001),
            dtype=self.dtype,
            name="predictor",
        )(x, classes)
        return logits.astype(jnp.float32)


def mask_rcnn_loss(
    mask_logits: jax.Array,
    classes: jax.Array,
    positive: jax.Array,
    rois: jax.Array,
    gt_index: jax.Array,
    instance_masks: jax.Array,
    *,
    sampling_ratio: int,
) -> tuple[jax.Array, jax.Array]:
    """Per-image mask loss, torchvision's ``maskrcnn_loss`` on fixed ROI slots.

    The mean per-pixel binary cross-entropy of each positive ROI's
    ground-truth class channel against its target, averaged over the image's
    positive ROIs (0 when it has none).

    Args:
      mask_logits: ``(B, Q, S, S, K)`` float32 logits.
      classes: ``(B, Q)`` int ground-truth class of each ROI (0 for negatives).
      positive: ``(B, Q)`` bool, the ROIs that count.
      rois: ``(B, Q, 4)`` pixel ``(x1, y1, x2, y2)`` boxes the logits belong to.
      gt_index: ``(B, Q)`` int, the instance each ROI is matched to.
      instance_masks: ``(B, M, H, W)`` 0/1 ground-truth masks.
      sampling_ratio: ROI Align samples per bin axis of the target crop
        (at least 1).

    Returns:
      ``(loss, num_positive)``: ``(B,)`` float32 each.
    """
    logits = select_class(mask_logits, classes[..., None, None])
    targets = crop_mask_targets(
        instance_masks, rois, gt_index, mask_logits.shape[2], sampling_ratio=sampling_ratio
    )
    pixel_bce = optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=(2, 3))
    num_positive = jnp.sum(positive, axis=1)
    loss = jnp.sum(jnp.where(positive, pixel_bce, 0.0), axis=1) / jnp.maximum(num_positive, 1)
    return loss, num_positive.astype(jnp.float32)


def mask_rcnn_inference(
    mask_logits: jax.Array, classes: jax.Array | None, valid: jax.Array
) -> jax.Array:
    """Mask probabilities ``(B, D, S, S)`` of each detection's class; zeros where not ``valid``.

    Args:
      mask_logits: ``(B, D, S, S, K)`` float32 logits of every class, or
        ``(B, D, S, S)`` of the detected class already (``classes`` None).
      classes: ``(B, D)`` int detected classes, or None.
      valid: ``(B, D)`` bool.
    """
    if classes is not None:
        mask_logits = select_class(mask_logits, classes[..., None, None])
    return jnp.where(valid[..., None, None], jax.nn.sigmoid(mask_logits), 0.0)
