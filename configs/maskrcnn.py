"""Mask R-CNN instance segmentation on the built-in synthetic shapes data set.

Trained from scratch, offline, on a 2-core laptop CPU in under 8 minutes:

    python train.py --config configs/maskrcnn.py --workdir runs/maskrcnn
    python -m jfcnn.evaluate --workdir runs/maskrcnn

A small ResNet-18-style backbone (one block per stage, 16 channels) with a
3-level FPN, and fewer proposals and sampled ROIs than the COCO setting.
Measured on a quiet 2-core CPU: 1600 steps and four evaluations in 7.8
minutes (building the data set included), mask AP 0.879 (box AP 0.802) on
the validation split. Any field can be overridden. configs/maskrcnn_c4.py
is the same model with the ResNet-C4 ROI heads (res5 on 14x14 ROIs of res4,
14x14 masks) instead of the FPN ones.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "instance"  # Mask R-CNN: boxes, classes and a mask per instance.
    config.seed = 0  # Seeds initialization, data order, augmentation and ROI sampling.

    # Model: `name` picks the class, every other field is a constructor argument
    # of jfcnn.models.maskrcnn.MaskRCNN (see its docstring).
    config.model = ml_collections.ConfigDict()
    config.model.name = "maskrcnn"
    # ROI heads design: "fpn" (28x28 masks) or "c4" (res5 on res4 ROIs, 14x14 masks).
    config.model.roi_heads = "fpn"
    config.model.depth = 18  # ResNet depth: block type (basic for 18/34) and default stages.
    config.model.stage_sizes = (1, 1, 1, 1)  # Blocks in res2..res5 (None: the depth's).
    config.model.width = 16  # Stem channels (64 in the standard ResNet).
    config.model.norm = "batch"  # "batch", "group" or "frozen_batch" (for pretrained weights).
    # Pretrained backbone: a torchvision ImageNet ResNet state dict (.pth, .safetensors or
    # .npz of resnet18/34/50/101 matching depth/stage_sizes/width), loaded at step 0 only.
    config.model.backbone_weights = ml_collections.config_dict.placeholder(str)
    # Backbone layers trained, from res5 down to the stem (0-5); None: 3 with
    # backbone_weights, 5 without (torchvision's defaults). The others get no updates.
    config.model.trainable_backbone_layers = ml_collections.config_dict.placeholder(int)
    config.model.frozen_batch_norm = False  # True: torchvision's FrozenBatchNorm2d in the backbone.
    config.model.fpn_channels = 32
    config.model.fpn_in_features = ("res2", "res3", "res4")  # -> P2..P4, plus P5 for the RPN.
    # One tuple of anchor sizes (pixels) per RPN level; shapes are 20-80 px at 128 px.
    config.model.anchor_sizes = ((16,), (32,), (64,), (128,))
    config.model.aspect_ratios = (0.5, 1.0, 2.0)
    config.model.rpn_pre_nms_top_n_train = 300  # Per level, before NMS.
    config.model.rpn_pre_nms_top_n_test = 150
    config.model.rpn_post_nms_top_n_train = 300  # Proposals per image.
    config.model.rpn_post_nms_top_n_test = 100
    config.model.rpn_batch_size_per_image = 256  # Anchors sampled for the RPN loss.
    config.model.roi_batch_size_per_image = 128  # ROIs sampled for the box head.
    config.model.roi_positive_fraction = 0.25
    config.model.mask_rois_per_image = 16  # Positive ROIs the mask head trains on.
    config.model.box_head_dim = 128
    config.model.mask_head_channels = 32
    config.model.mask_head_convs = 4
    config.model.roi_align = "gather"  # or "dense": same values as matrix products.
    # "align": ROI Align (Mask R-CNN); "pool": Fast R-CNN's ROI pooling (quantized bins, max).
    config.model.roi_pooler = "align"
    config.model.detections_per_image = 50
    config.model.dtype = "float32"  # Compute dtype; "bfloat16" on TPU/GPU.

    # Data: see jfcnn/data. "jfcnn_shapes" is generated locally on first use.
    config.data = ml_collections.ConfigDict()
    config.data.name = "jfcnn_shapes"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS default.
    config.data.image_size = 128  # Must be a multiple of 32.
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.shuffle_buffer = 2048
    config.data.augment = True  # Random flip and scale/crop, same for image and masks.
    config.data.scale_range = (0.8, 1.25)
    config.data.max_instances = 8  # Ground truth is padded to this many instances.
    config.data.cache = True  # Keep decoded examples in memory (small data sets).

    # Loss: the sum of the RPN, box and mask terms (see jfcnn.instance.LOSS_TERMS).
    config.loss = ml_collections.ConfigDict()

    # Optimization.
    config.batch_size = 8  # Global batch size, split over all devices.
    config.num_train_steps = 1600
    config.optimizer = "adam"  # "adam", "adamw" or "sgd".
    config.learning_rate = 2e-3
    config.lr_schedule = "warmup_cosine"  # "constant", "cosine" or "warmup_cosine".
    config.warmup_steps = 50
    config.momentum = 0.9  # Only for sgd.
    config.weight_decay = 1e-4  # Only for adamw.
    config.grad_clip_norm = 5.0  # 0 disables clipping.
    config.parallelism = "jit"  # "jit" (sharded batch, recommended) or "pmap".

    # Bookkeeping.
    config.log_every_steps = 50
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 4
    config.num_eval_images = 8  # Pictures written to TensorBoard and eval/.
    return config
