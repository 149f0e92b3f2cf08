"""Pure, jit-able, differentiable JAX ops used by jfcnn models.

This package imports only JAX and NumPy (never TensorFlow), so other JAX
projects can depend on it cheaply.
"""

from jfcnn.ops.anchors import anchor_strides, generate_anchors, grid_anchors, multilevel_anchors
from jfcnn.ops.boxes import (
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    min_size_mask,
)
from jfcnn.ops.conv_transpose import conv_transpose, conv_transpose_output_size
from jfcnn.ops.detection import (
    crop_mask_targets,
    match_boxes,
    paste_masks,
    sample_balanced,
    sample_rois,
    select_detections,
    select_proposals,
)
from jfcnn.ops.max_pool import max_pool
from jfcnn.ops.nms import batched_nms, nms
from jfcnn.ops.roi_align import (
    fpn_levels,
    multilevel_roi_align,
    multilevel_roi_align_dense,
    roi_align,
    roi_align_dense,
)
from jfcnn.ops.roi_pool import multilevel_roi_pool, roi_pool
