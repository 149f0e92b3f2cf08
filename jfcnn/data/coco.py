"""COCO 2017 instances from the TFDS ``coco/2017_panoptic`` data set.

The panoptic annotations store one PNG per image whose RGB pixels encode a
segment id, ``id = R + 256 G + 256**2 B`` (0: unlabeled), and one record per
segment in ``panoptic_objects`` (``id``, ``label``: index of the 133 panoptic
categories, ``is_crowd``, ...). Its categories come sorted by COCO id, so the
first 80 are the thing classes (COCO ids 1..90) and the other 53 stuff.

Importing this module registers its `SPEC` (``jfcnn.data.registry``). What the
pipeline makes of it (`to_common`, then ``jfcnn.data.pipeline``):

- Instances: the thing segments; instance mask = pixels of its segment id.
  Class id = panoptic label + 1 (1..80, names `THING_CLASS_NAMES`; 0 is
  background). Stuff segments and unlabeled pixels are background.
- Crowd segments (``is_crowd``, one region covering many objects) are not
  training instances: their slots come after all other instances, with
  ``instance_valid`` False and ``crowd`` True, their mask, box and label
  filled, so that COCO evaluation can ignore detections on them, as COCO's
  own evaluation does.
- The semantic ``mask`` is the thing class map (crowd regions included).
- Images keep their aspect ratio: the longer side is resized to
  ``config.data.image_size`` and the rest zero-padded (bottom and right).

Prepare the data set on a machine with internet (about 20 GB)::

    tfds build coco/2017_panoptic --data_dir=DIR

and train with ``--config.data.data_dir=DIR`` and ``config.data.cache=False``
(decoded COCO does not fit in memory).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from jfcnn.data import registry

THING_CLASS_NAMES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
NUM_THING_CLASSES = len(THING_CLASS_NAMES)
# COCO's category id of each thing class (ids 1..90 with ten unused), in the
# order of THING_CLASS_NAMES: what COCO files and results call the classes.
THING_CATEGORY_IDS = (
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
)
assert len(THING_CATEGORY_IDS) == NUM_THING_CLASSES
# Semantic class ids: 0 background (stuff, unlabeled, padding), then the things.
CLASS_NAMES = ("background", *THING_CLASS_NAMES)
# The instance index map is uint8; later segments are dropped.
MAX_SEGMENTS = 255
# Above every segment id (< 256**3); closes the sorted id table.
_ID_SENTINEL = 2**31 - 1


def segment_ids(panoptic_hw3: tf.Tensor) -> tf.Tensor:
    """(H, W) int32 segment ids ``R + 256 G + 256**2 B`` of an (H, W, 3) panoptic PNG."""
    rgb = tf.cast(panoptic_hw3, tf.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def decode_panoptic(
    panoptic_hw3: tf.Tensor,
    object_ids: tf.Tensor,
    object_labels: tf.Tensor,
    object_is_crowd: tf.Tensor,
) -> dict[str, tf.Tensor]:
    """Thing instances of one panoptic annotation, as maps over its pixels.

    Letters: H, W image size; O panoptic segments; N kept thing segments.

    Args:
      panoptic_hw3: (H, W, 3) uint8 panoptic PNG (segment id per pixel).
      object_ids: (O,) int segment ids.
      object_labels: (O,) int panoptic category indices (0..79 things).
      object_is_crowd: (O,) bool.

    Returns:
      ``label_maps`` (H, W, 2) uint8: channel 0 the class id of the thing at
      each pixel (label + 1; 0 for stuff and unlabeled), channel 1 the instance
      index (n + 1 for the n-th kept thing, 0 elsewhere); ``instance_labels``
      (N,) int32 class ids; ``instance_crowd`` (N,) bool. Things are kept in
      their order, non-crowd ones first, at most `MAX_SEGMENTS`.

    >>> png = tf.constant([[[7, 0, 0], [9, 0, 0]]], tf.uint8)  # (1, 2, 3): ids 7, 9
    >>> out = decode_panoptic(png, [7, 9], [0, 100], [False, False])
    >>> out["instance_labels"].numpy(), out["label_maps"][..., 1].numpy()  # 9 is stuff
    (array([1], dtype=int32), array([[1, 0]], dtype=uint8))
    """
    ids = tf.cast(object_ids, tf.int64)
    labels = tf.cast(object_labels, tf.int32)
    crowd = tf.cast(object_is_crowd, tf.bool)
    # Id 0 marks unlabeled pixels, never a segment.
    keep = tf.where((labels < NUM_THING_CLASSES) & (ids > 0))[:, 0]
    # Stable sort on the crowd flag: non-crowd things first, each group in order.
    keep = tf.gather(keep, tf.argsort(tf.cast(tf.gather(crowd, keep), tf.int32), stable=True))
    keep = keep[:MAX_SEGMENTS]
    kept_ids = tf.gather(ids, keep)
    instance_labels = tf.gather(labels, keep) + 1

    # Segment id -> instance index by binary search in the sorted kept ids.
    order = tf.argsort(kept_ids, stable=True)
    table = tf.concat([tf.gather(kept_ids, order), [_ID_SENTINEL]], axis=0)
    index_of_entry = tf.concat([tf.cast(order, tf.int32) + 1, [0]], axis=0)
    pixel_ids = tf.cast(segment_ids(panoptic_hw3), tf.int64)
    shape = tf.shape(pixel_ids)
    flat_ids = tf.reshape(pixel_ids, [-1])
    entry = tf.searchsorted(table, flat_ids, side="left", out_type=tf.int32)
    found = tf.equal(tf.gather(table, entry), flat_ids)
    index = tf.reshape(tf.where(found, tf.gather(index_of_entry, entry), 0), shape)
    semantic = tf.gather(tf.concat([[0], instance_labels], axis=0), index)
    return {
        "label_maps": tf.cast(tf.stack([semantic, index], axis=-1), tf.uint8),
        "instance_labels": instance_labels,
        "instance_crowd": tf.gather(crowd, keep),
    }


def partial_decoding(decode: bool, instances: bool = True) -> tfds.decode.PartialDecoding:
    """The features the pipeline reads; images stay encoded unless ``decode``.

    The same with or without ``instances``: the semantic mask is the thing
    class map, which needs the panoptic segments too.
    """
    del instances
    features = {
        "image": True,
        "panoptic_image": True,
        "panoptic_objects": {"id": True, "label": True, "is_crowd": True},
    }
    decoders = None
    if not decode:
        decoders = {
            "image": tfds.decode.SkipDecoding(),
            "panoptic_image": tfds.decode.SkipDecoding(),
        }
    return tfds.decode.PartialDecoding(features, decoders=decoders)


def check_class_names(names: list[str]) -> None:
    """Raises unless the stored panoptic categories start with `THING_CLASS_NAMES`.

    Names are only known once the data set is prepared (or mocked with its
    metadata); the defaults "0", "1", ... of an unprepared builder pass.
    """
    if list(names[:3]) == ["0", "1", "2"]:
        return
    if tuple(names[:NUM_THING_CLASSES]) != THING_CLASS_NAMES:
        raise ValueError(
            "coco/2017_panoptic: expected the first 80 panoptic categories to be the COCO "
            f"thing classes {THING_CLASS_NAMES[:3]}..., got {list(names[:NUM_THING_CLASSES])}"
        )


def to_common(
    builder: tfds.core.DatasetBuilder, *, decoded: bool, instances: bool = True
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Returns the map from a ``coco/2017_panoptic`` example to the pipeline's common form.

    The form (see ``jfcnn.data.registry``): ``image`` (H, W, 3) uint8 and the
    outputs of `decode_panoptic`, instance fields included even without
    ``instances`` (the pipeline drops them; decoding them is the semantic map's cost).
    """
    del instances
    features = builder.info.features
    check_class_names(features["panoptic_objects"]["label"].names)

    def decode(name, value):
        return value if decoded else features[name].decode_example(value)

    def fn(example):
        objects = example["panoptic_objects"]
        return {
            "image": decode("image", example["image"]),
            **decode_panoptic(
                decode("panoptic_image", example["panoptic_image"]),
                objects["id"],
                objects["label"],
                objects["is_crowd"],
            ),
        }

    return fn


def classes(builder: tfds.core.DatasetBuilder) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Class names and COCO category ids (0 for the background), for the work directory."""
    del builder  # COCO's categories are fixed.
    return CLASS_NAMES, (0, *THING_CATEGORY_IDS)


SPEC = registry.register(
    registry.DatasetSpec(
        name="coco/2017_panoptic",
        class_names=CLASS_NAMES,
        has_instances=True,
        decoding=partial_decoding,
        to_common=to_common,
        keep_aspect=True,
        classes=classes,
    )
)
