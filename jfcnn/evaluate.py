"""Evaluates a trained work directory.

    python -m jfcnn.evaluate --workdir runs/unet [--step 400] [--split test]
        [--data_dir DIR] [--data folder=/other/folder] [--output DIR]

Restores the checkpoint (the latest by default) on whatever devices this
machine has (a checkpoint written on 8 devices restores on 1), evaluates the
validation split (``config.data.eval_split``, or ``--split``), prints the
metrics and writes ``<workdir>/eval/metrics.json`` plus PNG pictures (input |
ground truth | prediction) of the first examples. ``--data_dir`` and
``--data KEY=VALUE`` (repeatable) change ``config.data`` for this evaluation
only, e.g. to score another copy or folder of the data set; its classes must
be the run's.

Loading a run needs only its work directory: the config, the data set's
metadata (``dataset.json``: class names, category ids, image size,
normalization) and the checkpoints.

From Python (a notebook, another script)::

    config, task, variables, step = jfcnn.evaluate.load_trained("runs/unet")
    logits = task.model.apply(variables, images, train=False)
"""

from __future__ import annotations

from jfcnn import cli

if __name__ == "__main__":  # Before the training stack is imported below.
    cli.exit_unless_installed("train", "python -m jfcnn.evaluate")

import ast
import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jfcnn import checkpoint as ckpt
from jfcnn import config_validation, distributed, tasks, visualize
from jfcnn import data as data_lib
from jfcnn import train_state as state_lib
from jfcnn.errors import ConfigError, WorkdirMetadataError
from jfcnn.tasks.base import Task

EVAL_DIR = "eval"
# Eval batch fields only the host-side evaluator reads (ids may need 64 bits).
# (``resized_size`` goes to the devices too: a model resized as torchvision does
# is told where each image ends on its canvas.)
HOST_ONLY_KEYS = ("image_id", "original_size")


def run_evaluation(
    config: ml_collections.ConfigDict, task: Task, variables: Any
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One pass over ``config.data.eval_split``; returns (metrics, pictures).

    The eval step runs under ``jit`` with the batch sharded over all devices,
    whatever parallelism training used.
    """
    config = _eval_config(config)
    mesh = state_lib.data_mesh()
    data_sharding = state_lib.batch_sharded(mesh)
    variables = jax.device_put(variables, state_lib.replicated(mesh))
    eval_step = _compiled_eval_step(task)
    evaluator = task.new_evaluator(config.num_eval_images)
    for batch in data_lib.create_eval_iterator(config, instances=task.needs_instances):
        device_batch = {
            key: jax.make_array_from_process_local_data(data_sharding, value)
            for key, value in batch.items()
            if key not in HOST_ONLY_KEYS
        }
        with jax.set_mesh(mesh):  # Per-image ops on each device's own images (jfcnn.ops).
            outputs = eval_step(variables, device_batch)
        if jax.process_count() > 1:
            # Every process scores the whole global batch, so each holds the metrics of
            # the whole split (every example once) and process 0 writes them.
            outputs = multihost_utils.process_allgather(outputs, tiled=True)
            batch = gather_host_batch(batch)
        else:
            outputs = jax.device_get(outputs)
        evaluator.update(outputs, batch)
    return evaluator.result(), evaluator.images


def gather_host_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's batch, concatenated in process order (the global batch's order).

    64-bit values (image ids) travel as pairs of 32-bit words, so they arrive
    whole whether or not JAX runs with 64-bit types.
    """
    gathered = {}
    for key, value in batch.items():
        value = np.ascontiguousarray(value)
        if value.dtype.itemsize == 8:
            words = value.reshape(value.shape[0], -1).view(np.uint32)
            words = np.asarray(multihost_utils.process_allgather(words, tiled=True))
            gathered[key] = words.view(value.dtype).reshape((-1, *value.shape[1:]))
        else:
            gathered[key] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return gathered


def _eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with a batch size that splits evenly over this machine's devices.

    A run trained on 8 devices may be evaluated on 3: the batch grows to the
    next multiple of the device count (the extra examples are padding, marked
    invalid, so the metrics do not change).
    """
    devices = jax.device_count()
    if config.batch_size % devices == 0:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.batch_size = -(-config.batch_size // devices) * devices
    return config


@functools.lru_cache(maxsize=8)
def _compiled_eval_step(task):
    # Cached per task object so periodic evaluation during training compiles once.
    return jax.jit(task.eval_step)


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        elif isinstance(value, int):
            parts.append(f"{key} {value}")
    return "  ".join(parts)


def load_trained(workdir: str, step: int | None = None) -> tuple[Any, Task, Any, int]:
    """Restores a run on this machine's devices, for evaluation or prediction.

    Returns:
      ``(config, task, variables, step)``: the run's config, its task (whose
      ``.model`` is the flax module), the variables for ``model.apply``
      (``{"params": ..., **model_state}``, replicated on all devices) and the
      restored step. The optimizer state is not read.
    """
    config = ckpt.load_config(workdir)
    metadata = load_metadata(workdir, config)
    task = tasks.get_task(config, metadata)
    manager = ckpt.create_manager(workdir, read_only=True)
    try:
        variables, restored_step = state_lib.restore_variables(manager, task, step)
    finally:
        manager.close()
    return config, task, variables, restored_step


def load_metadata(workdir: str, config: ml_collections.ConfigDict) -> data_lib.DatasetMetadata:
    """The data set metadata stored in ``workdir`` (read from the data set for older runs)."""
    stored = ckpt.load_metadata(workdir)
    if stored is None:  # Written by every run since dataset.json exists.
        return data_lib.dataset_metadata(config)
    try:
        return data_lib.DatasetMetadata.from_dict(stored)
    except (ValueError, TypeError) as e:
        raise WorkdirMetadataError(
            f"{os.path.join(workdir, ckpt.METADATA_FILE)} is not valid data set metadata ({e})."
        ) from e


def with_data_overrides(
    config: ml_collections.ConfigDict,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    overrides: Sequence[str] = (),
) -> ml_collections.ConfigDict:
    """``config`` with ``config.data`` changed for one evaluation.

    Args:
      split: the split to score (``config.data.eval_split``).
      data_dir: the TFDS data dir (``config.data.data_dir``).
      overrides: ``"KEY=VALUE"`` strings for other ``config.data`` keys (a key
        the config lacks is added if it is a data key of any data set, e.g.
        ``eval_annotations`` for ``name=coco_json``); the value is parsed as a
        Python literal when it is one, else kept as a string.
    """
    config = config.copy_and_resolve_references()
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("data.")
        if not sep or not key:
            raise ConfigError(
                f"--data takes KEY=VALUE (e.g. --data folder=/data/cells), got {item!r}"
            )
        # A key of another data set (e.g. coco_json's annotation files when a run of
        # COCO is scored on a COCO JSON file) is new to the run's config but no typo.
        if key not in config.data and key not in config_validation.DATA:
            raise ConfigError(
                f"--data {item!r}: config.data has no key {key!r}; its keys are "
                f"{sorted(config.data.keys())}."
            )
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[key] = text
    if split is not None:
        values["eval_split"] = split
    if data_dir is not None:
        values["data_dir"] = data_dir
    with config.unlocked():
        for key, value in values.items():
            config.data[key] = value
    return config


# Class slots of a model that stand for no class (torchvision's COCO detectors
# keep slots for the ten COCO category ids that have no objects, named "N/A").
UNUSED_CLASS_NAMES = ("N/A", "__background__")


def class_mapping(
    model_metadata: data_lib.DatasetMetadata, data_metadata: data_lib.DatasetMetadata
) -> np.ndarray | None:
    """How a model's class slots become the evaluation data's class ids, by class name.

    None when the two have the same classes in the same order (nothing to
    map). Otherwise a ``(K_model,)`` int32 table: the data's class id of each
    model slot, 0 (the detection is dropped) for the background and unused
    slots (``"N/A"``). This lets a model whose slots are spaced by category id
    (a converted torchvision detector: 91 slots, COCO's category ids 1..90
    with ten unused) be scored on COCO's 80 contiguous classes, or on a COCO
    JSON file naming the same classes with any ids.

    The classes must be the same set: every class of the data is the name of
    exactly one model slot and every named model slot is a class of the data;
    when a class has a category id in both (other than its index), the ids
    must agree too. Returns None as well when they differ in any other way;
    `_check_same_classes` then stops with a message.
    """
    model_names = tuple(model_metadata.class_names)
    data_names = tuple(data_metadata.class_names)
    if model_names == data_names or not data_names:
        return None
    used = {
        name: slot
        for slot, name in enumerate(model_names)
        if slot > 0 and name not in UNUSED_CLASS_NAMES
    }
    data_classes = {name: k for k, name in enumerate(data_names) if k > 0}
    duplicated = (
        len(used)
        != sum(
            1
            for slot, name in enumerate(model_names)
            if slot > 0 and name not in UNUSED_CLASS_NAMES
        )
        or len(data_classes) != len(data_names) - 1
    )
    if duplicated or set(used) != set(data_classes):
        return None
    table = np.zeros(len(model_names), np.int32)
    for name, slot in used.items():
        k = data_classes[name]
        model_id = model_metadata.category_ids[slot]
        data_id = data_metadata.category_ids[k]
        # Ids that are only indices (no ids of their own) say nothing.
        if model_id != slot and data_id != k and model_id != data_id:
            return None
        table[slot] = k
    return table


class RemappedTask:
    """``task`` evaluated on data whose classes are its classes in other slots.

    The model's detections get the data's class ids (`class_mapping`);
    detections of unused slots are dropped. The evaluator is the data's (its
    class names, its category ids), so the scores are the data's.
    """

    def __init__(self, task: Task, config: ml_collections.ConfigDict, data_metadata, table):
        self.task = task
        self.model = task.model
        self.name = task.name
        self.needs_instances = task.needs_instances
        self.metadata = data_metadata
        self._table = np.asarray(table, np.int32)
        self._config = config

    def eval_step(self, variables, batch):
        outputs = dict(self.task.eval_step(variables, batch))
        classes = jax.numpy.take(self._table, outputs["classes"])
        outputs["detection_valid"] = outputs["detection_valid"] & (classes > 0)
        outputs["classes"] = classes
        return outputs

    def new_evaluator(self, num_images: int):
        # The data's task builds the evaluator: the data's class names and category ids.
        return tasks.get_task(self._config, self.metadata).new_evaluator(num_images)


def _check_same_classes(config: ml_collections.ConfigDict, task: Task) -> None:
    """Stops an evaluation on data whose classes are not the ones the model was trained on."""
    data_names = tuple(data_lib.dataset_metadata(config).class_names)
    trained = tuple(task.metadata.class_names)
    if data_names != trained:
        first = next(
            (
                k
                for k, pair in enumerate(zip(data_names, trained, strict=False))
                if pair[0] != pair[1]
            ),
            min(len(data_names), len(trained)),
        )

        def name(names, k):
            return repr(names[k]) if k < len(names) else "none"

        raise ConfigError(
            f"The evaluation data ({config.data.name}) has {len(data_names)} classes and the "
            f"model {len(trained)}; class {first} is {name(data_names, first)} in the data and "
            f"{name(trained, first)} in the model. Evaluate it on data with the model's classes "
            "(the same class names; a model whose classes sit in other slots, such as a "
            "converted torchvision detector with COCO's category ids, is mapped to the data's "
            "classes by name, which needs the same set of names)."
        )


def json_safe(value: Any) -> Any:
    """``value`` with NaN/Inf floats as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a class absent from the split has no IoU.
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def evaluate_run(
    workdir: str,
    step: int | None = None,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    data_overrides: Sequence[str] = (),
) -> tuple[dict[str, Any], list]:
    """Restores ``workdir`` and evaluates it; returns ``(metrics, pictures)``, writes nothing.

    ``split``, ``data_dir`` and ``data_overrides`` change the data scored (see
    `with_data_overrides`).
    """
    config, task, variables, restored_step = load_trained(workdir, step)
    if split is not None or data_dir is not None or data_overrides:
        config = with_data_overrides(
            config, split=split, data_dir=data_dir, overrides=data_overrides
        )
        # The task reads config.data too (e.g. which annotation file to score against).
        task = tasks.get_task(config, task.metadata)
    # The model's classes come from the work directory, the ground truth's from the data:
    # scoring one against the other needs them to be the same classes, in the same
    # slots or mapped to the data's by name (a converted COCO detector on COCO).
    eval_task: Any = task
    if task.name == "instance":
        data_metadata = data_lib.dataset_metadata(config)
        table = class_mapping(task.metadata, data_metadata)
        if table is not None:
            eval_task = RemappedTask(task, config, data_metadata, table)
    if eval_task is task:
        _check_same_classes(config, task)
    metrics, images = run_evaluation(config, eval_task, variables)
    metrics["step"] = restored_step
    return metrics, images


def write_results(out_dir: str, metrics: dict[str, Any], images: list) -> str:
    """Writes ``out_dir/metrics.json`` (atomically) and the pictures; returns the JSON's path."""
    path = os.path.join(out_dir, "metrics.json")
    if jax.process_index() != 0:
        return path
    os.makedirs(out_dir, exist_ok=True)
    for i, image in enumerate(images):
        visualize.save_png(os.path.join(out_dir, f"example_{i:02d}.png"), image)
    with open(path + ".tmp", "w") as f:
        json.dump(json_safe(metrics), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


def evaluate_workdir(
    workdir: str, step: int | None = None, output_dir: str | None = None
) -> dict[str, Any]:
    """Restores ``workdir``, evaluates it and writes ``output_dir`` (``<workdir>/eval/``)."""
    metrics, images = evaluate_run(workdir, step)
    write_results(output_dir or os.path.join(workdir, EVAL_DIR), metrics, images)
    return metrics


def main(argv) -> None:
    del argv
    cli.quiet_library_logs()
    with cli.exit_on_user_error(), distributed.exit_on_peer_failure():
        distributed.initialize_from_flags()
        metrics, images = evaluate_run(
            FLAGS.workdir,
            FLAGS.step,
            split=FLAGS.split,
            data_dir=FLAGS.data_dir,
            data_overrides=FLAGS.data or (),
        )
    # The metrics are printed before anything is written, so a directory that
    # cannot be written never costs the evaluation.
    print(json.dumps(json_safe(metrics), indent=2, sort_keys=True))
    out_dir = FLAGS.output or os.path.join(FLAGS.workdir, EVAL_DIR)
    try:
        path = write_results(out_dir, metrics, images)
    except OSError as e:
        print(
            f"error: could not write the results to {out_dir} ({e.strerror or e}); the metrics "
            "are printed above. Pass --output DIR to write them elsewhere.",
            file=sys.stderr,
        )
        sys.exit(1)
    print(f"Wrote {path}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Work directory of a training run.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
    flags.DEFINE_string("output", None, "Directory for metrics.json and pictures (default W/eval).")
    flags.DEFINE_string("split", None, "Split to score (default: the run's data.eval_split).")
    flags.DEFINE_string("data_dir", None, "TFDS data dir to read (default: the run's).")
    flags.DEFINE_multi_string(
        "data", None, "KEY=VALUE: another config.data value for this evaluation (repeatable)."
    )
    distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, ...
    FLAGS = flags.FLAGS
    app.run(main)
