"""Fine-tuning torchvision's COCO Mask R-CNN (converted) on your COCO-format annotations.

Convert the published weights once, then train in that work directory:

    python -m jfcnn.convert --torchvision=maskrcnn_resnet50_fpn \
        --weights=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --workdir=runs/maskrcnn_tv
    python train.py --config configs/maskrcnn_finetune_torchvision.py --workdir runs/maskrcnn_tv \
        --config.data.train_annotations=/data/my_objects/train.json \
        --config.data.train_images=/data/my_objects/train \
        --config.data.eval_annotations=/data/my_objects/val.json \
        --config.data.eval_images=/data/my_objects/val
    python -m jfcnn.evaluate --workdir runs/maskrcnn_tv

The model section is the converted model's (``jfcnn.convert`` writes the same
fields into ``runs/maskrcnn_tv/config.json``): ResNet-50-FPN, frozen batch norm,
torchvision's ROI Align, RPN and detection settings, so no ``--config.model.*``
override is needed. It starts from the COCO weights: the classes of your file
whose names are COCO's (case and spaces ignored) keep COCO's rows of the box
classifier, box regressor and mask predictor, the others start fresh, every
other weight is COCO's, and the optimizer starts afresh (``jfcnn.finetune``).
As in torchvision, ``model.trainable_backbone_layers = 3`` trains res3 to res5
and leaves the stem and res2 as they are.

``model.norm_epsilon`` is 0, the epsilon torchvision gives the published (v1)
file's frozen batch norm; ``jfcnn.convert`` prints the one it used, and a
``state_dict()`` saved from current torchvision converts with 1e-5: add
``--config.model.norm_epsilon=1e-5`` for one. Images are resized as torchvision
resizes them (shorter side ``data.min_size`` 800, longer at most ``data.max_size``
1333) on a 1344 x 1344 canvas; training jitters that scale by ``data.scale_range``
and flips. For smaller objects or a smaller machine, lower ``data.min_size``,
``data.max_size`` and ``data.image_size`` (``max_size`` rounded up to 32)
together. Data as in ``configs/maskrcnn_coco_json.py``.
"""

import ml_collections

from configs import maskrcnn_coco_json
from jfcnn import convert


def get_config() -> ml_collections.ConfigDict:
    config = maskrcnn_coco_json.get_config()

    # The converted model's fields, from the function that writes them into a
    # converted work directory's config.json: torchvision's maskrcnn_resnet50_fpn
    # with its inference settings (norm_epsilon 0: the published v1 file's).
    config.model = convert.maskrcnn_config(norm_epsilon=0.0).model

    data = config.data  # coco_json: the four file keys of configs/maskrcnn_coco_json.py.
    data.resize = "torchvision"  # GeneralizedRCNNTransform's resize, as the model saw COCO.
    data.min_size = 800
    data.max_size = 1333
    data.image_size = 1344  # max_size rounded up to a multiple of 32.
    data.scale_range = (0.8, 1.25)
    data.max_instances = 100

    # torchvision's fine-tuning recipe (SGD, momentum 0.9, 0.02 at batch 16), scaled to
    # batch 4 by the linear rule.
    config.batch_size = 4
    config.num_train_steps = 5000
    config.optimizer = "sgd"
    config.learning_rate = 0.005
    config.lr_schedule = "warmup_cosine"
    config.warmup_steps = 500
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.grad_clip_norm = 0.0
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 3
    config.num_eval_images = 8
    return config
