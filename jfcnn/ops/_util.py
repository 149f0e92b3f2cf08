"""Argument checks shared by the ops (static Python values, not arrays)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def _as_int(value: object) -> int:
    # bool is an int subclass, but `True` as a size or a stride is a bug.
    if isinstance(value, (bool, np.bool_)):
        raise TypeError
    return operator.index(value)


def _two_ints(value: object) -> tuple[int, int]:
    """`(value, value)` for an int, the entries of a 2-iterable of ints; else TypeError."""
    try:
        return (_as_int(value),) * 2
    except TypeError:
        pass
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError
    items = tuple(value)
    if len(items) != 2:
        raise TypeError
    return _as_int(items[0]), _as_int(items[1])


def pair(value: int | Iterable[int], name: str, *, minimum: int | None = None) -> tuple[int, int]:
    """`(value, value)` for an int, the two ints of a pair, as Python ints.

    Accepts Python and NumPy integers (anything with `__index__` except
    bools) and any iterable of exactly two of them, such as a tuple, a list
    or a `(2,)` NumPy array.

    Args:
      value: an int, or an `(h, w)` pair of ints.
      name: the argument's name, for the error message.
      minimum: if given, the smallest value either entry may take.

    Returns:
      `(h, w)` as Python ints.

    Raises:
      ValueError: naming `name`, if `value` is neither an int nor a pair of
        ints, or an entry is below `minimum`.

    >>> pair(7, "output_size")
    (7, 7)
    >>> pair((3, 0), "padding", minimum=0)
    (3, 0)
    """
    try:
        result = _two_ints(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if minimum is not None and min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return result


def check_int(name: str, value: int) -> int:
    """`value` as a Python int; TypeError naming `name` for anything but an integer."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def over_batch_shards(fn: Callable[..., Any], *batched: Any) -> Any:
    """``fn(*batched)``, run on each shard of the batch when a device mesh is set.

    ``batched``: pytrees of arrays whose leading axis is the batch (or None);
    ``fn`` maps images independently and returns arrays with the same leading
    axis. Under ``jax.set_mesh(mesh)`` (a ``jit`` data-parallel step) whose
    axes are all ``Auto`` (as ``jax.sharding.Mesh`` makes them) and hold more
    than one device, ``fn`` runs in ``jax.shard_map`` with the batch split
    over every axis, each device on its own images. Without it XLA's
    partitioner, which cannot see that a gather by computed image index stays
    within an image, puts all-gathers inside the gather kernels' loops: a Mask
    R-CNN step on 2 devices took 100x as long as on one. Otherwise (no mesh,
    one device, inside ``pmap`` or ``shard_map``, whose axes are ``Manual``,
    an ``Explicit`` mesh, or a batch that does not divide over the devices):
    ``fn(*batched)``.
    """
    import jax
    from jax.sharding import AxisType, PartitionSpec

    mesh = jax.sharding.get_abstract_mesh()
    leaves = [x for x in jax.tree.leaves(batched) if x is not None]
    if (
        mesh.empty
        or mesh.size == 1
        or any(t != AxisType.Auto for t in mesh.axis_types)
        or not leaves
        or leaves[0].shape[0] % mesh.size
    ):
        return fn(*batched)
    spec = PartitionSpec(tuple(mesh.axis_names))
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(*batched)
