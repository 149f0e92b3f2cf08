"""Tests of the ``coco_json`` data set (jfcnn.data.coco_json): the user's COCO files.

A small export is written to a temporary directory (tests/coco_json_files.py:
polygons, compressed and uncompressed RLE, a crowd region, category ids 3 and
7, an image without objects). The prepared examples are checked against the
masks that were drawn and against pycocotools' ``annToMask``; every mistake
in the files has a test that its message names the problem and the fix.
"""

from __future__ import annotations

import json
import os
import shutil

import coco_json_files as files
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from pycocotools.coco import COCO

from jfcnn.data import coco_json, pipeline
from jfcnn.data.images import load_image
from jfcnn.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict:
    return files.write_dataset(str(tmp_path_factory.mktemp("export")))


def make_config(paths: dict, data_dir: str, **data_fields) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {"seed": 0, "batch_size": 4, "data": pipeline.default_config()}
    )
    config.data.update(
        {
            "name": "coco_json",
            "data_dir": data_dir,
            "image_size": 64,
            "augment": False,
            **{key: paths[key] for key in coco_json.SPLIT_KEYS["train"]},
            **{key: paths[key] for key in coco_json.SPLIT_KEYS["validation"]},
            **data_fields,
        }
    )
    return config


@pytest.fixture(scope="module")
def prepared(export, tmp_path_factory):
    """(config, builder) of the export prepared once for the module."""
    config = make_config(export, str(tmp_path_factory.mktemp("tfds")))
    return config, coco_json.make_builder(config.data)


def stored_examples(builder, split: str) -> dict[int, dict]:
    """The prepared examples of ``split``, by image id."""
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    return {int(e["image_id"]): e for e in examples}


@pytest.mark.parametrize("split,file_split", [("train", "train"), ("validation", "eval")])
def test_prepared_examples_are_the_drawn_masks_and_pycocotools_masks(
    export, prepared, split, file_split
):
    _, builder = prepared
    examples = stored_examples(builder, split)
    coco_file = export[f"{file_split}_annotations"]
    reference = COCO(coco_file)
    records = files.read_json(coco_file)["images"]
    assert sorted(examples) == sorted(r["id"] for r in records)
    for record, drawn, pixels in zip(
        records, export["drawn"][file_split], export["pixels"][file_split], strict=True
    ):
        example = examples[record["id"]]
        # Pixels: stored losslessly, as load_image (and so prediction) reads the file.
        path = os.path.join(export[f"{file_split}_images"], record["file_name"])
        np.testing.assert_array_equal(example["image"], load_image(path))
        np.testing.assert_array_equal(example["image"], pixels)
        # Objects in file order, then crowd regions; class ids from category ids 3 -> 1, 7 -> 2.
        expected_order = [d for d in drawn if not d[3]] + [d for d in drawn if d[3]]
        class_of = {files.SQUARE: 1, files.DISK: 2}
        np.testing.assert_array_equal(
            example["instance_labels"], [class_of[d[1]] for d in expected_order]
        )
        np.testing.assert_array_equal(example["instance_crowd"], [d[3] for d in expected_order])
        index_map = example["instance_index"][..., 0]
        assert index_map.max(initial=0) == len(expected_order)
        for k, (annotation_id, _, mask, _) in enumerate(expected_order, start=1):
            # The drawn objects do not overlap: each mask comes back whole.
            np.testing.assert_array_equal(index_map == k, mask.astype(bool))
            annotation = reference.anns[annotation_id]
            np.testing.assert_array_equal(index_map == k, reference.annToMask(annotation) > 0)


def test_classes_split_sizes_and_eval_batches(prepared):
    config, _ = prepared
    metadata = pipeline.dataset_metadata(config)
    assert metadata.class_names == files.CLASS_NAMES
    assert metadata.category_ids == files.CATEGORY_IDS
    assert metadata.keep_aspect
    assert (metadata.num_train_examples, metadata.num_eval_examples) == (8, 4)

    records = {r["id"]: r for r in files.make_split("eval", 1)[0]["images"]}
    seen = []
    for batch in pipeline.create_eval_iterator(config, instances=True):
        for i in np.flatnonzero(batch["valid"]):
            image_id = int(batch["image_id"][i])
            seen.append(image_id)
            record = records[image_id]
            np.testing.assert_array_equal(
                batch["original_size"][i], [record["height"], record["width"]]
            )
            # The longer side becomes 64 (keep_aspect), the other rounds.
            scale = 64 / max(record["height"], record["width"])
            expected = [round(record["height"] * scale), round(record["width"] * scale)]
            np.testing.assert_array_equal(batch["resized_size"][i], expected)
            index = list(records).index(image_id)
            valid, crowd = batch["instance_valid"][i], batch["crowd"][i]
            if index == files.EMPTY_IMAGE["eval"]:
                assert not valid.any() and not crowd.any()
                assert not batch["mask"][i].any()
            else:
                np.testing.assert_array_equal(batch["labels"][i, :2], [1, 2])
                assert valid[:2].all() and not valid[2:].any()
            # The crowd region: a slot after the objects, not trained on, kept for evaluation.
            if index == files.CROWD_IMAGE["eval"]:
                assert crowd[2] and not crowd[:2].any() and batch["labels"][i, 2] == 1
                assert batch["instance_masks"][i, 2].any()
    assert sorted(seen) == sorted(records)


def test_overlapping_objects_keep_the_smaller_on_top():
    height, width = 20, 20
    big = np.zeros((height, width), np.uint8)
    big[2:18, 2:18] = 1
    small = np.zeros((height, width), np.uint8)
    small[6:10, 6:10] = 1
    crowd = np.zeros((height, width), np.uint8)
    crowd[0:20, 0:8] = 1
    record = {"id": 5, "file_name": "a.png", "width": width, "height": height}
    annotations = [
        {"category_id": 3, "segmentation": files._compressed_rle(small)},
        {"category_id": 3, "segmentation": files._compressed_rle(crowd), "iscrowd": 1},
        {"category_id": 7, "segmentation": files._compressed_rle(big)},
    ]
    example = coco_json.image_example(
        np.zeros((height, width, 3), np.uint8), record, annotations, {3: 1, 7: 2}
    )
    np.testing.assert_array_equal(example["instance_labels"], [1, 2, 1])  # objects, then crowd
    np.testing.assert_array_equal(example["instance_crowd"], [False, False, True])
    index = example["instance_index"][..., 0]
    np.testing.assert_array_equal(index == 1, small.astype(bool))  # on top of the big one
    np.testing.assert_array_equal(index == 2, (big & ~small.astype(bool)).astype(bool))
    np.testing.assert_array_equal(index == 3, (crowd & ~big.astype(bool)).astype(bool))
    assert example["image_id"] == 5


def test_prepared_once_and_again_when_a_file_changes(export, tmp_path, monkeypatch):
    root = str(tmp_path / "export")
    shutil.copytree(os.path.dirname(export["train_annotations"]), root)
    paths = {
        key: os.path.join(root, os.path.relpath(export[key], os.path.dirname(export[key])))
        if key.endswith("annotations")
        else os.path.join(root, os.path.basename(export[key]))
        for key in ("train_annotations", "train_images", "eval_annotations", "eval_images")
    }
    config = make_config(paths, str(tmp_path / "tfds"))
    calls = []
    generate = coco_json.generate_examples

    def counting(*args, **kwargs):
        calls.append(args[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(coco_json, "generate_examples", counting)
    coco_json.make_builder(config.data)
    assert len(calls) == 2  # Both splits prepared.
    coco_json.make_builder(config.data)
    assert len(calls) == 2  # Nothing read again.

    # Renaming a category is a change of the annotation file: prepared again.
    coco = files.read_json(paths["eval_annotations"])
    for category in coco["categories"]:
        category["name"] = category["name"].upper()
    train = files.read_json(paths["train_annotations"])
    train["categories"] = coco["categories"]
    files.write_json(paths["train_annotations"], train)
    files.write_json(paths["eval_annotations"], coco)
    builder = coco_json.make_builder(config.data)
    assert len(calls) == 4
    assert coco_json.classes(builder) == (("background", "SQUARE", "DISK"), (0, 3, 7))

    # A rewritten image file (new size and time) is a change too.
    image = os.path.join(paths["eval_images"], "img_00.png")
    with open(image, "ab") as f:
        f.write(b"\0")
    coco_json.make_builder(config.data)
    assert len(calls) == 6

    # Scoring another annotation file (evaluate --data eval_annotations=...) makes a
    # second copy; the first, which a training run may be reading, stays untouched.
    first = coco_json.make_builder(config.data)
    other = os.path.join(root, "other.json")
    shutil.copy(paths["eval_annotations"], other)
    second = coco_json.make_builder(
        make_config({**paths, "eval_annotations": other}, str(tmp_path / "tfds")).data
    )
    assert len(calls) == 8 and second.data_dir != first.data_dir
    assert os.path.isdir(first.data_dir)
    coco_json.make_builder(config.data)
    assert len(calls) == 8  # the first copy is still prepared


# ---------------------------------------------------------------------------
# Mistakes in the files: each stops with a message naming the problem and the fix.


@pytest.fixture
def broken(export, tmp_path):
    """``break_eval(edit) -> config``: a copy of the export whose eval file ``edit`` changed."""

    def break_eval(edit) -> ml_collections.ConfigDict:
        root = str(tmp_path / "export")
        shutil.copytree(os.path.dirname(export["train_annotations"]), root)
        paths = {
            "train_annotations": os.path.join(root, "train.json"),
            "train_images": os.path.join(root, "train"),
            "eval_annotations": os.path.join(root, "eval.json"),
            "eval_images": os.path.join(root, "eval"),
        }
        coco = files.read_json(paths["eval_annotations"])
        edit(coco, paths)
        files.write_json(paths["eval_annotations"], coco)
        return make_config(paths, str(tmp_path / "tfds"))

    return break_eval


def _annotation(coco, annotation_id):
    return next(a for a in coco["annotations"] if a["id"] == annotation_id)


def _first_object_id(coco) -> int:
    return coco["annotations"][0]["id"]


def _error(config) -> str:
    with pytest.raises(UserError) as info:
        pipeline.dataset_metadata(config)
    return str(info.value)


def test_error_image_listed_but_missing(broken):
    def edit(coco, paths):
        os.remove(os.path.join(paths["eval_images"], "img_01.png"))

    message = _error(broken(edit))
    assert "eval.json" in message and "image 1007" in message and "'img_01.png'" in message
    assert "not in" in message and "copy the file there, or remove the image" in message


def test_error_annotation_of_an_unknown_image(broken):
    def edit(coco, paths):
        coco["annotations"][1]["image_id"] = 4242

    config = broken(edit)
    annotation_id = files.read_json(config.data.eval_annotations)["annotations"][1]["id"]
    message = _error(config)
    assert "eval.json" in message and f"annotation {annotation_id}" in message
    assert "image_id 4242" in message and "not in the file's images list" in message
    assert "add that image to 'images' or remove the annotation" in message


def test_error_annotation_of_an_unknown_category(broken):
    def edit(coco, paths):
        coco["annotations"][0]["category_id"] = 5

    config = broken(edit)
    annotation_id = _first_object_id(files.read_json(config.data.eval_annotations))
    message = _error(config)
    assert f"annotation {annotation_id}" in message and "category_id 5" in message
    assert "[3, 7]" in message and "add the category to 'categories'" in message


def test_error_polygon_with_fewer_than_3_points(broken):
    def edit(coco, paths):
        square = next(a for a in coco["annotations"] if isinstance(a["segmentation"], list))
        square["segmentation"].append([1.0, 1.0, 5.0, 5.0])
        coco["test_id"] = square["id"]

    config = broken(edit)
    annotation_id = files.read_json(config.data.eval_annotations)["test_id"]
    message = _error(config)
    assert "eval.json" in message and f"annotation {annotation_id}" in message
    assert "polygon with 2 points" in message and "at least 3 points" in message
    assert "Fix or delete that polygon" in message


def test_error_box_outside_the_image(broken):
    def edit(coco, paths):
        image = coco["images"][0]  # 80 x 64
        annotation = next(a for a in coco["annotations"] if a["image_id"] == image["id"])
        annotation["bbox"] = [70.0, 10.0, 20.0, 10.0]
        coco["test_id"] = annotation["id"]

    config = broken(edit)
    annotation_id = files.read_json(config.data.eval_annotations)["test_id"]
    message = _error(config)
    assert f"annotation {annotation_id}" in message and "image 1000" in message
    assert "outside the 80x64 image" in message and "x + w = 90" in message
    assert "fix the box" in message


def test_error_image_size_not_the_files(broken):
    def edit(coco, paths):
        coco["images"][3]["width"] = 65  # the image without objects; the file is 64 x 64

    message = _error(broken(edit))
    assert "image 1021" in message and "65x64" in message and "64x64" in message
    assert "fix 'width' and 'height'" in message


def test_error_rle_of_another_size(broken):
    def edit(coco, paths):
        rle = next(a for a in coco["annotations"] if isinstance(a["segmentation"], dict))
        rle["segmentation"]["size"] = [10, 10]
        coco["test_id"] = rle["id"]

    config = broken(edit)
    annotation_id = files.read_json(config.data.eval_annotations)["test_id"]
    message = _error(config)
    assert f"annotation {annotation_id}" in message and "RLE mask of size [10, 10]" in message


def test_error_missing_config_keys_and_files(export, tmp_path):
    config = make_config(export, str(tmp_path / "tfds"), eval_annotations=None)
    with pytest.raises(ConfigError, match=r"\['data.eval_annotations'\] are not set"):
        pipeline.dataset_metadata(config)
    config = make_config(export, str(tmp_path / "tfds"), train_images=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="nowhere: no such image directory"):
        pipeline.dataset_metadata(config)
    not_json = tmp_path / "train.json"
    not_json.write_text("{'images': []")
    config = make_config(export, str(tmp_path / "tfds"), train_annotations=str(not_json))
    with pytest.raises(UserError, match="train.json: not valid JSON"):
        pipeline.dataset_metadata(config)


def test_error_category_id_named_differently_in_the_two_files(broken):
    def edit(coco, paths):
        coco["categories"][0]["name"] = "ball"

    with pytest.raises(UserError, match="Category id 7 is 'disk' in .*train.json but 'ball'"):
        pipeline.dataset_metadata(broken(edit))


def test_shipped_config_reads_coco_json():
    import tiny_configs

    from jfcnn import tasks

    config = tiny_configs.shipped_config("maskrcnn_coco_json.py")
    tasks.validate_config(config)
    assert config.data.name == "coco_json"
    assert json.dumps(sorted(coco_json.SPLIT_KEYS)) == '["train", "validation"]'
