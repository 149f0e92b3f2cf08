"""U-Net on Oxford-IIIT Pet (trimap: pet, background, border) from TFDS.

Needs the prepared data set (no download happens during training):

    tfds build oxford_iiit_pet --data_dir ~/tensorflow_datasets   # on a machine with internet
    python train.py --config configs/unet_pets.py --workdir runs/unet_pets \
        --config.data.data_dir ~/tensorflow_datasets

On a TPU VM or GPU, add `--config.model.dtype=bfloat16`.
"""

import ml_collections

from configs import unet


def get_config() -> ml_collections.ConfigDict:
    config = unet.get_config()
    config.data.name = "oxford_iiit_pet"
    config.data.image_size = 128
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.shuffle_buffer = 1024
    config.data.cache = False
    config.data.augment = True  # Long runs on real photos need the flip and scale/crop.
    config.model.depth = 4
    config.model.base_width = 32
    config.batch_size = 32
    config.num_train_steps = 10_000
    config.learning_rate = 1e-3
    config.warmup_steps = 500
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 1000
    return config
