"""Data: the offline `jfcnn_shapes` TFDS builder and tf.data input pipelines.

Importing this package registers the `jfcnn_shapes` TFDS builder.
"""

from jfcnn.data import shapes  # noqa: F401  (registers the `jfcnn_shapes` builder)
from jfcnn.data.pipeline import (
    DatasetMetadata,
    DatasetNotFoundError,
    create_eval_iterator,
    create_train_iterator,
    dataset_metadata,
    default_config,
    num_eval_batches,
    save_preview,
)

__all__ = [
    "DatasetMetadata",
    "DatasetNotFoundError",
    "create_eval_iterator",
    "create_train_iterator",
    "dataset_metadata",
    "default_config",
    "num_eval_batches",
    "save_preview",
]
