"""Tests of the instance pictures in jfcnn.visualize."""

from __future__ import annotations

import numpy as np
import pytest

from jfcnn import visualize

CLASS_NAMES = ("background", "circle", "square")
GRAY = 100


def one_instance(size: int = 48):
    """A gray image with one 30x26 instance (rows 14..43, cols 4..29) in slot 1 of 3."""
    image = np.full((size, size, 3), GRAY, np.uint8)
    masks = np.zeros((3, size, size), np.uint8)
    masks[1, 14:44, 4:30] = 1
    boxes = np.zeros((3, 4), np.float32)
    boxes[1] = [4, 14, 30, 44]
    classes = np.array([0, 2, 0], np.int32)
    valid = np.array([False, True, False])
    return image, boxes, classes, masks, valid


def tinted(color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An instance tint over GRAY: Pillow's integer blend, weight m = round(255 alpha)."""
    m = round(255 * alpha)
    return np.floor((GRAY * (255 - m) + color.astype(np.int64) * m) / 255 + 0.5).astype(np.uint8)


def test_instance_colors_are_fixed_per_slot():
    assert visualize.instance_color(1).tolist() != visualize.instance_color(0).tolist()
    np.testing.assert_array_equal(visualize.instance_color(3), visualize.instance_color(23))


@pytest.mark.parametrize("scale", [1, 3])
def test_draw_instances_tints_mask_and_outlines_box(scale):
    image, boxes, classes, masks, valid = one_instance()
    picture = visualize.draw_instances(
        image, boxes, classes, masks, valid, CLASS_NAMES, np.array([0.0, 0.5, 0.0]), scale=scale
    )
    assert picture.shape == (48 * scale, 48 * scale, 3) and picture.dtype == np.uint8
    color = visualize.instance_color(1)
    # The label (~13 px tall) sits at the top-left; below it, inside the outline,
    # every pixel is the tinted mask.
    inner = picture[scale * 14 + 14 : scale * 44 - 2, scale * 4 + 2 : scale * 30 - 2]
    np.testing.assert_array_equal(inner, np.broadcast_to(tinted(color), inner.shape))
    # Box outline: bottom row and right column of the box are pure instance color.
    bottom = picture[scale * 44 - 1, scale * 4 : scale * 30]
    right = picture[scale * 14 + 14 : scale * 44, scale * 30 - 1]
    np.testing.assert_array_equal(bottom, np.broadcast_to(color, bottom.shape))
    np.testing.assert_array_equal(right, np.broadcast_to(color, right.shape))
    # The label box is filled with the color at the top-left corner of the box.
    np.testing.assert_array_equal(picture[scale * 14 + 1, scale * 4 + 1], color)
    # Above and below the box nothing changes.
    np.testing.assert_array_equal(picture[: scale * 14], GRAY)
    np.testing.assert_array_equal(picture[scale * 44 :], GRAY)


def test_invalid_slots_are_not_drawn():
    image, boxes, classes, masks, valid = one_instance()
    picture = visualize.draw_instances(
        image, boxes, classes, masks, np.zeros(3, bool), CLASS_NAMES, scale=2
    )
    np.testing.assert_array_equal(picture, GRAY)


def test_instance_panel_layout_threshold_and_zero_detections():
    image, boxes, classes, masks, valid = one_instance(size=64)
    kwargs = dict(gt_boxes=boxes, gt_classes=classes, gt_masks=masks, gt_valid=valid)
    panel = visualize.instance_panel(
        image, boxes, classes, np.array([0.0, 0.9, 0.0]), masks, valid, CLASS_NAMES, **kwargs
    )
    # 64 px images are enlarged 4x: three 256-px panels and two 4-px white gaps.
    assert panel.shape == (256, 3 * 256 + 8, 3) and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[:, :256], GRAY)
    np.testing.assert_array_equal(panel[:, 256:260], 255)
    color = visualize.instance_color(1)
    truth, prediction = panel[:, 260:516], panel[:, 520:]
    for drawn in (truth, prediction):
        np.testing.assert_array_equal(drawn[4 * 40, 4 * 10], tinted(color))
    # Below the score threshold, or with no valid detection, the prediction
    # panel is the enlarged input.
    for scores, pred_valid in (([0.0, 0.2, 0.0], valid), ([0.0, 0.9, 0.0], np.zeros(3, bool))):
        panel = visualize.instance_panel(
            image,
            boxes,
            classes,
            np.array(scores),
            masks,
            pred_valid,
            CLASS_NAMES,
            score_threshold=0.5,
            **kwargs,
        )
        np.testing.assert_array_equal(panel[:, 520:], GRAY)
        np.testing.assert_array_equal(panel[4 * 40, 260 + 4 * 10], tinted(color))


def test_instance_panel_with_no_slots_at_all():
    image = np.zeros((16, 16, 3), np.float32)
    empty = dict(boxes=np.zeros((0, 4)), classes=np.zeros((0,), int), masks=np.zeros((0, 16, 16)))
    panel = visualize.instance_panel(
        image,
        empty["boxes"],
        empty["classes"],
        np.zeros((0,)),
        empty["masks"],
        np.zeros((0,), bool),
        CLASS_NAMES,
        gt_boxes=empty["boxes"],
        gt_classes=empty["classes"],
        gt_masks=empty["masks"],
        gt_valid=np.zeros((0,), bool),
        scale=2,
    )
    assert panel.shape == (32, 3 * 32 + 8, 3)
    np.testing.assert_array_equal(panel[:, :32], 0)


def test_shape_errors():
    image, boxes, classes, masks, valid = one_instance()
    with pytest.raises(ValueError, match=r"\(3, 48, 31\)"):
        visualize.draw_instances(image, boxes, classes, masks[..., :31], valid, CLASS_NAMES)


def preview_batch():
    """Two 48 px examples: a gray image, mask classes 0..2 (plus -1 in a corner), one instance."""
    image, boxes, classes, masks, valid = one_instance()
    mask = np.zeros((48, 48), np.int32)
    mask[14:44, 4:30] = 2
    mask[0:4, 40:48] = 1
    mask[44:, 44:] = -1  # Zero padding of oxford_iiit_pet becomes -1.
    stack = lambda x: np.stack([x, x])  # noqa: E731
    return {
        "image": stack(image / 255.0).astype(np.float32),
        "mask": stack(mask),
        "boxes": stack(boxes),
        "labels": stack(classes),
        "instance_masks": stack(masks),
        "instance_valid": stack(valid),
    }


def test_save_preview_columns(tmp_path):
    from PIL import Image

    batch = preview_batch()
    path = visualize.save_preview(
        batch, str(tmp_path / "preview.png"), max_examples=5, class_names=CLASS_NAMES
    )
    with Image.open(path) as png:
        picture = np.asarray(png.convert("RGB"))
    # Two rows (max_examples caps at the batch), three columns.
    assert picture.shape == (2 * 48, 3 * 48, 3)
    row = picture[48:]
    np.testing.assert_array_equal(row[:, :48], GRAY)
    # Semantic column: the shared palette, ids modulo its size (here 3 colors).
    colors = visualize.palette(3)
    np.testing.assert_array_equal(row[20, 48 + 10], colors[2])
    np.testing.assert_array_equal(row[1, 48 + 45], colors[1])
    np.testing.assert_array_equal(row[10, 48 + 10], colors[0])
    np.testing.assert_array_equal(row[46, 48 + 46], colors[-1 % 3])
    # Instance column: exactly `draw_instances` of the example.
    expected = visualize.draw_instances(
        batch["image"][1],
        batch["boxes"][1],
        batch["labels"][1],
        batch["instance_masks"][1],
        batch["instance_valid"][1],
        CLASS_NAMES,
    )
    np.testing.assert_array_equal(row[:, 96:], expected)
    np.testing.assert_array_equal(row[30, 96 + 10], tinted(visualize.instance_color(1)))


def test_save_preview_without_instances(tmp_path):
    from PIL import Image

    batch = {k: v for k, v in preview_batch().items() if k in ("image", "mask")}
    path = visualize.save_preview(batch, str(tmp_path / "preview.png"), max_examples=1)
    with Image.open(path) as png:
        picture = np.asarray(png.convert("RGB"))
    assert picture.shape == (48, 2 * 48, 3)
    np.testing.assert_array_equal(picture[20, 48 + 10], visualize.palette(3)[2])


def test_legend_rows_hold_swatch_colors_and_names():
    colors = np.array([[230, 25, 75], [0, 130, 200]], np.uint8)
    panel = visualize.legend(["circle", "a much longer class name"], colors)
    assert panel.dtype == np.uint8 and panel.ndim == 3
    # Each row starts with a swatch of its color (inside a black outline).
    rows = [r for r in range(panel.shape[0]) if np.array_equal(panel[r, 6], colors[0])]
    assert rows and all(np.array_equal(panel[r, 6], colors[0]) for r in rows)
    assert any(np.array_equal(panel[r, 6], colors[1]) for r in range(rows[-1] + 1, len(panel)))
    # Text is drawn (dark pixels right of the swatches); the longer name widens the panel.
    assert (panel[:, 24:] < 100).any()
    assert panel.shape[1] > visualize.legend(["circle", "x"], colors).shape[1]


def test_legend_draws_without_any_font_file():
    # Pillow's built-in font: no font file is looked up, whatever is installed.
    panel = visualize.legend(["only"], np.array([[1, 2, 3]], np.uint8))
    assert panel.shape[0] >= 8


def test_semantic_overlay_keeps_the_picture_and_names_present_classes():
    image = np.full((40, 30, 3), GRAY, np.uint8)
    classes = np.zeros((40, 30), np.int64)
    classes[10:20, 5:15] = 2
    picture = visualize.semantic_overlay(image, classes, CLASS_NAMES)
    np.testing.assert_array_equal(picture[:40, :30], visualize.overlay(image, classes, 3))
    legend = visualize.legend(["square"], visualize.palette(3)[[2]])
    assert picture.shape == (max(40, legend.shape[0]), 30 + legend.shape[1], 3)
    np.testing.assert_array_equal(picture[: legend.shape[0], 30:], legend)
    # White fills under the legend when the image is taller.
    np.testing.assert_array_equal(picture[legend.shape[0] :, 30:], 255)


# ---------------------------------------------------------------------------
# The fast paths (lookup-table tint, mask-confined instance tint) against loops.


def overlay_loop(image8: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float):
    """`visualize.overlay` pixel by pixel, by its docstring's float32 formula."""
    colors = visualize.palette(num_classes)
    out = image8.copy()
    for y, x in np.ndindex(mask.shape):
        if mask[y, x] > 0:
            color = colors[min(int(mask[y, x]), num_classes - 1)].astype(np.float32)
            value = np.float32(1 - alpha) * image8[y, x].astype(np.float32)
            out[y, x] = np.round(value + np.float32(alpha) * color).astype(np.uint8)
    return out


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.77])
@pytest.mark.parametrize("num_classes", [1, 3, 300])
def test_overlay_matches_the_pixel_loop(num_classes, alpha):
    rng = np.random.default_rng(num_classes)
    image = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    # Negative labels (padding) stay unpainted; labels past the last class get its color.
    mask = rng.integers(-2, num_classes + 3, (9, 13))
    want = overlay_loop(image, mask, num_classes, alpha)
    np.testing.assert_array_equal(visualize.overlay(image, mask, num_classes, alpha), want)
    # Float images in [0, 1] are rounded to 8 bits first.
    np.testing.assert_array_equal(
        visualize.overlay(image / 255.0, mask.astype(np.int16), num_classes, alpha), want
    )


def test_semantic_overlay_legend_names_only_classes_present():
    image = np.full((6, 6, 3), GRAY, np.uint8)
    classes = np.array([[0, 3, -1, 7, 3, 0]] * 6)  # 7 and -1 are no class of 4.
    picture = visualize.semantic_overlay(image, classes, ["bg", "a", "b", "c"])
    legend = visualize.legend(["c"], visualize.palette(4)[[3]])
    np.testing.assert_array_equal(picture[: legend.shape[0], 6:], legend)


def draw_loop(image8, masks, valid, alpha):
    """The tint of `draw_instances` (scale 1), written pixel by pixel from its definition.

    A pixel covered by a valid slot's mask takes the color of the first such
    slot, blended once in integers: weight ``m = round(255 alpha)``, rounding
    ``(v (255 - m) + color m) / 255``; other pixels keep their value.
    """
    tinted = image8.astype(np.int64)
    m = int(round(255 * alpha))
    for y in range(image8.shape[0]):
        for x in range(image8.shape[1]):
            covering = [n for n in np.flatnonzero(valid) if masks[n, y, x]]
            if covering:
                color = visualize.instance_color(covering[0]).astype(np.int64)
                blended = (tinted[y, x] * (255 - m) + color * m) / 255.0
                tinted[y, x] = np.floor(blended + 0.5)  # Never a tie: 255 is odd.
    return tinted.astype(np.uint8)


@pytest.mark.parametrize("alpha", [0.5, 0.35])
def test_instance_tint_matches_the_whole_image_loop(alpha):
    # Overlapping masks (the first slot's color shows); masks reach outside their
    # boxes, have holes, or are empty. Boxes and labels all sit in the top-left corner.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    masks = np.zeros((5, 40, 50), np.uint8)
    masks[0, 5:30, 10:45] = 1
    masks[1, 20:40, 0:25] = rng.random((20, 25)) < 0.6
    masks[2] = rng.random((40, 50)) < 0.1
    masks[4, 0, 49] = masks[4, 39, 0] = 1
    valid = np.array([True, True, True, True, False])
    boxes = np.tile([0.0, 0.0, 1.0, 1.0], (5, 1))
    drawn = visualize.draw_instances(
        image, boxes, np.zeros(5, int), masks, valid, ["x"], alpha=alpha
    )
    want = draw_loop(image, masks, valid, alpha)
    # Labels sit at the (clipped) top-left corner; compare below them.
    np.testing.assert_array_equal(drawn[14:], want[14:])
    np.testing.assert_array_equal(drawn[:, 20:], want[:, 20:])


def test_instance_regions_only_narrow_the_search():
    # Masks that are 0 outside their regions draw the same with and without them.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    regions = np.array([[5, 30, 10, 45], [20, 40, 0, 25], [0, 40, 0, 50], [3, 3, 7, 9]])
    masks = np.zeros((4, 40, 50), np.uint8)
    for n, (row0, row1, col0, col1) in enumerate(regions):
        masks[n, row0:row1, col0:col1] = rng.random((row1 - row0, col1 - col0)) < 0.5
    boxes = np.tile([30.0, 30.0, 40.0, 40.0], (4, 1))
    args = (image, boxes, np.zeros(4, int), masks, np.ones(4, bool), ["x"])
    want = visualize.draw_instances(*args)
    np.testing.assert_array_equal(visualize.draw_instances(*args, regions=regions), want)
    # Each mask given as its region only.
    crops = [m[r0:r1, c0:c1] for m, (r0, r1, c0, c1) in zip(masks, regions, strict=True)]
    args = (image, boxes, np.zeros(4, int), crops, np.ones(4, bool), ["x"])
    np.testing.assert_array_equal(visualize.draw_instances(*args, regions=regions), want)
    # The tint really is drawn (not only the labels): compare with the whole-image loop.
    np.testing.assert_array_equal(want[:25], draw_loop(image, masks, np.ones(4, bool), 0.5)[:25])


def test_more_than_255_slots_tint_as_the_loop():
    # Over 255 drawn slots the map of priorities needs 16 bits (and no palette).
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    masks = (rng.random((300, 12, 14)) < 0.01).astype(np.uint8)
    valid = rng.random(300) < 0.95
    assert valid.sum() > 255
    boxes = np.tile([0.0, 0.0, 1.0, 1.0], (300, 1))
    drawn = visualize.draw_instances(image, boxes, np.zeros(300, int), masks, valid, ["x"])
    want = draw_loop(image, masks, valid, 0.5)
    np.testing.assert_array_equal(drawn[:, 8:], want[:, 8:])  # Right of the labels.


def test_regions_past_the_image_edge_are_clipped():
    # A crop whose region runs past the image draws as its part inside the image.
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop = (rng.random((20, 25)) < 0.7).astype(np.uint8)
    region = np.array([[20, 40, -5, 20]])  # Rows 20..39 and columns -5..19.
    boxes = np.array([[30.0, 0.0, 31.0, 1.0]])  # Label in the top-right corner.
    drawn = visualize.draw_instances(
        image, boxes, np.zeros(1, int), [crop], np.ones(1, bool), ["x"], regions=region
    )
    full = np.zeros((1, 30, 40), np.uint8)
    full[0, 20:30, 0:20] = crop[:10, 5:]
    want = draw_loop(image, full, np.ones(1, bool), 0.5)
    np.testing.assert_array_equal(drawn[14:], want[14:])
    np.testing.assert_array_equal(drawn[:, :25], want[:, :25])
