"""Tests of jfcnn/data/local.py: preparing TFDS data sets from local files, once per change."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jfcnn.data import local

FEATURES = tfds.features.FeaturesDict(
    {"name": tfds.features.Text(), "value": tfds.features.Scalar(np.int64)}
)


class Source:
    """A folder of text files, each holding one integer; counts how often it is read."""

    def __init__(self, root):
        self.root = str(root)
        self.reads = 0
        os.makedirs(self.root, exist_ok=True)

    def write(self, name: str, value: int) -> None:
        with open(os.path.join(self.root, name), "w") as f:
            f.write(str(value))

    def files(self) -> list[str]:
        return sorted(os.path.join(self.root, n) for n in os.listdir(self.root))

    def examples(self, fail_at: str | None = None):
        for path in self.files():
            name = os.path.basename(path)
            if name == fail_at:
                raise local.LocalDataError(f"{path}: broken")
            self.reads += 1
            with open(path) as f:
                yield name, {"name": name, "value": int(f.read())}

    def prepare(self, data_dir, options=None, fail_at=None, metadata=None):
        return local.prepare(
            name="jfcnn_local_test",
            source=self.root,
            files=self.files(),
            options=options or {"format": 1},
            features=FEATURES,
            split_examples={"train": lambda: self.examples(fail_at)},
            metadata=metadata or {"class_names": ["a", "b"]},
            data_dir=str(data_dir),
        )


def stored_values(builder) -> dict[str, int]:
    ds = tfds.as_numpy(builder.as_dataset(split="train"))
    return {ex["name"].decode(): int(ex["value"]) for ex in ds}


def test_prepares_once_and_again_only_when_the_files_change(tmp_path):
    source = Source(tmp_path / "src")
    source.write("a.txt", 1)
    source.write("b.txt", 2)
    data_dir = tmp_path / "tfds"

    builder = source.prepare(data_dir)
    assert stored_values(builder) == {"a.txt": 1, "b.txt": 2}
    assert local.stored_metadata(builder) == {"class_names": ["a", "b"]}
    assert builder.info.splits["train"].num_examples == 2
    assert source.reads == 2

    source.prepare(data_dir)  # Unchanged: nothing is read.
    assert source.reads == 2

    source.write("a.txt", 10)  # Size changes.
    assert stored_values(source.prepare(data_dir)) == {"a.txt": 10, "b.txt": 2}
    assert source.reads == 4

    # Same size, new modification time.
    os.utime(os.path.join(source.root, "b.txt"), ns=(1, 1))
    source.write("b.txt", 3)
    assert stored_values(source.prepare(data_dir)) == {"a.txt": 10, "b.txt": 3}

    source.write("c.txt", 4)  # Added file.
    assert stored_values(source.prepare(data_dir)) == {"a.txt": 10, "b.txt": 3, "c.txt": 4}

    reads = source.reads
    source.prepare(data_dir, options={"format": 1, "ignore_label": 0})  # Options change.
    assert source.reads == reads + 3
    # The stale copy was replaced, not kept beside the new one.
    config_dir = os.path.dirname(os.fspath(builder.data_path))
    assert os.listdir(config_dir) == [local.VERSION]


def test_two_folders_with_one_name_do_not_collide(tmp_path):
    first, second = Source(tmp_path / "x" / "data"), Source(tmp_path / "y" / "data")
    first.write("a.txt", 1)
    second.write("a.txt", 2)
    data_dir = tmp_path / "tfds"
    builder_1, builder_2 = first.prepare(data_dir), second.prepare(data_dir)
    assert builder_1.data_path != builder_2.data_path
    assert stored_values(first.prepare(data_dir)) == {"a.txt": 1}
    assert stored_values(builder_2) == {"a.txt": 2}
    assert local.storage_name(first.root).startswith("data_")
    assert first.reads == second.reads == 1


def test_a_failed_preparation_leaves_nothing_that_counts_as_prepared(tmp_path):
    source = Source(tmp_path / "src")
    source.write("a.txt", 1)
    source.write("b.txt", 2)
    data_dir = tmp_path / "tfds"
    with pytest.raises(local.LocalDataError, match="b.txt: broken"):
        source.prepare(data_dir, fail_at="b.txt")
    name_dir = data_dir / "jfcnn_local_test" / local.storage_name(source.root)
    assert not any(entry.startswith(local.VERSION) for entry in os.listdir(name_dir))
    # An interrupted run's temporary directory (as TFDS names it) is cleaned up.
    leftover = name_dir / f"{tfds.core.constants.INCOMPLETE_PREFIX}ABCDEF_{local.VERSION}"
    leftover.mkdir()
    reads = source.reads
    builder = source.prepare(data_dir)
    assert source.reads == reads + 2  # Prepared for real this time.
    assert stored_values(builder) == {"a.txt": 1, "b.txt": 2}
    assert sorted(os.listdir(name_dir)) == [local.VERSION]


def test_fingerprint_is_relative_to_the_source(tmp_path):
    for name in ("one", "two"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "f.txt").write_text("12")
        os.utime(tmp_path / name / "f.txt", ns=(5, 5))
    assert local.fingerprint(tmp_path / "one", [tmp_path / "one" / "f.txt"], {}) == (
        local.fingerprint(tmp_path / "two", [tmp_path / "two" / "f.txt"], {})
    )
    with pytest.raises(local.LocalDataError, match="missing.txt"):
        local.fingerprint(tmp_path, [tmp_path / "missing.txt"], {})
