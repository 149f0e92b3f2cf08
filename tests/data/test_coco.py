"""Tests of the COCO panoptic input pipeline (jfcnn.data.coco and its registered spec).

No COCO download: a tiny ``coco/2017_panoptic`` is prepared from hand-built
examples by replacing the builder's split generators, and
`tfds.testing.mock_data` serves random examples from its metadata.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import jfcnn.data as data_lib
from jfcnn.data import coco, pipeline

NAME = "coco/2017_panoptic"
# The 133 panoptic categories: the 80 things first (COCO id order), then stuff.
PANOPTIC_NAMES = [*coco.THING_CLASS_NAMES, *(f"stuff-{i}" for i in range(53))]
STUFF = 100  # a stuff label


def rgb_of_id(segment_id: int) -> tuple[int, int, int]:
    return segment_id % 256, segment_id // 256 % 256, segment_id // 65536


def panoptic_png(height: int, width: int, segments: list[tuple[int, tuple[slice, slice]]]):
    """(H, W, 3) uint8 panoptic image painting each (id, region) in order (later on top)."""
    png = np.zeros((height, width, 3), np.uint8)
    for segment_id, region in segments:
        png[region] = rgb_of_id(segment_id)
    return png


def objects(*records):
    """panoptic_objects from (id, label, is_crowd) records (area and bbox unused)."""
    return [
        {
            "id": i,
            "area": 0,
            "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0),
            "label": label,
            "is_crowd": crowd,
        }
        for i, label, crowd in records
    ]


def gradient_image(height: int, width: int) -> np.ndarray:
    """A smooth image (JPEG keeps it to within a few levels)."""
    rows = np.linspace(30, 220, height)[:, None]
    cols = np.linspace(0, 120, width)[None, :]
    return np.stack([rows + 0 * cols, 0 * rows + cols + 60, (rows + cols) / 2], -1).astype(np.uint8)


# Landscape, portrait and upscaled examples (size ratios 2, 2 and 1/2 to S = 32,
# so nearest-neighbour resampling has an exact reference), with two things, a
# crowd region, stuff and an empty example.
EXAMPLES = {
    "landscape": {
        "size": (40, 64),
        "segments": [
            (1000, np.s_[4:20, 6:30]),  # person
            (300, np.s_[20:24, :]),  # stuff
            (70000, np.s_[24:40, 0:50]),  # crowd of cars
            (5, np.s_[2:12, 40:60]),  # toothbrush
        ],
        "objects": objects((1000, 0, False), (70000, 2, True), (300, STUFF, False), (5, 79, False)),
    },
    "portrait": {
        "size": (64, 24),
        "segments": [(301, np.s_[:, :]), (7, np.s_[10:50, 2:20])],  # cat on stuff
        "objects": objects((301, STUFF + 1, False), (7, 15, False)),
    },
    "empty": {"size": (16, 16), "segments": [], "objects": []},
}


# Size ratios 2 and 1/2 to S = 32, for exact nearest-neighbour references.
RANDOM_SIZES = [(64, 40), (16, 10), (48, 64), (14, 16)]


def random_example(seed: int) -> dict:
    """Random panoptic layout: a grid of cells (>= 2 px, so that none vanishes at half
    size) painted with up to 6 things (some crowd), stuff or nothing."""
    rng = np.random.default_rng(seed)
    size = RANDOM_SIZES[seed]

    def bands(n: int) -> list[int]:
        edges = [0]
        while n - edges[-1] >= 4:
            edges.append(edges[-1] + int(rng.integers(2, min(8, n - edges[-1] - 1))))
        return [*edges, n]

    num_segments = int(rng.integers(3, 9))
    ids = rng.choice(np.arange(1, 2**24), size=num_segments, replace=False)
    labels = [
        int(rng.integers(0, 80)) if k < 6 else int(rng.integers(80, 133))
        for k in range(num_segments)
    ]
    crowd = [bool(label < 80 and rng.random() < 0.25) for label in labels]
    rows, cols = bands(size[0]), bands(size[1])
    owner = rng.integers(-1, num_segments, size=(len(rows) - 1, len(cols) - 1))
    segments = [
        (int(ids[owner[r, c]]), np.s_[rows[r] : rows[r + 1], cols[c] : cols[c + 1]])
        for r in range(len(rows) - 1)
        for c in range(len(cols) - 1)
        if owner[r, c] >= 0
    ]
    present = set(owner[owner >= 0].tolist())  # Every listed segment has pixels.
    records = [(int(ids[k]), labels[k], crowd[k]) for k in range(num_segments) if k in present]
    order = rng.permutation(len(records))
    return {"size": size, "segments": segments, "objects": objects(*[records[k] for k in order])}


EXAMPLES.update({f"random{seed}": random_example(seed) for seed in range(4)})


def tfds_example(key: str, index: int) -> dict:
    spec = EXAMPLES[key]
    height, width = spec["size"]
    return {
        "image": gradient_image(height, width),
        "image/filename": f"{key}.jpg",
        "image/id": index,
        "panoptic_image": panoptic_png(height, width, spec["segments"]),
        "panoptic_image/filename": f"{key}.png",
        "panoptic_objects": spec["objects"],
    }


@pytest.fixture(scope="session")
def coco_data_dir(tmp_path_factory) -> str:
    """A prepared ``coco/2017_panoptic`` with the EXAMPLES in both splits."""
    data_dir = os.fspath(tmp_path_factory.mktemp("coco_tfds"))

    def split_generators(self, dl_manager):
        del dl_manager
        self.info.features["panoptic_objects"]["label"].names = PANOPTIC_NAMES

        def generate():
            for index, key in enumerate(EXAMPLES):
                yield key, tfds_example(key, index)

        return {"train": generate(), "validation": generate()}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfds.builder_cls("coco"), "_split_generators", split_generators)
        tfds.builder(NAME, data_dir=data_dir).download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return data_dir


def make_config(data_dir: str, **data_fields) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {"seed": 0, "batch_size": 2, "data": pipeline.default_config()}
    )
    config.data.update(
        name=NAME,
        data_dir=data_dir,
        image_size=32,
        max_instances=8,
        cache=False,
        augment=False,
        scale_range=(0.5, 1.5),
    )
    config.data.update(data_fields)
    return config


def reference_instances(png: np.ndarray, records: list[dict]) -> list[tuple[np.ndarray, int, bool]]:
    """(mask, class id, crowd) of each thing, non-crowd first, by listing the records."""
    rgb = png.astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    things = [r for r in records if r["label"] < 80]
    ordered = [r for r in things if not r["is_crowd"]] + [r for r in things if r["is_crowd"]]
    return [(ids == r["id"], int(r["label"]) + 1, bool(r["is_crowd"])) for r in ordered]


def tight_box(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_decode_panoptic_on_a_hand_built_png():
    png = panoptic_png(
        6,
        8,
        [
            (1000, np.s_[0:2, 0:3]),
            (70000, np.s_[3:6, 0:4]),
            (300, np.s_[0:3, 5:8]),
            (5, np.s_[4:6, 6:8]),
        ],
    )
    out = coco.decode_panoptic(
        tf.constant(png),
        tf.constant([1000, 70000, 300, 5], tf.int64),
        tf.constant([0, 2, STUFF, 79], tf.int64),
        tf.constant([False, True, False, False]),
    )
    # Things in order, the crowd last: person (1), toothbrush (80), crowd of cars (3).
    np.testing.assert_array_equal(out["instance_labels"], [1, 80, 3])
    np.testing.assert_array_equal(out["instance_crowd"], [False, False, True])
    semantic, index = np.moveaxis(out["label_maps"].numpy(), -1, 0)
    expected_index = np.array(
        [
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [3, 3, 3, 3, 0, 0, 0, 0],
            [3, 3, 3, 3, 0, 0, 2, 2],
            [3, 3, 3, 3, 0, 0, 2, 2],
        ]
    )
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_array_equal(semantic, np.array([0, 1, 80, 3])[expected_index])
    assert out["label_maps"].dtype == tf.uint8


def test_decode_panoptic_without_things():
    png = panoptic_png(4, 5, [(300, np.s_[:, :2])])
    out = coco.decode_panoptic(
        tf.constant(png), tf.constant([300], tf.int64), tf.constant([STUFF]), tf.constant([False])
    )
    assert out["instance_labels"].shape == (0,) and out["instance_crowd"].shape == (0,)
    np.testing.assert_array_equal(out["label_maps"], 0)


def test_class_names_are_checked():
    coco.check_class_names(PANOPTIC_NAMES)
    coco.check_class_names([str(i) for i in range(133)])  # unprepared builder: unknown
    with pytest.raises(ValueError, match="thing classes"):
        coco.check_class_names(["person", "car", *PANOPTIC_NAMES[2:]])


def test_metadata(coco_data_dir):
    metadata = data_lib.dataset_metadata(make_config(coco_data_dir))
    assert metadata.num_classes == 81 and metadata.has_instances
    assert metadata.class_names[:3] == ("background", "person", "bicycle")
    assert metadata.class_names[-1] == "toothbrush"
    # COCO's own category ids, as predictions.json and COCO files name the classes:
    # person 1, bicycle 2, ..., stop sign 13 (12 is unused), ..., toothbrush 90.
    assert metadata.category_ids[:3] == (0, 1, 2) and metadata.category_ids[-1] == 90
    assert metadata.category_ids[metadata.class_names.index("stop sign")] == 13
    assert len(set(metadata.category_ids)) == 81
    assert (metadata.num_train_examples, metadata.num_eval_examples) == (7, 7)


def nearest(in_size: int, out_size: int) -> np.ndarray:
    # Half-pixel centers: output pixel j samples input floor((j + 0.5) * in / out).
    return np.floor((np.arange(out_size) + 0.5) * in_size / out_size).astype(int)


def test_eval_batches_hold_the_exact_instances(coco_data_dir):
    config = make_config(coco_data_dir)
    batches = list(data_lib.create_eval_iterator(config, instances=True))
    builder = tfds.builder(NAME, data_dir=coco_data_dir)
    # All features, in the file order the pipeline reads.
    raw = list(tfds.as_numpy(builder.as_dataset(split="validation", shuffle_files=False)))
    assert len(batches) == 4
    np.testing.assert_array_equal(batches[-1]["valid"], [True, False])
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "image": ((8, 32, 32, 3), np.float32),
        "mask": ((8, 32, 32), np.int32),
        "boxes": ((8, 8, 4), np.float32),
        "labels": ((8, 8), np.int32),
        "instance_masks": ((8, 8, 32, 32), np.uint8),
        "instance_valid": ((8, 8), bool),
        "crowd": ((8, 8), bool),
        "valid": ((8,), bool),
        "original_size": ((8, 2), np.int32),
        "resized_size": ((8, 2), np.int32),
    }
    seen = set()
    for i, ex in enumerate(raw):
        key = ex["image/filename"].decode().removesuffix(".jpg")
        seen.add(key)
        height, width = EXAMPLES[key]["size"]
        # The longer side becomes 32; the rest is zero padding.
        out_h, out_w = (
            round(height * 32 / max(height, width)),
            round(width * 32 / max(height, width)),
        )
        rows, cols = nearest(height, out_h), nearest(width, out_w)
        # What evaluation maps predictions back to the original pixels with.
        np.testing.assert_array_equal(batch["original_size"][i], [height, width])
        np.testing.assert_array_equal(batch["resized_size"][i], [out_h, out_w])
        records = [
            dict(zip(ex["panoptic_objects"], values, strict=True))
            for values in zip(*ex["panoptic_objects"].values(), strict=True)
        ]
        instances = reference_instances(ex["panoptic_image"], records)
        semantic = np.zeros((32, 32), np.int32)
        for k in range(8):
            if k < len(instances):
                full_mask, label, crowd = instances[k]
                mask = np.zeros((32, 32), np.uint8)
                mask[:out_h, :out_w] = full_mask[rows][:, cols]
                semantic[mask == 1] = label
                np.testing.assert_array_equal(batch["instance_masks"][i, k], mask, err_msg=key)
                np.testing.assert_array_equal(batch["boxes"][i, k], tight_box(mask), err_msg=key)
                assert batch["labels"][i, k] == label
                assert batch["crowd"][i, k] == crowd
                assert batch["instance_valid"][i, k] == (not crowd)
            else:
                assert not batch["instance_masks"][i, k].any()
                assert not batch["instance_valid"][i, k] and not batch["crowd"][i, k]
                assert batch["labels"][i, k] == 0
                np.testing.assert_array_equal(batch["boxes"][i, k], 0)
        np.testing.assert_array_equal(batch["mask"][i], semantic, err_msg=key)
        image = batch["image"][i]
        np.testing.assert_array_equal(image[out_h:], 0.0)
        np.testing.assert_array_equal(image[:, out_w:], 0.0)
        # Smooth image: the resized one is close to the nearest-neighbour samples.
        reference = gradient_image(height, width)[rows][:, cols] / 255.0
        np.testing.assert_allclose(image[:out_h, :out_w], reference, atol=0.06)
    assert seen == set(EXAMPLES)
    # The landscape example: person, toothbrush, then the crowd of cars.
    landscape = [ex["image/filename"] for ex in raw].index(b"landscape.jpg")
    np.testing.assert_array_equal(batch["labels"][landscape], [1, 80, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["boxes"][landscape, 0], [3, 2, 15, 10])
    # Without instances: the same images, masks and valid flags, nothing else.
    semantic = list(data_lib.create_eval_iterator(config))
    assert len(semantic) == len(batches)
    for sem, inst in zip(semantic, batches, strict=True):
        assert sem.keys() == {"image", "mask", "valid", "original_size", "resized_size"}
        for key in sem:
            np.testing.assert_array_equal(sem[key], inst[key], err_msg=key)


def assert_consistent(batch: dict[str, np.ndarray]) -> None:
    """Valid and crowd slots hold nonempty, disjoint, tightly boxed masks; the rest is zeros."""
    for i in range(len(batch["image"])):
        masks = batch["instance_masks"][i]
        assert masks.sum(axis=0).max() <= 1
        painted = np.zeros(masks.shape[1:], np.int32)
        for k in range(len(masks)):
            valid, crowd = batch["instance_valid"][i, k], batch["crowd"][i, k]
            assert not (valid and crowd)
            if valid or crowd:
                assert masks[k].any() and 1 <= batch["labels"][i, k] <= 80
                np.testing.assert_array_equal(batch["boxes"][i, k], tight_box(masks[k]))
                painted[masks[k] == 1] = batch["labels"][i, k]
            else:
                assert not masks[k].any() and batch["labels"][i, k] == 0
                np.testing.assert_array_equal(batch["boxes"][i, k], 0)
        np.testing.assert_array_equal(batch["mask"][i], painted)


@pytest.mark.parametrize("cache", [True, False])
def test_augmented_train_batches_stay_consistent(coco_data_dir, cache):
    config = make_config(coco_data_dir, augment=True, cache=cache, batch_size=3)
    iterator = data_lib.create_train_iterator(config, instances=True)
    batches = [next(iterator) for _ in range(3)]
    for batch in batches:
        assert_consistent(batch)
    assert any(b["crowd"].any() for b in batches) and any(
        b["instance_valid"].any() for b in batches
    )
    # Resuming at step 2 gives the same batch.
    resumed = next(data_lib.create_train_iterator(config, start_step=2, instances=True))
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], batches[2][key], err_msg=key)


def test_missing_coco_raises_clear_error(tmp_path):
    config = make_config(os.fspath(tmp_path))
    with pytest.raises(data_lib.DatasetNotFoundError) as error:
        data_lib.create_eval_iterator(config)
    message = str(error.value)
    assert f"'{NAME}'" in message and os.fspath(tmp_path) in message
    assert f"tfds build {NAME} --data_dir=DIR" in message
    assert not os.listdir(tmp_path)
