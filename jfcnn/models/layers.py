"""Flax linen layers shared by jfcnn models, and the one normalization factory.

:func:`norm_layer` builds every normalization layer of the U-Net and the
ResNet (and so of Mask R-CNN's backbone), with one group-count rule,
:func:`group_norm_groups`, and one GroupNorm, :class:`GroupNorm`.

Letters used for shapes:

  B: batch size.
  H, W: height and width.
  C: input channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfcnn.ops.conv_transpose import conv_transpose

Dtype = Any
Initializer = Callable[[jax.Array, Sequence[int], Dtype], jax.Array]


class ConvTranspose(nn.Module):
    """Transposed 2-D convolution with PyTorch's ``ConvTranspose2d`` geometry.

    Unlike ``flax.linen.ConvTranspose``, ``padding`` is PyTorch's ``P``: the
    output has ``(H - 1) * S + K - 2 * P`` rows (same for columns), so
    ``kernel_size=2, strides=2, padding=0`` exactly doubles the size and a
    PyTorch model's weights carry over after permuting
    ``(Cin, Cout, KH, KW) -> (KH, KW, Cin, Cout)``. Built on
    :func:`jfcnn.ops.conv_transpose`.

    Shapes: input ``(B, H, W, C)``, output ``(B, OH, OW, features)``; params
    ``kernel`` ``(KH, KW, C, features)`` and ``bias`` ``(features,)``.

    Attributes:
      features: number of output channels ``O``.
      kernel_size: ``K`` as an int or ``(KH, KW)``.
      strides: ``S`` as an int or ``(SH, SW)``.
      padding: PyTorch's ``P`` as an int or ``(PH, PW)``.
      use_bias: whether to add a per-channel bias.
      dtype: computation dtype; ``None`` promotes input and params.
      param_dtype: dtype of the parameters.
      kernel_init: initializer of the kernel (fan-in ``KH * KW * C``).
      bias_init: initializer of the bias.

    >>> layer = ConvTranspose(features=8, kernel_size=2, strides=2)
    >>> x = jnp.ones((1, 4, 4, 3))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).shape
    (1, 8, 8, 8)
    """

    features: int
    kernel_size: int | Sequence[int] = 2
    strides: int | Sequence[int] = 2
    padding: int | Sequence[int] = 0
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim != 4:
            raise ValueError(f"inputs must have shape (B, H, W, C), got shape {inputs.shape}.")
        kh, kw = (
            (self.kernel_size, self.kernel_size)
            if isinstance(self.kernel_size, int)
            else tuple(self.kernel_size)
        )
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, inputs.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        strides = self.strides if isinstance(self.strides, int) else tuple(self.strides)
        padding = self.padding if isinstance(self.padding, int) else tuple(self.padding)
        outputs = conv_transpose(inputs, kernel, strides, padding)
        if bias is not None:
            outputs = outputs + bias
        return outputs


# torchvision's BatchNorm2d and GroupNorm and detectron2's FrozenBatchNorm2d all use 1e-5.
NORM_EPSILON = 1e-5
# The GroupNorm paper's (and detectron2's) group count.
MAX_GROUPS = 32
NORM_KINDS = ("batch", "group", "frozen_batch", "none")


def group_norm_groups(channels: int) -> int:
    """Number of GroupNorm groups for a layer of ``channels`` channels.

    The largest divisor of ``channels`` that is at most 32 and leaves at least
    2 channels per group; 1 (layer normalization) when no such divisor
    exists, e.g. for a prime ``channels``. Every multiple of 32 from 64 up
    gets 32 groups, as in the GroupNorm paper and detectron2's GroupNorm
    ResNets; narrow layers of shrunken networks get fewer groups rather
    than degenerate into one channel per group (instance normalization).

    >>> [group_norm_groups(c) for c in (3, 8, 16, 24, 32, 48, 64, 2048)]
    [1, 4, 8, 12, 16, 24, 32, 32]
    """
    for groups in range(min(MAX_GROUPS, channels // 2), 1, -1):
        if channels % groups == 0:
            return groups
    return 1


class GroupNorm(nn.Module):
    """Group normalization of ``(B, H, W, C)`` maps, a drop-in for ``flax.linen.GroupNorm``.

    Same function, params (``scale`` and ``bias``, shape ``(C,)``) and
    defaults as ``flax.linen.GroupNorm(num_groups, epsilon=...)`` for 4-D
    inputs, and as PyTorch's ``nn.GroupNorm``: each example's channels are
    split into ``num_groups`` contiguous groups, each normalized over
    ``(H, W, channels of the group)`` with the biased variance. Statistics
    are accumulated in float32 whatever ``dtype`` is.

    Why not the flax layer: it reduces over the reshaped
    ``(B, H, W, G, C // G)`` tensor, which XLA's CPU backend does much more
    slowly (README, U-Net benchmark) than per-channel sums over ``(H, W)``
    followed by a tiny ``(B, C) -> (B, G)`` sum and one fused per-channel
    affine map, as here.

    Attributes:
      num_groups: number of groups ``G``; must divide ``C``.
      epsilon: added to the variance.
      dtype: output dtype; ``None`` promotes input and params.
      param_dtype: dtype of ``scale`` and ``bias``.

    >>> layer = GroupNorm(num_groups=2)
    >>> x = jnp.array([0.0, 1.0, 2.0, 6.0]).reshape(1, 1, 1, 4)  # groups [0, 1], [2, 6]
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jnp.round(layer.apply(variables, x), 3).ravel()
    Array([-1.,  1., -1.,  1.], dtype=float32)
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        if x_bhwc.ndim != 4:
            raise ValueError(f"inputs must have shape (B, H, W, C), got shape {x_bhwc.shape}.")
        b, h, w, c = x_bhwc.shape
        if c % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} does not divide the {c} channels of "
                f"inputs of shape {x_bhwc.shape}."
            )
        scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x_bhwc, scale, bias)
        per_group = c // self.num_groups
        x32_bhwc = x_bhwc.astype(jnp.float32)
        sum_bg = jnp.sum(x32_bhwc, axis=(1, 2)).reshape(b, self.num_groups, per_group).sum(-1)
        sumsq_bg = (
            jnp.sum(x32_bhwc * x32_bhwc, axis=(1, 2)).reshape(b, self.num_groups, per_group).sum(-1)
        )
        count = h * w * per_group
        mean_bg = sum_bg / count
        var_bg = jnp.maximum(sumsq_bg / count - mean_bg * mean_bg, 0.0)
        inv_bc = jnp.repeat(jax.lax.rsqrt(var_bg + self.epsilon), per_group, axis=1)
        mul_bc = inv_bc * scale.astype(jnp.float32)
        add_bc = bias.astype(jnp.float32) - jnp.repeat(mean_bg, per_group, axis=1) * mul_bc
        y_bhwc = x32_bhwc * mul_bc[:, None, None, :] + add_bc[:, None, None, :]
        return y_bhwc.astype(dtype)


class FrozenBatchNorm(nn.Module):
    """Batch normalization with fixed statistics and affine parameters.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per channel, the
    four vectors read from the ``batch_stats`` collection and never updated
    (detectron2's ``FrozenBatchNorm2d``), so they are neither trained nor
    decayed by the optimizer. The folded per-channel scale and shift are
    computed in float32 and applied in ``dtype``. Initialized to the
    identity: meant for loading pretrained weights, not for training from
    scratch.

    Shapes: input ``(..., C)``, output the same; ``batch_stats`` ``scale``,
    ``bias``, ``mean``, ``var`` each ``(C,)``.

    Attributes:
      epsilon: added to ``var`` before the square root.
      dtype: computation dtype; ``None`` keeps the input's dtype.

    >>> layer = FrozenBatchNorm()
    >>> x = jnp.ones((1, 2, 2, 3))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> sorted(variables["batch_stats"])
    ['bias', 'mean', 'scale', 'var']
    """

    epsilon: float = NORM_EPSILON
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]

        def stat(name: str, value: float) -> jax.Array:
            return self.variable(
                "batch_stats", name, lambda: jnp.full((channels,), value, jnp.float32)
            ).value

        scale, bias = stat("scale", 1.0), stat("bias", 0.0)
        mean, var = stat("mean", 0.0), stat("var", 1.0)
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        shift = bias - mean * multiplier
        dtype = self.dtype or x.dtype
        return x.astype(dtype) * multiplier.astype(dtype) + shift.astype(dtype)


def norm_layer(
    kind: str,
    *,
    channels: int,
    train: bool,
    name: str,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    bn_axis_name: str | None = None,
    epsilon: float = NORM_EPSILON,
) -> Callable[[jax.Array], jax.Array]:
    """The normalization layer ``kind`` for ``channels``-channel ``(B, H, W, C)`` maps.

    Called inside a model's compact method, the layer becomes its submodule
    ``name``. All kinds use epsilon ``1e-5`` (PyTorch's) unless told. ``kind``:

      ``"batch"``: ``flax.linen.BatchNorm``, ``scale``/``bias`` in
          ``params``, ``mean``/``var`` in ``batch_stats``; batch statistics
          (averaged over the ``bn_axis_name`` devices) and running-average
          updates (momentum 0.9, i.e. PyTorch's 0.1) when ``train``, the
          running averages otherwise.
      ``"group"``: :class:`GroupNorm` with :func:`group_norm_groups`
          ``(channels)`` groups; ``scale``/``bias`` in ``params``.
      ``"frozen_batch"``: :class:`FrozenBatchNorm`, all four vectors in
          ``batch_stats``; ``param_dtype`` does not apply (they are float32).
      ``"none"``: the identity; no variables.

    Args:
      kind: one of ``NORM_KINDS``; each model accepts a subset.
      channels: ``C``, which the group count depends on.
      train: whether batch norm uses (and updates) batch statistics.
      name: submodule name, e.g. ``"norm1"`` (its params' path).
      dtype: computation dtype; ``None`` promotes input and params.
      param_dtype: dtype of trainable norm params.
      bn_axis_name: for ``"batch"``, the ``pmap``/``shard_map``/``vmap`` axis
        over which batch statistics are averaged; ``None`` for per-device.
      epsilon: added to the variance; torchvision's published v1 detection
        weights were trained with frozen batch norm of epsilon 0.

    Returns:
      A function of ``(B, H, W, C)`` maps returning the same shape.
    """
    if kind == "batch":
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=epsilon,
            axis_name=bn_axis_name,
            dtype=dtype,
            param_dtype=param_dtype,
            name=name,
        )
    if kind == "group":
        return GroupNorm(
            num_groups=group_norm_groups(channels),
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            name=name,
        )
    if kind == "frozen_batch":
        return FrozenBatchNorm(epsilon=epsilon, dtype=dtype, name=name)
    if kind == "none":
        return lambda x_bhwc: x_bhwc
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}.")
