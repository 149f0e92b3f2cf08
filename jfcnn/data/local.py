"""TFDS data sets prepared from the user's local files (``folder``, ``coco_json``).

A data set made from the user's own files is converted once into an ordinary
TFDS data set in the TFDS data dir, and the generic pipeline reads it like
any other. `prepare` does the conversion and decides when it is needed:

- **Where.** ``DATA_DIR/NAME/CONFIG/1.0.0/`` with ``DATA_DIR`` the config's
  ``data.data_dir`` (None: the TFDS default, ``~/tensorflow_datasets`` or
  ``$TFDS_DATA_DIR``), ``NAME`` the data set kind (e.g. ``jfcnn_folder``) and
  ``CONFIG`` = `storage_name` of the source: the source's base name plus a
  hash of its absolute path, so two folders never share a copy.
- **When.** A *fingerprint* of the inputs (each file's path relative to the
  source, size and modification time) and of the preparation options (e.g.
  the ignore label, a format number of the caller's conversion code) is
  stored with the data set. The next run recomputes it (a directory listing
  and a ``stat`` per file, no reading) and prepares again only when it
  differs: a file added, removed, renamed, or rewritten.
- **Safely.** TFDS writes into a temporary ``incomplete.*`` directory and
  renames it into place when every split is written (``tfds.core.utils
  .incomplete_dir``), and the fingerprint is part of that directory
  (``metadata.json``), so a failed or interrupted preparation never leaves a
  copy that a later run takes as prepared. An exclusive file lock keeps two
  processes on one machine from preparing the same copy at once.
- **Streamed.** Examples come from the caller's generators one at a time;
  TFDS's writer shuffles them by key hash with at most about 1 GB in memory
  (it spills to disk beyond that), so the size of the source is not limited
  by memory.

A data set module calls `prepare` from its spec's ``make_builder`` and reads
what it stored with `stored_metadata` (e.g. the class names) from the spec's
``classes``. Problems in the user's files raise `LocalDataError` with a
message that names the file and the fix.

>>> builder = prepare(
...     name="jfcnn_folder",
...     source="/data/leaves",
...     files=["/data/leaves/classes.txt", "/data/leaves/train/images/a.png", ...],
...     options={"format": 1, "ignore_label": 255},
...     features=tfds.features.FeaturesDict({"image": tfds.features.Image(), ...}),
...     split_examples={"train": lambda: generate("train"), ...},
...     metadata={"class_names": ["soil", "leaf"]},
...     data_dir=None,
... )
>>> stored_metadata(builder)["class_names"]
['soil', 'leaf']
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

from jfcnn.errors import UserError

VERSION = "1.0.0"
# Bumped when what `prepare` stores beside the caller's examples changes.
_STORAGE_FORMAT = 1
_METADATA_FILE = "metadata.json"  # TFDS's name for `DatasetInfo.metadata`.

# (key, example) pairs of one split; keys are unique strings within the split.
SplitExamples = Callable[[], Iterable[tuple[str, Mapping[str, Any]]]]


class LocalDataError(UserError, ValueError):
    """A file of a data set made from the user's files is missing, unreadable or inconsistent.

    The message names the file and how to fix it.
    """


def storage_name(source: str | os.PathLike) -> str:
    """The TFDS config name of the copy prepared from ``source`` (a folder or file).

    Readable (the base name, lower case, letters, digits and ``_`` only) and
    unique per absolute path (a hash of it), so that two sources with the same
    base name do not collide.

    >>> storage_name("/data/My Leaves/")
    'my_leaves_a827d0186c'
    """
    path = os.path.abspath(os.fspath(source)).rstrip(os.sep) or os.sep
    base = re.sub(r"[^a-z0-9]+", "_", os.path.basename(path).lower()).strip("_")[:40]
    digest = hashlib.sha256(path.encode("utf-8")).hexdigest()[:10]
    return f"{base or 'data'}_{digest}"


def fingerprint(
    source: str | os.PathLike, files: Iterable[str | os.PathLike], options: Mapping[str, Any]
) -> str:
    """A hex digest of ``files`` (path relative to ``source``, size, mtime) and ``options``.

    Changes when a file is added, removed, renamed or rewritten (its size or
    modification time changes), or when an option changes; reads no file.

    Raises:
      LocalDataError: naming a file that cannot be ``stat``-ed.
    """
    root = os.path.abspath(os.fspath(source))
    entries = []
    for path in files:
        path = os.fspath(path)
        try:
            stat = os.stat(path)
        except OSError as e:
            raise LocalDataError(f"{path}: cannot be read ({e.strerror}).") from e
        relative = os.path.relpath(os.path.abspath(path), root)
        entries.append((relative, stat.st_size, stat.st_mtime_ns))
    entries.sort()
    digest = hashlib.sha256()
    digest.update(
        json.dumps({"format": _STORAGE_FORMAT, "options": options}, sort_keys=True).encode()
    )
    for relative, size, mtime_ns in entries:
        digest.update(f"\0{relative}\0{size}\0{mtime_ns}".encode())
    return digest.hexdigest()


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder for one source, made per call (it is not in the TFDS registry).

    The class attributes that TFDS reads (``name``, ``VERSION``,
    ``BUILDER_CONFIGS``) are set on a subclass made per call (`_builder_class`),
    so that TFDS finds the config among the class's own. Unlike
    ``tfds.dataset_builders.AdhocBuilder``, it stores ``DatasetInfo.metadata``
    (the fingerprint and the caller's metadata) with the examples.
    """

    def __init__(
        self,
        *,
        config_name: str,
        features: tfds.features.FeaturesDict,
        split_examples: Mapping[str, SplitExamples],
        metadata: Mapping[str, Any],
        description: str,
        data_dir: str | None,
    ):
        self._features = features
        self._split_examples = split_examples
        self._metadata = metadata
        self._description = description
        super().__init__(data_dir=data_dir, config=config_name, version=VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description,
            features=self._features,
            metadata=tfds.core.MetadataDict(self._metadata),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        # Generators are created here, so nothing is read unless preparing.
        return {split: make() for split, make in self._split_examples.items()}

    def _generate_examples(self, **kwargs):  # Unused: `_split_generators` yields examples.
        raise NotImplementedError


def _builder_class(name: str, config_name: str) -> type[_LocalBuilder]:
    config = tfds.core.BuilderConfig(name=config_name, version=VERSION)
    attributes = {"name": name, "VERSION": tfds.core.Version(VERSION), "BUILDER_CONFIGS": [config]}
    return type(f"LocalBuilder_{config_name}", (_LocalBuilder,), attributes, skip_registration=True)


def _read_stored(data_path: os.PathLike) -> dict[str, Any] | None:
    """The stored ``metadata.json`` of a prepared copy; None if absent or unreadable."""
    try:
        with open(os.path.join(os.fspath(data_path), _METADATA_FILE)) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


@contextlib.contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (created) where the OS has ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent preparations are unlikely there.
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(
    *,
    name: str,
    source: str | os.PathLike,
    files: Iterable[str | os.PathLike],
    options: Mapping[str, Any],
    features: tfds.features.FeaturesDict,
    split_examples: Mapping[str, SplitExamples],
    metadata: Mapping[str, Any],
    data_dir: str | None = None,
    description: str = "",
    also_named_by: Iterable[str | os.PathLike] = (),
) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of ``source``; prepares it first if its inputs changed.

    Args:
      name: TFDS name of the data set kind, e.g. ``"jfcnn_folder"`` (a valid
        Python identifier in snake case).
      source: the user's folder or annotation file; its absolute path names the
        copy (`storage_name`).
      files: every input file whose change must trigger a new preparation
        (images, masks, annotation files); paths are taken relative to
        ``source`` (or its folder, for a file) in the fingerprint, so a moved
        source with the same files still matches.
      options: JSON-serializable preparation options that change the stored
        examples (e.g. ``{"format": 1, "ignore_label": 255}``; bump
        ``format`` when the conversion code changes what it stores).
      features: the TFDS features of one example.
      split_examples: split name -> a function returning that split's
        ``(key, example)`` pairs (called only when preparing; a generator keeps
        memory bounded). Keys are unique strings within a split; they also
        seed the stored order (TFDS shuffles examples by key hash).
      metadata: JSON-serializable facts to store with the copy (class names,
        category ids); read back with `stored_metadata`.
      data_dir: the TFDS data dir (``config.data.data_dir``); None: TFDS default.
      description: stored in the data set's info.
      also_named_by: other paths that select what is prepared (e.g. the
        other split's annotation file); they enter the copy's name beside
        ``source``, so that a run naming other files never replaces the copy
        another run reads.

    Returns:
      A prepared builder (``as_dataset``, ``info.splits`` as for any TFDS data set).

    Raises:
      LocalDataError: from ``split_examples``, for a problem in the user's files.
        The copy is not prepared then, and the next call tries again.
    """
    source = os.path.abspath(os.fspath(source))
    root = source if os.path.isdir(source) else os.path.dirname(source)
    key = fingerprint(root, files, options)
    copy_name = storage_name(source)
    others = sorted(os.path.abspath(os.fspath(p)) for p in also_named_by)
    if others:
        digest = hashlib.sha256("\n".join([source, *others]).encode("utf-8")).hexdigest()[:10]
        copy_name = f"{copy_name}_{digest}"

    def make_builder(stored_metadata: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
        return _builder_class(name, copy_name)(
            config_name=copy_name,
            features=features,
            split_examples=split_examples,
            metadata=stored_metadata,
            description=description,
            data_dir=data_dir,
        )

    to_store = {
        "fingerprint": key,
        "source": source,
        "storage_format": _STORAGE_FORMAT,
        "metadata": dict(metadata),
    }
    builder = make_builder(to_store)
    data_path = os.fspath(builder.data_path)
    if builder.is_prepared() and (_read_stored(data_path) or {}).get("fingerprint") == key:
        return builder  # The common case: a listing and one small file read.

    config_dir = os.path.dirname(data_path)
    os.makedirs(config_dir, exist_ok=True)
    with _exclusive_lock(os.path.join(os.path.dirname(config_dir), f".{copy_name}.lock")):
        # Another process may have prepared it while we waited for the lock.
        if (_read_stored(data_path) or {}).get("fingerprint") != key:
            # A stale copy (inputs changed) and leftovers of interrupted
            # preparations (TFDS's temporary directories) go first.
            for entry in os.listdir(config_dir):
                if entry == os.path.basename(data_path) or entry.startswith(
                    tfds.core.constants.INCOMPLETE_PREFIX
                ):
                    shutil.rmtree(os.path.join(config_dir, entry), ignore_errors=True)
            # A fresh builder: the one above may have read the stale copy's info.
            make_builder(to_store).download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
    # Read back from disk, as every later run will.
    return make_builder(to_store)


def stored_metadata(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """The ``metadata`` that `prepare` stored with ``builder``'s copy.

    Raises:
      LocalDataError: if the copy has none (it was not made by `prepare`).
    """
    stored = _read_stored(builder.data_path)
    if stored is None or "metadata" not in stored:
        raise LocalDataError(
            f"{builder.data_path}: not a data set prepared from local files (no "
            f"{_METADATA_FILE}); delete the directory and run again to prepare it."
        )
    return stored["metadata"]
