"""Mask R-CNN ResNet-50-FPN on COCO 2017 (thing classes), for a TPU VM or GPU box.

    python train.py --config configs/maskrcnn_coco.py --workdir runs/maskrcnn_coco \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    python -m jfcnn.evaluate --workdir runs/maskrcnn_coco

The data set is TFDS `coco/2017_panoptic` (instance masks decoded from the
panoptic PNGs, crowd regions ignored); it is never downloaded by jfcnn:
prepare it once with `tfds build coco/2017_panoptic --data_dir=DIR`.

Trained from scratch with synchronized batch norm (the batch statistics of
the whole global batch, under `jit` and `pmap` alike) and a large-scale-jitter
style fixed input size, so every step has the same shapes. The model fields
are torchvision's `maskrcnn_resnet50_fpn` defaults; `model.roi_heads = "c4"`
(with `model.anchor_sizes = ((32, 64, 128, 256, 512),)`) gives the ResNet-C4
variant.
"""

import ml_collections

from configs import maskrcnn


def get_config() -> ml_collections.ConfigDict:
    config = maskrcnn.get_config()

    model = config.model
    model.roi_heads = "fpn"
    model.depth = 50
    model.stage_sizes = None  # (3, 4, 6, 3) for ResNet-50.
    model.width = 64
    model.norm = "batch"
    model.fpn_channels = 256
    model.fpn_in_features = ("res2", "res3", "res4", "res5")
    model.anchor_sizes = ((32,), (64,), (128,), (256,), (512,))
    model.rpn_pre_nms_top_n_train = 2000
    model.rpn_pre_nms_top_n_test = 1000
    model.rpn_post_nms_top_n_train = 2000
    model.rpn_post_nms_top_n_test = 1000
    model.roi_batch_size_per_image = 512
    model.mask_rois_per_image = 128  # All positive slots: int(512 * 0.25).
    model.box_head_dim = 1024
    model.mask_head_channels = 256
    model.mask_head_convs = 4
    model.roi_align = "gather"  # The dense form's cost grows with the map size.
    model.detections_per_image = 100
    model.dtype = "bfloat16"

    data = config.data
    data.name = "coco/2017_panoptic"
    data.image_size = 1024  # Resized and padded to 1024x1024 (a multiple of 32).
    data.train_split = "train"
    data.eval_split = "validation"
    data.shuffle_buffer = 10_000
    data.scale_range = (0.5, 2.0)  # Large-scale jitter.
    data.max_instances = 100  # COCO images have up to ~90 thing instances.
    data.cache = False

    config.batch_size = 64
    config.num_train_steps = 90_000
    config.optimizer = "adamw"
    config.learning_rate = 2e-4
    config.lr_schedule = "warmup_cosine"
    config.warmup_steps = 1000
    config.weight_decay = 0.05
    config.grad_clip_norm = 1.0

    config.log_every_steps = 100
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 2_000
    config.keep_checkpoints = 3
    config.num_eval_images = 16
    return config
