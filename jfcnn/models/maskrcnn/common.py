"""Small pieces the RPN, the ROI heads and the mask head share.

Letters used for shapes: K classes (background 0 included).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any

# torchvision's smooth L1 beta for both box losses (the RPN's and the box head's).
SMOOTH_L1_BETA = 1.0 / 9.0


def smooth_l1(x: jax.Array, beta: float = SMOOTH_L1_BETA) -> jax.Array:
    """Elementwise smooth L1 (Huber / beta) as ``torch.nn.functional.smooth_l1_loss``.

    >>> smooth_l1(jnp.array([0.0, 2.0]), beta=1.0).tolist()
    [0.0, 1.5]
    """
    absolute = jnp.abs(x)
    return jnp.where(absolute < beta, 0.5 * x * x / beta, absolute - 0.5 * beta)


def select_class(values: jax.Array, classes: jax.Array) -> jax.Array:
    """``values[..., c, ...]`` with ``c = classes[...]`` on class axis ``classes.ndim``.

    ``values`` has ``classes.shape`` (broadcast dimensions of size 1 allowed)
    followed by ``K`` and any trailing dimensions, e.g. box deltas
    ``(B, R, K, 4)`` with classes ``(B, R)`` give ``(B, R, 4)``, mask logits
    ``(B, R, S, S, K)`` with classes ``(B, R, 1, 1)`` give ``(B, R, S, S)``.

    A one-hot product rather than ``take_along_axis``: it fuses into one
    elementwise pass, where the gather is slow on CPU.
    """
    axis = classes.ndim
    onehot = jax.nn.one_hot(classes, values.shape[axis], dtype=values.dtype)
    onehot = onehot.reshape(onehot.shape + (1,) * (values.ndim - onehot.ndim))
    return jnp.sum(values * onehot, axis=axis)
