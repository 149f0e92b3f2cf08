"""Predicts with a trained work directory on image files.

    python -m jfcnn.predict --workdir runs/unet --output predictions/ photos/ more/*.jpg
        [--step 400] [--batch_size 8] [--score_threshold 0.05] [--no_overlay]

Each INPUT is an image file, a directory (searched recursively for
`jfcnn.data.images.IMAGE_EXTENSIONS` files) or a glob. Images of any size,
aspect and mode (JPEG, PNG, BMP, TIFF, WebP: whatever Pillow reads;
grayscale, RGBA, 16-bit) are decoded as training decoded them
(`jfcnn.data.images.load_image`: photos turned upright by their EXIF
orientation, as a viewer shows them) and fitted to the model's S x S input
exactly as evaluation fits them (`jfcnn.data.pipeline.fit_image`); the
predictions are mapped back to the image's own resolution (after the EXIF
turn). A converted torchvision detector (``python -m jfcnn.convert``) fits
images as torchvision does instead (``config.data.resize = "torchvision"``:
shorter side ``min_size``, longer at most ``max_size``) and pastes masks as
torchvision does, so its predictions are torchvision's. What ``OUT`` receives:

- Semantic segmentation: ``OUT/<stem>.png``, a palette PNG ("P" mode, the
  `jfcnn.visualize.palette` colors) of the image's size whose pixel values
  are class indices (see ``dataset.json``'s ``class_names``), and
  ``OUT/<stem>_overlay.png``, the image with its classes tinted and a legend
  of their names to the right.
- Instance segmentation: ``OUT/predictions.json``, a COCO results list with
  one entry per detection scoring at least ``--score_threshold``:
  ``file_name`` (the path relative to the directory given as INPUT, or the
  file's name for a file or glob), ``category_id`` (the data set's own id),
  ``category_name``, ``bbox`` ``[x, y, width, height]`` in image pixels,
  ``score`` and ``segmentation`` (compressed RLE, ``{"size": [h, w],
  "counts": str}``); and ``OUT/<stem>_overlay.png`` (masks, boxes, labels).

``--no_overlay`` leaves the ``_overlay.png`` pictures out (drawing and
compressing them is most of the host's work per image).

Two inputs with the same stem get ``<stem>_<extension>`` (then a counter).
A file that cannot be read gets one ``error:`` line naming it; the other
images are still predicted, and the exit status is 1 at the end.

Images are fed in fixed-size batches (the last one padded) through one
compiled function, so any mix of image sizes compiles once; decoding and
fitting run in a thread pool ahead of the model, and mapping back and
writing overlap the next batch.

Several processes (hosts) share the work when started like ``train.py`` (see
`jfcnn.distributed`: ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` on every command, or nothing on Cloud TPU, SLURM and Open
MPI), each with the same INPUTs and the same ``--output``, a directory every
process can write (a shared file system): process ``i`` predicts every
``N``-th file from the ``i``-th on, on its own devices, and writes its
pictures; process 0 then writes the one ``predictions.json`` of all the
files, in input order, as one process would have written it. Every process
exits with status 1 if any file could not be read.

From Python (a notebook, a service)::

    predictor = jfcnn.predict.Predictor("runs/unet")
    result = predictor.predict(image)  # (H, W), (H, W, 3) or (H, W, 4) uint8, or floats in [0, 1]
    result["classes"]  # (H, W) class indices (semantic); instance: boxes, scores, masks, ...
"""

from __future__ import annotations

from jfcnn import cli

if __name__ == "__main__":  # Before the training stack is imported below.
    cli.exit_unless_installed("train", "python -m jfcnn.predict")

import collections
import concurrent.futures
import dataclasses
import glob
import json
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from jfcnn import distributed, evaluate, visualize
from jfcnn import train_state as state_lib
from jfcnn.data import images as images_lib
from jfcnn.data import pipeline
from jfcnn.errors import UserError
from jfcnn.tasks import instance as instance_lib

try:  # The same deflate streams as zlib's, about twice as fast.
    from zlib_ng import zlib_ng as _deflate
except ImportError:
    _deflate = zlib

# The model outputs the host needs to map detections back (not the canvas masks).
_INSTANCE_OUTPUTS = ("boxes", "scores", "classes", "detection_valid", "mask_probs")
PREDICTIONS_FILE = "predictions.json"


@dataclasses.dataclass
class Prediction:
    """One image's prediction, or why there is none.

    Attributes:
      source: the file's path (`Predictor.predict_files`) or the image's index
        (`Predictor.predict_batch`).
      image: the (H, W, 3) uint8 image the prediction refers to (upright), or None.
      result: what `Predictor.predict` returns, or None if ``error``.
      error: the `jfcnn.data.images.ImageReadError` of a file that cannot be read.
    """

    source: str | int
    image: np.ndarray | None = None
    result: dict[str, Any] | None = None
    error: UserError | None = None


@dataclasses.dataclass
class _Fitted:
    prediction: Prediction
    canvas: np.ndarray | None = None  # (S, S, 3) float32 in [0, 1]
    resized_size: np.ndarray | None = None  # (2,) int32


def as_rgb8(image: Any) -> np.ndarray:
    """An in-memory image as (H, W, 3) uint8 RGB, the form files are decoded to.

    Accepts (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped) arrays
    of uint8 pixels or of floats in [0, 1] (rounded to 8 bits, as a saved
    file would be).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape[:2]:
        raise ValueError(
            f"image must be (H, W), (H, W, 3) or (H, W, 4) with H, W > 0, got shape {image.shape}"
        )
    if image.dtype == np.uint8:
        pass
    elif np.issubdtype(image.dtype, np.floating):
        low, high = float(np.min(image)), float(np.max(image))
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{low:g}, {high:g}]"
                + (": pass 0..255 pixels as uint8." if high > 1 else ".")
            )
        image = np.round(image * 255.0).astype(np.uint8)
    else:
        raise TypeError(
            f"image must be uint8 or float in [0, 1], got dtype {image.dtype} "
            "(scale other integer images to 0..255 uint8 first)"
        )
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


class Predictor:
    """A trained work directory, ready to predict on images of any size.

    >>> predictor = Predictor("runs/unet")
    >>> result = predictor.predict(np.zeros((480, 640, 3), np.uint8))
    >>> result["classes"].shape
    (480, 640)

    `predict` returns, at the image's own resolution:

    - semantic: ``classes`` (H, W) int32 class indices, ``class_names``, and
      with ``probabilities=True`` also ``probabilities`` (H, W, K) float32
      (the model's softmax on its canvas, resized bilinearly; ``classes`` is
      their argmax).
    - instance, detections scoring at least ``score_threshold``, best first:
      ``boxes`` (N, 4) float64 ``(x1, y1, x2, y2)`` pixels, ``scores`` (N,),
      ``classes`` (N,) int64 class indices, ``category_ids`` (N,) int64 (the
      data set's own ids), ``category_names`` (N names), ``masks`` (N, H, W)
      uint8 0/1, ``mask_regions`` (N, 4) int64 ``(row0, row1, col0, col1)``
      (mask ``n`` is 0 outside those rows and columns: its box and a pixel
      around it, so work on a mask can be confined to its region) and
      ``mask_crops`` (N uint8 arrays: each mask's region).

    Attributes:
      task_name: ``"semantic"`` or ``"instance"``.
      metadata: the run's `jfcnn.data.DatasetMetadata` (class names, image size, ...).
      step: the restored checkpoint step.
    """

    def __init__(
        self,
        workdir: str,
        *,
        step: int | None = None,
        score_threshold: float = 0.05,
        batch_size: int = 8,
        workers: int | None = None,
    ):
        """Restores ``workdir`` (latest checkpoint unless ``step``) on this process's devices.

        In a multi-process run (`jfcnn.distributed`) every process must create
        its predictor (the checkpoint is read together); each then predicts on
        its own devices alone.

        Args:
          workdir: a training run's work directory.
          step: the checkpoint step to use (default: the latest).
          score_threshold: instance detections scoring below it are dropped.
          batch_size: images per model call (rounded up to a multiple of the
            process's device count); the last batch of a call is padded to it.
          workers: host threads that decode, fit and map back images (default:
            the CPU count, at most 8).

        Raises:
          UserError: the directory holds no usable run.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # TensorFlow only resizes images here; device memory stays with JAX.
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow already set up its devices (e.g. in a notebook).
            pass
        self.config, self.task, variables, self.step = evaluate.load_trained(workdir, step)
        self.metadata = self.task.metadata
        self.task_name: str = self.task.name
        self.class_names: tuple[str, ...] = tuple(self.metadata.class_names)
        self.category_ids: tuple[int, ...] = tuple(int(c) for c in self.metadata.category_ids)
        self.score_threshold = float(score_threshold)
        self.image_size = int(self.metadata.image_size)
        # (min_size, max_size) of torchvision's resize (converted models), else None.
        self._torchvision = pipeline.torchvision_resize(self.config.data)
        if self._torchvision is not None:
            pipeline.check_torchvision_resize(self.config.data)
        self._pass_sizes = self._torchvision is not None and self.task_name == "instance"
        devices = jax.local_devices()
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self._mesh = state_lib.data_mesh()
        if jax.process_count() > 1:
            # Each process predicts its own images on its own devices: no collective
            # per batch, so processes whose shares differ (image sizes, unreadable
            # files, batch counts) never wait for one another.
            self._mesh = jax.sharding.Mesh(np.asarray(devices), (state_lib.DATA_AXIS,))
            local = state_lib.replicated(self._mesh)
            variables = jax.tree.map(
                lambda x: jax.device_put(x.addressable_data(0), local), variables
            )
        self._batch_sharding = state_lib.batch_sharded(self._mesh)
        self._variables = variables
        self._forward = jax.jit(self._make_forward())
        self._workers = workers or min(os.cpu_count() or 1, 8)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._workers, thread_name_prefix="jfcnn-predict"
        )

    def close(self) -> None:
        """Stops the host threads (the predictor cannot be used afterwards)."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public ------------------------------------------------------------
    def predict(self, image: Any, *, probabilities: bool = False) -> dict[str, Any]:
        """The prediction for one image at its own resolution (see the class docstring).

        Args:
          image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array (alpha is
            dropped) of uint8 pixels or floats in [0, 1]; upright (a photo's
            EXIF orientation is not known here: `jfcnn.data.images.load_image`
            applies it to files).
          probabilities: semantic only: also return ``probabilities`` (H, W, K).
        """
        return self.predict_batch([image], probabilities=probabilities)[0]

    def predict_batch(
        self, images: Sequence[Any], *, probabilities: bool = False
    ) -> list[dict[str, Any]]:
        """`predict` for several images (of any sizes), batched through the model."""
        rgb = [as_rgb8(image) for image in images]  # Bad arrays raise before any work.
        fitted = self._map_ahead(
            lambda item: self._fit_one(Prediction(item[0], image=item[1])), enumerate(rgb)
        )
        return [p.result for p in self._run(fitted, probabilities, True)]

    def predict_files(
        self, paths: Iterable[str], *, probabilities: bool = False, full_masks: bool = True
    ) -> Iterator[Prediction]:
        """Predictions for image files, in order, as they are ready.

        Files are read and fitted by a thread pool ahead of the model; a file
        that cannot be read yields a `Prediction` whose ``error`` names it.
        ``full_masks=False`` (instance task): results hold each mask only in
        its region (``mask_crops``, ``mask_regions``), no (N, H, W) ``masks``.
        """
        fitted = self._map_ahead(self._read_and_fit, paths)
        yield from self._run(fitted, probabilities, full_masks)

    # -- host work ---------------------------------------------------------
    def _read_and_fit(self, path: str) -> _Fitted:
        try:
            image = images_lib.load_image(path)
        except images_lib.ImageReadError as e:
            return _Fitted(Prediction(path, error=e))
        return self._fit_one(Prediction(path, image=image))

    def _fit_one(self, prediction: Prediction) -> _Fitted:
        # Eager, like tf.data's map: a tf.function would let Grappler reorder the
        # arithmetic, and the canvas would differ from evaluation's in the last bit.
        canvas, resized_size = pipeline.fit_image(
            prediction.image,
            self.image_size,
            bool(self.metadata.keep_aspect),
            torchvision=self._torchvision,
        )
        return _Fitted(prediction, canvas.numpy(), resized_size.numpy())

    def _map_ahead(self, fn: Callable[[Any], _Fitted], items: Iterable[Any]) -> Iterator[_Fitted]:
        """``map(fn, items)`` on the thread pool, in order, at most two batches ahead."""
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(self._pool.submit(fn, item))
            if len(pending) >= 2 * self.batch_size:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _run(
        self, fitted: Iterator[_Fitted], probabilities: bool, full_masks: bool
    ) -> Iterator[Prediction]:
        """Batches ``fitted`` through the model; batch k is mapped back while k + 1 runs."""
        in_flight: collections.deque = collections.deque()
        for chunk in _chunks(fitted, self.batch_size):
            good = [f for f in chunk if f.prediction.error is None]
            outputs = self._dispatch(good) if good else None
            in_flight.append((chunk, outputs))
            if len(in_flight) > 1:
                yield from self._finish(*in_flight.popleft(), probabilities, full_masks)
        while in_flight:
            yield from self._finish(*in_flight.popleft(), probabilities, full_masks)

    def _finish(
        self, chunk: list[_Fitted], outputs: Any, probabilities: bool, full_masks: bool
    ) -> Iterator[Prediction]:
        host = jax.device_get(outputs) if outputs is not None else None
        jobs = []
        index = 0
        for f in chunk:
            if f.prediction.error is None:
                jobs.append(
                    self._pool.submit(self._map_back, f, host, index, probabilities, full_masks)
                )
                index += 1
            else:
                jobs.append(None)
        for f, job in zip(chunk, jobs, strict=True):
            if job is not None:
                f.prediction.result = job.result()
            yield f.prediction

    def _map_back(
        self,
        fitted: _Fitted,
        host: Any,
        index: int,
        probabilities: bool = False,
        full_masks: bool = True,
    ) -> dict:
        """One image's outputs on the canvas mapped to its own resolution."""
        original_size = fitted.prediction.image.shape[:2]
        if self.task_name == "semantic":
            classes, probs = _upsample_probabilities(
                tf.constant(host[index]),
                tf.constant(fitted.resized_size, tf.int32),
                tf.constant(original_size, tf.int32),
            )
            result = {"classes": classes.numpy(), "class_names": self.class_names}
            if probabilities:
                result["probabilities"] = probs.numpy()
            return result
        one = {key: value[index] for key, value in host.items()}
        detections = instance_lib.detections_in_original(
            one,
            fitted.resized_size,
            original_size,
            score_threshold=self.score_threshold,
            full_masks=full_masks,
            mask_paste=getattr(self.task.model, "mask_paste", "centers"),
        )
        detections["category_ids"] = np.array(
            [self.category_ids[c] for c in detections["classes"]], np.int64
        )
        detections["category_names"] = [self.class_names[c] for c in detections["classes"]]
        return detections

    # -- device work -------------------------------------------------------
    def _make_forward(self) -> Callable[[Any, jax.Array], Any]:
        model = self.task.model
        mean = np.asarray(self.metadata.normalization["mean"], np.float32)
        std = np.asarray(self.metadata.normalization["std"], np.float32)
        semantic = self.task.name == "semantic"

        def forward(variables, images_bss3, image_sizes_b2):
            # The normalization training applied (the identity for every data set today).
            images_bss3 = (images_bss3 - mean) / std
            if self._pass_sizes:  # Where each image ends on its canvas (torchvision's resize).
                outputs = model.apply(
                    variables, images_bss3, train=False, image_sizes=image_sizes_b2
                )
            else:
                outputs = model.apply(variables, images_bss3, train=False)
            if semantic:
                return jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
            return {key: outputs[key] for key in _INSTANCE_OUTPUTS}

        return forward

    def _dispatch(self, fitted: list[_Fitted]) -> Any:
        """Starts the model on up to ``batch_size`` canvases (padded); returns without waiting."""
        size = self.image_size
        batch = np.zeros((self.batch_size, size, size, 3), np.float32)
        batch[: len(fitted)] = np.stack([f.canvas for f in fitted])
        sizes = np.full((self.batch_size, 2), size, np.int32)  # Padding slots: the canvas.
        sizes[: len(fitted)] = np.stack([f.resized_size for f in fitted])
        batch = jax.device_put(batch, self._batch_sharding)
        sizes = jax.device_put(sizes, self._batch_sharding)
        with jax.set_mesh(self._mesh):  # Per-image ops on each device's own images (jfcnn.ops).
            return self._forward(self._variables, batch, sizes)


def _chunks(fitted: Iterator[_Fitted], size: int) -> Iterator[list[_Fitted]]:
    """Groups of ``size`` readable images, with the unreadable ones where they occurred."""
    chunk: list[_Fitted] = []
    good = 0
    for f in fitted:
        chunk.append(f)
        good += f.prediction.error is None
        if good == size:
            yield chunk
            chunk, good = [], 0
    if chunk:
        yield chunk


@tf.function(
    input_signature=[
        tf.TensorSpec([None, None, None], tf.float32),
        tf.TensorSpec([2], tf.int32),
        tf.TensorSpec([2], tf.int32),
    ]
)
def _upsample_probabilities(probs_ssk, resized_size, original_size):
    """The image's part of the canvas probabilities, resized to ``original_size``; and argmax.

    Bilinear on probabilities (antialiased when shrinking), then argmax: a
    class map is never resized itself, so boundaries stay smooth.
    Enlarging, the antialiased kernel is plain bilinear interpolation, which
    TensorFlow's ResizeBilinear computes in two thirds of the time.
    """
    probs_hwk = probs_ssk[: resized_size[0], : resized_size[1]]
    probs_hwk = tf.cond(
        tf.reduce_all(original_size >= resized_size),
        lambda: tf.image.resize(probs_hwk, original_size, method="bilinear"),
        lambda: tf.image.resize(probs_hwk, original_size, method="bilinear", antialias=True),
    )
    return tf.argmax(probs_hwk, axis=-1, output_type=tf.int32), probs_hwk


# ---------------------------------------------------------------------------
# Command line


@dataclasses.dataclass(frozen=True)
class InputFile:
    """An image file to predict: where it is, its name in predictions.json, its output stem."""

    path: str
    file_name: str
    stem: str = ""


def collect_inputs(
    inputs: Sequence[str], *, exclude_dir: str | None = None
) -> tuple[list[InputFile], list[str]]:
    """The files named by ``inputs`` (files, directories, globs), each once, in order.

    Files under ``exclude_dir`` (the output directory) found by searching a
    directory or a glob are left out, so that an output directory inside an
    input directory never feeds its pictures back in.

    Returns:
      ``(files, problems)``: ``problems`` names the inputs that match nothing.
      Files have unique output stems (`unique_stems`).
    """
    files: list[InputFile] = []
    problems: list[str] = []
    seen: set[str] = set()
    excluded = os.path.realpath(exclude_dir) + os.sep if exclude_dir else None

    def add(path: str, file_name: str, *, searched: bool = True) -> None:
        key = os.path.realpath(path)
        if searched and excluded and key.startswith(excluded):
            return
        if key not in seen:
            seen.add(key)
            files.append(InputFile(path, file_name))

    def add_directory(directory: str) -> int:
        found = images_lib.find_images(directory)
        for path in found:
            add(path, os.path.relpath(path, directory).replace(os.sep, "/"))
        return len(found)

    for item in inputs:
        if os.path.isdir(item):
            if not add_directory(item):
                problems.append(
                    f"{item}: no image files in this directory "
                    f"({', '.join(images_lib.IMAGE_EXTENSIONS)})."
                )
        elif os.path.exists(item) or not glob.has_magic(item):
            # A missing file is reported when it is read, in the input order.
            add(item, os.path.basename(item), searched=False)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            count = 0
            for path in matches:
                if os.path.isdir(path):
                    count += add_directory(path)
                elif path.lower().endswith(images_lib.IMAGE_EXTENSIONS):
                    add(path, os.path.basename(path))
                    count += 1
            if not count:
                problems.append(f"{item}: matches no image file.")
    return unique_stems(files), problems


def unique_stems(files: Sequence[InputFile]) -> list[InputFile]:
    """``files`` with output stems: the file's stem, ``<stem>_<ext>`` when two share
    a stem, and a counter after that. No two files' outputs share a name (the
    overlay of ``x.jpg``, ``x_overlay.png``, is not the class map of an input
    ``x_overlay.png``)."""
    stems = [os.path.splitext(os.path.basename(f.path)) for f in files]
    count = collections.Counter(stem for stem, _ in stems)
    taken: set[str] = set()  # Output names without ".png".
    out = []
    for f, (stem, ext) in zip(files, stems, strict=True):
        name = stem if count[stem] == 1 else f"{stem}_{ext.lstrip('.').lower() or 'file'}"
        candidate, n = name, 2
        while candidate in taken or f"{candidate}_overlay" in taken:
            candidate, n = f"{name}_{n}", n + 1
        taken.update((candidate, f"{candidate}_overlay"))
        out.append(dataclasses.replace(f, stem=candidate))
    return out


def class_png(classes: np.ndarray, num_classes: int) -> Any:
    """A "P"-mode Pillow image whose pixel values are the class indices, in palette colors.

    More than 256 classes do not fit a palette: those maps are 16-bit grayscale.
    """
    from PIL import Image

    if num_classes > 256:
        return Image.fromarray(classes.astype(np.uint16))
    picture = Image.fromarray(classes.astype(np.uint8), mode="P")
    colors = np.zeros((256, 3), np.uint8)
    colors[:num_classes] = visualize.palette(num_classes)
    picture.putpalette(colors.ravel().tolist())
    return picture


def rgb_png(rgb8: np.ndarray) -> bytes:
    """The PNG file of an (H, W, 3) uint8 image, encoded for speed.

    Every row uses PNG's "up" filter (the difference to the row above),
    computed in one array operation, compressed at level 1 with deflate's
    run-length strategy (matches only of the previous byte: on filtered
    photos as small as full matching, at half its time) by zlib-ng where it
    is installed (twice as fast again) and by zlib otherwise. About four
    times as fast as Pillow's encoder at ``compress_level=1`` (which tries
    five filters per row), for smaller files. Compression releases the GIL,
    so writer threads work in parallel.
    """
    rgb8 = np.ascontiguousarray(rgb8, np.uint8)
    if rgb8.ndim != 3 or rgb8.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {rgb8.shape}")
    height, width = rgb8.shape[:2]
    rows = rgb8.reshape(height, 3 * width)
    filtered = np.empty((height, 1 + 3 * width), np.uint8)
    filtered[:, 0] = 2  # Filter type "up"; the first row's "row above" is zeros.
    filtered[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # Modulo 256, as PNG defines it.

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", _deflate.crc32(data, _deflate.crc32(kind)))
        return struct.pack(">I", len(data)) + kind + data + checksum

    compressor = _deflate.compressobj(1, _deflate.DEFLATED, 15, 8, _deflate.Z_RLE)
    data = compressor.compress(filtered.data) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", data),
            chunk(b"IEND", b""),
        ]
    )


def _save_png(picture: Any, path: str) -> None:
    # Fast compression: writing must not slow prediction down.
    if isinstance(picture, np.ndarray):
        with open(path, "wb") as f:
            f.write(rgb_png(picture))
    else:
        picture.save(path, compress_level=1)


def _rle_from_regions(
    crops: Sequence[np.ndarray], regions_n4: np.ndarray, image_size: Sequence[int]
) -> list[dict[str, Any]]:
    """`jfcnn.tasks.instance.encode_masks` of (H, W) masks given by their regions.

    Mask ``n`` is ``crops[n]`` at rows ``row0..row1-1`` and columns
    ``col0..col1-1`` (``regions_n4[n]``, as
    `jfcnn.tasks.instance.detections_in_original` returns them) and 0
    elsewhere. COCO's RLE runs down the columns; its runs end where a crop's
    column changes, including from and to the zeros above and below it, so
    only the crop is scanned (a mask costs its crop, not the image's height);
    pycocotools compresses the counts of all masks in one call.
    """
    from pycocotools import mask as mask_utils

    height, width = (int(n) for n in image_size)
    size = height * width
    uncompressed = []
    for crop, (row0, _, col0, _) in zip(crops, regions_n4.tolist(), strict=True):
        rows, cols = crop.shape
        if not (rows and cols):
            uncompressed.append({"counts": [size], "size": [height, width]})
            continue
        # Where each column of the crop changes, with a 0 above and below it: (rows + 1, cols).
        edges = np.empty((rows + 1, cols), bool)
        np.not_equal(crop[1:], crop[:-1], out=edges[1:rows])
        np.not_equal(crop[0], 0, out=edges[0])
        np.not_equal(crop[-1], 0, out=edges[rows])
        row, changes = np.divmod(np.flatnonzero(edges), cols)
        # Their positions in the image, column by column (COCO's order).
        changes += col0
        changes *= height
        changes += row
        changes += row0
        changes.sort()
        if rows == height:
            # A column's end and the next column's start are the same pixel, where two
            # changes cancel.
            same = changes[1:] == changes[:-1]
            keep = np.ones(len(changes), bool)
            keep[1:][same] = keep[:-1][same] = False
            changes = changes[keep]
        if len(changes) and changes[-1] == size:  # Past the image's last pixel: no change.
            changes = changes[:-1]
        bounds = np.empty(len(changes) + 2, np.int64)
        bounds[0], bounds[1:-1], bounds[-1] = 0, changes, size
        uncompressed.append(
            {"counts": (bounds[1:] - bounds[:-1]).tolist(), "size": [height, width]}
        )
    rles = mask_utils.frPyObjects(uncompressed, height, width) if uncompressed else []
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


def write_outputs(
    prediction: Prediction,
    file: InputFile,
    out_dir: str,
    predictor: Predictor,
    *,
    overlay: bool = True,
) -> list[dict[str, Any]]:
    """Writes one image's PNGs; returns its predictions.json entries (instance task).

    ``overlay=False`` leaves ``<stem>_overlay.png`` out.
    """
    result, image = prediction.result, prediction.image
    overlay_path = os.path.join(out_dir, f"{file.stem}_overlay.png")
    if predictor.task_name == "semantic":
        classes = result["classes"]
        class_path = os.path.join(out_dir, f"{file.stem}.png")
        _save_png(class_png(classes, len(predictor.class_names)), class_path)
        if overlay:
            picture = visualize.semantic_overlay(image, classes, predictor.class_names)
            _save_png(picture, overlay_path)
        return []
    if overlay:
        picture = visualize.draw_instances(
            image,
            result["boxes"],
            result["classes"],
            result["mask_crops"],
            np.ones(len(result["scores"]), bool),
            predictor.class_names,
            result["scores"],
            regions=result["mask_regions"],
        )
        _save_png(picture, overlay_path)
    boxes = result["boxes"]
    entries = []
    rles = _rle_from_regions(result["mask_crops"], result["mask_regions"], image.shape[:2])
    for n, rle in enumerate(rles):
        x1, y1, x2, y2 = (float(v) for v in boxes[n])
        entries.append(
            {
                "file_name": file.file_name,
                "category_id": int(result["category_ids"][n]),
                "category_name": result["category_names"][n],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(result["scores"][n]),
                "segmentation": rle,
            }
        )
    return entries


def _check_no_input_overwritten(files: Sequence[InputFile], out_dir: str, *, overlay: bool) -> None:
    """Stops, before anything is written, if an output file would replace an input file."""
    inputs = {os.path.realpath(f.path): f.path for f in files}
    outputs = [os.path.join(out_dir, PREDICTIONS_FILE)]
    for f in files:
        outputs.append(os.path.join(out_dir, f"{f.stem}.png"))
        if overlay:
            outputs.append(os.path.join(out_dir, f"{f.stem}_overlay.png"))
    for path in outputs:
        if os.path.realpath(path) in inputs:
            raise UserError(
                f"{inputs[os.path.realpath(path)]} is an input and would be overwritten by "
                f"the predictions written to {out_dir}; pass another --output directory."
            )


def predict_to_directory(
    predictor: Predictor,
    files: Sequence[InputFile],
    out_dir: str,
    *,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
    overlay: bool = True,
) -> int:
    """Predicts ``files`` into ``out_dir``; returns how many could not be read.

    Writing runs on a thread pool while the model works on the next batch.
    ``on_error`` receives one message per unreadable file (default: an
    ``error:`` line on stderr); ``overlay=False`` writes no ``_overlay.png``.

    In a multi-process run every process calls it with the same ``files``
    and ``out_dir`` (a directory they share) and predicts its share,
    ``files[jax.process_index()::jax.process_count()]``; process 0 writes
    the predictions.json of all of them, as one process would have written
    it, and the count returned is that of all processes.

    Raises:
      UserError: an output would replace an input; in a multi-process run,
        processes given other files, an ``out_dir`` not shared by all, or
        another process that stopped with an error (each process raises,
        so every one of them exits, none waits for the others).
    """
    _check_no_input_overwritten(files, out_dir, overlay=overlay)
    index, count = jax.process_index(), jax.process_count()
    if count == 1:
        return _predict_share(predictor, files, out_dir, progress, on_error, overlay)
    from jax.experimental import multihost_utils

    _check_same_files(files)
    # Whatever happens to its share, each process reaches the one collective
    # below and tells the others: a process whose share fails makes every process
    # stop with an error now, not when the others give up waiting for it.
    failure: Exception | None = None
    errors = 0
    try:
        share = list(files)[index::count]
        errors = _predict_share(predictor, share, out_dir, progress, on_error, overlay)
    except Exception as e:
        failure = e
    status = multihost_utils.process_allgather(np.array([errors, failure is not None], np.int32))
    if failure is not None:
        raise failure
    failed = [i for i, (_, stopped) in enumerate(status.tolist()) if stopped]
    if failed:
        raise UserError(
            f"process(es) {failed} of this run stopped with an error (their own output "
            "names it), so some images have no predictions; fix it and rerun every process."
        )
    if predictor.task_name == "instance":
        path = os.path.join(out_dir, PREDICTIONS_FILE)
        merged: Exception | None = None
        if index == 0:
            try:
                _merge_parts(path, len(files), count)
            except Exception as e:
                merged = e
        if multihost_utils.broadcast_one_to_all(np.int32(merged is not None)):
            if merged is not None:
                raise merged
            raise UserError(
                f"process 0 could not write {path} (its output names the problem); "
                "fix that and rerun every process."
            )
    return int(status[:, 0].sum())


def _predict_share(
    predictor: Predictor,
    share: Sequence[InputFile],
    out_dir: str,
    progress: bool,
    on_error: Callable[[str], None] | None,
    overlay: bool,
) -> int:
    """Predicts this process's ``share`` of the files into ``out_dir`` (an
    instance task's entries into predictions.json, or in a multi-process run
    this process's part of it); returns how many files could not be read."""
    from tqdm import tqdm

    index, count = jax.process_index(), jax.process_count()
    os.makedirs(out_dir, exist_ok=True)
    bar = tqdm(
        total=len(share),
        unit="img",
        disable=not progress or index != 0,  # Process 0 shows its share's progress.
        file=sys.stderr,
        smoothing=0.1,
    )
    if on_error is None:
        on_error = lambda message: bar.write(f"error: {message}", file=sys.stderr)
    by_path = {f.path: f for f in share}
    errors = 0
    per_file: list[list[dict[str, Any]]] = []  # Each file's predictions.json entries, in order.
    writes: collections.deque = collections.deque()  # None for an unreadable file.
    # As many writers as predictor threads: drawing and compressing (zlib releases the
    # GIL) cost more than decoding and fitting.
    threads = max(2, predictor._workers)
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jfcnn-write") as writer:
        paths = [f.path for f in share]
        for prediction in predictor.predict_files(paths, full_masks=False):
            if prediction.error is not None:
                errors += 1
                on_error(str(prediction.error))
                writes.append(None)
            else:
                file = by_path[prediction.source]
                writes.append(
                    writer.submit(
                        write_outputs, prediction, file, out_dir, predictor, overlay=overlay
                    )
                )
            # Finished writes release their images; at most two batches wait to be
            # written, so memory stays bounded when writing is the slower side. Taking
            # them in order keeps predictions.json in input order.
            while writes and (
                writes[0] is None or writes[0].done() or len(writes) > 2 * predictor.batch_size
            ):
                done = writes.popleft()
                per_file.append(done.result() if done is not None else [])
            bar.update(1)
        while writes:
            done = writes.popleft()
            per_file.append(done.result() if done is not None else [])
    bar.close()
    path = os.path.join(out_dir, PREDICTIONS_FILE)
    if predictor.task_name == "instance":
        if count == 1:
            _write_json(path, [entry for entries in per_file for entry in entries])
        else:
            _write_json(_part_path(path, index, count), per_file)
    return errors


def _write_json(path: str, value: Any) -> None:
    """Writes ``value`` to ``path`` atomically: never half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def _part_path(path: str, index: int, count: int) -> str:
    """Where process ``index`` of ``count`` leaves its share of the predictions.json at ``path``."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.part{index}-of-{count}")


def _check_same_files(files: Sequence[InputFile]) -> None:
    """Stops every process of a multi-process run unless all were given the same files."""
    from jax.experimental import multihost_utils

    listing = "\n".join(f"{f.path}\t{f.file_name}\t{f.stem}" for f in files).encode()
    checksums = multihost_utils.process_allgather(np.uint32(zlib.crc32(listing)))
    if len(set(checksums.tolist())) > 1:
        raise UserError(
            "the processes of this run found different image files to predict (process "
            f"{jax.process_index()} found {len(files)}): start every process with the same "
            "INPUTs, on a file system they all share."
        )


def _merge_parts(path: str, num_files: int, count: int) -> None:
    """Writes the predictions.json at ``path`` from the parts of ``count`` processes."""
    parts = []
    for index in range(count):
        part = _part_path(path, index, count)
        try:
            with open(part) as f:
                parts.append(json.load(f))
        except FileNotFoundError:
            raise UserError(
                f"{part} is missing: process {index} wrote its predictions elsewhere. Pass "
                "every process the same --output directory, on a file system they all share."
            ) from None
        if len(parts[-1]) != len(range(index, num_files, count)):
            raise UserError(f"{part} does not hold process {index}'s share of the files.")
    entries = []
    for position in range(num_files):  # Back in input order: file k was process k % count's.
        entries += parts[position % count][position // count]
    _write_json(path, entries)
    for index in range(count):
        os.remove(_part_path(path, index, count))


def main(argv: Sequence[str]) -> None:
    inputs = list(argv[1:])
    cli.quiet_library_logs()
    if not inputs:
        print("error: name at least one INPUT: image files, directories or globs.", file=sys.stderr)
        sys.exit(1)
    # (Called without parsed flags, main stops at the inputs: nothing to exclude then.)
    output_dir = FLAGS.output if "FLAGS" in globals() else None
    files, problems = collect_inputs(inputs, exclude_dir=output_dir)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not files:
        print("error: no image files to predict.", file=sys.stderr)
        sys.exit(1)
    with cli.exit_on_user_error(), distributed.exit_on_peer_failure():
        distributed.initialize_from_flags()
        predictor = Predictor(
            FLAGS.workdir,
            step=FLAGS.step,
            score_threshold=FLAGS.score_threshold,
            batch_size=FLAGS.batch_size,
        )
    try:
        with predictor, cli.exit_on_user_error(), distributed.exit_on_peer_failure():
            errors = predict_to_directory(
                predictor, files, FLAGS.output, overlay=not FLAGS.no_overlay
            )
    except OSError as e:
        print(f"error: could not write to {FLAGS.output} ({e.strerror or e}).", file=sys.stderr)
        sys.exit(1)
    written = len(files) - errors  # Of all processes.
    if jax.process_index() == 0:
        print(f"Wrote the predictions of {written} image(s) to {FLAGS.output}")
    if errors or problems:
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Work directory of a training run.", required=True)
    flags.DEFINE_string("output", None, "Directory for the predictions.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to use (default: latest).")
    flags.DEFINE_integer("batch_size", 8, "Images per model call (the last batch is padded).")
    flags.DEFINE_float(
        "score_threshold", 0.05, "Instance task: detections scoring below it are dropped."
    )
    flags.DEFINE_bool("no_overlay", False, "Write no <stem>_overlay.png pictures (faster).")
    distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, ...
    FLAGS = flags.FLAGS
    app.run(main)
