"""Pretrained torchvision detectors as jfcnn work directories.

    python -m jfcnn.convert --torchvision=maskrcnn_resnet50_fpn \
        --weights=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --workdir=runs/maskrcnn_coco_tv

writes ``W/config.json`` (``configs/maskrcnn_coco.py`` with torchvision's
inference settings), ``W/dataset.json`` (COCO's class names at their
category ids 1..90, so predicted class ids are COCO category ids, as
torchvision's labels are) and an Orbax checkpoint at step 0, so that
``python -m jfcnn.evaluate``, ``python -m jfcnn.predict``, ``load_trained``
and ``train.py --workdir W`` use it like a trained run.

The weights file is the published v1 file or a ``state_dict()`` saved from
current torchvision (the key names differ; both are read), as ``.pth``
(needs torch), ``.safetensors`` or ``.npz`` (NumPy only).

What the converted model does like torchvision's at inference: images resized
as ``GeneralizedRCNNTransform`` resizes them (shorter side ``--min_size`` 800,
longer at most ``--max_size`` 1333, bilinear, the sizes computed as
torchvision computes them; ``config.data.resize = "torchvision"``) on a square
canvas of ``max_size`` rounded up to 32, with each image's size passed to the
model so the canvas padding adds no proposals; the backbone's
frozen batch norm (epsilon 0 for the published v1 weights, as torchvision sets
when it loads them; 1e-5 for a state dict of current names, the epsilon of a
model built without the v1 weights; ``--norm_epsilon`` overrides), ROI Align
without the half-pixel shift (``aligned=False``, sampling ratio 2), RPN top
1000 per level before NMS 0.7 and 1000 after, box score threshold 0.05,
per-class NMS 0.5 and 100 detections.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jfcnn import checkpoint as ckpt
from jfcnn import finetune, tasks
from jfcnn import train as train_lib
from jfcnn import train_state as state_lib
from jfcnn import weights as weights_lib
from jfcnn import workdir as workdir_lib
from jfcnn.data.coco import THING_CLASS_NAMES
from jfcnn.data.registry import DatasetMetadata
from jfcnn.errors import ConfigError
from jfcnn.models.maskrcnn import MaskRCNN

ARCHITECTURES = ("maskrcnn_resnet50_fpn",)
# COCO's category ids of its 80 thing classes, in THING_CLASS_NAMES' order.
COCO_CATEGORY_IDS = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)
# torchvision's detection models predict 91 classes: background and ids 1..90,
# ten of which COCO never uses.
NUM_CLASSES = 91
UNUSED_CLASS_NAME = "N/A"
# torchvision's resize (GeneralizedRCNNTransform): shorter side to MIN_SIZE, longer side
# at most MAX_SIZE.
MIN_SIZE, MAX_SIZE = 800, 1333


def canvas_size(max_size: int) -> int:
    """The canvas side that holds any resized image: ``max_size`` rounded up to 32."""
    return -(-int(max_size) // 32) * 32


# Canvas side of evaluation: torchvision's longest resized side (1333) padded to 32.
CANVAS = canvas_size(MAX_SIZE)


def coco_metadata(image_size: int = CANVAS) -> DatasetMetadata:
    """Metadata of a torchvision COCO detector: class id = COCO category id."""
    names = [UNUSED_CLASS_NAME] * NUM_CLASSES
    names[0] = "background"
    for name, category in zip(THING_CLASS_NAMES, COCO_CATEGORY_IDS, strict=True):
        names[category] = name
    return DatasetMetadata(
        name="coco/2017_panoptic",
        num_classes=NUM_CLASSES,
        class_names=tuple(names),
        image_size=image_size,
        num_train_examples=0,
        num_eval_examples=0,
        has_instances=True,
        category_ids=tuple(range(NUM_CLASSES)),
        keep_aspect=True,
    )


def maskrcnn_config(
    norm_epsilon: float, *, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE
) -> ml_collections.ConfigDict:
    """The run config of a converted ``maskrcnn_resnet50_fpn`` (``maskrcnn_coco.py``'s keys).

    Written out here rather than read from ``configs/``, which an installed
    jfcnn does not ship. Model fields are torchvision's inference settings;
    images are resized as torchvision resizes them (``data.resize =
    "torchvision"``: shorter side ``min_size``, longer at most ``max_size``)
    on a canvas of ``max_size`` rounded up to 32; the optimizer is
    torchvision's fine-tuning recipe (SGD, momentum 0.9, learning rate 0.02
    at batch 16).
    """
    config = ml_collections.ConfigDict()
    config.task = "instance"
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        {
            "name": "maskrcnn",
            "roi_heads": "fpn",
            "depth": 50,
            "stage_sizes": None,
            "width": 64,
            "norm": "frozen_batch",
            "frozen_batch_norm": True,
            "norm_epsilon": norm_epsilon,
            "backbone_weights": None,
            "trainable_backbone_layers": 3,
            "fpn_channels": 256,
            "fpn_in_features": ("res2", "res3", "res4", "res5"),
            "anchor_sizes": ((32,), (64,), (128,), (256,), (512,)),
            "aspect_ratios": (0.5, 1.0, 2.0),
            "rpn_pre_nms_top_n_train": 2000,
            "rpn_pre_nms_top_n_test": 1000,
            "rpn_post_nms_top_n_train": 2000,
            "rpn_post_nms_top_n_test": 1000,
            "rpn_nms_threshold": 0.7,
            "roi_batch_size_per_image": 512,
            "roi_positive_fraction": 0.25,
            "mask_rois_per_image": 128,
            "box_pool_size": 7,
            "mask_pool_size": 14,
            "sampling_ratio": 2,
            "roi_align": "gather",
            "roi_align_aligned": False,
            "box_head_dim": 1024,
            "mask_head_channels": 256,
            "mask_head_convs": 4,
            "box_score_threshold": 0.05,
            "box_nms_threshold": 0.5,
            "detections_per_image": 100,
            "mask_threshold": 0.5,
            "mask_paste": "torchvision",
            "dtype": "float32",
        }
    )
    config.data = ml_collections.ConfigDict(
        {
            "name": "coco/2017_panoptic",
            "data_dir": None,
            "image_size": canvas_size(max_size),
            "resize": "torchvision",
            "min_size": int(min_size),
            "max_size": int(max_size),
            "train_split": "train",
            "eval_split": "validation",
            "shuffle_buffer": 10_000,
            "augment": True,
            "scale_range": (0.8, 1.25),
            "max_instances": 100,
            "cache": False,
        }
    )
    config.loss = ml_collections.ConfigDict()
    config.batch_size = 16
    config.num_train_steps = 0
    config.optimizer = "sgd"
    config.learning_rate = 0.02
    config.lr_schedule = "warmup_cosine"
    config.warmup_steps = 1000
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.grad_clip_norm = 0.0
    config.parallelism = "jit"
    config.log_every_steps = 100
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 2_000
    config.keep_checkpoints = 3
    config.num_eval_images = 8
    return config


def convert_maskrcnn(
    weights_path: str,
    workdir: str,
    *,
    norm_epsilon: float | None = None,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
) -> dict[str, Any]:
    """Converts a ``maskrcnn_resnet50_fpn`` state dict file into the work directory ``workdir``.

    ``min_size`` and ``max_size`` are the sizes of torchvision's resize the
    work directory evaluates and predicts with (torchvision's ``min_size`` and
    ``max_size`` arguments; 800 and 1333 for the published model).

    Returns:
      ``{"workdir", "key_names" ("v1" or "current"), "norm_epsilon"}``.

    Raises:
      WeightsError: the file does not fit (the first bad key is named).
      ConfigError: ``workdir`` already holds checkpoints.
    """
    if min(min_size, max_size) < 1:
        raise ConfigError(
            f"--min_size={min_size} and --max_size={max_size}; both must be positive "
            f"(torchvision's defaults: {MIN_SIZE} and {MAX_SIZE})."
        )
    state_dict = weights_lib.read_state_dict(weights_path)
    current, was_v1 = weights_lib.current_key_names(state_dict)
    if norm_epsilon is None:
        norm_epsilon = 0.0 if was_v1 else 1e-5
    config = maskrcnn_config(norm_epsilon, min_size=min_size, max_size=max_size)
    tasks.validate_config(config)
    metadata = coco_metadata(config.data.image_size)
    task = tasks.get_task(config, metadata)
    model: MaskRCNN = task.model
    # The variables' shapes do not depend on the image size: a small dummy.
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), method=MaskRCNN.initialize)
    )
    variables = weights_lib.maskrcnn_variables(
        current,
        expected,
        fpn_in_features=tuple(model.fpn_in_features),
        box_pool_size=model.box_pool_size,
        source=weights_path,
    )
    variables = jax.tree.map(jnp.asarray, variables)

    workdir_lib.check(workdir)
    workdir = workdir_lib.prepare(workdir)
    if os.path.isdir(ckpt.checkpoint_dir(workdir)) and os.listdir(ckpt.checkpoint_dir(workdir)):
        raise ConfigError(f"{workdir} already holds checkpoints; convert into a new --workdir.")
    tx, _ = train_lib.create_optimizer(config, frozen=train_lib.frozen_param_paths(model))
    state = state_lib.state_at_step_0(
        variables, tx, jax.random.split(jax.random.PRNGKey(config.seed))[1]
    )
    ckpt.save_config(workdir, config)
    ckpt.save_metadata(workdir, metadata.to_dict())
    # Fine-tuning on other classes maps the class rows from these (jfcnn.finetune).
    finetune.save_pretrained_metadata(workdir, metadata, os.path.abspath(weights_path))
    manager = ckpt.create_manager(workdir)
    try:
        ckpt.save(manager, 0, state)
    finally:
        manager.close()
    return {
        "workdir": workdir,
        "key_names": "v1" if was_v1 else "current",
        "norm_epsilon": norm_epsilon,
    }


def main(argv) -> None:
    del argv
    from jfcnn import cli

    cli.quiet_library_logs()
    with cli.exit_on_user_error():
        if FLAGS.torchvision not in ARCHITECTURES:
            raise ConfigError(
                f"--torchvision={FLAGS.torchvision!r}; jfcnn converts {list(ARCHITECTURES)}."
            )
        result = convert_maskrcnn(
            FLAGS.weights,
            FLAGS.workdir,
            norm_epsilon=FLAGS.norm_epsilon,
            min_size=FLAGS.min_size,
            max_size=FLAGS.max_size,
        )
    print(
        f"Wrote {result['workdir']} ({result['key_names']} key names, frozen batch norm "
        f"epsilon {result['norm_epsilon']:g}); evaluate it with "
        f"`python -m jfcnn.evaluate --workdir {result['workdir']}`."
    )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string(
        "torchvision", None, f"Architecture: one of {ARCHITECTURES}.", required=True
    )
    flags.DEFINE_string("weights", None, "State dict: .pth, .safetensors or .npz.", required=True)
    flags.DEFINE_string("workdir", None, "Work directory to write.", required=True)
    flags.DEFINE_float(
        "norm_epsilon", None, "Frozen batch norm epsilon (default: 0 for v1 key names, else 1e-5)."
    )
    flags.DEFINE_integer("min_size", MIN_SIZE, "torchvision's resize: the shorter side.")
    flags.DEFINE_integer("max_size", MAX_SIZE, "torchvision's resize: the longer side at most.")
    FLAGS = flags.FLAGS
    app.run(main)
