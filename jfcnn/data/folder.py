"""``folder``: semantic segmentation from a folder of the user's images and masks.

``config.data.name = "folder"`` and ``config.data.folder = DIR`` read::

    DIR/classes.txt                    one class name per line; line i is class i
    DIR/train/images/<stem>.jpg|png    any size; RGB, grayscale or RGBA (-> RGB)
    DIR/train/masks/<stem>.png         the image's size; pixel value = class index
    DIR/validation/images/...          the same layout
    DIR/validation/masks/...

Images and masks pair by their path below ``images/`` and ``masks/`` without
the extension (sub-folders are allowed). Images are read by
`jfcnn.data.images.load_image` (any format Pillow reads, upright as a viewer
shows them, as 8-bit RGB); masks are 8-bit grayscale (mode ``L``) or palette
(mode ``P``: the palette *index* is the class) images in a lossless format
(PNG). A mask pixel equal to ``config.data.ignore_label`` (default 255) is
left out of the loss and of every metric.

On first use the folder is converted into a TFDS data set in the TFDS data
dir (``config.data.data_dir``, or the TFDS default) by `jfcnn.data.local`:
images are stored as lossless PNG of the decoded pixels, so training,
evaluation and ``jfcnn.predict`` (which decodes with the same `load_image`)
see identical pixels. It is converted again only when a file of the folder
changes (name, size or modification time) or ``data.ignore_label`` changes.
Problems in the folder stop the conversion with one error naming the file and
the fix.

Stored masks hold ``class + 1``, and 0 for ignored pixels (the spec's
``label_offset=1``), so that zero padding (``keep_aspect``, augmentation) is
ignored as well. Images keep their aspect ratio (``keep_aspect``): the longer
side is resized to ``config.data.image_size`` and the rest zero-padded.

    python train.py --config configs/unet_folder.py --workdir runs/mine \\
        --config.data.folder=/path/to/DIR
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jfcnn.data import local, registry
from jfcnn.data.images import IMAGE_EXTENSIONS, find_images, load_image
from jfcnn.errors import ConfigError

NAME = "folder"
TFDS_NAME = "jfcnn_folder"  # Copies live in DATA_DIR/jfcnn_folder/<folder name>_<hash>/.
SPLITS = ("train", "validation")
CLASSES_FILE = "classes.txt"
# Stored labels are class + 1 in 8 bits, 0 is reserved for ignored pixels.
MAX_CLASSES = 255
# Bump when the stored examples change, so that existing copies are prepared again.
_FORMAT = 1
# Lossy formats would blur the class index at every edge of a mask.
_LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
# How many offending files an error message lists.
_LISTED = 5

_MASK_HELP = (
    "save masks as 8-bit grayscale or palette PNGs whose pixel value is the class index "
    "(line i of classes.txt is class i)"
)


def _stem(path: str, directory: str) -> str:
    """The pairing key: the path below ``directory`` without its extension, '/'-separated."""
    return os.path.splitext(os.path.relpath(path, directory))[0].replace(os.sep, "/")


def _listing(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_LISTED])
    return shown + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def read_classes(folder: str) -> tuple[str, ...]:
    """The class names in ``folder/classes.txt`` (line i is class i).

    Raises:
      local.LocalDataError: the file is missing or empty, has a blank line
        between names, repeats a name, or lists more than `MAX_CLASSES` classes.
    """
    path = os.path.join(folder, CLASSES_FILE)
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte order mark.
            lines = [line.strip() for line in f.read().splitlines()]
    except FileNotFoundError as e:
        raise local.LocalDataError(
            f"{path}: no such file. Write the class names there, one per line: line 1 is "
            "class 0 (pixel value 0 in the masks), line 2 class 1, and so on."
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise local.LocalDataError(f"{path}: cannot be read ({e}); save it as UTF-8 text.") from e
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise local.LocalDataError(
            f"{path} is empty: write the class names there, one per line (line 1 is class 0)."
        )
    for number, name in enumerate(lines, start=1):
        if not name:
            raise local.LocalDataError(
                f"{path}: line {number} is blank, but line i names class i - 1; "
                "remove the blank line or write a class name there."
            )
        if lines.index(name) < number - 1:
            raise local.LocalDataError(
                f"{path}: line {number} repeats the class name {name!r} of line "
                f"{lines.index(name) + 1}; give every class its own name."
            )
    if len(lines) > MAX_CLASSES:
        raise local.LocalDataError(
            f"{path} lists {len(lines)} classes; at most {MAX_CLASSES} fit 8-bit masks."
        )
    return tuple(lines)


def find_pairs(folder: str, split: str) -> list[tuple[str, str, str]]:
    """The ``(key, image_path, mask_path)`` of every image of ``split``, sorted by key.

    Raises:
      local.LocalDataError: a missing or empty ``images``/``masks`` folder, an
        image without a mask or a mask without an image, two files with one
        stem, or a mask in a lossy format.
    """
    split_dir = os.path.join(folder, split)
    images_dir = os.path.join(split_dir, "images")
    masks_dir = os.path.join(split_dir, "masks")
    layout = (
        f"put the {split} images in {images_dir}/ and, for each, a mask of the same name "
        f"with extension .png in {masks_dir}/"
    )
    for directory in (images_dir, masks_dir):
        if not os.path.isdir(directory):
            raise local.LocalDataError(f"{directory}: no such folder; {layout}.")
    by_kind = {}
    for kind, directory in (("image", images_dir), ("mask", masks_dir)):
        found: dict[str, str] = {}
        for path in find_images(directory):
            key = _stem(path, directory)
            if key in found:
                raise local.LocalDataError(
                    f"{found[key]} and {path} are two {kind}s with the same name; "
                    f"keep one {kind} per name (remove or rename the other)."
                )
            found[key] = path
        by_kind[kind] = found
    images, masks = by_kind["image"], by_kind["mask"]
    lonely_images = [images[k] for k in sorted(images.keys() - masks.keys())]
    if lonely_images:
        raise local.LocalDataError(
            f"{_listing(lonely_images)}: no mask in {masks_dir} (expected "
            f"{os.path.join(masks_dir, _stem(lonely_images[0], images_dir))}.png); add the "
            "mask of each image, or remove the image."
        )
    lonely_masks = [masks[k] for k in sorted(masks.keys() - images.keys())]
    if lonely_masks:
        raise local.LocalDataError(
            f"{_listing(lonely_masks)}: no image of that name in {images_dir}; add the image, "
            "or remove the mask."
        )
    if not images:
        raise local.LocalDataError(
            f"The {split} split is empty: {images_dir} holds no images "
            f"({', '.join(IMAGE_EXTENSIONS)}); {layout}."
        )
    lossy = [m for m in masks.values() if m.lower().endswith(_LOSSY_EXTENSIONS)]
    if lossy:
        raise local.LocalDataError(
            f"{_listing(sorted(lossy))}: masks in a lossy format change class values at "
            f"every edge; {_MASK_HELP}."
        )
    return [(key, images[key], masks[key]) for key in sorted(images)]


def read_mask(path: str) -> np.ndarray:
    """A mask file's raw pixel values, (H, W) uint8 (the palette index of a palette image).

    Raises:
      local.LocalDataError: the file is unreadable or not 8-bit grayscale or palette.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as mask:
            mode = mask.mode
            if mode in ("L", "P", "1"):  # "1": bilevel, classes 0 and 1.
                return np.asarray(mask, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise local.LocalDataError(
            f"{path}: cannot be read as a mask ({e}); {_MASK_HELP}, or remove the file."
        ) from e
    raise local.LocalDataError(
        f"{path}: a mask of image mode {mode!r} (e.g. RGB colors); {_MASK_HELP}."
    )


def _check_sizes(image_path: str, image: np.ndarray, mask_path: str, mask: np.ndarray) -> None:
    if image.shape[:2] == mask.shape:
        return
    (height, width), (mask_height, mask_width) = image.shape[:2], mask.shape
    hint = ""
    from PIL import Image

    with Image.open(image_path) as raw:
        if raw.size == (mask_width, mask_height):
            hint = (
                " The image's EXIF orientation turns it upright (as viewers show it); "
                "rotate the mask the same way, or save the image without the orientation tag."
            )
    raise local.LocalDataError(
        f"{mask_path} is {mask_width}x{mask_height} but its image {image_path} is "
        f"{width}x{height} (width x height); a mask must have its image's size: resize it "
        f"with nearest-neighbour interpolation, or redraw it.{hint}"
    )


def _examples(
    pairs: Sequence[tuple[str, str, str]], num_classes: int, ignore_label: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Decodes and checks one pair at a time (so memory stays bounded)."""
    for key, image_path, mask_path in pairs:
        image = load_image(image_path)  # ImageReadError names the file.
        mask = read_mask(mask_path)
        _check_sizes(image_path, image, mask_path, mask)
        values = np.unique(mask)
        bad = [int(v) for v in values if v >= num_classes and v != ignore_label]
        if bad:
            raise local.LocalDataError(
                f"{mask_path}: pixel values {bad[:10]} are neither a class (classes.txt lists "
                f"{num_classes}: values 0..{num_classes - 1}) nor the ignore label "
                f"{ignore_label} (config.data.ignore_label). Add the missing classes to "
                f"classes.txt, or set those pixels to a class or to {ignore_label}."
            )
        stored = np.where(mask == ignore_label, 0, mask.astype(np.int32) + 1).astype(np.uint8)
        yield key, {"image": image, "mask": stored[..., None], "file_name": key}


FEATURES = tfds.features.FeaturesDict(
    {
        # PNG: lossless, so the stored pixels are exactly what `load_image` returned.
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "file_name": tfds.features.Text(),  # The pairing key, e.g. "sub/leaf_001".
    }
)


def make_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of ``data_config.folder`` (prepared first if it changed).

    Raises:
      ConfigError: ``data.folder`` is unset or not a folder, or ``data.ignore_label``
        is a class index.
      local.LocalDataError, jfcnn.data.images.ImageReadError: a problem in the
        folder's files.
    """
    folder = data_config.get("folder")
    if not folder:
        raise ConfigError(
            "config.data.folder is not set: pass --config.data.folder=DIR, a folder holding "
            "classes.txt, train/images, train/masks, validation/images and validation/masks."
        )
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise ConfigError(
            f"config.data.folder={data_config.folder!r}: no such folder ({folder}). Pass the "
            "folder holding classes.txt, train/ and validation/."
        )
    class_names = read_classes(folder)
    ignore_label = int(data_config.get("ignore_label", 255))
    if ignore_label < len(class_names):
        raise ConfigError(
            f"config.data.ignore_label={ignore_label} is class {ignore_label} "
            f"({class_names[ignore_label]!r}) of {os.path.join(folder, CLASSES_FILE)}; pick "
            f"an ignore label of at least {len(class_names)} (255 is the default)."
        )
    pairs = {split: find_pairs(folder, split) for split in SPLITS}
    files = [os.path.join(folder, CLASSES_FILE)]
    files += [path for split in SPLITS for _, image, mask in pairs[split] for path in (image, mask)]
    return local.prepare(
        name=TFDS_NAME,
        source=folder,
        files=files,
        options={"format": _FORMAT, "ignore_label": ignore_label},
        features=FEATURES,
        split_examples={
            split: (lambda split=split: _examples(pairs[split], len(class_names), ignore_label))
            for split in SPLITS
        },
        metadata={"class_names": list(class_names)},
        data_dir=data_config.get("data_dir"),
        description=f"Semantic segmentation from the folder {folder}.",
    )


def _classes(builder: tfds.core.DatasetBuilder) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The class names stored when the folder was prepared; class i is its own id."""
    names = tuple(local.stored_metadata(builder)["class_names"])
    return names, tuple(range(len(names)))


def _decoding(decode: bool, instances: bool) -> tfds.decode.PartialDecoding:
    """The features the pipeline reads; images stay encoded unless ``decode``."""
    del instances  # There are none.
    decoders = None
    if not decode:
        decoders = {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}
    return tfds.decode.PartialDecoding({"image": True, "mask": True}, decoders=decoders)


def _to_common(builder: tfds.core.DatasetBuilder, *, decoded: bool, instances: bool):
    """The map from a stored example to the common form (``jfcnn.data.registry``)."""
    del instances
    features = builder.info.features

    def decode(name, value):
        return value if decoded else features[name].decode_example(value)

    def fn(example):
        return {
            "image": decode("image", example["image"]),
            "label_maps": decode("mask", example["mask"]),
        }

    return fn


SPEC = registry.register(
    registry.DatasetSpec(
        name=NAME,
        class_names=(),  # Known from classes.txt only; see `_classes`.
        has_instances=False,
        decoding=_decoding,
        to_common=_to_common,
        # Stored class + 1 -> class; ignored pixels (0) and zero padding become -1.
        label_offset=1,
        keep_aspect=True,
        make_builder=make_builder,
        classes=_classes,
    )
)
