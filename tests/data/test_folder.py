"""Tests of the ``folder`` data set (jfcnn/data/folder.py): a folder of images and masks.

Each test writes a small folder (tiny images of different sizes and formats,
grayscale and palette masks with ignored pixels) and checks what comes out
against references computed here from the written arrays: stored pixels vs
`load_image`, batch masks vs the written masks resized by nearest neighbour,
and the evaluation metrics vs a confusion matrix counted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tiny_configs
from PIL import Image

import jfcnn.data as data_lib
from jfcnn.data import folder as folder_lib
from jfcnn.data import local, pipeline
from jfcnn.data.images import ImageReadError, load_image
from jfcnn.errors import ConfigError

ROOT = tiny_configs.ROOT
CLASSES = ("background", "leaf", "stem")
IGNORE = 255
SIZE = 16  # config.data.image_size of these tests.
# (key, (height, width) as displayed, how the image file is written, mask mode).
TRAIN = [
    ("a", (24, 32), "jpg", "L"),
    ("b", (16, 16), "gray", "P"),
    ("c", (20, 12), "rgba", "L"),
    ("sub/d", (8, 12), "png", "P"),
]
VALIDATION = [
    ("v1", (32, 24), "png", "P"),
    ("v2", (20, 12), "jpg_exif", "L"),  # Stored 12x20, turned upright by its EXIF tag.
    ("v3", (16, 16), "rgba", "L"),
]


def draw_mask(key: str, height: int, width: int) -> np.ndarray:
    """Random classes with an ignored block; every class appears."""
    rng = np.random.default_rng(sum(map(ord, key)))
    mask = rng.integers(0, len(CLASSES), (height, width)).astype(np.uint8)
    mask[: height // 4, : width // 3] = IGNORE
    mask[-1, :3] = [0, 1, 2]
    return mask


def write_image(path: str, kind: str, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    if kind == "jpg":
        Image.fromarray(rgb).save(path + ".jpg", quality=90)
    elif kind == "jpg_exif":  # Stored on its side; orientation 6 turns it upright.
        exif = Image.Exif()
        exif[0x0112] = 6
        raw = np.ascontiguousarray(np.rot90(rgb, 1))  # (width, height, 3)
        Image.fromarray(raw).save(path + ".jpg", quality=90, exif=exif)
    elif kind == "gray":
        Image.fromarray(rgb[..., 0]).save(path + ".png")
    elif kind == "rgba":
        alpha = rng.integers(0, 256, (height, width, 1)).astype(np.uint8)
        Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(path + ".png")
    else:
        Image.fromarray(rgb).save(path + ".png")


def write_mask(path: str, mask: np.ndarray, mode: str) -> None:
    image = Image.fromarray(mask)  # Mode "L".
    if mode == "P":
        image = image.convert("P")  # Palette index = the value, as written below.
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        image.frombytes(mask.tobytes())
    image.save(path + ".png")


def write_folder(root, train=TRAIN, validation=VALIDATION, classes=CLASSES) -> str:
    root = str(root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    for split, entries in (("train", train), ("validation", validation)):
        for seed, (key, (height, width), kind, mode) in enumerate(entries):
            for sub in ("images", "masks"):
                os.makedirs(os.path.dirname(os.path.join(root, split, sub, key)), exist_ok=True)
            write_image(os.path.join(root, split, "images", key), kind, height, width, seed)
            write_mask(os.path.join(root, split, "masks", key), draw_mask(key, height, width), mode)
    return root


def reference_label(mask: np.ndarray, size: int = SIZE) -> np.ndarray:
    """A written mask as an eval batch holds it: longer side to ``size`` by nearest
    neighbour (pixel centers), zero-padded at the bottom and right, ignore -> 255."""
    height, width = mask.shape
    factor = np.float32(size) / np.float32(max(height, width))
    out_h, out_w = (int(np.clip(np.round(np.float32(n) * factor), 1, size)) for n in mask.shape)
    rows = np.minimum(((np.arange(out_h) + 0.5) * height / out_h).astype(int), height - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * width / out_w).astype(int), width - 1)
    label = np.full((size, size), IGNORE, np.int32)
    label[:out_h, :out_w] = mask[rows][:, cols]
    return label


def make_config(folder: str, data_dir: str, **data_fields) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {"seed": 0, "batch_size": 2, "data": pipeline.default_config()}
    )
    config.data.update(
        name="folder", folder=folder, data_dir=data_dir, image_size=SIZE, augment=False
    )
    config.data.update(data_fields)
    return config


def eval_batches(config) -> list[dict[str, np.ndarray]]:
    return list(data_lib.create_eval_iterator(config))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A written folder and its TFDS data dir, prepared once for the module."""
    base = tmp_path_factory.mktemp("folder")
    folder, data_dir = write_folder(base / "mine"), str(base / "tfds")
    return folder, data_dir, folder_lib.make_builder(make_config(folder, data_dir).data)


def test_stored_pixels_are_load_image_pixels_and_masks_are_class_plus_one(prepared):
    folder, _, builder = prepared
    assert builder.info.splits["train"].num_examples == len(TRAIN)
    assert builder.info.splits["validation"].num_examples == len(VALIDATION)
    assert local.stored_metadata(builder)["class_names"] == list(CLASSES)
    for split, entries in (("train", TRAIN), ("validation", VALIDATION)):
        stored = {
            ex["file_name"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))
        }
        assert sorted(stored) == sorted(key for key, *_ in entries)
        for key, (height, width), kind, _ in entries:
            extension = ".jpg" if kind.startswith("jpg") else ".png"
            expected = load_image(os.path.join(folder, split, "images", key + extension))
            assert expected.shape == (height, width, 3)  # EXIF applied for v2.
            np.testing.assert_array_equal(stored[key]["image"], expected, err_msg=key)
            mask = draw_mask(key, height, width)
            expected_mask = np.where(mask == IGNORE, 0, mask.astype(int) + 1)
            np.testing.assert_array_equal(stored[key]["mask"][..., 0], expected_mask)


@pytest.mark.parametrize("cache", [True, False])
def test_eval_batches_hold_the_written_masks_resized_with_ignore_255(prepared, cache):
    folder, data_dir, _ = prepared
    batches = eval_batches(make_config(folder, data_dir, cache=cache))
    # The stored order is TFDS's (hashed keys): match examples by their original size.
    masks = {(h, w): draw_mask(key, h, w) for key, (h, w), *_ in VALIDATION}
    seen = []
    for batch in batches:
        for i in np.flatnonzero(batch["valid"]):
            size = tuple(int(n) for n in batch["original_size"][i])
            expected = reference_label(masks[size])
            np.testing.assert_array_equal(batch["mask"][i], expected, err_msg=str(size))
            assert (batch["mask"][i] == IGNORE).any() and set(np.unique(expected)) == {
                0,
                1,
                2,
                IGNORE,
            }
            seen.append(size)
    assert sorted(seen) == sorted(masks)


def test_train_batches_resize_and_ignore_like_eval(prepared):
    folder, data_dir, _ = prepared
    config = make_config(folder, data_dir, shuffle_buffer=1)
    config.batch_size = len(TRAIN)
    batch = next(data_lib.create_train_iterator(config))
    masks = {key: draw_mask(key, h, w) for key, (h, w), *_ in TRAIN}
    expected = sorted(reference_label(m).tobytes() for m in masks.values())
    assert sorted(m.astype(np.int32).tobytes() for m in batch["mask"]) == expected


def test_metadata_names_the_folder_classes(prepared):
    folder, data_dir, _ = prepared
    metadata = data_lib.dataset_metadata(make_config(folder, data_dir))
    assert metadata.class_names == CLASSES and metadata.num_classes == 3
    assert metadata.category_ids == (0, 1, 2)
    assert (metadata.num_train_examples, metadata.num_eval_examples) == (4, 3)
    assert metadata.keep_aspect and metadata.ignore_label == IGNORE


def test_prepared_again_only_when_a_file_changes(tmp_path):
    folder = write_folder(tmp_path / "mine", train=TRAIN[:2], validation=VALIDATION[:1])
    config = make_config(folder, str(tmp_path / "tfds"))
    info_file = os.path.join(folder_lib.make_builder(config.data).data_path, "dataset_info.json")
    first = os.stat(info_file).st_mtime_ns
    folder_lib.make_builder(config.data)
    assert os.stat(info_file).st_mtime_ns == first  # Not prepared again.

    # A changed mask (new size on disk) is read again: all pixels become class 2.
    key, (height, width), _, mode = VALIDATION[0]
    all_stem = np.full((height, width), 2, np.uint8)
    write_mask(os.path.join(folder, "validation", "masks", key), all_stem, mode)
    (batch,) = eval_batches(config)
    expected = reference_label(all_stem)
    np.testing.assert_array_equal(batch["mask"][0], expected)

    # Another ignore label is another preparation: the old ignored pixels (255)
    # are now an error, as values that are neither a class nor the ignore label.
    config.data.ignore_label = 200
    with pytest.raises(local.LocalDataError, match="neither a class"):
        folder_lib.make_builder(config.data)


# -- errors: each names the file and the fix ---------------------------------


def error_of(folder: str, data_dir: str, **data_fields) -> str:
    with pytest.raises((local.LocalDataError, ImageReadError, ConfigError)) as info:
        folder_lib.make_builder(make_config(folder, data_dir, **data_fields).data)
    return str(info.value)


@pytest.fixture
def small_folder(tmp_path):
    """A one-image-per-split folder to break; returns (folder, data_dir)."""
    return write_folder(tmp_path / "mine", [TRAIN[1]], [VALIDATION[2]]), str(tmp_path / "tfds")


def test_error_image_without_mask(small_folder):
    folder, data_dir = small_folder
    os.remove(os.path.join(folder, "train", "masks", "b.png"))
    message = error_of(folder, data_dir)
    assert os.path.join(folder, "train", "images", "b.png") in message
    assert os.path.join(folder, "train", "masks", "b.png") in message
    assert "add the mask" in message


def test_error_mask_without_image(small_folder):
    folder, data_dir = small_folder
    os.remove(os.path.join(folder, "validation", "images", "v3.png"))
    message = error_of(folder, data_dir)
    assert os.path.join(folder, "validation", "masks", "v3.png") in message
    assert "add the image" in message and "remove the mask" in message


def test_error_sizes_differ(small_folder):
    folder, data_dir = small_folder
    write_mask(os.path.join(folder, "train", "masks", "b"), np.zeros((16, 15), np.uint8), "L")
    message = error_of(folder, data_dir)
    assert os.path.join(folder, "train", "masks", "b.png") + " is 15x16" in message
    assert os.path.join(folder, "train", "images", "b.png") + " is 16x16" in message
    assert "nearest-neighbour" in message


def test_error_size_differs_by_exif_orientation_says_so(tmp_path):
    folder = write_folder(tmp_path / "mine", [TRAIN[0]], [VALIDATION[1]])
    # The mask drawn on the image as stored (12x20), not as displayed (20x12).
    write_mask(os.path.join(folder, "validation", "masks", "v2"), np.zeros((12, 20), np.uint8), "L")
    message = error_of(folder, str(tmp_path / "tfds"))
    assert os.path.join(folder, "validation", "masks", "v2.png") in message
    assert "EXIF orientation" in message and "rotate the mask" in message


def test_error_mask_value_neither_class_nor_ignore(small_folder):
    folder, data_dir = small_folder
    mask = draw_mask("b", 16, 16)
    mask[5, 5], mask[6, 6] = 3, 254
    write_mask(os.path.join(folder, "train", "masks", "b"), mask, "P")
    message = error_of(folder, data_dir)
    assert os.path.join(folder, "train", "masks", "b.png") in message
    assert "[3, 254]" in message and "0..2" in message and "classes.txt" in message


def test_error_unreadable_image_and_mask(small_folder):
    folder, data_dir = small_folder
    image = os.path.join(folder, "validation", "images", "v3.png")
    with open(image, "wb") as f:
        f.write(b"not a png")
    message = error_of(folder, data_dir)
    assert image in message and "cannot be read" in message and "Re-save it" in message

    write_image(image[: -len(".png")], "png", 16, 16, 0)
    mask = os.path.join(folder, "validation", "masks", "v3.png")
    with open(mask, "wb") as f:
        f.write(b"\x89PNG broken")
    message = error_of(folder, data_dir)
    assert mask in message and "cannot be read as a mask" in message and "8-bit" in message


def test_error_rgb_mask(small_folder):
    folder, data_dir = small_folder
    path = os.path.join(folder, "train", "masks", "b.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    message = error_of(folder, data_dir)
    assert path in message and "'RGB'" in message
    assert "8-bit grayscale or palette PNGs whose pixel value is the class index" in message


def test_error_jpeg_mask(small_folder):
    folder, data_dir = small_folder
    path = os.path.join(folder, "train", "masks", "b.png")
    os.remove(path)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path[:-4] + ".jpg")
    message = error_of(folder, data_dir)
    assert path[:-4] + ".jpg" in message and "lossy" in message and "PNG" in message


def test_error_empty_split(small_folder):
    folder, data_dir = small_folder
    os.remove(os.path.join(folder, "validation", "images", "v3.png"))
    os.remove(os.path.join(folder, "validation", "masks", "v3.png"))
    message = error_of(folder, data_dir)
    assert "validation split is empty" in message
    assert os.path.join(folder, "validation", "images") in message


def test_error_missing_classes_txt_and_bad_config(small_folder, tmp_path):
    folder, data_dir = small_folder
    classes = os.path.join(folder, "classes.txt")
    with open(classes, "w") as f:
        f.write("background\n\nleaf\n")
    message = error_of(folder, data_dir)
    assert classes in message and "line 2 is blank" in message

    os.remove(classes)
    message = error_of(folder, data_dir)
    assert classes + ": no such file" in message and "one per line" in message

    write_folder(folder)  # Whole again.
    message = error_of(folder, data_dir, ignore_label=1)
    assert "ignore_label=1 is class 1 ('leaf')" in message and "at least 3" in message
    assert "--config.data.folder=DIR" in error_of(None, data_dir)
    assert str(tmp_path / "nowhere") in error_of(str(tmp_path / "nowhere"), data_dir)


# -- train.py and python -m jfcnn.evaluate, end to end ------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run of configs/unet_folder.py, then `python -m jfcnn.evaluate`."""
    base = tmp_path_factory.mktemp("folder_run")
    folder, workdir = write_folder(base / "mine"), base / "run"
    overrides = {
        **tiny_configs.UNET_OVERRIDES,
        "data.folder": folder,
        "data.data_dir": str(base / "tfds"),
        "data.image_size": SIZE,
        "data.train_split": "train",
        "data.eval_split": "validation",
        "batch_size": 2,
        "num_train_steps": 2,
        "warmup_steps": 1,
        "log_every_steps": 2,
        "eval_every_steps": 2,  # Only the final evaluation.
        "checkpoint_every_steps": 2,
    }
    command = [sys.executable, os.path.join(ROOT, "train.py")]
    command += ["--config", os.path.join(ROOT, "configs", "unet_folder.py")]
    command += ["--workdir", str(workdir)]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    result = subprocess.run(
        [sys.executable, "-m", "jfcnn.evaluate", "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return folder, workdir


def test_train_and_evaluate_score_only_labelled_pixels(trained):
    folder, workdir = trained
    with open(os.path.join(workdir, "dataset.json")) as f:
        metadata = json.load(f)
    assert metadata["class_names"] == list(CLASSES) and metadata["keep_aspect"]
    assert (metadata["num_train_examples"], metadata["num_eval_examples"]) == (4, 3)
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["num_examples"] == len(VALIDATION)

    # The confusion matrix of the trained model, counted here over the labelled
    # pixels of the written masks (fit_image is how evaluation sizes images).
    from jfcnn import evaluate

    _, task, variables, step = evaluate.load_trained(str(workdir))
    assert step == 2
    confusion = np.zeros((3, 3), np.int64)
    for key, (height, width), kind, _ in VALIDATION:
        extension = ".jpg" if kind.startswith("jpg") else ".png"
        image = load_image(os.path.join(folder, "validation", "images", key + extension))
        canvas, _ = pipeline.fit_image(image, SIZE, keep_aspect=True)
        logits = task.model.apply(variables, canvas.numpy()[None], train=False)
        prediction = np.asarray(logits).argmax(-1)[0]
        label = reference_label(draw_mask(key, height, width))
        labelled = label != IGNORE
        np.add.at(confusion, (label[labelled], prediction[labelled]), 1)
    assert confusion.sum() < len(VALIDATION) * SIZE * SIZE  # Ignored pixels left out.
    true_positive = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    assert metrics["pixel_accuracy"] == pytest.approx(true_positive.sum() / confusion.sum())
    iou = [tp / u if u else np.nan for tp, u in zip(true_positive, union, strict=True)]
    assert metrics["mean_iou"] == pytest.approx(np.nanmean(iou))
    np.testing.assert_allclose(metrics["per_class_iou"], iou, rtol=1e-6)


def test_train_py_reports_a_folder_error_in_one_line(tmp_path):
    folder = write_folder(tmp_path / "mine", [TRAIN[1]], [VALIDATION[2]])
    os.remove(os.path.join(folder, "classes.txt"))
    command = [sys.executable, os.path.join(ROOT, "train.py")]
    command += ["--config", os.path.join(ROOT, "configs", "unet_folder.py")]
    command += ["--workdir", str(tmp_path / "run"), f"--config.data.folder={folder}"]
    command += [f"--config.data.data_dir={tmp_path / 'tfds'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {os.path.join(folder, 'classes.txt')}: no such file. Write the class names "
        "there, one per line: line 1 is class 0 (pixel value 0 in the masks), line 2 class 1, "
        "and so on."
    ]
