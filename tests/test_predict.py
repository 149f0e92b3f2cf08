"""python -m jfcnn.predict and jfcnn.predict.Predictor on tiny trained runs.

Each prediction is checked against the model applied by hand to the image's
`fit_image` canvas and mapped back independently; image files of other sizes
and modes (grayscale, RGBA, 16-bit, EXIF-rotated) must give the predictions of
the RGB pixels they decode to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
import tensorflow as tf
import tiny_configs
from PIL import Image
from pycocotools import mask as mask_utils

from jfcnn import predict
from jfcnn.data import images as images_lib
from jfcnn.data import pipeline
from jfcnn.errors import UserError
from jfcnn.tasks import instance

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few steps, so that the U-Net's class maps hold several classes (at initialization
# they are one class). The Mask R-CNN's training step, whose compilation took most of
# this file's time, is not needed: with no steps train.py still writes the whole work
# directory (config, data set metadata, the step-0 checkpoint), and the initial model
# detects plenty; prediction is checked against the model applied by hand.
UNET_RUN = {"num_train_steps": 4, "eval_every_steps": 4, "checkpoint_every_steps": 4}
TINY_MASKRCNN = {
    "data.image_size": 64,
    "data.train_split": "train[:16]",
    "data.eval_split": "validation[:8]",
    "data.shuffle_buffer": 16,
    **tiny_configs.config_overrides(tiny_configs.MASKRCNN),
    "batch_size": 8,
    "num_train_steps": 0,
    "num_eval_images": 0,
}


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """An (H, W, 3) uint8 image of smooth color blobs: class maps with regions, not noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def with_keep_aspect(workdir, tmp_path) -> str:
    """A copy of ``workdir`` whose data set metadata says: keep the aspect, pad the rest."""
    copy = str(tmp_path / "keep_aspect")
    shutil.copytree(workdir, copy)
    path = os.path.join(copy, "dataset.json")
    with open(path) as f:
        metadata = json.load(f)
    metadata["keep_aspect"] = True
    with open(path, "w") as f:
        json.dump(metadata, f)
    return copy


@pytest.fixture(scope="module")
def workdirs(runner, tmp_path_factory) -> dict[str, str]:
    """The tiny U-Net and Mask R-CNN runs, trained side by side by train.py.

    Both mostly compile, which keeps one core busy each: together they take
    the time of the longer one.
    """
    unet_dir = str(tmp_path_factory.mktemp("unet"))
    maskrcnn_dir = str(tmp_path_factory.mktemp("maskrcnn"))
    commands = [
        runner.command(unet_dir, **UNET_RUN),
        runner.with_config("maskrcnn.py", TINY_MASKRCNN).command(maskrcnn_dir),
    ]
    processes = [
        subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for command in commands
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"training failed:\n{stderr[-5000:]}"
    return {"unet": unet_dir, "maskrcnn": maskrcnn_dir}


@pytest.fixture(scope="module")
def unet_workdir(workdirs) -> str:
    return workdirs["unet"]


@pytest.fixture(scope="module", params=[False, True], ids=["stretch", "keep_aspect"])
def unet(request, unet_workdir, tmp_path_factory) -> predict.Predictor:
    workdir = unet_workdir
    if request.param:
        workdir = with_keep_aspect(workdir, tmp_path_factory.mktemp("unet_copy"))
    with predict.Predictor(workdir, batch_size=2) as predictor:
        assert predictor.metadata.keep_aspect == request.param
        yield predictor


@pytest.fixture(scope="module")
def maskrcnn(workdirs, tmp_path_factory) -> predict.Predictor:
    # COCO-style fitting (longer side to S, zero padding) exercises the crop when mapping back.
    workdir = with_keep_aspect(workdirs["maskrcnn"], tmp_path_factory.mktemp("maskrcnn_copy"))
    # Threshold 0: the barely trained model's detections all count.
    with predict.Predictor(workdir, batch_size=2, score_threshold=0.0) as predictor:
        yield predictor


def expected_classes(predictor: predict.Predictor, image: np.ndarray) -> np.ndarray:
    """The class map by hand: model on the fit_image canvas, softmax, crop, resize, argmax."""
    size, keep_aspect = predictor.image_size, predictor.metadata.keep_aspect
    canvas, (h, w) = pipeline.fit_image(image, size, keep_aspect)
    logits = predictor.task.model.apply(predictor._variables, canvas.numpy()[None], train=False)
    probs = jax.nn.softmax(np.asarray(logits[0], np.float32), axis=-1)[: int(h), : int(w)]
    probs = tf.image.resize(np.asarray(probs), image.shape[:2], "bilinear", antialias=True)
    return np.argmax(probs.numpy(), axis=-1)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


# ---------------------------------------------------------------------------
# Semantic


def test_semantic_classes_are_the_model_on_the_fitted_canvas(unet):
    image = smooth_image(45, 70, seed=1)
    result = unet.predict(image, probabilities=True)
    classes = result["classes"]
    assert classes.shape == (45, 70)
    assert result["class_names"] == unet.class_names
    # Several classes, so that a misplaced map could not pass.
    assert len(np.unique(classes)) >= 2
    # The batch held another image and the padding: predictions do not depend on them
    # beyond float rounding.
    assert agreement(classes, expected_classes(unet, image)) > 0.999
    probs = result["probabilities"]
    assert probs.shape == (45, 70, len(unet.class_names))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(classes, np.argmax(probs, -1))


def test_one_compiled_function_for_all_image_sizes(unet):
    sizes = [(45, 70), (100, 30), (17, 17), (64, 96), (300, 200)]
    images = [smooth_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    results = unet.predict_batch(images)
    assert [r["classes"].shape for r in results] == sizes
    for image, result in zip(images, results, strict=True):
        assert agreement(result["classes"], expected_classes(unet, image)) > 0.999
    assert unet._forward._cache_size() == 1


def test_upscaled_copy_gives_the_upscaled_class_map(unet):
    image = smooth_image(40, 60, seed=2)
    small = unet.predict(image)["classes"]
    big = unet.predict(np.repeat(np.repeat(image, 2, 0), 2, 1))["classes"]
    assert big.shape == (80, 120)
    # Not bit-equal (the canvases differ by resampling), but the same regions.
    assert agreement(big, np.repeat(np.repeat(small, 2, 0), 2, 1)) > 0.95


def test_array_kinds_give_the_predictions_of_their_rgb_pixels(unet):
    image = smooth_image(33, 51, seed=3)
    gray = np.asarray(Image.fromarray(image).convert("L"))
    rgba = np.concatenate([image, np.full((33, 51, 1), 7, np.uint8)], axis=-1)
    results = unet.predict_batch([image, image / 255.0, rgba, gray, gray[..., None]])
    for result in results[1:3]:
        np.testing.assert_array_equal(result["classes"], results[0]["classes"])
    gray_rgb = unet.predict(np.repeat(gray[..., None], 3, -1))["classes"]
    for result in results[3:]:
        np.testing.assert_array_equal(result["classes"], gray_rgb)


@pytest.mark.parametrize(
    "image, error",
    [
        (np.zeros((4, 4, 3), np.int32), TypeError),
        (np.full((4, 4, 3), 2.0), ValueError),
        (np.zeros((4, 4, 2), np.uint8), ValueError),
        (np.zeros((0, 4, 3), np.uint8), ValueError),
    ],
)
def test_bad_arrays_are_rejected(image, error):
    with pytest.raises(error):
        predict.as_rgb8(image)


def write_variants(directory, image: np.ndarray) -> dict[str, np.ndarray]:
    """Files of ``image`` in other formats and modes; returns stem -> upright RGB pixels."""
    os.makedirs(directory, exist_ok=True)
    gray = np.asarray(Image.fromarray(image).convert("L"))
    gray_rgb = np.repeat(gray[..., None], 3, -1)
    Image.fromarray(image).save(os.path.join(directory, "rgb.png"))
    Image.fromarray(image).save(os.path.join(directory, "photo.jpg"), quality=95)
    Image.fromarray(image).save(os.path.join(directory, "bitmap.bmp"))
    Image.fromarray(gray).save(os.path.join(directory, "gray.png"))
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 9, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(os.path.join(directory, "rgba.png"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(os.path.join(directory, "deep.png"))
    # Stored turned (as a camera held sideways writes it), upright by its EXIF orientation
    # 6 ("rotate 90 degrees clockwise to view").
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(image, 1)).save(os.path.join(directory, "turned.png"), exif=exif)
    big = np.repeat(np.repeat(image, 2, 0), 2, 1)
    Image.fromarray(big).save(os.path.join(directory, "big.png"))
    expected = {
        "rgb": image,
        "bitmap": image,
        "gray": gray_rgb,
        "rgba": image,
        "deep": gray_rgb,
        "turned": image,
        "big": big,
    }
    expected["photo"] = images_lib.load_image(os.path.join(directory, "photo.jpg"))
    return expected


def test_command_line_semantic_files(unet_workdir, tmp_path):
    image = smooth_image(37, 58, seed=4)
    expected = write_variants(tmp_path / "in", image)
    # Same stem twice: both are kept, under <stem>_<extension>.
    Image.fromarray(image).save(tmp_path / "in" / "rgb.bmp")
    expected["rgb_png"], expected["rgb_bmp"] = expected.pop("rgb"), image
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "jfcnn.predict", "--workdir", unet_workdir, "--output", str(out)]
        + [str(tmp_path / "in"), str(tmp_path / "missing.png"), "--batch_size", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr[-3000:]
    assert "broken.jpg" in errors[0] and "missing.png" in errors[1]
    assert "img/s" in result.stderr  # The progress bar.

    with predict.Predictor(unet_workdir) as predictor:
        num_classes = len(predictor.class_names)
        for stem, pixels in expected.items():
            with Image.open(out / f"{stem}.png") as saved:
                assert saved.mode == "P"
                classes = np.asarray(saved)
                palette = np.asarray(saved.getpalette()[: 3 * num_classes]).reshape(-1, 3)
            assert classes.shape == pixels.shape[:2], stem
            assert classes.max() < num_classes
            np.testing.assert_array_equal(palette, predict.visualize.palette(num_classes))
            want = predictor.predict(pixels)["classes"]
            np.testing.assert_array_equal(classes, want, err_msg=stem)
            with Image.open(out / f"{stem}_overlay.png") as overlay:
                picture = np.asarray(overlay.convert("RGB"))
            # The image, tinted where a class other than background is, then the legend.
            tinted = predict.visualize.overlay(pixels, want, num_classes)
            h, w = want.shape
            np.testing.assert_array_equal(picture[:h, :w], tinted, err_msg=stem)
            assert picture.shape[1] > w
        # The upright EXIF photo has the class map of the upright pixels.
        turned = np.asarray(Image.open(out / "turned.png"))
        np.testing.assert_array_equal(turned, predictor.predict(image)["classes"])
    assert not (out / "broken.png").exists()
    assert sorted(os.listdir(out)) == sorted(
        name for stem in expected for name in (f"{stem}.png", f"{stem}_overlay.png")
    )


def test_no_input_found_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    # What the command runs after parsing its flags; it stops before loading any run.
    with pytest.raises(SystemExit) as stopped:
        predict.main(["jfcnn.predict", str(tmp_path / "empty")])
    assert stopped.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "error: no image files to predict."
    assert "no image files in this directory" in lines[-2]


def test_collect_inputs_directories_globs_and_stems(tmp_path):
    for name in ("a/x.jpg", "a/sub/y.png", "a/.hidden.png", "a/notes.txt", "b/x.jpg", "c.png"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    files, problems = predict.collect_inputs(
        [str(tmp_path / "a"), str(tmp_path / "b" / "*.jpg"), str(tmp_path / "c.png")]
        + [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "z*.png")]
    )
    assert [(f.file_name, f.stem) for f in files] == [
        ("x.jpg", "x_jpg"),
        ("sub/y.png", "y"),
        ("x.jpg", "x_jpg_2"),
        ("c.png", "c"),
    ]
    assert problems == [f"{tmp_path / 'z*.png'}: matches no image file."]


# ---------------------------------------------------------------------------
# Instance


def expected_detections(predictor: predict.Predictor, image: np.ndarray) -> dict:
    size, keep_aspect = predictor.image_size, predictor.metadata.keep_aspect
    canvas, resized_size = pipeline.fit_image(image, size, keep_aspect)
    batch = np.zeros((predictor.batch_size, size, size, 3), np.float32)
    batch[0] = canvas
    outputs = jax.device_get(instance.predict(predictor.task, predictor._variables, batch))
    return instance.detections_in_original(
        {key: value[0] for key, value in outputs.items()},
        resized_size.numpy(),
        image.shape[:2],
        score_threshold=predictor.score_threshold,
    )


def assert_same_detections(got: dict, want: dict) -> None:
    # Two compiled programs (the predictor returns fewer outputs): equal up to float rounding.
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(got["classes"], want["classes"])
    assert got["masks"].shape == want["masks"].shape
    assert agreement(got["masks"], want["masks"]) > 0.999


def test_instance_detections_are_the_model_outputs_mapped_back(maskrcnn):
    images = [smooth_image(50, 90, seed=5), smooth_image(120, 41, seed=6)]
    results = maskrcnn.predict_batch(images)
    for image, result in zip(images, results, strict=True):
        num = len(result["scores"])
        assert num > 0
        assert result["masks"].shape == (num, *image.shape[:2])
        assert np.all(np.diff(result["scores"]) <= 0)
        h, w = image.shape[:2]
        assert np.all(result["boxes"] >= 0) and np.all(result["boxes"] <= [w, h, w, h])
        ids = np.array(maskrcnn.category_ids)[result["classes"]]
        np.testing.assert_array_equal(result["category_ids"], ids)
        assert result["category_names"] == [maskrcnn.class_names[c] for c in result["classes"]]
        assert_same_detections(result, expected_detections(maskrcnn, image))


def test_instance_score_threshold_filters(maskrcnn):
    image = smooth_image(50, 90, seed=5)
    everything = maskrcnn.predict(image)
    threshold = float(np.median(everything["scores"]))
    maskrcnn.score_threshold = threshold
    try:
        kept = maskrcnn.predict(image)
    finally:
        maskrcnn.score_threshold = 0.0
    assert len(kept["scores"]) == int(np.sum(everything["scores"] >= threshold))
    np.testing.assert_array_equal(kept["masks"], everything["masks"][: len(kept["scores"])])


def test_predictions_json_decodes_to_the_predictor_masks(maskrcnn, tmp_path):
    image = smooth_image(70, 52, seed=7)
    expected = write_variants(tmp_path / "in", image)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG broken")
    files, problems = predict.collect_inputs([str(tmp_path / "in")])
    assert not problems
    messages = []
    out = tmp_path / "out"
    errors = predict.predict_to_directory(
        maskrcnn, files, str(out), progress=False, on_error=messages.append
    )
    assert errors == 1 and "broken.png" in messages[0]
    with open(out / "predictions.json") as f:
        entries = json.load(f)
    readable = [f for f in files if "broken" not in f.path]
    assert {e["file_name"] for e in entries} == {f.file_name for f in readable}
    assert {f.file_name for f in readable} == {
        "rgb.png",
        "photo.jpg",
        "bitmap.bmp",
        "gray.png",
        "rgba.png",
        "deep.png",
        "turned.png",
        "big.png",
    }
    for stem, pixels in expected.items():
        name = next(f.file_name for f in files if f.stem == stem)
        mine = [e for e in entries if e["file_name"] == name]
        result = maskrcnn.predict(pixels)
        assert len(mine) == len(result["scores"]) > 0, stem
        masks = mask_utils.decode([e["segmentation"] for e in mine]).transpose(2, 0, 1)
        np.testing.assert_array_equal(masks, result["masks"], err_msg=stem)
        for entry, box, score, cid, cname in zip(
            mine,
            result["boxes"],
            result["scores"],
            result["category_ids"],
            result["category_names"],
            strict=True,
        ):
            assert entry["segmentation"]["size"] == list(pixels.shape[:2])
            np.testing.assert_allclose(entry["bbox"], [*box[:2], *(box[2:] - box[:2])])
            assert entry["score"] == pytest.approx(score)
            assert (entry["category_id"], entry["category_name"]) == (cid, cname)
        with Image.open(out / f"{stem}_overlay.png") as overlay:
            assert overlay.size == (pixels.shape[1], pixels.shape[0])
            picture = np.asarray(overlay.convert("RGB"))
        drawn = predict.visualize.draw_instances(
            pixels,
            result["boxes"],
            result["classes"],
            result["masks"],
            np.ones(len(result["scores"]), bool),
            maskrcnn.class_names,
            result["scores"],
        )
        np.testing.assert_array_equal(picture, drawn, err_msg=stem)
    turned = [e for e in entries if e["file_name"] == "turned.png"]
    assert turned[0]["segmentation"]["size"] == [70, 52]
    # --no_overlay: the same predictions.json (same batches), and no pictures.
    bare = tmp_path / "no_overlay"
    errors = predict.predict_to_directory(
        maskrcnn, files, str(bare), progress=False, on_error=messages.append, overlay=False
    )
    assert errors == 1 and os.listdir(bare) == ["predictions.json"]
    with open(bare / "predictions.json") as f:
        assert json.load(f) == entries


# ---------------------------------------------------------------------------
# Host fast paths against independent references (no model).


def test_detections_in_original_pastes_like_paste_masks_within_regions():
    from jfcnn.ops import detection

    rng = np.random.default_rng(0)
    height, width, num = 300, 700, 12  # Wide: the pasting runs in several row blocks.
    x1 = rng.uniform(-20, width - 40, num)
    y1 = rng.uniform(-20, height - 40, num)
    canvas_boxes = np.stack(
        [x1, y1, x1 + rng.uniform(2, 600, num), y1 + rng.uniform(2, 300, num)], -1
    ) * [64 / width, 64 / height, 64 / width, 64 / height]
    outputs = {
        "boxes": canvas_boxes.astype(np.float32),
        "scores": rng.random(num).astype(np.float32),
        "classes": rng.integers(1, 3, num),
        "detection_valid": np.arange(num) != 3,
        "mask_probs": rng.random((num, 28, 28)).astype(np.float32),
    }
    found = instance.detections_in_original(outputs, (64, 64), (height, width))
    masks, regions = found["masks"], found["mask_regions"]
    assert masks.shape == (num - 1, height, width) and masks.any()
    keep = np.argsort(-outputs["scores"] * outputs["detection_valid"], kind="stable")[:-1]
    # Masks go into the boxes they were predicted for, scaled back but not clipped.
    scale = [width / 64, height / 64, width / 64, height / 64]
    unclipped = outputs["boxes"][keep].astype(np.float64) * scale
    np.testing.assert_allclose(found["boxes"], np.clip(unclipped, 0, [width, height] * 2))
    want = detection.paste_masks(outputs["mask_probs"][keep], unclipped, (height, width))
    # paste_masks runs in float32 on the device: equal but for pixels at the threshold.
    assert agreement(masks, np.asarray(want)) > 0.9999
    for mask, (row0, row1, col0, col1) in zip(masks, regions, strict=True):
        assert mask.sum() == mask[row0:row1, col0:col1].sum()
    np.testing.assert_array_equal(
        masks[0], instance.paste_mask(outputs["mask_probs"][keep[0]], unclipped[0], (300, 700))
    )
    # Without full masks: the same masks, as crops of their regions.
    crops_only = instance.detections_in_original(
        outputs, (64, 64), (height, width), full_masks=False
    )
    assert "masks" not in crops_only
    np.testing.assert_array_equal(crops_only["mask_regions"], regions)
    for mask, crop, (row0, row1, col0, col1) in zip(
        masks, crops_only["mask_crops"], regions, strict=True
    ):
        np.testing.assert_array_equal(crop, mask[row0:row1, col0:col1])


def test_detections_reaching_into_the_padding_keep_their_mask_proportions():
    # A 100 x 50 photo (H x W) fitted into a 64 canvas as 64 x 32 (scale 1.5625 back);
    # columns 32..63 of the canvas are padding.
    outputs = {
        # Box 0 covers canvas columns 16..48, half of it padding; box 1 lies in the padding.
        "boxes": np.array([[16.0, 0.0, 48.0, 64.0], [40.0, 0.0, 60.0, 64.0]], np.float32),
        "scores": np.array([0.9, 0.8], np.float32),
        "classes": np.array([1, 2]),
        "detection_valid": np.array([True, True]),
        # The left half of box 0's mask is object, the right half (the padding) is not.
        "mask_probs": np.tile(np.repeat([1.0, 0.0], 14)[None], (2, 28, 1)).astype(np.float32),
    }
    found = instance.detections_in_original(outputs, (64, 32), (100, 50))
    assert found["classes"].tolist() == [1]  # the detection in the padding is dropped
    np.testing.assert_allclose(found["boxes"], [[25.0, 0.0, 50.0, 100.0]])
    # By hand: the object is the box's left half, original columns 25..49 (x 25..50).
    columns = np.flatnonzero(found["masks"][0].any(axis=0))
    # (The corner pixels interpolate with the zeros outside the mask.)
    assert columns.min() == 25 and columns.max() == 49 and found["masks"][0][1:-1, 25:50].all()


@pytest.mark.parametrize(
    "height, width, regions",
    [
        (
            23,
            31,
            # The whole image; at the left, right, top and bottom edges and corners;
            # full-height regions (a column's end meets the next one's start); empty ones.
            [
                [0, 23, 0, 31],
                [5, 9, 0, 4],
                [0, 1, 30, 31],
                [22, 23, 0, 31],
                [3, 3, 5, 9],
                [4, 20, 7, 7],
                [0, 0, 0, 0],
                [0, 23, 5, 12],
                [0, 23, 0, 1],
                [0, 23, 27, 31],
                [0, 9, 0, 31],
                [12, 23, 20, 31],
                [1, 22, 1, 30],
            ],
        ),
        (1, 1, [[0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]]),  # A 1-pixel image.
        (1, 9, [[0, 1, 0, 9], [0, 1, 3, 5], [0, 1, 8, 9]]),  # One row: every column is full.
        (9, 1, [[0, 9, 0, 1], [2, 5, 0, 1], [8, 9, 0, 1]]),  # One column.
    ],
)
def test_rle_from_regions_is_encode_masks(height, width, regions):
    rng = np.random.default_rng(1)
    regions = np.array(regions * 5)
    masks = np.zeros((len(regions), height, width), np.uint8)
    num = len(regions) // 5
    for n, (row0, row1, col0, col1) in enumerate(regions):
        shape = (row1 - row0, col1 - col0)
        # Random pixels, all ones, all zeros, stripes across and down: runs that start
        # or end at the regions' and the image's edges and corners.
        masks[n, row0:row1, col0:col1] = [
            rng.random(shape) < 0.5,
            np.ones(shape),
            np.zeros(shape),
            np.indices(shape)[0] % 2,
            np.indices(shape)[1] % 2,
        ][n // num]
    crops = [m[r0:r1, c0:c1] for m, (r0, r1, c0, c1) in zip(masks, regions, strict=True)]
    got = predict._rle_from_regions(crops, regions, (height, width))
    assert got == instance.encode_masks(masks)
    assert predict._rle_from_regions([], np.zeros((0, 4), np.int64), (height, width)) == []


@pytest.mark.parametrize("deflate", ["installed", "zlib"])
@pytest.mark.parametrize("shape", [(1, 1, 3), (37, 58, 3), (64, 5, 3)])
def test_rgb_png_decodes_to_the_pixels(shape, deflate, tmp_path, monkeypatch):
    if deflate == "zlib":  # The encoder without zlib-ng.
        monkeypatch.setattr(predict, "_deflate", zlib)
    pixels = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    # Runs of equal pixels: the run-length strategy's matches.
    pixels[: shape[0] // 2, : shape[1] // 2] = 7
    path = tmp_path / "picture.png"
    path.write_bytes(predict.rgb_png(pixels))
    with Image.open(path) as png:
        assert png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), pixels)


def test_outputs_never_replace_inputs(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b_overlay.png"):
        Image.fromarray(smooth_image(8, 8, 0)).save(photos / name)
    files, _ = predict.collect_inputs([str(photos)])
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    # --output photos/ would write photos/a.png over the input a.png.
    with pytest.raises(UserError, match=r"a\.png is an input and would be overwritten"):
        predict._check_no_input_overwritten(files, str(photos), overlay=True)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    # An output directory inside an input directory is not searched for inputs.
    (photos / "out").mkdir()
    Image.fromarray(smooth_image(8, 8, 1)).save(photos / "out" / "a_overlay.png")
    found, _ = predict.collect_inputs([str(photos)], exclude_dir=str(photos / "out"))
    assert sorted(f.file_name for f in found) == ["a.png", "b_overlay.png"]
    predict._check_no_input_overwritten(found, str(photos / "out"), overlay=True)


def test_output_names_never_collide():
    # x.jpg's overlay would be x_overlay.png, the class map of the input x_overlay.png.
    for names, expected in (
        (("a/x.jpg", "b/x_overlay.png"), ["x", "x_overlay_2"]),
        (("b/x_overlay.png", "a/x.jpg"), ["x_overlay", "x_2"]),
        (("a/x.jpg", "b/x.png", "c/x_jpg.bmp"), ["x_jpg", "x_png", "x_jpg_2"]),
    ):
        stems = [f.stem for f in predict.unique_stems([predict.InputFile(n, n) for n in names])]
        assert stems == expected
        outputs = [name for stem in stems for name in (stem, f"{stem}_overlay")]
        assert len(set(outputs)) == len(outputs)


def test_merged_parts_are_in_input_order_and_missing_or_wrong_parts_are_named(tmp_path):
    # Process k of 2 predicted files k, k + 2, ...: each part holds one list per file.
    path = str(tmp_path / "predictions.json")
    for index, share in enumerate([[[{"f": 0}], [{"f": 2}]], [[{"f": 1}], []]]):
        with open(predict._part_path(path, index, 2), "w") as f:
            json.dump(share, f)
    predict._merge_parts(path, 4, 2)
    with open(path) as f:
        assert [e["f"] for e in json.load(f)] == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["predictions.json"]  # The parts are gone.

    with open(predict._part_path(path, 0, 2), "w") as f:
        json.dump([[], []], f)
    with pytest.raises(predict.UserError, match=r"part1-of-2 is missing.*same --output"):
        predict._merge_parts(path, 4, 2)
    with open(predict._part_path(path, 1, 2), "w") as f:
        json.dump([[]], f)  # One list for two files: a leftover of another run.
    with pytest.raises(predict.UserError, match=r"part1-of-2 does not hold process 1's share"):
        predict._merge_parts(path, 4, 2)


class _FakeProcesses:
    """Process ``index`` of 2, with the collectives answered as ``peer`` would."""

    def __init__(self, monkeypatch, index: int, *, peer_status, peer_checksum=None, merged=True):
        from jax.experimental import multihost_utils

        self.sent = []
        mine = {}

        def allgather(value):
            value = np.asarray(value)
            self.sent.append(value)
            if value.shape == ():  # _check_same_files's checksum of the file list.
                mine["checksum"] = value
                theirs = value if peer_checksum is None else np.uint32(peer_checksum)
                return np.stack([value, theirs][:: 1 if index == 0 else -1])
            return np.stack([value, np.int32(peer_status)][:: 1 if index == 0 else -1])

        def broadcast(value):  # Process 0's word: whether its merge failed.
            return value if index == 0 else np.int32(not merged)

        monkeypatch.setattr(jax, "process_index", lambda: index)
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
        monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)


def _files(tmp_path, n=4):
    return [predict.InputFile(str(tmp_path / f"{i}.png"), f"{i}.png", str(i)) for i in range(n)]


def test_a_process_whose_share_fails_stops_every_process(tmp_path, monkeypatch):
    instance_task = type("P", (), {"task_name": "instance"})()
    files, out = _files(tmp_path), str(tmp_path / "out")
    shares = []

    def fails(predictor, share, *args):
        shares.append([f.stem for f in share])
        raise OSError(28, "No space left on device")

    # The process that failed tells the others before it raises its own error...
    fake = _FakeProcesses(monkeypatch, 1, peer_status=[0, 0])
    monkeypatch.setattr(predict, "_predict_share", fails)
    with pytest.raises(OSError, match="No space left"):
        predict.predict_to_directory(instance_task, files, out)
    assert shares == [["1", "3"]]  # Process 1 of 2: files 1, 3.
    assert fake.sent[-1].tolist() == [0, 1]

    # ...and the others stop too, naming it, instead of waiting for its part.
    _FakeProcesses(monkeypatch, 0, peer_status=[0, 1])
    monkeypatch.setattr(predict, "_predict_share", lambda *args: 1)
    with pytest.raises(predict.UserError, match=r"process\(es\) \[1\] of this run stopped"):
        predict.predict_to_directory(instance_task, files, out)

    # Without failures the unreadable files of all processes are counted, and a merge
    # that fails on process 0 stops the others as well.
    _FakeProcesses(monkeypatch, 1, peer_status=[2, 0], merged=False)
    with pytest.raises(predict.UserError, match="process 0 could not write"):
        predict.predict_to_directory(instance_task, files, out)
    _FakeProcesses(monkeypatch, 1, peer_status=[2, 0])
    assert predict.predict_to_directory(instance_task, files, out) == 3


def test_processes_given_other_files_are_stopped(tmp_path, monkeypatch):
    files = _files(tmp_path)
    for index in (0, 1):
        _FakeProcesses(monkeypatch, index, peer_status=[0, 0], peer_checksum=12345)
        with pytest.raises(predict.UserError, match=r"different image files.*same INPUTs"):
            predict.predict_to_directory(None, files, str(tmp_path / "out"))
