"""U-Net for semantic segmentation (Ronneberger et al., 2015), in Flax linen.

Letters used for shapes:

  B: batch size.
  H, W: image height and width.
  C: image channels.
  K: number of classes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfcnn.models.layers import ConvTranspose, norm_layer
from jfcnn.ops.max_pool import max_pool

# Re-exported: benchmarks/unet_step.py builds its PyTorch twin with this rule.

Dtype = Any

NORMS = ("group", "batch", "none")


def _resize_to(x_bhwc: jax.Array, height: int, width: int) -> jax.Array:
    """Zero-pads or center-crops ``x_bhwc`` to ``(height, width)``.

    Along each axis with size difference ``d = target - size``, adds
    ``d // 2`` rows/columns before and ``d - d // 2`` after, negative counts
    cropping: the usual PyTorch U-Net line
    ``F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])``, so an odd
    extra padded row goes to the bottom and an odd extra cropped row comes
    off the top (same for columns: right and left).
    """
    widths = [(0, 0)] * 4
    for axis, target in ((1, height), (2, width)):
        diff = target - x_bhwc.shape[axis]
        widths[axis] = (diff // 2, diff - diff // 2)
    if any(w for pair in widths for w in pair):
        # lax.pad crops where the widths are negative.
        x_bhwc = jax.lax.pad(
            x_bhwc, jnp.zeros((), x_bhwc.dtype), [(lo, hi, 0) for lo, hi in widths]
        )
    return x_bhwc


class DoubleConv(nn.Module):
    """Two (3x3 conv, normalization, ReLU) layers; the spatial size is kept.

    Shapes: input ``(B, H, W, C)``, output ``(B, H, W, features)``.
    Convolutions have no bias when a normalization follows (its shift makes
    a bias redundant). Params: ``conv1``, ``norm1``, ``conv2``, ``norm2``
    (no ``norm{i}`` for ``norm="none"``); the norms come from
    :func:`jfcnn.models.layers.norm_layer`.
    """

    features: int
    norm: str = "group"
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, *, train: bool) -> jax.Array:
        for i in (1, 2):
            x_bhwc = nn.Conv(
                self.features,
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=self.norm == "none",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.initializers.he_normal(),
                name=f"conv{i}",
            )(x_bhwc)
            x_bhwc = norm_layer(
                self.norm,
                channels=self.features,
                train=train,
                name=f"norm{i}",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                bn_axis_name=self.bn_axis_name,
            )(x_bhwc)
            x_bhwc = nn.relu(x_bhwc)
        return x_bhwc


class UNet(nn.Module):
    """U-Net: per-pixel class logits from images.

    Encoder level ``l`` (``l = 0 .. depth - 1``) is a :class:`DoubleConv` to
    ``base_width * 2**l`` channels (params ``down_l``) followed by a 2x2 max
    pool; the ``bottleneck`` DoubleConv has ``base_width * 2**depth``
    channels. Each decoder step ``l = depth - 1 .. 0`` up-samples with a
    PyTorch-exact :class:`~jfcnn.models.layers.ConvTranspose` to
    ``base_width * 2**l`` channels (``up_l``) and a ReLU, concatenates the
    encoder output of level ``l`` (skip first, as in PyTorch U-Nets), and
    applies a DoubleConv to ``base_width * 2**l`` channels (``dec_l``). A 1x1
    conv (``head``) gives one logit per class. With ``skip_connections=False``
    nothing is concatenated: ``dec_l`` convolves the up-sampled map alone
    (``base_width * 2**l`` input channels instead of twice that), so the
    encoder reaches the output only through the bottleneck (an ablation of
    what the skips contribute, e.g. to object borders); parameter names are
    the same either way.

    Sizes: pooling floors odd sizes, and non-default up-sampling geometry can
    give maps that differ from the skip; the up-sampled map is then
    zero-padded or center-cropped to the skip's size (see ``_resize_to`` for
    where an odd row/column goes, as in PyTorch U-Nets). With the default
    ``kernel = stride = 2, padding = 0`` and ``H, W`` multiples of
    ``2**depth`` no cropping or padding happens. Inputs too small for
    ``depth`` raise a ``ValueError`` that names a size that works.

    Attributes:
      num_classes: number of classes ``K``.
      depth: number of 2x2 down-samplings.
      base_width: channels at the top level; doubled at each level down.
      up_kernel_size: kernel size of the up-sampling transposed convolution.
      up_stride: its stride.
      up_padding: its padding, PyTorch's meaning (crop from each border).
      skip_connections: concatenate encoder features into the decoder (the
        U-Net); ``False`` gives a plain encoder-decoder.
      norm: ``"group"`` (GroupNorm, see
        :func:`jfcnn.models.layers.group_norm_groups`),
        ``"batch"`` (BatchNorm; needs ``mutable=["batch_stats"]`` when
        ``train``) or ``"none"``.
      bn_axis_name: for ``norm="batch"``, the ``pmap``/``shard_map`` axis name
        over which batch statistics are averaged; ``None`` for per-device
        statistics.
      dtype: computation dtype (``jnp.float32`` or ``jnp.bfloat16``).
      param_dtype: parameter dtype.

    >>> model = UNet(num_classes=3, depth=2, base_width=8)
    >>> images = jnp.zeros((1, 16, 16, 3))
    >>> variables = model.init(jax.random.key(0), images, train=False)
    >>> model.apply(variables, images, train=False).shape
    (1, 16, 16, 3)
    """

    num_classes: int
    # The values a config may give the string fields (checked before a run starts).
    FIELD_CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "norm": NORMS,
        "dtype": ("float32", "bfloat16", "float16"),
    }

    depth: int = 4
    base_width: int = 64
    up_kernel_size: int = 2
    up_stride: int = 2
    up_padding: int = 0
    skip_connections: bool = True
    norm: str = "group"
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _up_sizes_ok(self, size: int) -> bool:
        sizes = [size]
        for _ in range(self.depth):
            sizes.append(sizes[-1] // 2)
        if sizes[-1] < 1:
            return False
        for small in sizes[1:]:
            up = (small - 1) * self.up_stride + self.up_kernel_size - 2 * self.up_padding
            if up < 1:
                return False
        return True

    def _check(self, images_bhwc: jax.Array) -> None:
        if images_bhwc.ndim != 4:
            raise ValueError(f"images_bhwc must have shape (B, H, W, C), got {images_bhwc.shape}.")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}.")
        for name, value, least in (
            ("up_kernel_size", self.up_kernel_size, 1),
            ("up_stride", self.up_stride, 1),
            ("up_padding", self.up_padding, 0),
        ):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}.")
        for axis, size in (("height", images_bhwc.shape[1]), ("width", images_bhwc.shape[2])):
            if not self._up_sizes_ok(size):
                working = next(
                    (
                        m
                        for m in range(size + 1, size + 2 ** (self.depth + 8))
                        if self._up_sizes_ok(m)
                    ),
                    None,
                )
                hint = (
                    f"the smallest {axis} that works is {working}"
                    if working is not None
                    else "reduce up_padding"
                )
                raise ValueError(
                    f"image {axis} {size} (images shape {images_bhwc.shape}) is too small for "
                    f"depth={self.depth} with up-sampling kernel {self.up_kernel_size}, stride "
                    f"{self.up_stride}, padding {self.up_padding}; {hint}."
                )

    @nn.compact
    def __call__(self, images_bhwc: jax.Array, *, train: bool) -> jax.Array:
        """Returns float32 logits of shape ``(B, H, W, K)`` for images ``(B, H, W, C)``."""
        self._check(images_bhwc)
        block = dict(
            norm=self.norm,
            bn_axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x_bhwc = images_bhwc.astype(self.dtype)
        skips = []
        for level in range(self.depth):
            x_bhwc = DoubleConv(self.base_width * 2**level, **block, name=f"down_{level}")(
                x_bhwc, train=train
            )
            skips.append(x_bhwc)
            x_bhwc = max_pool(x_bhwc, 2)
        x_bhwc = DoubleConv(self.base_width * 2**self.depth, **block, name="bottleneck")(
            x_bhwc, train=train
        )
        for level in reversed(range(self.depth)):
            x_bhwc = ConvTranspose(
                self.base_width * 2**level,
                kernel_size=self.up_kernel_size,
                strides=self.up_stride,
                padding=self.up_padding,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.initializers.he_normal(),
                name=f"up_{level}",
            )(x_bhwc)
            x_bhwc = nn.relu(x_bhwc)
            skip = skips[level]
            # Resized to the skip's size either way, so both variants give
            # the same output shape.
            x_bhwc = _resize_to(x_bhwc, skip.shape[1], skip.shape[2])
            if self.skip_connections:
                x_bhwc = jnp.concatenate([skip, x_bhwc], axis=-1)
            x_bhwc = DoubleConv(self.base_width * 2**level, **block, name=f"dec_{level}")(
                x_bhwc, train=train
            )
        logits_bhwk = nn.Conv(
            self.num_classes,
            (1, 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="head",
        )(x_bhwc)
        return logits_bhwk.astype(jnp.float32)
