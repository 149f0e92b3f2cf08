"""Tests of the procedurally generated `jfcnn_shapes` data set."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jfcnn.data import shapes


def reference_tight_box(mask_hw: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel-edge (x1, y1, x2, y2) of the nonzero pixels, by listing them."""
    coords = np.argwhere(mask_hw)
    (y_min, x_min), (y_max, x_max) = coords.min(axis=0), coords.max(axis=0)
    return int(x_min), int(y_min), int(x_max) + 1, int(y_max) + 1


def test_generate_example_is_deterministic_per_split_and_index():
    first = shapes.generate_example("train", 7)
    again = shapes.generate_example("train", 7)
    assert first.keys() == again.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["image"], shapes.generate_example("train", 8)["image"])
    assert not np.array_equal(first["image"], shapes.generate_example("validation", 7)["image"])


def test_generate_example_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        shapes.generate_example("test", 0)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_annotations_are_consistent(split):
    for index in range(40):
        ex = shapes.generate_example(split, index)
        image, semantic = ex["image"], ex["segmentation_mask"]
        masks, labels, bboxes = ex["masks"], ex["labels"], ex["bboxes"]
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert semantic.shape == (128, 128) and semantic.dtype == np.uint8
        assert 1 <= len(labels) <= shapes.MAX_INSTANCES
        assert masks.shape == (len(labels), 128, 128) and bboxes.shape == (len(labels), 4)
        assert set(labels.tolist()) <= {0, 1, 2}
        # Visible masks are disjoint and large enough.
        assert masks.sum(axis=0).max() <= 1
        assert masks.sum(axis=(1, 2)).min() >= 64
        # Semantic mask == union of instance masks painted with label + 1.
        painted = np.zeros((128, 128), np.uint8)
        for mask, label in zip(masks, labels, strict=True):
            painted[mask] = label + 1
        np.testing.assert_array_equal(semantic, painted)
        for mask, bbox in zip(masks, bboxes, strict=True):
            x1, y1, x2, y2 = reference_tight_box(mask)
            np.testing.assert_allclose(bbox, np.array([y1, x1, y2, x2]) / 128.0, rtol=0, atol=1e-7)


def test_task_is_not_solvable_from_color_or_size():
    colors_by_class: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    sides_by_class: dict[int, list[float]] = {0: [], 1: [], 2: []}
    touching_pairs = 0
    for index in range(150):
        ex = shapes.generate_example("train", index)
        # Instances overlap: count pairs whose visible masks share an edge.
        for a, b in itertools.combinations(ex["masks"], 2):
            grown = a | np.roll(a, 1, 0) | np.roll(a, -1, 0) | np.roll(a, 1, 1) | np.roll(a, -1, 1)
            touching_pairs += bool((grown & b).any())
        for mask, label, bbox in zip(ex["masks"], ex["labels"], ex["bboxes"], strict=True):
            colors_by_class[int(label)].append(ex["image"][mask].mean(axis=0))
            sides_by_class[int(label)].append(128 * max(bbox[2] - bbox[0], bbox[3] - bbox[1]))
    class_means = [np.mean(colors_by_class[c], axis=0) for c in range(3)]
    for c in range(3):
        assert len(colors_by_class[c]) > 100
        # Colors spread over the whole range for every class ...
        assert np.std(colors_by_class[c], axis=0).min() > 45
        # ... and their means nearly coincide across classes.
        for other in range(c):
            assert np.linalg.norm(class_means[c] - class_means[other]) < 30
        # Shapes are reasonably large (radius-like parameter 12..30 px at 128).
        sides = np.array(sides_by_class[c])
        assert np.median(sides) > 30 and sides.min() >= 8 and sides.max() <= 128
    assert touching_pairs >= 30
    # The background is textured, not flat.
    image = shapes.generate_example("train", 0)["image"].astype(np.float64)
    background = shapes.generate_example("train", 0)["segmentation_mask"] == 0
    assert image[background].std(axis=0).min() > 4


def test_builder_stores_the_generated_examples(shapes_data_dir, examples_per_split):
    builder = tfds.builder("jfcnn_shapes", data_dir=shapes_data_dir)
    assert builder.info.features["objects"]["label"].names == list(shapes.CLASS_NAMES)
    assert builder.info.splits["validation"].num_examples == examples_per_split
    generated = [shapes.generate_example("validation", i) for i in range(examples_per_split)]
    index_of = {ex["image"].tobytes(): i for i, ex in enumerate(generated)}
    seen = []
    for stored in builder.as_dataset(split="validation").as_numpy_iterator():
        index = index_of[stored["image"].tobytes()]
        seen.append(index)
        ex = generated[index]
        np.testing.assert_array_equal(stored["segmentation_mask"][..., 0], ex["segmentation_mask"])
        np.testing.assert_array_equal(stored["objects"]["label"], ex["labels"])
        np.testing.assert_array_equal(stored["objects"]["mask"][..., 0], ex["masks"])
        np.testing.assert_allclose(stored["objects"]["bbox"], ex["bboxes"], rtol=0, atol=1e-7)
    assert sorted(seen) == list(range(examples_per_split))
