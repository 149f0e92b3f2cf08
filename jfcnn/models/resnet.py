"""ResNet backbones (He et al., 2016) in Flax linen, NHWC, torchvision-compatible.

The architecture is torchvision's ``resnet18/34/50/101`` without the classifier:
a stem (7x7/2 convolution, normalization, ReLU, 3x3/2 max pool with padding 1)
and four stages ``res2 .. res5`` of :class:`BasicBlock` (depth 18, 34) or
:class:`Bottleneck` (depth 50, 101; the stride sits on the 3x3 convolution,
"ResNet v1.5"). With the same weights (see :func:`variables_from_torchvision`)
the feature maps equal torchvision's.

Letters used for shapes:

  N: batch size (or number of ROIs for :class:`ResNetStage` in a C4 head).
  H, W: input height and width.
  C: input channels.

Normalization (``norm``):

  ``"frozen_batch"``: a fixed affine map from stored ``scale``, ``bias``,
      ``mean`` and ``var`` (detectron2's ``FrozenBatchNorm2d``), what detection
      fine-tuning of a pretrained backbone uses. All four live in the
      ``batch_stats`` collection, so they are neither trained nor decayed by
      the optimizer and never updated. Initialized to the identity, it is
      meant for loading pretrained weights, not for training from scratch.
  ``"batch"``: ``flax.linen.BatchNorm`` (``scale``/``bias`` in ``params``,
      ``mean``/``var`` in ``batch_stats``, updated when ``train=True``).
  ``"group"``: ``flax.linen.GroupNorm`` with 32 groups (fewer for narrow
      layers, see :func:`resnet_group_norm_groups`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

NORMS = ("frozen_batch", "batch", "group")
STAGE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_NAMES = ("stem", *STAGE_NAMES)
# Output stride of each feature map relative to the input.
FEATURE_STRIDES = {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}

# Same epsilon as torchvision's BatchNorm2d and detectron2's FrozenBatchNorm2d.
_NORM_EPSILON = 1e-5
# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def resnet_group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups for a ResNet layer of ``channels`` channels.

    ``max_groups`` (32, detectron2's ResNet default) when it divides
    ``channels``; otherwise, for the narrow layers of a shrunken network, the
    largest divisor of ``channels`` that is at most ``max_groups`` and leaves
    at least 2 channels per group (1 if none).

    >>> [resnet_group_norm_groups(c) for c in (8, 16, 24, 64, 2048)]
    [4, 8, 12, 32, 32]
    """
    if channels % max_groups == 0:
        return max_groups
    for groups in range(min(max_groups, channels // 2), 1, -1):
        if channels % groups == 0:
            return groups
    return 1


class FrozenBatchNorm(nn.Module):
    """Batch normalization with fixed statistics and affine parameters.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per channel, the
    four vectors read from the ``batch_stats`` collection and never updated
    (detectron2's ``FrozenBatchNorm2d``). The folded per-channel scale and
    shift are computed in float32 and applied in ``dtype``.

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

    epsilon: float = _NORM_EPSILON
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


def _norm_layer(
    norm: str,
    *,
    train: bool,
    dtype: Dtype,
    bn_axis_name: str | None,
    name: str,
    channels: int,
) -> nn.Module:
    if norm == "frozen_batch":
        return FrozenBatchNorm(dtype=dtype, name=name)
    if norm == "batch":
        # momentum 0.9 == torchvision's momentum 0.1 (weight of the new batch).
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=_NORM_EPSILON,
            axis_name=bn_axis_name,
            dtype=dtype,
            name=name,
        )
    if norm == "group":
        return nn.GroupNorm(
            num_groups=resnet_group_norm_groups(channels),
            epsilon=_NORM_EPSILON,
            dtype=dtype,
            name=name,
        )
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


def _conv(features: int, kernel: int, strides: int, dtype: Dtype, name: str) -> nn.Conv:
    # Explicit symmetric padding k // 2 (not "SAME", which pads stride-2 layers
    # asymmetrically on even sizes) reproduces PyTorch's geometry exactly.
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=_CONV_INIT,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Output channels: ``features``. The first convolution carries the stride;
    the shortcut is a 1x1 convolution plus normalization when the stride is not
    1 or the channel count changes, the identity otherwise. Params:
    ``conv1``, ``norm1``, ``conv2``, ``norm2`` [, ``shortcut_conv``,
    ``shortcut_norm``].

    Attributes:
      features: output channels.
      strides: spatial stride (1 or 2).
      norm: one of ``NORMS``.
      dtype: computation dtype.
      bn_axis_name: ``axis_name`` for cross-device ``norm="batch"`` statistics.
    """

    expansion = 1

    features: int
    strides: int = 1
    norm: str = "frozen_batch"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x_nhwc: jax.Array, *, train: bool) -> jax.Array:
        y = _conv(self.features, 3, self.strides, self.dtype, "conv1")(x_nhwc)
        y = nn.relu(_block_norm(self, "norm1", self.features, train)(y))
        y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = _block_norm(self, "norm2", self.features, train)(y)
        return nn.relu(y + _shortcut(self, x_nhwc, self.features, train))


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 convolutions with a residual connection (ResNet-50/101).

    Output channels: ``4 * features``. The stride sits on the 3x3 convolution
    (torchvision's "ResNet v1.5"); the shortcut is a strided 1x1 convolution
    plus normalization when the stride is not 1 or the channel count changes.
    Params: ``conv1``, ``norm1``, ``conv2``, ``norm2``, ``conv3``, ``norm3``
    [, ``shortcut_conv``, ``shortcut_norm``].

    Attributes:
      features: channels of the 1x1 and 3x3 convolutions inside the block.
      strides: spatial stride (1 or 2).
      norm: one of ``NORMS``.
      dtype: computation dtype.
      bn_axis_name: ``axis_name`` for cross-device ``norm="batch"`` statistics.
    """

    expansion = 4

    features: int
    strides: int = 1
    norm: str = "frozen_batch"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x_nhwc: jax.Array, *, train: bool) -> jax.Array:
        out_features = self.features * self.expansion
        y = _conv(self.features, 1, 1, self.dtype, "conv1")(x_nhwc)
        y = nn.relu(_block_norm(self, "norm1", self.features, train)(y))
        y = _conv(self.features, 3, self.strides, self.dtype, "conv2")(y)
        y = nn.relu(_block_norm(self, "norm2", self.features, train)(y))
        y = _conv(out_features, 1, 1, self.dtype, "conv3")(y)
        y = _block_norm(self, "norm3", out_features, train)(y)
        return nn.relu(y + _shortcut(self, x_nhwc, out_features, train))


def _block_norm(block: BasicBlock | Bottleneck, name: str, channels: int, train: bool) -> nn.Module:
    return _norm_layer(
        block.norm,
        train=train,
        dtype=block.dtype,
        bn_axis_name=block.bn_axis_name,
        name=name,
        channels=channels,
    )


def _shortcut(
    block: BasicBlock | Bottleneck, x_nhwc: jax.Array, out_features: int, train: bool
) -> jax.Array:
    if block.strides == 1 and x_nhwc.shape[-1] == out_features:
        return x_nhwc.astype(block.dtype)
    # Called inside the block's compact __call__, so these submodules belong to it.
    x_nhwc = _conv(out_features, 1, block.strides, block.dtype, "shortcut_conv")(x_nhwc)
    return _block_norm(block, "shortcut_norm", out_features, train)(x_nhwc)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNetStage(nn.Module):
    """A ResNet stage: ``num_blocks`` residual blocks, the first one strided.

    Usable on its own, e.g. as the res5 head of a C4 Mask R-CNN applied to
    pooled ROI features:

    >>> stage = ResNetStage(num_blocks=3, features=512, strides=2, block_cls=Bottleneck)
    >>> rois = jnp.zeros((8, 14, 14, 1024))
    >>> variables = jax.eval_shape(lambda x: stage.init(jax.random.key(0), x, train=False), rois)
    >>> jax.eval_shape(lambda v, x: stage.apply(v, x, train=False), variables, rois).shape
    (8, 7, 7, 2048)

    Shapes: input ``(N, H, W, C)``, output
    ``(N, ceil(H / strides), ceil(W / strides), features * block_cls.expansion)``.
    Params: ``block0`` .. ``block{num_blocks - 1}``.

    Attributes:
      num_blocks: number of residual blocks.
      features: ``features`` of each block (output channels are
        ``features * block_cls.expansion``).
      strides: stride of the first block.
      block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
      norm: one of ``NORMS``.
      dtype: computation dtype.
      bn_axis_name: ``axis_name`` for cross-device ``norm="batch"`` statistics.
    """

    num_blocks: int
    features: int
    strides: int = 1
    block_cls: type[nn.Module] = Bottleneck
    norm: str = "frozen_batch"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x_nhwc: jax.Array, *, train: bool) -> jax.Array:
        if x_nhwc.ndim != 4:
            raise ValueError(f"inputs must have shape (N, H, W, C), got shape {x_nhwc.shape}.")
        for i in range(self.num_blocks):
            x_nhwc = self.block_cls(
                features=self.features,
                strides=self.strides if i == 0 else 1,
                norm=self.norm,
                dtype=self.dtype,
                bn_axis_name=self.bn_axis_name,
                name=f"block{i}",
            )(x_nhwc, train=train)
        return x_nhwc


# depth -> (block type, blocks per stage res2..res5), as in torchvision.
RESNET_SPECS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet backbone returning multi-scale feature maps.

    Shapes: input ``(N, H, W, C)``; output a dict with (a subset, see
    ``return_stages``, of) ``"stem"`` (after the max pool) and ``"res2"`` ..
    ``"res5"``, of strides 4, 4, 8, 16, 32 (``FEATURE_STRIDES``). Each
    convolution and pool maps a size ``S`` to ``floor((S + 2P - K) / s) + 1``
    as in PyTorch, so a side divisible by 32 gives exactly ``S / stride``.
    Channels: ``width`` for the stem and ``width * 2**i * expansion`` for
    stage ``i = 0 .. 3`` (64, 64/256, 128/512, 256/1024, 512/2048 at the
    default width for BasicBlock/Bottleneck).

    Params: ``stem_conv``, ``stem_norm``, ``res2`` .. ``res5`` (each a
    :class:`ResNetStage`).

    Attributes:
      depth: 18, 34, 50 or 101; picks the block type and the blocks per stage.
      stage_sizes: overrides the blocks per stage (e.g. ``(1, 1, 1, 1)`` for a
        tiny CPU network); ``None`` uses the depth's.
      width: channels of the stem and of the first stage's blocks (64 in
        torchvision); e.g. 16 gives a quarter-width network.
      norm: one of ``NORMS``.
      dtype: computation dtype (params stay float32).
      bn_axis_name: ``axis_name`` for cross-device ``norm="batch"`` statistics.
      return_stages: names of the feature maps to return; stages after the last
        requested one are not built (a C4 backbone uses ``("res4",)``).

    >>> model = ResNet(depth=18, width=16)
    >>> x = jnp.zeros((1, 64, 64, 3))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> {k: v.shape for k, v in model.apply(variables, x, train=False).items()}
    {'stem': (1, 16, 16, 16), 'res2': (1, 16, 16, 16), 'res3': (1, 8, 8, 32), \
'res4': (1, 4, 4, 64), 'res5': (1, 2, 2, 128)}
    """

    depth: int = 50
    stage_sizes: Sequence[int] | None = None
    width: int = 64
    norm: str = "frozen_batch"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    return_stages: Sequence[str] = FEATURE_NAMES

    @nn.compact
    def __call__(self, x_nhwc: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        if x_nhwc.ndim != 4:
            raise ValueError(f"inputs must have shape (N, H, W, C), got shape {x_nhwc.shape}.")
        if self.depth not in RESNET_SPECS:
            raise ValueError(f"depth must be one of {sorted(RESNET_SPECS)}, got {self.depth}.")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
        unknown = [s for s in self.return_stages if s not in FEATURE_NAMES]
        if unknown or not self.return_stages:
            raise ValueError(
                f"return_stages must be a non-empty subset of {FEATURE_NAMES}, "
                f"got {tuple(self.return_stages)}."
            )
        block_name, default_sizes = RESNET_SPECS[self.depth]
        stage_sizes = tuple(self.stage_sizes or default_sizes)
        if len(stage_sizes) != 4 or min(stage_sizes) < 1:
            raise ValueError(f"stage_sizes must be 4 positive ints, got {stage_sizes}.")
        last = max(FEATURE_NAMES.index(s) for s in self.return_stages)

        x = _conv(self.width, 7, 2, self.dtype, "stem_conv")(x_nhwc)
        x = _norm_layer(
            self.norm,
            train=train,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            name="stem_norm",
            channels=self.width,
        )(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = {"stem": x}
        for i, (name, num_blocks) in enumerate(zip(STAGE_NAMES, stage_sizes, strict=True)):
            if i + 1 > last:
                break
            x = ResNetStage(
                num_blocks=num_blocks,
                features=self.width * 2**i,
                strides=1 if i == 0 else 2,
                block_cls=BLOCKS[block_name],
                norm=self.norm,
                dtype=self.dtype,
                bn_axis_name=self.bn_axis_name,
                name=name,
            )(x, train=train)
            features[name] = x
        return {name: features[name] for name in self.return_stages}


def variables_from_torchvision(
    state_dict: Mapping[str, Any], *, norm: str = "frozen_batch"
) -> dict[str, dict[str, Any]]:
    """Converts a torchvision ResNet ``state_dict`` to :class:`ResNet` variables.

    Works for any depth; the classifier (``fc.*``) is dropped. Values may be
    torch CPU tensors or arrays (anything ``np.asarray`` accepts), so this
    function itself does not need torch. Convolution kernels are permuted from
    ``(O, I, KH, KW)`` to ``(KH, KW, I, O)``; batch-norm ``weight``, ``bias``,
    ``running_mean``, ``running_var`` become ``scale``, ``bias``, ``mean``,
    ``var``. ``layer1 .. layer4`` become ``res2 .. res5``, so for a C4 head
    ``variables["params"]["res5"]`` (and ``["batch_stats"]["res5"]``) are the
    variables of a :class:`ResNetStage`.

    Args:
      state_dict: torchvision ``resnet{18,34,50,101}().state_dict()``.
      norm: ``"frozen_batch"`` (all four norm vectors in ``batch_stats``) or
        ``"batch"`` (``scale``/``bias`` in ``params``).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for ``ResNet(norm=norm)``.
    """
    if norm not in ("frozen_batch", "batch"):
        raise ValueError(f"norm must be 'frozen_batch' or 'batch', got {norm!r}.")
    variables: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}

    def put(collection: str, path: list[str], leaf: str, value: np.ndarray) -> None:
        node = variables[collection]
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value

    def module_path(torch_module: str) -> list[str]:
        parts = torch_module.split(".")
        if parts[0] in ("conv1", "bn1"):
            return ["stem_conv" if parts[0] == "conv1" else "stem_norm"]
        stage = STAGE_NAMES[int(parts[0].removeprefix("layer")) - 1]
        block = f"block{parts[1]}"
        if parts[2] == "downsample":
            return [stage, block, "shortcut_conv" if parts[3] == "0" else "shortcut_norm"]
        return [stage, block, parts[2].replace("bn", "norm")]

    norm_leaves = {
        "weight": ("scale", "params"),
        "bias": ("bias", "params"),
        "running_mean": ("mean", "batch_stats"),
        "running_var": ("var", "batch_stats"),
    }
    for key, value in state_dict.items():
        torch_module, _, leaf = key.rpartition(".")
        if key.startswith("fc.") or leaf == "num_batches_tracked":
            continue
        array = np.asarray(value, dtype=np.float32)
        path = module_path(torch_module)
        if array.ndim == 4:
            put("params", path, "kernel", np.transpose(array, (2, 3, 1, 0)))
        else:
            name, collection = norm_leaves[leaf]
            if norm == "frozen_batch":
                collection = "batch_stats"
            put(collection, path, name, array)
    return variables
