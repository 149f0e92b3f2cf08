"""ResNet backbones (He et al., 2016) in Flax linen, BHWC, torchvision-compatible.

The architecture is torchvision's ``resnet18/34/50/101`` without the classifier:
a stem (7x7/2 convolution, normalization, ReLU, 3x3/2 max pool with padding 1)
and four stages ``res2 .. res5`` of :class:`BasicBlock` (depth 18, 34) or
:class:`Bottleneck` (depth 50, 101; the stride sits on the 3x3 convolution,
"ResNet v1.5"). With the same weights (see :func:`variables_from_torchvision`)
the feature maps equal torchvision's.

Letters used for shapes:

  B: batch size (or number of ROIs for :class:`ResNetStage` in a C4 head).
  H, W: input height and width.
  C: input channels.

Normalization (``norm``, built by :func:`jfcnn.models.layers.norm_layer`):

  ``"frozen_batch"``: :class:`~jfcnn.models.layers.FrozenBatchNorm`, a fixed
      affine map from ``scale``, ``bias``, ``mean`` and ``var`` stored in
      ``batch_stats`` (detectron2's ``FrozenBatchNorm2d``), what detection
      fine-tuning of a pretrained backbone uses.
  ``"batch"``: ``flax.linen.BatchNorm`` (``scale``/``bias`` in ``params``,
      ``mean``/``var`` in ``batch_stats``, updated when ``train=True``).
  ``"group"``: :class:`~jfcnn.models.layers.GroupNorm` with
      :func:`~jfcnn.models.layers.group_norm_groups` groups (32 for every
      layer of a standard-width network).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jfcnn.models.layers import NORM_EPSILON, norm_layer

Dtype = Any

NORMS = ("frozen_batch", "batch", "group")
STAGE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_NAMES = ("stem", *STAGE_NAMES)
# Output stride of each feature map relative to the input.
FEATURE_STRIDES = {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}

# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


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


class _ResidualBlock(nn.Module):
    """What BasicBlock and Bottleneck share: conv/norm layers, shortcut, residual add.

    A subclass lists its convolutions in :meth:`layers`; layer ``i`` (from 1)
    is ``conv{i}`` followed by ``norm{i}``, with a ReLU after all but the
    last. The shortcut is the identity when the stride is 1 and the channel
    count is kept, else ``shortcut_conv`` (1x1, strided) and
    ``shortcut_norm``; the block returns ``relu(layers(x) + shortcut(x))``.
    """

    features: int
    strides: int = 1
    norm: str = "frozen_batch"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    norm_epsilon: float = NORM_EPSILON

    def layers(self) -> tuple[tuple[int, int, int], ...]:
        """``(output channels, kernel size, stride)`` of each convolution."""
        raise NotImplementedError

    def _norm(self, name: str, channels: int, train: bool) -> Callable[[jax.Array], jax.Array]:
        return norm_layer(
            self.norm,
            channels=channels,
            train=train,
            name=name,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            epsilon=self.norm_epsilon,
        )

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, *, train: bool) -> jax.Array:
        layers = self.layers()
        y_bhwc = x_bhwc
        for i, (features, kernel, strides) in enumerate(layers, start=1):
            y_bhwc = _conv(features, kernel, strides, self.dtype, f"conv{i}")(y_bhwc)
            y_bhwc = self._norm(f"norm{i}", features, train)(y_bhwc)
            if i < len(layers):
                y_bhwc = nn.relu(y_bhwc)
        out_features = layers[-1][0]
        if self.strides == 1 and x_bhwc.shape[-1] == out_features:
            shortcut_bhwc = x_bhwc.astype(self.dtype)
        else:
            shortcut_bhwc = _conv(out_features, 1, self.strides, self.dtype, "shortcut_conv")(
                x_bhwc
            )
            shortcut_bhwc = self._norm("shortcut_norm", out_features, train)(shortcut_bhwc)
        return nn.relu(y_bhwc + shortcut_bhwc)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Shapes: input ``(B, H, W, C)``, output
    ``(B, ceil(H / strides), ceil(W / strides), features)``. The first
    convolution carries the stride; the shortcut is a 1x1 convolution plus
    normalization when the stride is not 1 or the channel count changes, the
    identity otherwise. Params: ``conv1``, ``norm1``, ``conv2``, ``norm2``
    [, ``shortcut_conv``, ``shortcut_norm``].

    Attributes:
      features: output channels.
      strides: spatial stride (1 or 2).
      norm: one of ``NORMS``.
      dtype: computation dtype.
      bn_axis_name: ``axis_name`` for cross-device ``norm="batch"`` statistics.
    """

    expansion = 1

    def layers(self) -> tuple[tuple[int, int, int], ...]:
        return ((self.features, 3, self.strides), (self.features, 3, 1))


class Bottleneck(_ResidualBlock):
    """1x1, 3x3, 1x1 convolutions with a residual connection (ResNet-50/101).

    Shapes: input ``(B, H, W, C)``, output
    ``(B, ceil(H / strides), ceil(W / strides), 4 * features)``. The stride
    sits on the 3x3 convolution (torchvision's "ResNet v1.5"); the shortcut is
    a strided 1x1 convolution plus normalization when the stride is not 1 or
    the channel count changes. Params: ``conv1``, ``norm1``, ``conv2``,
    ``norm2``, ``conv3``, ``norm3`` [, ``shortcut_conv``, ``shortcut_norm``].

    Attributes:
      features: channels of the 1x1 and 3x3 convolutions inside the block.
      strides: spatial stride (1 or 2).
      norm: one of ``NORMS``.
      dtype: computation dtype.
      bn_axis_name: ``axis_name`` for cross-device ``norm="batch"`` statistics.
    """

    expansion = 4

    def layers(self) -> tuple[tuple[int, int, int], ...]:
        return (
            (self.features, 1, 1),
            (self.features, 3, self.strides),
            (self.features * self.expansion, 1, 1),
        )


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

    Shapes: input ``(B, H, W, C)``, output
    ``(B, ceil(H / strides), ceil(W / strides), features * block_cls.expansion)``.
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
    norm_epsilon: float = NORM_EPSILON

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, *, train: bool) -> jax.Array:
        if x_bhwc.ndim != 4:
            raise ValueError(f"inputs must have shape (B, H, W, C), got shape {x_bhwc.shape}.")
        for i in range(self.num_blocks):
            x_bhwc = self.block_cls(
                features=self.features,
                strides=self.strides if i == 0 else 1,
                norm=self.norm,
                dtype=self.dtype,
                bn_axis_name=self.bn_axis_name,
                norm_epsilon=self.norm_epsilon,
                name=f"block{i}",
            )(x_bhwc, train=train)
        return x_bhwc


# depth -> (block type, blocks per stage res2..res5), as in torchvision.
RESNET_SPECS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet backbone returning multi-scale feature maps.

    Shapes: input ``(B, H, W, C)``; output a dict with (a subset, see
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
      norm_epsilon: added to the variance in every norm (1e-5; torchvision's
        published v1 detection weights need 0).
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
    norm_epsilon: float = NORM_EPSILON
    return_stages: Sequence[str] = FEATURE_NAMES

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        if x_bhwc.ndim != 4:
            raise ValueError(f"inputs must have shape (B, H, W, C), got shape {x_bhwc.shape}.")
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

        x_bhwc = _conv(self.width, 7, 2, self.dtype, "stem_conv")(x_bhwc)
        x_bhwc = norm_layer(
            self.norm,
            channels=self.width,
            train=train,
            name="stem_norm",
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            epsilon=self.norm_epsilon,
        )(x_bhwc)
        x_bhwc = nn.relu(x_bhwc)
        x_bhwc = nn.max_pool(x_bhwc, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = {"stem": x_bhwc}
        for i, (name, num_blocks) in enumerate(zip(STAGE_NAMES, stage_sizes, strict=True)):
            if i + 1 > last:
                break
            x_bhwc = ResNetStage(
                num_blocks=num_blocks,
                features=self.width * 2**i,
                strides=1 if i == 0 else 2,
                block_cls=BLOCKS[block_name],
                norm=self.norm,
                dtype=self.dtype,
                bn_axis_name=self.bn_axis_name,
                norm_epsilon=self.norm_epsilon,
                name=name,
            )(x_bhwc, train=train)
            features[name] = x_bhwc
        return {name: features[name] for name in self.return_stages}


def variables_from_torchvision(
    state_dict: Mapping[str, Any], *, norm: str = "frozen_batch"
) -> dict[str, dict[str, Any]]:
    """Converts a torchvision ResNet ``state_dict`` to :class:`ResNet` variables.

    Works for any depth; the classifier (``fc.*``) is dropped. Values may be
    torch CPU tensors or arrays (anything ``np.asarray`` accepts), so this
    function itself does not need torch. Convolution kernels are permuted from
    ``(O, I, KH, KW)`` to ``(KH, KW, I, O)``; norm ``weight``, ``bias``
    (and batch norm's ``running_mean``, ``running_var``) become ``scale``,
    ``bias`` (``mean``, ``var``). ``layer1 .. layer4`` become ``res2 .. res5``, so for a C4 head
    ``variables["params"]["res5"]`` (and ``["batch_stats"]["res5"]``) are the
    variables of a :class:`ResNetStage`.

    Args:
      state_dict: torchvision ``resnet{18,34,50,101}().state_dict()``.
      norm: ``"frozen_batch"`` (all four norm vectors in ``batch_stats``),
        ``"batch"`` (``scale``/``bias`` in ``params``) or ``"group"`` (for a
        torchvision ResNet built with ``norm_layer`` a ``torch.nn.GroupNorm``
        of :func:`jfcnn.models.layers.group_norm_groups` groups: ``scale``/
        ``bias`` in ``params``, no ``batch_stats``).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (``{"params": ...}`` for
      ``"group"``) for ``ResNet(norm=norm)``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
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
    if norm == "group":
        del variables["batch_stats"]
    return variables
