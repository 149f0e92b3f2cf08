"""Data: TFDS data sets, one registered module each, and the generic tf.data pipeline.

Importing this package registers every data set below (its TFDS builder, if
it is generated here, and its `DatasetSpec`). Adding a data set is one module
that calls `register` and one import line here.
"""

# Each import registers a data set (`jfcnn_shapes` also registers its TFDS builder).
from jfcnn.data import coco, coco_json, folder, pets, shapes  # noqa: F401
from jfcnn.data.pipeline import (
    create_eval_iterator,
    create_train_iterator,
    dataset_metadata,
    default_config,
    num_eval_batches,
)
from jfcnn.data.registry import (
    DatasetMetadata,
    DatasetSpec,
    dataset_names,
    get_spec,
    register,
)
from jfcnn.errors import DatasetNotFoundError

__all__ = [
    "DatasetMetadata",
    "DatasetNotFoundError",
    "DatasetSpec",
    "create_eval_iterator",
    "create_train_iterator",
    "dataset_metadata",
    "dataset_names",
    "default_config",
    "get_spec",
    "num_eval_batches",
    "register",
]
