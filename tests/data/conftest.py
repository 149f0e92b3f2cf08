"""Fixtures for the data tests: a small `jfcnn_shapes` build shared by the session."""

from __future__ import annotations

import ml_collections
import pytest
import tensorflow_datasets as tfds

from jfcnn.data import pipeline

# The small build keeps the first N examples (keys 0..N-1) of each split.
EXAMPLES_PER_SPLIT = 48


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = tfds.builder("jfcnn_shapes", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            max_examples_per_split=EXAMPLES_PER_SPLIT, try_download_gcs=False
        )
    )
    return data_dir


@pytest.fixture
def examples_per_split() -> int:
    return EXAMPLES_PER_SPLIT


@pytest.fixture
def make_config(shapes_data_dir):
    """Returns ``make(seed=0, batch_size=8, **data_fields) -> ConfigDict`` on the small build."""

    def make(*, seed: int = 0, batch_size: int = 8, **data_fields) -> ml_collections.ConfigDict:
        config = ml_collections.ConfigDict(
            {"seed": seed, "batch_size": batch_size, "data": pipeline.default_config()}
        )
        config.data.data_dir = shapes_data_dir
        config.data.update(data_fields)
        return config

    return make
