"""Oxford-IIIT Pet from TFDS (``oxford_iiit_pet``): semantic segmentation only.

The pipeline reads ``image`` and the trimap ``segmentation_mask`` (1 pet,
2 background, 3 border, i.e. the not classified outline of the pet), which
become class ids 0, 1, 2. There are no instance annotations.

Prepare the data set on a machine with internet::

    tfds build oxford_iiit_pet --data_dir=DIR

and train with ``--config.data.data_dir=DIR`` and ``config.data.eval_split="test"``
(the data set has no validation split).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from jfcnn.data import registry

CLASS_NAMES = ("pet", "background", "border")


def _decoding(decode: bool, instances: bool) -> tfds.decode.PartialDecoding:
    """The features the pipeline reads; images stay encoded unless ``decode``."""
    del instances  # There are none.
    decoders = None
    if not decode:
        decoders = {
            "image": tfds.decode.SkipDecoding(),
            "segmentation_mask": tfds.decode.SkipDecoding(),
        }
    return tfds.decode.PartialDecoding(
        {"image": True, "segmentation_mask": True}, decoders=decoders
    )


def _to_common(builder: tfds.core.DatasetBuilder, *, decoded: bool, instances: bool):
    """The map from an ``oxford_iiit_pet`` example to the common form (``jfcnn.data.registry``)."""
    del instances
    features = builder.info.features

    def decode(name, value):
        return value if decoded else features[name].decode_example(value)

    def fn(example):
        return {
            "image": decode("image", example["image"]),
            "label_maps": decode("segmentation_mask", example["segmentation_mask"]),
        }

    return fn


SPEC = registry.register(
    registry.DatasetSpec(
        name="oxford_iiit_pet",
        class_names=CLASS_NAMES,
        has_instances=False,
        decoding=_decoding,
        to_common=_to_common,
        # Trimap 1, 2, 3 -> class ids 0, 1, 2 (zero padding becomes -1).
        label_offset=1,
    )
)
