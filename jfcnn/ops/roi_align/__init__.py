"""ROI Align with torchvision / detectron2 semantics for NHWC feature maps.

`roi_align` pools a fixed-size `(PH, PW)` grid of features from each box of a
feature map; `multilevel_roi_align` first assigns each box to a level of a
feature pyramid (FPN, `fpn_levels`) and pools from that level. Both are pure
functions that run under `jit`, `vmap` and `grad`, and both are
differentiable with respect to the features and the box coordinates
(reverse mode). A box with a NaN or infinite coordinate pools zeros with
zero gradients in every form; `roi_align`'s `index_mode` says what image
indices out of range do (clamped by default).

Two forms compute the same values:

* the gather form, `roi_align` and `multilevel_roi_align`: each bin reads
  only the few pixels its samples touch, so the work grows with the number of
  boxes and bins, not with the map size (the default everywhere);
* the dense form, `roi_align_dense` and `multilevel_roi_align_dense`: two
  small matrix products per box, with no gather or scatter, for matrix units
  and small maps; not differentiable with respect to the boxes.

Layout of this package: `_geometry` holds the sample positions and counts
both forms share (and the FPN level rule), `_kernel` the patch-gather kernel
with its custom VJP, `_gather` and `_dense` the two public forms.

The `aligned` defaults differ on purpose: `roi_align(aligned=True)` follows
detectron2's `ROIAlignV2` (half-pixel shift, the correct alignment), while
`multilevel_roi_align(aligned=False)` follows torchvision's
`MultiScaleRoIAlign`; see their docstrings.
"""

from jfcnn.ops.roi_align._dense import multilevel_roi_align_dense, roi_align_dense
from jfcnn.ops.roi_align._gather import multilevel_roi_align, roi_align
from jfcnn.ops.roi_align._geometry import fpn_levels

__all__ = [
    "fpn_levels",
    "multilevel_roi_align",
    "multilevel_roi_align_dense",
    "roi_align",
    "roi_align_dense",
]
