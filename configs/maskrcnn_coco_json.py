"""Mask R-CNN on your own instance annotations in COCO format (CVAT, Label Studio, Roboflow).

Any tool's COCO instances export works (labelme's via labelme2coco). Train and evaluate:

    python train.py --config configs/maskrcnn_coco_json.py --workdir runs/my_objects \
        --config.data.train_annotations=/data/my_objects/train.json \
        --config.data.train_images=/data/my_objects/train \
        --config.data.eval_annotations=/data/my_objects/val.json \
        --config.data.eval_images=/data/my_objects/val
    python -m jfcnn.evaluate --workdir runs/my_objects

The first run decodes every image once into the TFDS data dir
(``--config.data.data_dir``, default ``~/tensorflow_datasets``); later runs
reuse that copy until a file changes. Classes are the files' categories
(background is class 0); crowd regions are not trained on and are ignored in
evaluation. ``eval/metrics.json`` holds COCOeval's box and mask AP against
``val.json`` itself, at the original image resolution.

The model is configs/maskrcnn.py's small ResNet-FPN trained from scratch, at
512 x 512 (the longer side, the other zero-padded), with anchors scaled to
that size. For objects much smaller or larger than 16-256 pixels at that
size, change ``model.anchor_sizes``; for more than 50 objects per image,
``data.max_instances``.
"""

import ml_collections

from configs import maskrcnn


def get_config() -> ml_collections.ConfigDict:
    config = maskrcnn.get_config()

    model = config.model
    model.width = 32
    model.fpn_channels = 64
    model.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
    model.fpn_in_features = ("res2", "res3", "res4", "res5")  # -> P2..P5, plus P6 for the RPN.
    model.rpn_pre_nms_top_n_train = 1000
    model.rpn_pre_nms_top_n_test = 500
    model.rpn_post_nms_top_n_train = 1000
    model.rpn_post_nms_top_n_test = 500
    model.roi_batch_size_per_image = 256
    model.mask_rois_per_image = 64
    model.detections_per_image = 100  # COCOeval counts at most 100 per image.

    data = config.data
    data.name = "coco_json"
    # The COCO JSON file and the image directory of each split.
    data.train_annotations = ml_collections.config_dict.placeholder(str)
    data.train_images = ml_collections.config_dict.placeholder(str)
    data.eval_annotations = ml_collections.config_dict.placeholder(str)
    data.eval_images = ml_collections.config_dict.placeholder(str)
    data.image_size = 512  # Longer side; must be a multiple of 32.
    data.train_split = "train"  # The train files.
    data.eval_split = "validation"  # The eval files.
    data.shuffle_buffer = 1024
    data.scale_range = (0.75, 1.25)
    data.max_instances = 50  # Ground truth is padded to this many objects per image.
    data.cache = False  # Read the prepared PNGs each epoch: memory stays bounded.

    config.batch_size = 4
    config.num_train_steps = 5000
    config.learning_rate = 1e-3
    config.warmup_steps = 200
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 3
    return config
