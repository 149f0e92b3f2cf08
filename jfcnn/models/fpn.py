"""Feature Pyramid Network (Lin et al., 2017) in Flax linen, BHWC.

The same computation as torchvision's ``FeaturePyramidNetwork`` with
``LastLevelMaxPool`` (the FPN of torchvision's ``maskrcnn_resnet50_fpn``): a
1x1 lateral convolution per input level, a top-down pathway that adds the
nearest-neighbour up-sampled coarser map to each lateral, a 3x3 output
convolution per level, and P6 taken as every second pixel of P5.

Letters used for shapes:

  B: batch size.
  Hl, Wl: height and width of level ``l``'s input feature map.
  Cl: channels of level ``l``'s input feature map.
  D: ``out_channels``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# torchvision initializes FPN convolutions with kaiming_uniform_(a=1): uniform
# with variance 1 / fan_in.
_CONV_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output position for nearest-neighbour resizing.

    ``floor(i * (in_size / out_size))`` with the ratio rounded to float32,
    clipped to ``in_size - 1``: PyTorch's ``F.interpolate(mode="nearest")``
    rule, so odd sizes pick the same pixels as torchvision. An exact 2x
    enlargement repeats every pixel twice.

    >>> nearest_indices(4, 8).tolist()
    [0, 0, 1, 1, 2, 2, 3, 3]
    >>> nearest_indices(4, 7).tolist()
    [0, 0, 1, 1, 2, 2, 3]
    """
    scale = np.float32(in_size) / np.float32(out_size)
    indices = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(indices, in_size - 1)


def resize_nearest(x_bhwc: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour resize of ``(B, H, W, C)`` to ``(B, height, width, C)``.

    Matches ``torch.nn.functional.interpolate(x, size=(height, width),
    mode="nearest")``; see :func:`nearest_indices`.
    """
    if x_bhwc.ndim != 4:
        raise ValueError(f"x_bhwc must have shape (B, H, W, C), got shape {x_bhwc.shape}.")
    _, h, w, _ = x_bhwc.shape
    if (height, width) == (2 * h, 2 * w):
        # The common case; a repeat lowers to a broadcast instead of a gather.
        return jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2)
    x_bhwc = jnp.take(x_bhwc, nearest_indices(h, height), axis=1)
    return jnp.take(x_bhwc, nearest_indices(w, width), axis=2)


def _level(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    if match is None:
        raise ValueError(f"feature names must end with their level, e.g. 'res4', got {name!r}.")
    return int(match.group(1))


class FPN(nn.Module):
    """Feature pyramid from backbone feature maps, plus a max-pooled top level.

    For input levels ``l = a .. b`` (``in_features``, finest first, each
    coarser one half the size, rounded up), with ``lateral_l`` a 1x1 and
    ``output_l`` a 3x3 (padding 1) convolution, both with bias:

      inner_b = lateral_b(C_b);  inner_l = lateral_l(C_l) + up(inner_{l+1})
      P_l = output_l(inner_l);   P_{b+1} = P_b[:, ::2, ::2]

    where ``up`` resizes to ``lateral_l(C_l)``'s size by nearest neighbour
    (2x when sizes are even, :func:`resize_nearest` otherwise).

    Shapes: input a mapping with ``in_features`` keys, each ``(B, Hl, Wl, Cl)``;
    output ``{"p{l}": (B, Hl, Wl, D)}`` for every input level plus
    ``"p{b+1}"`` of shape ``(B, ceil(Hb / 2), ceil(Wb / 2), D)``. With the
    default ``in_features`` on a :class:`jfcnn.models.resnet.ResNet`, that is
    ``"p2" .. "p6"`` at strides 4, 8, 16, 32, 64. Params: ``lateral_p{l}`` and
    ``output_p{l}`` per input level.

    Attributes:
      out_channels: ``D``, channels of every output level (256 for COCO).
      in_features: names of the input maps, finest first; each ends with its
        level number.
      dtype: computation dtype (params stay float32).

    >>> fpn = FPN(out_channels=8)
    >>> feats = {f"res{l}": jnp.zeros((1, 64 >> l, 64 >> l, 4)) for l in (2, 3, 4, 5)}
    >>> variables = fpn.init(jax.random.key(0), feats)
    >>> {k: v.shape for k, v in fpn.apply(variables, feats).items()}
    {'p2': (1, 16, 16, 8), 'p3': (1, 8, 8, 8), 'p4': (1, 4, 4, 8), 'p5': (1, 2, 2, 8), \
'p6': (1, 1, 1, 8)}
    """

    out_channels: int = 256
    in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        missing = [name for name in self.in_features if name not in features]
        if missing:
            raise ValueError(
                f"features lack {missing}; got keys {sorted(features)} "
                f"for in_features {tuple(self.in_features)}."
            )
        levels = [_level(name) for name in self.in_features]
        for name in self.in_features:
            if features[name].ndim != 4:
                raise ValueError(
                    f"features[{name!r}] must have shape (B, H, W, C), "
                    f"got shape {features[name].shape}."
                )

        def conv(kernel: int, name: str) -> nn.Conv:
            pad = kernel // 2
            return nn.Conv(
                self.out_channels,
                (kernel, kernel),
                padding=((pad, pad), (pad, pad)),
                dtype=self.dtype,
                kernel_init=_CONV_INIT,
                name=name,
            )

        outputs: dict[str, jax.Array] = {}
        inner = None
        for name, level in reversed(list(zip(self.in_features, levels, strict=True))):
            lateral = conv(1, f"lateral_p{level}")(features[name])
            if inner is not None:
                lateral = lateral + resize_nearest(inner, lateral.shape[1], lateral.shape[2])
            inner = lateral
            outputs[f"p{level}"] = conv(3, f"output_p{level}")(inner)
        top = max(levels)
        # max_pool(kernel 1, stride 2) is a strided slice.
        outputs[f"p{top + 1}"] = outputs[f"p{top}"][:, ::2, ::2]
        return {f"p{level}": outputs[f"p{level}"] for level in (*sorted(levels), top + 1)}


def fpn_variables_from_torchvision(
    state_dict: Mapping[str, Any], in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
) -> dict[str, dict[str, Any]]:
    """Converts a torchvision ``FeaturePyramidNetwork`` ``state_dict`` to :class:`FPN` variables.

    Keys as in ``FeaturePyramidNetwork(...).state_dict()``
    (``inner_blocks.{i}.0.weight``, ``layer_blocks.{i}.0.bias``, ...); strip a
    prefix such as ``backbone.fpn.`` from a detection checkpoint first. Values
    may be torch CPU tensors or arrays. Kernels are permuted from
    ``(O, I, KH, KW)`` to ``(KH, KW, I, O)``.

    Returns:
      ``{"params": ...}`` for ``FPN(in_features=in_features)``.
    """
    params: dict[str, dict[str, np.ndarray]] = {}
    for i, name in enumerate(in_features):
        level = _level(name)
        for torch_name, flax_name in (("inner_blocks", "lateral"), ("layer_blocks", "output")):
            prefix = f"{torch_name}.{i}.0."
            params[f"{flax_name}_p{level}"] = {
                "kernel": np.transpose(
                    np.asarray(state_dict[prefix + "weight"], np.float32), (2, 3, 1, 0)
                ),
                "bias": np.asarray(state_dict[prefix + "bias"], np.float32),
            }
    return {"params": params}
