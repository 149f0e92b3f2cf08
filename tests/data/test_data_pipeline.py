"""Tests of the tf.data pipelines (jfcnn.data.pipeline) on a small `jfcnn_shapes` build."""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import jfcnn.data as data_lib
from jfcnn.data import pipeline, registry
from jfcnn.errors import ConfigError

INSTANCE_KEYS = {"boxes", "labels", "instance_masks", "instance_valid"}


def reference_tight_box(mask_hw: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel-edge (x1, y1, x2, y2) of the nonzero pixels, by listing them."""
    coords = np.argwhere(mask_hw)
    (y_min, x_min), (y_max, x_max) = coords.min(axis=0), coords.max(axis=0)
    return int(x_min), int(y_min), int(x_max) + 1, int(y_max) + 1


def example_ids(images_bhwc: np.ndarray) -> list[str]:
    """Content hashes that identify un-augmented 128x128 examples across pipelines."""
    return [
        hashlib.sha1(np.round(image * 255).astype(np.uint8).tobytes()).hexdigest()
        for image in images_bhwc
    ]


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, n))


def assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.keys() == e.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def assert_instances_consistent(batch: dict[str, np.ndarray]) -> None:
    """Semantic mask == painted valid instance masks; boxes tight; padding all zero."""
    for i in range(len(batch["image"])):
        masks, valid = batch["instance_masks"][i], batch["instance_valid"][i]
        labels, boxes = batch["labels"][i], batch["boxes"][i]
        assert masks.sum(axis=0).max() <= 1  # Visible masks stay disjoint.
        painted = np.zeros(batch["mask"][i].shape, np.int32)
        for k in range(len(valid)):
            if valid[k]:
                assert masks[k].any() and 1 <= labels[k] <= 3
                painted[masks[k] == 1] = labels[k]
                np.testing.assert_array_equal(boxes[k], reference_tight_box(masks[k]))
            else:
                assert not masks[k].any() and labels[k] == 0
                np.testing.assert_array_equal(boxes[k], 0.0)
        np.testing.assert_array_equal(batch["mask"][i], painted)


def test_metadata(make_config, examples_per_split):
    metadata = data_lib.dataset_metadata(make_config(image_size=64))
    assert metadata == data_lib.DatasetMetadata(
        name="jfcnn_shapes",
        num_classes=4,
        class_names=("background", "circle", "square", "triangle"),
        image_size=64,
        num_train_examples=examples_per_split,
        num_eval_examples=examples_per_split,
        has_instances=True,
    )


def test_train_batch_shapes_dtypes_and_ranges(make_config):
    config = make_config(image_size=48, max_instances=7, batch_size=6)
    batches = take(data_lib.create_train_iterator(config, instances=True), 2)
    expected = {
        "image": ((6, 48, 48, 3), np.float32),
        "mask": ((6, 48, 48), np.int32),
        "boxes": ((6, 7, 4), np.float32),
        "labels": ((6, 7), np.int32),
        "instance_masks": ((6, 7, 48, 48), np.uint8),
        "instance_valid": ((6, 7), np.bool_),
    }
    for batch in batches:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert set(np.unique(batch["mask"])) <= {0, 1, 2, 3}
        assert batch["instance_valid"].any(axis=1).sum() >= 4  # Most crops keep a shape.
        assert_instances_consistent(batch)


def test_unaugmented_eval_matches_stored_examples(make_config, shapes_data_dir):
    config = make_config(eval_split="validation[:12]", image_size=128, max_instances=6)
    batches = list(data_lib.create_eval_iterator(config, instances=True))
    assert len(batches) == 2
    builder = tfds.builder("jfcnn_shapes", data_dir=shapes_data_dir)
    stored = list(builder.as_dataset(split="validation[:12]").as_numpy_iterator())
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    np.testing.assert_array_equal(merged["valid"], [True] * 12 + [False] * 4)
    for i, ex in enumerate(stored):
        num = len(ex["objects"]["label"])
        np.testing.assert_allclose(merged["image"][i], ex["image"] / 255.0, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(merged["mask"][i], ex["segmentation_mask"][..., 0])
        np.testing.assert_array_equal(merged["instance_valid"][i], np.arange(6) < num)
        np.testing.assert_array_equal(merged["labels"][i, :num], ex["objects"]["label"] + 1)
        np.testing.assert_array_equal(
            merged["instance_masks"][i, :num], ex["objects"]["mask"][..., 0]
        )
        ymin, xmin, ymax, xmax = np.moveaxis(ex["objects"]["bbox"], -1, 0)
        np.testing.assert_allclose(
            merged["boxes"][i, :num], 128 * np.stack([xmin, ymin, xmax, ymax], -1), atol=1e-4
        )
    for key, value in merged.items():  # Padding examples are all zeros.
        assert not value[12:].any(), key


def _find_offset(cropped_hwc: np.ndarray, full_hwc: np.ndarray) -> tuple[int, int] | None:
    """Offset of the window of ``full_hwc`` equal to ``cropped_hwc``, or None."""
    size = cropped_hwc.shape[0]
    slack = full_hwc.shape[0] - size
    # Screen all offsets with a 4x4 corner patch (pixel noise makes it unique), then verify.
    windows = np.lib.stride_tricks.sliding_window_view(
        full_hwc[: slack + 4, : slack + 4], (4, 4, 3)
    )[:, :, 0]
    distance = np.abs(windows - cropped_hwc[:4, :4]).max(axis=(2, 3, 4))
    for oy, ox in np.argwhere(distance < 1e-5):
        if np.allclose(full_hwc[oy : oy + size, ox : ox + size], cropped_hwc, rtol=0, atol=1e-5):
            return int(oy), int(ox)
    return None


def test_flip_and_crop_are_exact_and_shared(make_config):
    """Scale 2 at S=64 resamples the 128 px source 1:1, so the crop is an exact window."""
    common = dict(train_split="train[:16]", max_instances=6, batch_size=16)
    source = next(
        data_lib.create_train_iterator(
            make_config(image_size=128, augment=False, **common), instances=True
        )
    )
    augmented = next(
        data_lib.create_train_iterator(
            make_config(image_size=64, scale_range=(2.0, 2.0), **common), instances=True
        )
    )
    flips, offsets = [], set()
    for i in range(16):
        for flip in (False, True):
            flipped = source["image"][i][:, ::-1] if flip else source["image"][i]
            offset = _find_offset(augmented["image"][i], flipped)
            if offset is not None:
                break
        assert offset is not None, f"example {i}: no window of the (flipped) source matches"
        flips.append(flip)
        offsets.add(offset)
        oy, ox = offset

        def window(x, flip=flip, oy=oy, ox=ox):
            x = x[..., ::-1] if flip else x
            return x[..., oy : oy + 64, ox : ox + 64]

        np.testing.assert_array_equal(augmented["mask"][i], window(source["mask"][i]))
        # Instances keep their slots; those cropped away become padding.
        expected_masks = window(source["instance_masks"][i])
        np.testing.assert_array_equal(augmented["instance_masks"][i], expected_masks)
        expected_valid = expected_masks.any(axis=(1, 2))
        np.testing.assert_array_equal(augmented["instance_valid"][i], expected_valid)
        np.testing.assert_array_equal(
            augmented["labels"][i], np.where(expected_valid, source["labels"][i], 0)
        )
    assert 0 < sum(flips) < 16
    assert len(offsets) > 4
    assert_instances_consistent(augmented)


def test_downscale_pads_with_background(make_config):
    """scale 0.5 at S=64 pastes a 32 px nearest-neighbour resample into a zero canvas."""
    common = dict(train_split="train[:8]", max_instances=6)
    source = next(
        data_lib.create_train_iterator(
            make_config(image_size=128, augment=False, **common), instances=True
        )
    )
    augmented = next(
        data_lib.create_train_iterator(
            make_config(image_size=64, scale_range=(0.5, 0.5), **common), instances=True
        )
    )
    for i in range(8):
        mask = augmented["mask"][i]
        image = augmented["image"][i]
        # The pasted 32x32 block sits where the image is nonzero.
        rows = np.flatnonzero(image.any(axis=(1, 2)))
        cols = np.flatnonzero(image.any(axis=(0, 2)))
        oy, ox = rows[0], cols[0]
        assert rows[-1] - oy == 31 and cols[-1] - ox == 31
        outside = np.ones((64, 64), bool)
        outside[oy : oy + 32, ox : ox + 32] = False
        assert not mask[outside].any() and not augmented["instance_masks"][i][:, outside].any()
        # Nearest neighbour with half-pixel centers picks source pixel 4 j + 2 (of the
        # flipped source when flipped: flipping comes first).
        block = mask[oy : oy + 32, ox : ox + 32]
        assert np.array_equal(block, source["mask"][i][2::4, 2::4]) or np.array_equal(
            block, source["mask"][i][:, ::-1][2::4, 2::4]
        )
    assert_instances_consistent(augmented)


def test_random_scale_keeps_annotations_consistent(make_config):
    config = make_config(image_size=40, scale_range=(0.6, 1.6), batch_size=8)
    for batch in take(data_lib.create_train_iterator(config, instances=True), 3):
        assert_instances_consistent(batch)


@pytest.mark.parametrize("instances", [False, True])
@pytest.mark.parametrize("cache", [True, False])
def test_resume_yields_bit_identical_batches(make_config, cache, instances):
    # 40 examples / 8 per step = 5 steps per epoch; step 7 lies in the second epoch.
    config = make_config(train_split="train[:40]", image_size=32, cache=cache)
    uninterrupted = take(data_lib.create_train_iterator(config, instances=instances), 9)
    assert_batches_equal(
        take(data_lib.create_train_iterator(config, start_step=3, instances=instances), 6),
        uninterrupted[3:],
    )
    assert_batches_equal(
        take(data_lib.create_train_iterator(config, start_step=7, instances=instances), 2),
        uninterrupted[7:],
    )
    other_seed = take(
        data_lib.create_train_iterator(
            make_config(seed=1, train_split="train[:40]", image_size=32, cache=cache),
            instances=instances,
        ),
        1,
    )
    assert not np.array_equal(other_seed[0]["image"], uninterrupted[0]["image"])


def test_epochs_are_fresh_permutations(make_config):
    config = make_config(train_split="train[:40]", image_size=128, augment=False)
    batches = take(data_lib.create_train_iterator(config), 10)
    ids = [i for b in batches for i in example_ids(b["image"])]
    epoch0, epoch1 = ids[:40], ids[40:]
    file_order = example_ids(
        np.concatenate(
            [
                b["image"]
                for b in data_lib.create_eval_iterator(
                    make_config(eval_split="train[:40]", image_size=128)
                )
            ]
        )
    )
    assert sorted(epoch0) == sorted(epoch1) == sorted(file_order)
    assert len(set(epoch0)) == 40
    assert epoch0 != epoch1 and epoch0 != file_order


def test_eval_is_fixed_and_pads_the_last_batch(make_config):
    config = make_config(eval_split="validation[:21]", image_size=32)
    assert data_lib.num_eval_batches(config) == 3
    first = list(data_lib.create_eval_iterator(config, instances=True))
    second = list(data_lib.create_eval_iterator(config, instances=True))
    assert_batches_equal(first, second)
    valid = np.concatenate([b["valid"] for b in first])
    np.testing.assert_array_equal(valid, np.arange(24) < 21)
    last = first[-1]
    for key in ("image", "mask", "instance_masks", "labels", "boxes", "instance_valid"):
        assert not last[key][5:].any(), key
    assert last["image"][:5].any(axis=(1, 2, 3)).all()


def test_per_process_shards(make_config, monkeypatch):
    train = make_config(train_split="train[:40]", image_size=64, augment=True)
    evaluation = make_config(eval_split="validation[:21]", image_size=128)
    # Training: the global batches do not depend on the process count. One process
    # reads 8 per step; two read 4 each, and process 0's then process 1's are
    # exactly the one process's batch, augmentation included, across epochs
    # (40 examples: 5 steps each) and when resuming at step 7.
    monkeypatch.setattr(pipeline, "_process_info", lambda: (0, 1))
    alone = take(data_lib.create_train_iterator(train), 12)
    parts = []
    for process_index in range(2):
        monkeypatch.setattr(pipeline, "_process_info", lambda i=process_index: (i, 2))
        parts.append(take(data_lib.create_train_iterator(train), 12))
        resumed = take(data_lib.create_train_iterator(train, start_step=7), 5)
        assert_batches_equal(resumed, parts[-1][7:])
    assert parts[0][0]["image"].shape[0] == 4
    for step, whole in enumerate(alone):
        for key in whole:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, whole[key], err_msg=f"step {step} {key}")
    eval_ids, eval_batches = [], []
    for process_index in range(2):
        monkeypatch.setattr(pipeline, "_process_info", lambda i=process_index: (i, 2))
        batches = list(data_lib.create_eval_iterator(evaluation))
        eval_batches.append(len(batches))
        ids = [i for b in batches for i in example_ids(b["image"])]
        valid = np.concatenate([b["valid"] for b in batches])
        eval_ids.append([i for i, v in zip(ids, valid, strict=True) if v])
    # Eval: 11 + 10 examples, both processes run ceil(11 / 4) = 3 batches.
    assert eval_batches == [3, 3]
    assert [len(ids) for ids in eval_ids] == [11, 10]
    with pytest.raises(ValueError, match="multiple of jax.process_count"):
        data_lib.create_train_iterator(make_config(batch_size=7))
    monkeypatch.setattr(pipeline, "_process_info", lambda: (0, 1))
    all_eval = example_ids(
        np.concatenate([b["image"] for b in data_lib.create_eval_iterator(evaluation)])
    )
    assert eval_ids[0] + eval_ids[1] == all_eval[:21]


def test_config_errors(make_config):
    with pytest.raises(ValueError, match="config.data.name must be one of"):
        data_lib.create_train_iterator(make_config(name="imagenet2012"))
    with pytest.raises(ValueError, match="scale_range"):
        data_lib.create_train_iterator(make_config(scale_range=(1.5, 1.0)))
    with pytest.raises(ValueError, match="start_step"):
        data_lib.create_train_iterator(make_config(), start_step=-1)


def _write_pets_metadata(data_dir: str, num_train: int, num_test: int) -> None:
    """Writes the metadata of a prepared `oxford_iiit_pet` so that mock_data can serve it."""
    builder = tfds.builder("oxford_iiit_pet", data_dir=data_dir)
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name="train", shard_lengths=[num_train], num_bytes=0),
                tfds.core.SplitInfo(name="test", shard_lengths=[num_test], num_bytes=0),
            ]
        )
    )
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # Half-pixel centers: output pixel j samples input floor((j + 0.5) * in / out).
    return np.minimum(np.floor((np.arange(out_size) + 0.5) * in_size / out_size), in_size - 1)


@pytest.mark.parametrize("cache", [True, False])
def test_oxford_iiit_pet_with_mock_data(tmp_path, make_config, cache):
    data_dir = os.fspath(tmp_path)
    _write_pets_metadata(data_dir, num_train=6, num_test=5)
    config = make_config(
        name="oxford_iiit_pet",
        data_dir=data_dir,
        image_size=24,
        eval_split="test",
        cache=cache,
        batch_size=2,
    )
    with tfds.testing.mock_data(num_examples=5, data_dir=data_dir):
        metadata = data_lib.dataset_metadata(config)
        assert metadata.class_names == ("pet", "background", "border")
        assert (metadata.num_classes, metadata.num_train_examples) == (3, 6)
        assert not metadata.has_instances
        train_batch = next(data_lib.create_train_iterator(config))
        eval_batches = list(data_lib.create_eval_iterator(config))
        builder = tfds.builder("oxford_iiit_pet", data_dir=data_dir)
        spec = registry.get_spec("oxford_iiit_pet")
        raw = list(
            pipeline._read(
                builder, "test", spec=spec, decode=True, instances=False
            ).as_numpy_iterator()
        )
    assert {k: (v.shape, v.dtype) for k, v in train_batch.items()} == {
        "image": ((2, 24, 24, 3), np.float32),
        "mask": ((2, 24, 24), np.int32),
    }
    assert not INSTANCE_KEYS & train_batch.keys()
    assert len(eval_batches) == 3
    np.testing.assert_array_equal(eval_batches[-1]["valid"], [True, False])
    masks = np.concatenate([b["mask"] for b in eval_batches])
    for i, ex in enumerate(raw):
        trimap = ex["segmentation_mask"][..., 0].astype(np.int32)
        rows = _nearest_indices(trimap.shape[0], 24).astype(int)
        cols = _nearest_indices(trimap.shape[1], 24).astype(int)
        # Trimap 1 pet, 2 background, 3 border -> class ids 0, 1, 2; any other
        # value (the mock data draws 0..255) is no class: the ignore label 255.
        expected = trimap[rows][:, cols] - 1
        expected = np.where((expected >= 0) & (expected < 3), expected, 255)
        np.testing.assert_array_equal(masks[i], expected)


def test_missing_real_data_set_raises_clear_error(tmp_path, make_config):
    config = make_config(name="oxford_iiit_pet", data_dir=os.fspath(tmp_path), eval_split="test")
    for create in (
        data_lib.create_train_iterator,
        data_lib.create_eval_iterator,
        data_lib.dataset_metadata,
    ):
        with pytest.raises(data_lib.DatasetNotFoundError) as error:
            create(config)
        message = str(error.value)
        assert "'oxford_iiit_pet'" in message and os.fspath(tmp_path) in message
        assert "tfds build oxford_iiit_pet --data_dir=DIR" in message
        assert "--config.data.data_dir=DIR" in message
    assert not os.listdir(tmp_path)  # Nothing downloaded or prepared.


@pytest.mark.parametrize("cache", [True, False])
def test_semantic_batches_carry_no_instance_fields(make_config, cache):
    """Without instances a batch is image and mask (and valid), equal to the instance batch's."""
    config = make_config(
        train_split="train[:16]", image_size=40, scale_range=(0.6, 1.6), cache=cache
    )
    semantic = take(data_lib.create_train_iterator(config, start_step=1), 2)
    with_instances = take(data_lib.create_train_iterator(config, start_step=1, instances=True), 2)
    for sem, inst in zip(semantic, with_instances, strict=True):
        assert sem.keys() == {"image", "mask"}
        assert inst.keys() == {"image", "mask"} | INSTANCE_KEYS
        np.testing.assert_array_equal(sem["image"], inst["image"])
        np.testing.assert_array_equal(sem["mask"], inst["mask"])
        # The instance batch's masks paint exactly this semantic mask.
        assert_instances_consistent(inst)
        assert set(np.unique(sem["mask"])) <= {0, 1, 2, 3} and sem["mask"].any()

    eval_config = make_config(eval_split="validation[:10]", image_size=40)
    semantic = list(data_lib.create_eval_iterator(eval_config))
    with_instances = list(data_lib.create_eval_iterator(eval_config, instances=True))
    assert len(semantic) == len(with_instances) == 2
    eval_keys = {"image", "mask", "valid", "original_size", "resized_size"}
    for sem, inst in zip(semantic, with_instances, strict=True):
        assert sem.keys() == eval_keys
        assert inst.keys() == eval_keys | INSTANCE_KEYS
        for key in sem:
            np.testing.assert_array_equal(sem[key], inst[key], err_msg=key)
        # The stored 128 x 128 images, stretched to the 40 x 40 canvas.
        valid = sem["valid"]
        np.testing.assert_array_equal(sem["original_size"][valid], [[128, 128]] * valid.sum())
        np.testing.assert_array_equal(sem["resized_size"][valid], [[40, 40]] * valid.sum())


def test_semantic_batches_need_no_max_instances(make_config):
    config = make_config(train_split="train[:8]", image_size=32)
    del config.data["max_instances"]
    assert next(data_lib.create_train_iterator(config)).keys() == {"image", "mask"}
    assert next(data_lib.create_eval_iterator(config)).keys() == {
        "image",
        "mask",
        "valid",
        "original_size",
        "resized_size",
    }
    for create in (data_lib.create_train_iterator, data_lib.create_eval_iterator):
        with pytest.raises(ConfigError, match=r"`data\.max_instances` is missing"):
            create(config, instances=True)
    with pytest.raises(ValueError, match="max_instances must be positive"):
        data_lib.create_train_iterator(make_config(max_instances=0), instances=True)


def test_instances_need_a_data_set_with_instances(tmp_path, make_config):
    # Raised before the (here unprepared) data set is looked for.
    config = make_config(name="oxford_iiit_pet", data_dir=os.fspath(tmp_path), eval_split="test")
    for create in (data_lib.create_train_iterator, data_lib.create_eval_iterator):
        with pytest.raises(ConfigError, match="'oxford_iiit_pet' has no instance annotations"):
            create(config, instances=True)


def test_registry_names_and_unknown_name_error():
    assert data_lib.dataset_names() == (
        "coco/2017_panoptic",
        "coco_json",
        "folder",
        "jfcnn_shapes",
        "oxford_iiit_pet",
    )
    assert data_lib.get_spec("jfcnn_shapes").has_instances
    assert not data_lib.get_spec("oxford_iiit_pet").has_instances
    with pytest.raises(ConfigError) as error:
        data_lib.get_spec("imagenet2012")
    message = str(error.value)
    assert "'imagenet2012'" in message and "config.data.name must be one of" in message
    assert str(list(data_lib.dataset_names())) in message
    assert "register" in message  # Says how to add one.
    with pytest.raises(ValueError, match="'jfcnn_shapes' is already registered"):
        data_lib.register(data_lib.get_spec("jfcnn_shapes"))


def test_metadata_round_trips_through_json(make_config):
    metadata = data_lib.dataset_metadata(make_config(image_size=64))
    as_json = json.dumps(metadata.to_dict())
    assert json.loads(as_json)["class_names"] == ["background", "circle", "square", "triangle"]
    assert data_lib.DatasetMetadata.from_dict(json.loads(as_json)) == metadata
    # Keys it does not know (written by a newer version) are ignored; missing ones are not.
    values = {**json.loads(as_json), "future_field": 1}
    assert data_lib.DatasetMetadata.from_dict(values) == metadata
    del values["image_size"]
    with pytest.raises(ValueError, match="image_size"):
        data_lib.DatasetMetadata.from_dict(values)
    with pytest.raises(ValueError, match="num_classes=3 but 4 class_names"):
        data_lib.DatasetMetadata.from_dict({**metadata.to_dict(), "num_classes": 3})
