"""Evaluating a model whose classes sit in other slots than the data's (`class_mapping`).

A converted torchvision COCO detector has 91 class slots (COCO's category ids
1..90, ten of them unused, "N/A"); COCO's data set has 80 contiguous classes,
and a user's COCO JSON file may number the same classes otherwise. Detections
are mapped to the data's classes by name; different classes are refused.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from tiny_configs import instance_metadata as _metadata

from jfcnn import convert, evaluate
from jfcnn.data import coco

COCO_DATA = _metadata(coco.CLASS_NAMES, (0, *coco.THING_CATEGORY_IDS))


def test_converted_coco_slots_map_to_coco_classes():
    table = evaluate.class_mapping(convert.coco_metadata(), COCO_DATA)
    assert table.shape == (91,)
    # Slot = COCO category id; data class = index among the 80 things (+ background).
    for k, category in enumerate(coco.THING_CATEGORY_IDS, start=1):
        assert table[category] == k
    assert table[0] == 0 and table[12] == 0 and table[83] == 0  # background, "N/A"
    assert table[1] == 1 and table[90] == 80 and (table > 0).sum() == 80


def test_a_coco_json_file_with_other_ids_maps_by_name():
    names = ("background", *reversed(coco.THING_CLASS_NAMES))
    data = _metadata(names, range(81))  # The file's own ids 1..80, another order.
    table = evaluate.class_mapping(convert.coco_metadata(), data)
    assert table[1] == 80 and table[90] == 1  # person, toothbrush
    # The same classes in the same slots need no mapping.
    assert evaluate.class_mapping(COCO_DATA, COCO_DATA) is None


def test_different_classes_are_not_mapped():
    converted = convert.coco_metadata()
    shapes = _metadata(("background", "square", "circle", "triangle"))
    assert evaluate.class_mapping(converted, shapes) is None
    # A subset of COCO's classes is not the same set either.
    assert evaluate.class_mapping(converted, _metadata(coco.CLASS_NAMES[:40])) is None
    # Nor are the same names at contradicting category ids.
    swapped = list(COCO_DATA.category_ids)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    converted_ids = _metadata(converted.class_names, [0] + [i + 100 for i in range(1, 91)])
    assert evaluate.class_mapping(converted_ids, _metadata(coco.CLASS_NAMES, swapped)) is None


class _StubTask:
    name = "instance"
    needs_instances = True
    model = None
    metadata = convert.coco_metadata()

    def eval_step(self, variables, batch):
        del variables, batch
        return {
            "classes": np.array([[1, 12, 90, 0]], np.int32),
            "detection_valid": np.array([[True, True, True, False]]),
            "scores": np.array([[0.9, 0.8, 0.7, 0.0]], np.float32),
        }


def test_remapped_task_gives_data_classes_and_drops_unused_slots():
    from ml_collections import ConfigDict

    config = ConfigDict(
        {"task": "instance", "model": {"name": "maskrcnn"}, "data": {"name": "coco/2017_panoptic"}}
    )
    table = evaluate.class_mapping(convert.coco_metadata(), COCO_DATA)
    task = evaluate.RemappedTask(_StubTask(), config, COCO_DATA, table)
    out = jax.jit(task.eval_step)(None, {})
    np.testing.assert_array_equal(out["classes"], [[1, 0, 80, 0]])
    np.testing.assert_array_equal(out["detection_valid"], [[True, False, True, False]])
    assert task.metadata is COCO_DATA


def test_refusal_of_different_classes_says_what_maps():
    from ml_collections import ConfigDict

    config = ConfigDict({"data": {"name": "jfcnn_shapes"}})

    class Task:
        metadata = convert.coco_metadata()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            evaluate.data_lib,
            "dataset_metadata",
            lambda config: _metadata(("background", "square", "circle", "triangle")),
        )
        with pytest.raises(evaluate.ConfigError, match="mapped to the data's classes by name"):
            evaluate._check_same_classes(config, Task())


def test_data_overrides_point_a_converted_run_at_a_coco_json_file():
    """A converted run's config has COCO's data keys; ``--data`` adds coco_json's."""
    config = convert.maskrcnn_config(0.0)
    assert "eval_annotations" not in config.data
    changed = evaluate.with_data_overrides(
        config, overrides=["name=coco_json", "eval_annotations=/data/val.json"]
    )
    assert changed.data.name == "coco_json" and changed.data.eval_annotations == "/data/val.json"
    assert "eval_annotations" not in config.data  # For this evaluation only.
    # A key of no data set is still a typo.
    with pytest.raises(evaluate.ConfigError, match="config.data has no key 'eval_annotation'"):
        evaluate.with_data_overrides(config, overrides=["eval_annotation=/data/val.json"])
