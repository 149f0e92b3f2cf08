"""The data set registry: each data set module registers one `DatasetSpec`.

A spec says how to read one TFDS data set and map its examples to the
*common form* that the generic pipeline (``jfcnn.data.pipeline``) resizes,
augments and batches. Letters: H, W image size; H', W' label map size (the
image's, unless the data set stores labels at another resolution); C label
channels; N instances of the example.

The common form, a dict of tensors:

- ``image``: (H, W, 3) uint8.
- ``label_maps``: (H', W', C) uint8; channel 0 the stored semantic label
  (``class id + label_offset``), and, when instances are asked for, channel 1
  the instance index map (0 none, k the k-th instance). One index map replaces
  N masks because visible instance masks are disjoint, and it keeps every label
  resampled identically by a single nearest-neighbour resize.
- With instances only: ``instance_labels`` (N,) int32 semantic class ids, and
  optionally ``instance_crowd`` (N,) bool (slots kept for evaluation, not
  trained on; see ``jfcnn.data.coco``).

This module imports no TensorFlow: `DatasetMetadata` is read back from work
directories on machines that never load the training data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jfcnn.errors import ConfigError

# (example dict of tensors) -> common-form dict of tensors.
ToCommonFn = Callable[[dict[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How the pipeline reads one TFDS data set.

    Attributes:
      name: TFDS name (with its config, e.g. ``"coco/2017_panoptic"``), the
        value of ``config.data.name``.
      class_names: name of each semantic class id 0..K-1.
      has_instances: whether the data set has per-instance annotations.
      decoding: ``(decode, instances) -> tfds.decode.PartialDecoding``, the
        features to read; images (and PNG masks) stay encoded unless
        ``decode``; instance features are needed only if ``instances``.
      to_common: ``(builder, *, decoded, instances) -> fn`` mapping an example
        read with ``decoding(decoded, instances)`` to the common form (see the
        module docstring). Without ``instances`` it may skip the instance work;
        the pipeline then keeps only ``image`` and channel 0 of ``label_maps``.
      label_offset: subtracted from the stored semantic label (after resizing
        and zero padding) to give the class id.
      builds_locally: whether the pipeline may prepare the data set itself
        (only a generated one; real sets would need a download, which never
        happens here).
      keep_aspect: resize the longer side to S and zero-pad the rest, instead
        of resizing to S x S.
    """

    name: str
    class_names: tuple[str, ...]
    has_instances: bool
    decoding: Callable[[bool, bool], Any]
    to_common: Callable[..., ToCommonFn]
    label_offset: int = 0
    builds_locally: bool = False
    keep_aspect: bool = False


_SPECS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Adds ``spec`` to the registry (called once, when its module is imported)."""
    if spec.name in _SPECS:
        raise ValueError(f"Data set {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def dataset_names() -> tuple[str, ...]:
    """The registered data set names (the valid ``config.data.name`` values), sorted."""
    return tuple(sorted(_SPECS))


def get_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name``; ``ConfigError`` listing the known names otherwise."""
    if name not in _SPECS:
        raise ConfigError(
            f"Unknown data set {name!r}: config.data.name must be one of "
            f"{list(dataset_names())}. A new data set is a module in jfcnn/data/ that calls "
            "jfcnn.data.registry.register(DatasetSpec(...)), imported in jfcnn/data/__init__.py."
        )
    return _SPECS[name]


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """Static facts about a configured data set, enough to use a model without its data.

    Attributes:
      name: TFDS name.
      num_classes: number of semantic classes, background (or its equivalent) included.
      class_names: name of each semantic class id 0..num_classes-1.
      image_size: side S of the square images the model sees.
      num_train_examples: examples in ``config.data.train_split`` (all processes).
      num_eval_examples: examples in ``config.data.eval_split`` (all processes).
      has_instances: whether the data set has instance annotations (boxes,
        labels, instance masks), i.e. whether the instance task can train on it.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    num_train_examples: int
    num_eval_examples: int
    has_instances: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (``class_names`` as a list); inverse of `from_dict`."""
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DatasetMetadata:
        """Reads `to_dict`'s output (e.g. parsed JSON); keys it does not know are ignored."""
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in values]
        if missing:
            raise ValueError(f"Data set metadata lacks the keys {missing}; got {sorted(values)}")
        metadata = cls(
            name=str(values["name"]),
            num_classes=int(values["num_classes"]),
            class_names=tuple(str(n) for n in values["class_names"]),
            image_size=int(values["image_size"]),
            num_train_examples=int(values["num_train_examples"]),
            num_eval_examples=int(values["num_eval_examples"]),
            has_instances=bool(values["has_instances"]),
        )
        if metadata.num_classes != len(metadata.class_names):
            raise ValueError(
                f"Data set metadata: num_classes={metadata.num_classes} but "
                f"{len(metadata.class_names)} class_names"
            )
        return metadata
