"""`coco_json`: instance segmentation from the user's COCO-format JSON files and images.

What annotation tools export (CVAT, Label Studio, labelme, Roboflow) is read
as COCO defines it: per split one JSON file with ``images`` (``id``,
``file_name``, ``width``, ``height``), ``categories`` (``id``, ``name``) and
``annotations`` (``id``, ``image_id``, ``category_id``, ``segmentation``,
optional ``bbox``, ``iscrowd``, ``area``), and a directory of image files::

    config.data.name = "coco_json"
    config.data.train_annotations = "/data/cells/train.json"
    config.data.train_images = "/data/cells/train"
    config.data.eval_annotations = "/data/cells/val.json"
    config.data.eval_images = "/data/cells/val"

Splits: ``"train"`` (the train files) and ``"validation"`` (the eval files).

- Masks are decoded by pycocotools exactly as ``COCO.annToMask`` does:
  polygons (several per object), compressed and uncompressed RLE.
- Classes: 0 is the background, 1..K-1 the categories of both files sorted
  by category id (ids need not be contiguous; a category listed without
  annotations is a class too). ``DatasetMetadata.category_ids`` maps class
  ids back to the user's ids.
- ``iscrowd`` regions are not training instances: their slots come after the
  others with ``instance_crowd`` True (the pipeline gives them
  ``instance_valid`` False, as in `jfcnn.data.coco`); evaluation scores
  against the user's annotation file, where COCOeval ignores detections on
  them.
- Images without annotations are examples without instances.
- Overlapping objects: the common form holds one instance index per pixel, so
  where objects overlap the smaller one is kept (crowd regions lie below all
  objects). Training sees these visible masks; evaluation uses the file.
- Each example carries ``image_id``, its id in the file, so evaluation can
  score the detections against that file (``AnnotationFileEvaluator`` in
  ``jfcnn.tasks.instance``).

Every image is decoded once, when the data set is prepared, by
`jfcnn.data.images.load_image` (the decoder of prediction too) and stored
losslessly (PNG) at its original size, so evaluation and
``python -m jfcnn.predict`` see identical pixels.

Mistakes in the files stop the preparation with an `AnnotationError` naming
the file, the annotation or image id and the fix: an image listed but
missing, an annotation pointing at an unknown image or category, a polygon
with fewer than 3 points, a box outside its image, a mask whose size is not
its image's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

from jfcnn.data import local, registry
from jfcnn.data.images import find_images, load_image
from jfcnn.errors import ConfigError, UserError

NAME = "coco_json"
TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"
# config.data keys of each split: (annotation file, image directory).
SPLIT_KEYS = {
    TRAIN_SPLIT: ("train_annotations", "train_images"),
    EVAL_SPLIT: ("eval_annotations", "eval_images"),
}
# The instance index map is uint8: at most this many instances per image.
MAX_INSTANCES = 255
# How far (pixels) a box may reach past its image: tools round coordinates.
BOX_TOLERANCE = 1.0


class AnnotationError(UserError, ValueError):
    """A COCO annotation file (or its images) that cannot be used; the message names
    the file, the record and the fix."""


def _describe(annotation: Mapping[str, Any], index: int) -> str:
    if "id" in annotation:
        return f"annotation {annotation['id']!r}"
    return f"annotation #{index} (no id) of the annotations list"


class AnnotationFile:
    """A parsed and checked COCO annotation file.

    Attributes:
      path: the JSON file.
      images: the image records, in file order (``id``, ``file_name``,
        ``width``, ``height``).
      categories: category id -> name.
      annotations: image id -> its annotation records, in file order.
    """

    def __init__(self, path: str | os.PathLike, *, check_annotations: bool = True):
        """Reads ``path``; without ``check_annotations``, ``annotations`` is left empty."""
        self.path = os.fspath(path)
        data = _load_json(self.path)
        self.images = _check_images(self.path, data["images"])
        self.categories = _check_categories(self.path, data["categories"])
        self.annotations: dict[int, list[dict[str, Any]]] = {}
        if not check_annotations:
            return
        self.annotations = _check_annotations(
            self.path, data["annotations"], {image["id"]: image for image in self.images},
            self.categories,
        )  # fmt: skip


def _load_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(
            f"{path}: no such annotation file; set config.data.train_annotations / "
            "eval_annotations to the COCO JSON file your annotation tool exported."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(
            f"{path}: not valid JSON ({e}); export the annotations again in COCO format."
        ) from None
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{path}: a COCO annotation file is a JSON object with 'images', 'categories' "
            f"and 'annotations', got a JSON {type(data).__name__}."
        )
    missing = [key for key in ("images", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise AnnotationError(
            f"{path}: has no {' and no '.join(repr(k) for k in missing)} list; a COCO "
            "annotation file needs 'images', 'categories' and 'annotations'. Export the "
            "annotations in COCO (instances) format."
        )
    data.setdefault("annotations", [])  # A file of images without objects.
    if not isinstance(data["annotations"], list):
        raise AnnotationError(f"{path}: 'annotations' must be a list.")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_images(path: str, images: list[Any]) -> list[dict[str, Any]]:
    seen: dict[int, str] = {}
    for index, image in enumerate(images):
        what = f"image #{index} of the images list"
        if not isinstance(image, dict):
            raise AnnotationError(f"{path}: {what} is not a JSON object: {image!r}.")
        if "id" in image:
            what = f"image {image['id']!r}"
        missing = [k for k in ("id", "file_name", "width", "height") if k not in image]
        if missing:
            raise AnnotationError(
                f"{path}: {what} lacks {missing}; every image needs 'id', 'file_name', "
                "'width' and 'height'."
            )
        if not _is_int(image["id"]):
            raise AnnotationError(f"{path}: {what} has a non-integer id; image ids are integers.")
        width, height = image["width"], image["height"]
        if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
            raise AnnotationError(
                f"{path}: {what} ({image['file_name']!r}) has width={width!r} "
                f"height={height!r}; they must be the image's size in pixels."
            )
        if image["id"] in seen:
            raise AnnotationError(
                f"{path}: image id {image['id']} is used twice ({seen[image['id']]!r} and "
                f"{image['file_name']!r}); give every image its own id."
            )
        seen[image["id"]] = image["file_name"]
    return list(images)


def _check_categories(path: str, categories: list[Any]) -> dict[int, str]:
    out: dict[int, str] = {}
    for index, category in enumerate(categories):
        if not (isinstance(category, dict) and _is_int(category.get("id"))):
            raise AnnotationError(
                f"{path}: category #{index} of the categories list has no integer 'id': "
                f"{category!r}."
            )
        if category["id"] in out:
            raise AnnotationError(
                f"{path}: category id {category['id']} is listed twice; give every category "
                "its own id."
            )
        out[category["id"]] = str(category.get("name", category["id"]))
    if not out:
        raise AnnotationError(
            f"{path}: the categories list is empty; list the object classes there."
        )
    return out


def _check_annotations(
    path: str,
    annotations: list[Any],
    images: Mapping[int, Mapping[str, Any]],
    categories: Mapping[int, str],
) -> dict[int, list[dict[str, Any]]]:
    by_image: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise AnnotationError(
                f"{path}: annotation #{index} of the annotations list is not a JSON object."
            )
        what = _describe(annotation, index)
        missing = [k for k in ("image_id", "category_id", "segmentation") if k not in annotation]
        if missing:
            raise AnnotationError(
                f"{path}: {what} lacks {missing}; instance segmentation needs 'image_id', "
                "'category_id' and a 'segmentation' (polygons or RLE) for every object."
            )
        image = images.get(annotation["image_id"])
        if image is None:
            raise AnnotationError(
                f"{path}: {what} refers to image_id {annotation['image_id']!r}, which is not in "
                "the file's images list; add that image to 'images' or remove the annotation."
            )
        if annotation["category_id"] not in categories:
            raise AnnotationError(
                f"{path}: {what} (image {image['id']}) has category_id "
                f"{annotation['category_id']!r}, which is not in the file's categories "
                f"{sorted(categories)}; add the category to 'categories' or fix the annotation."
            )
        where = f"{path}: {what} (image {image['id']}, {image['file_name']!r})"
        _check_segmentation(where, annotation["segmentation"], image)
        if annotation.get("bbox") is not None:
            _check_box(where, annotation["bbox"], image)
        by_image[image["id"]].append(annotation)
    return by_image


def _check_segmentation(where: str, segmentation: Any, image: Mapping[str, Any]) -> None:
    height, width = image["height"], image["width"]
    if isinstance(segmentation, list):
        if not segmentation:
            raise AnnotationError(
                f"{where} has an empty segmentation (a box without a mask); instance "
                "segmentation needs the object's outline: draw a polygon or mask, or remove it."
            )
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in polygon
            ):
                raise AnnotationError(
                    f"{where} has a polygon that is not a list of numbers x1, y1, x2, y2, ...: "
                    f"{str(polygon)[:80]}."
                )
            if len(polygon) < 6 or len(polygon) % 2:
                raise AnnotationError(
                    f"{where} has a polygon with {len(polygon) // 2} points "
                    f"({len(polygon)} numbers); a polygon needs at least 3 points (x, y pairs). "
                    "Fix or delete that polygon in the annotation tool."
                )
        return
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = list(segmentation["size"])
        if size != [height, width]:
            raise AnnotationError(
                f"{where} has an RLE mask of size {size} (height, width), but the image is "
                f"{[height, width]} in the file; the mask must have its image's size (check the "
                "image's 'width' and 'height', or export the mask again)."
            )
        counts = segmentation["counts"]
        if isinstance(counts, list) and sum(counts) != height * width:
            raise AnnotationError(
                f"{where} has an uncompressed RLE whose counts add up to {sum(counts)}, not "
                f"height * width = {height * width}; export the mask again."
            )
        return
    raise AnnotationError(
        f"{where} has a segmentation that is neither polygons nor RLE "
        f"({str(segmentation)[:80]}); COCO takes [[x1, y1, x2, y2, ...], ...] or "
        "{'size': [h, w], 'counts': ...}."
    )


def _check_box(where: str, box: Any, image: Mapping[str, Any]) -> None:
    height, width = image["height"], image["width"]
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
    ):
        raise AnnotationError(f"{where} has bbox {box!r}; COCO boxes are [x, y, width, height].")
    x, y, w, h = box
    tol = BOX_TOLERANCE
    if w < 0 or h < 0 or x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise AnnotationError(
            f"{where} has bbox [x, y, w, h] = {box}, outside the {width}x{height} image "
            f"(x + w = {x + w:g}, y + h = {y + h:g}); fix the box in the annotation tool, or "
            "check that the image's width and height in the file are right."
        )


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 0/1 mask of a COCO segmentation, as ``COCO.annToMask`` decodes it.

    Args:
      segmentation: polygons ``[[x1, y1, x2, y2, ...], ...]`` (merged), an
        uncompressed RLE ``{"size": [H, W], "counts": [int, ...]}`` or a
        compressed one (``counts`` a string).
      height, width: the image's size.
    """
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(np.uint8)


def image_path(image_dir: str, file_name: str) -> str | None:
    """The file of an image record: ``file_name`` under ``image_dir``, or its base name there.

    Exports often keep the tool's path in ``file_name`` (``images/1.jpg``,
    ``../upload/1.jpg``); None if neither exists.
    """
    for candidate in (
        os.path.join(image_dir, file_name),
        os.path.join(image_dir, os.path.basename(file_name)),
    ):
        if os.path.isfile(candidate):
            return candidate
    return None


def check_image_files(annotations: AnnotationFile, image_dir: str) -> list[str]:
    """The file of each listed image (in file order); `AnnotationError` naming a missing one."""
    if not os.path.isdir(image_dir):
        raise AnnotationError(
            f"{image_dir}: no such image directory (the images of {annotations.path}); set "
            "config.data.train_images / eval_images to the directory holding the image files."
        )
    paths = []
    for image in annotations.images:
        path = image_path(image_dir, image["file_name"])
        if path is None:
            raise AnnotationError(
                f"{annotations.path}: image {image['id']} ({image['file_name']!r}) is listed but "
                f"not in {image_dir}; copy the file there, or remove the image and its "
                "annotations from the file."
            )
        paths.append(path)
    return paths


def class_table(files: Sequence[AnnotationFile]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(class_names, category_ids)`` of the categories of ``files``, background first.

    Class id k >= 1 is the k-th category in increasing id order; a category id
    named differently in two files is an `AnnotationError`.
    """
    names: dict[int, str] = {}
    where: dict[int, str] = {}
    for annotation_file in files:
        for category_id, name in annotation_file.categories.items():
            if category_id in names and names[category_id] != name:
                raise AnnotationError(
                    f"Category id {category_id} is {names[category_id]!r} in "
                    f"{where[category_id]} but {name!r} in {annotation_file.path}; the files "
                    "must use the same category ids for the same classes."
                )
            names.setdefault(category_id, name)
            where.setdefault(category_id, annotation_file.path)
    ids = sorted(names)
    return ("background", *(names[i] for i in ids)), (0, *ids)


def image_example(
    image: np.ndarray,
    record: Mapping[str, Any],
    annotations: Sequence[Mapping[str, Any]],
    class_of_category: Mapping[int, int],
    *,
    where: str = "",
) -> dict[str, Any]:
    """One image and its annotations as the stored example.

    Args:
      image: (H, W, 3) uint8 pixels (`jfcnn.data.images.load_image`).
      record: the image's record in the file.
      annotations: its annotation records.
      class_of_category: category id -> class id.
      where: the annotation file, for error messages.

    Returns:
      ``image``; ``instance_index`` (H, W, 1) uint8: k where the k-th instance
      is visible (objects in file order, then crowd regions); where objects
      overlap the smaller one is kept, and crowd regions lie below all
      objects; ``instance_labels`` (N,) int32 class ids; ``instance_crowd``
      (N,) bool; ``image_id`` int64.
    """
    height, width = image.shape[:2]
    if (height, width) != (record["height"], record["width"]):
        raise AnnotationError(
            f"{where}: image {record['id']} ({record['file_name']!r}) is "
            f"{record['width']}x{record['height']} (width x height) in the file, but the image "
            f"file is {width}x{height} (turned upright by its EXIF orientation, as viewers "
            "show it); fix 'width' and 'height' or export the annotations again."
        )
    objects = [a for a in annotations if not a.get("iscrowd", 0)]
    crowd = [a for a in annotations if a.get("iscrowd", 0)]
    ordered = (objects + crowd)[:MAX_INSTANCES]
    masks = [decode_mask(a["segmentation"], height, width).astype(bool) for a in ordered]
    areas = [int(m.sum()) for m in masks]
    is_crowd = [bool(a.get("iscrowd", 0)) for a in ordered]
    # Painted in this order, later on top: crowd regions, then objects from the
    # largest to the smallest, so a small object on a large one stays visible.
    paint = sorted(range(len(ordered)), key=lambda k: (not is_crowd[k], -areas[k], k))
    index = np.zeros((height, width), np.uint8)
    for k in paint:
        index[masks[k]] = k + 1
    return {
        "image": image,
        "instance_index": index[..., None],
        "instance_labels": np.array(
            [class_of_category[a["category_id"]] for a in ordered], np.int32
        ),
        "instance_crowd": np.array(is_crowd, bool),
        "image_id": np.int64(record["id"]),
    }


def generate_examples(
    annotation_path: str, image_dir: str, class_of_category: Mapping[int, int]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, example)`` for every image of one split, decoded one at a time.

    Checks the whole file and that every image exists before decoding any.
    """
    annotations = AnnotationFile(annotation_path)
    paths = check_image_files(annotations, image_dir)
    for record, path in zip(annotations.images, paths, strict=True):
        example = image_example(
            load_image(path),
            record,
            annotations.annotations[record["id"]],
            class_of_category,
            where=annotations.path,
        )
        yield str(record["id"]), example


# ---------------------------------------------------------------------------
# The prepared TFDS data set and its spec.

# Bumped when what is stored per example changes, so old copies are prepared again.
_FORMAT = 1


def features() -> tfds.features.FeaturesDict:
    """What is stored per image: pixels and the instance index map, both PNG (lossless)."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "instance_index": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "instance_labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "instance_crowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            "image_id": tfds.features.Scalar(dtype=np.int64),
        }
    )


def _split_paths(data_config: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
    """split -> (annotation file, image directory), or a `ConfigError` naming a missing key."""
    paths = {}
    for split, keys in SPLIT_KEYS.items():
        values = [data_config.get(key) for key in keys]
        missing = [f"data.{key}" for key, value in zip(keys, values, strict=True) if not value]
        if missing:
            raise ConfigError(
                f"Config keys {missing} are not set; data.name='coco_json' reads a COCO "
                "annotation file and an image directory per split, e.g. "
                "--config.data.train_annotations=/data/train.json "
                "--config.data.train_images=/data/train_images (and eval_annotations, "
                "eval_images)."
            )
        paths[split] = tuple(os.path.abspath(os.path.expanduser(str(v))) for v in values)
    return paths


def make_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of the configured files (``DatasetSpec.make_builder``).

    Prepared into ``config.data.data_dir`` the first time, and again only when
    an annotation file or an image file changes (name, size, modification
    time; `jfcnn.data.local`). Each run reads the annotation files' categories
    (the class table), nothing else.
    """
    paths = _split_paths(data_config)
    for split, (annotation_path, image_dir) in paths.items():
        if not os.path.isfile(annotation_path):
            raise AnnotationError(
                f"{annotation_path}: no such annotation file (config.data."
                f"{SPLIT_KEYS[split][0]}); point it at the COCO JSON file of the {split} images."
            )
        if not os.path.isdir(image_dir):
            raise AnnotationError(
                f"{image_dir}: no such image directory (config.data.{SPLIT_KEYS[split][1]}); "
                f"point it at the directory holding the images of {annotation_path}."
            )
    class_names, category_ids = class_table(
        [AnnotationFile(p, check_annotations=False) for p, _ in paths.values()]
    )
    class_of_category = {c: k for k, c in enumerate(category_ids) if k > 0}
    files = []
    for annotation_path, image_dir in paths.values():
        files += [annotation_path, *find_images(image_dir)]

    def split_examples(split: str) -> Callable[[], Iterator[tuple[str, dict[str, Any]]]]:
        annotation_path, image_dir = paths[split]
        return lambda: generate_examples(annotation_path, image_dir, class_of_category)

    return local.prepare(
        name="jfcnn_coco_json",
        source=paths[TRAIN_SPLIT][0],
        # Evaluating with other files (--data eval_annotations=...) is another copy:
        # it never replaces the one a training run reads.
        also_named_by=[
            path for split in paths.values() for path in split if path != paths[TRAIN_SPLIT][0]
        ],
        files=files,
        # The image directories are part of what is prepared, not only the files in them.
        options={"format": _FORMAT, "images": {s: d for s, (_, d) in paths.items()}},
        features=features(),
        split_examples={split: split_examples(split) for split in paths},
        metadata={"class_names": list(class_names), "category_ids": list(category_ids)},
        data_dir=data_config.get("data_dir"),
        description=f"Instances of the COCO files {[p for p, _ in paths.values()]}.",
    )


def classes(builder: tfds.core.DatasetBuilder) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(class_names, category_ids)`` stored with the prepared copy (``DatasetSpec.classes``)."""
    stored = local.stored_metadata(builder)
    return tuple(stored["class_names"]), tuple(int(i) for i in stored["category_ids"])


def partial_decoding(decode: bool, instances: bool = True) -> tfds.decode.PartialDecoding:
    """All stored features (the semantic map is made from the instances); PNGs stay
    encoded unless ``decode``."""
    del instances
    decoders = None
    if not decode:
        decoders = {
            "image": tfds.decode.SkipDecoding(),
            "instance_index": tfds.decode.SkipDecoding(),
        }
    names = ("image", "instance_index", "instance_labels", "instance_crowd", "image_id")
    return tfds.decode.PartialDecoding({name: True for name in names}, decoders=decoders)


def to_common(
    builder: tfds.core.DatasetBuilder, *, decoded: bool, instances: bool = True
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """The map from a stored example to the pipeline's common form (``jfcnn.data.registry``):
    channel 0 of ``label_maps`` is the class of the instance at each pixel (crowd
    regions included), channel 1 the instance index map."""
    del instances
    stored = builder.info.features

    def decode(name, value):
        return value if decoded else stored[name].decode_example(value)

    def fn(example):
        index = decode("instance_index", example["instance_index"])[..., 0]
        labels = tf.cast(example["instance_labels"], tf.int32)
        semantic = tf.gather(tf.concat([[0], labels], axis=0), tf.cast(index, tf.int32))
        return {
            "image": decode("image", example["image"]),
            "label_maps": tf.stack([tf.cast(semantic, tf.uint8), index], axis=-1),
            "instance_labels": labels,
            "instance_crowd": tf.cast(example["instance_crowd"], tf.bool),
            "image_id": tf.cast(example["image_id"], tf.int64),
        }

    return fn


SPEC = registry.register(
    registry.DatasetSpec(
        name=NAME,
        class_names=("background",),  # The real ones come from the files (`classes`).
        has_instances=True,
        decoding=partial_decoding,
        to_common=to_common,
        keep_aspect=True,
        make_builder=make_builder,
        classes=classes,
    )
)
