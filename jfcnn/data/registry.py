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
- Optionally ``image_id``, an int64 scalar: the example's id in the user's
  own annotation file (``jfcnn.data.coco_json``); evaluation batches carry it
  so that detections can be scored against that file.

A stored semantic label that is not a class id after ``label_offset`` (zero
padding with an offset, an ignore value) becomes ``config.data.ignore_label``
in the batches, and the losses and metrics skip it.

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
      make_builder: ``data_config -> tfds.core.DatasetBuilder``, for data sets
        made from the user's files (``folder``, ``coco_json``) whose builder
        depends on the config; None: ``tfds.builder(name, data_dir=...)``.
      classes: ``builder -> (class_names, category_ids)``, for data sets whose
        classes are only known from their files; None: ``class_names`` with
        category ids 0..K-1.
    """

    name: str
    class_names: tuple[str, ...]
    has_instances: bool
    decoding: Callable[[bool, bool], Any]
    to_common: Callable[..., ToCommonFn]
    label_offset: int = 0
    builds_locally: bool = False
    keep_aspect: bool = False
    make_builder: Callable[[Any], Any] | None = None
    classes: Callable[[Any], tuple[tuple[str, ...], tuple[int, ...]]] | None = None


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


# The pipeline's pixel normalization: images reach the model as
# ``(pixels / 255 - mean) / std``. Every data set uses the identity today; the
# values are stored so that prediction applies what training did.
IDENTITY_NORMALIZATION = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """Static facts about a configured data set, enough to use a model without its data.

    Written into every work directory (``dataset.json``) when training starts,
    so that evaluation and prediction never need the training data.

    Attributes:
      name: TFDS name.
      num_classes: number of semantic classes, background (or its equivalent) included.
      class_names: name of each semantic class id 0..num_classes-1.
      image_size: side S of the square images the model sees.
      num_train_examples: examples in ``config.data.train_split`` (all processes).
      num_eval_examples: examples in ``config.data.eval_split`` (all processes).
      has_instances: whether the data set has instance annotations (boxes,
        labels, instance masks), i.e. whether the instance task can train on it.
      category_ids: the data set's own id of each class id (e.g. COCO's
        category ids 1..90 for the class ids 1..80); the class id itself where
        the data set has no ids of its own.
      keep_aspect: how an image becomes S x S: True resizes its longer side to
        S and zero-pads the bottom and right; False resizes it to S x S.
      normalization: ``{"mean": (3,), "std": (3,)}``; the model sees
        ``(pixels / 255 - mean) / std``.
      ignore_label: the label value of pixels left out of the loss and metrics.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    num_train_examples: int
    num_eval_examples: int
    has_instances: bool
    category_ids: tuple[int, ...] = ()
    keep_aspect: bool = False
    normalization: Mapping[str, tuple[float, ...]] = dataclasses.field(
        default_factory=lambda: dict(IDENTITY_NORMALIZATION)
    )
    ignore_label: int = 255

    def __post_init__(self):
        if not self.category_ids:  # Class ids are their own category ids.
            object.__setattr__(self, "category_ids", tuple(range(self.num_classes)))
        if self.num_classes != len(self.class_names):
            raise ValueError(
                f"Data set metadata: num_classes={self.num_classes} but "
                f"{len(self.class_names)} class_names"
            )
        if len(self.category_ids) != self.num_classes:
            raise ValueError(
                f"Data set metadata: num_classes={self.num_classes} but "
                f"{len(self.category_ids)} category_ids"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (tuples as lists); inverse of `from_dict`."""
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names)
        out["category_ids"] = list(self.category_ids)
        out["normalization"] = {k: list(v) for k, v in self.normalization.items()}
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DatasetMetadata:
        """Reads `to_dict`'s output (e.g. parsed JSON); keys it does not know are ignored.

        The keys added after the first release (``category_ids``,
        ``keep_aspect``, ``normalization``, ``ignore_label``) take their
        defaults when absent.
        """
        required = ["name", "num_classes", "class_names", "image_size"]
        required += ["num_train_examples", "num_eval_examples", "has_instances"]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"Data set metadata lacks the keys {missing}; got {sorted(values)}")
        normalization = values.get("normalization") or IDENTITY_NORMALIZATION
        return cls(
            name=str(values["name"]),
            num_classes=int(values["num_classes"]),
            class_names=tuple(str(n) for n in values["class_names"]),
            image_size=int(values["image_size"]),
            num_train_examples=int(values["num_train_examples"]),
            num_eval_examples=int(values["num_eval_examples"]),
            has_instances=bool(values["has_instances"]),
            category_ids=tuple(int(i) for i in values.get("category_ids") or ()),
            keep_aspect=bool(values.get("keep_aspect", False)),
            normalization={k: tuple(float(x) for x in v) for k, v in normalization.items()},
            ignore_label=int(values.get("ignore_label", 255)),
        )
