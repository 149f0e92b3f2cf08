"""U-Net semantic segmentation on your own images and masks (a folder; see jfcnn/data/folder.py).

The folder DIR holds `classes.txt` (one class name per line; line i is class
i), `train/images/`, `train/masks/`, `validation/images/` and
`validation/masks/`; a mask is an 8-bit grayscale or palette PNG of its
image's size whose pixel value is the class index (255: ignored). The first
run converts the folder into a TFDS data set (again only when its files
change):

    python train.py --config configs/unet_folder.py --workdir runs/mine \
        --config.data.folder=/path/to/DIR
    python -m jfcnn.evaluate --workdir runs/mine

The work directory remembers the folder (as an absolute path) for evaluation.
On a TPU VM or GPU, add `--config.model.dtype=bfloat16`.
"""

import ml_collections

from configs import unet


def get_config() -> ml_collections.ConfigDict:
    config = unet.get_config()
    config.data.name = "folder"
    config.data.folder = ml_collections.config_dict.placeholder(str)  # Required: DIR.
    config.data.ignore_label = 255  # Mask value left out of the loss and metrics.
    config.data.image_size = 128  # The longer side; the rest is zero-padded.
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.shuffle_buffer = 1024
    # Streamed from disk: a folder of any size fits in memory. Turn on for small
    # folders (a few hundred images) to skip PNG decoding after the first epoch.
    config.data.cache = False
    config.data.augment = True  # Real photos need the flip and scale/crop.
    config.model.depth = 4
    config.model.base_width = 32
    config.batch_size = 16
    config.num_train_steps = 5000
    config.learning_rate = 1e-3
    config.warmup_steps = 200
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    return config
