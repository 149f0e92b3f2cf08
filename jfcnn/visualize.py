"""Pictures for TensorBoard, evaluation and input checks; the one home of jfcnn's colors.

Semantic masks (`segmentation_panel`: input | ground truth | prediction),
instances (`instance_panel`: a color per instance, its mask, box, class and
score) and input batches (`save_preview`). Class colors come from `palette`,
instance colors from `instance_color`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

_FONTS = threading.local()


def _default_font() -> Any:
    """Pillow's built-in bitmap font, loaded once per thread.

    The bitmap font (``load_default_imagefont``; what ``load_default`` gave
    before Pillow 10.1) needs no font file and draws a label ten times as fast
    as the FreeType font ``load_default`` returns now: an overlay of a hundred
    detections costs 4 ms of text instead of 45. A font is not shared between
    threads.
    """
    font = getattr(_FONTS, "font", None)
    if font is None:
        from PIL import ImageFont

        load = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
        font = _FONTS.font = load()
    return font


def palette(num_colors: int) -> np.ndarray:
    """A fixed ``(num_colors, 3)`` uint8 palette; color 0 (background) is black."""
    rng = np.random.default_rng(0)
    colors = rng.integers(64, 256, size=(max(num_colors, 1), 3), dtype=np.uint8)
    base = np.array(
        [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]],
        np.uint8,
    )
    colors[: min(len(base), num_colors)] = base[:num_colors]
    return colors


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (or uint8) to uint8 ``(H, W, 3)``."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    num_classes: int,
    alpha: float = 0.5,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Blends class colors of ``mask (H, W)`` over ``image``; class 0 stays unpainted.

    A pixel ``v`` of a class of color ``c`` becomes ``round((1 - alpha) * v +
    alpha * c)`` (float32); classes above ``num_classes - 1`` get its color.
    ``out``, an (H, W, 3) uint8 array (or a view into a larger picture),
    receives the result if given.
    """
    image8 = to_uint8(image)
    colors = palette(num_classes)  # max(num_classes, 1) colors
    last = len(colors) - 1
    # The blend of every (channel, class, pixel value), computed by the formula above in
    # float32: then each pixel is one lookup, with no float image temporaries. Table
    # row 0 is unpainted (the pixel itself), row k the color of class min(k, last),
    # so that a pixel's row is its class clipped to 0..last + 1.
    levels = np.arange(256, dtype=np.float32)
    table = np.empty((3, last + 2, 256), np.uint8)
    table[:, 0] = levels.astype(np.uint8)
    row_colors = colors[np.minimum(np.arange(1, last + 2), last)].astype(np.float32)
    table[:, 1:] = np.round((1 - alpha) * levels + alpha * row_colors.T[:, :, None])
    if out is None:
        out = np.empty(image8.shape, np.uint8)
    mask = np.asarray(mask)
    if last + 2 <= 256:
        # (row, value) fits 16 bits: one uint16 index per pixel, one lookup per channel.
        index = np.clip(mask, 0, last + 1).astype(np.uint16) << 8
        for c in range(3):
            np.take(table[c].reshape(-1), index | image8[..., c], out=out[..., c])
        return out
    row = np.clip(mask, 0, last + 1).astype(np.int32) * 256
    for c in range(3):
        np.take(table[c].reshape(-1), row + image8[..., c], out=out[..., c])
    return out


def segmentation_panel(
    image: np.ndarray, label: np.ndarray, prediction: np.ndarray, num_classes: int
) -> np.ndarray:
    """``(H, 3W + 4, 3)`` uint8: input | ground truth overlay | prediction overlay."""
    image8 = to_uint8(image)
    gap = np.full((image8.shape[0], 2, 3), 255, np.uint8)
    return np.concatenate(
        [
            image8,
            gap,
            overlay(image8, label, num_classes),
            gap,
            overlay(image8, prediction, num_classes),
        ],
        axis=1,
    )


def save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(to_uint8(image)).save(path)


# Distinct, saturated colors for instances (a fixed color per instance index).
_INSTANCE_COLORS = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
        [255, 250, 200],
        [128, 0, 0],
        [170, 255, 195],
        [128, 128, 0],
        [255, 215, 180],
        [0, 0, 128],
        [128, 128, 128],
    ],
    np.uint8,
)


def instance_color(index: int) -> np.ndarray:
    """The ``(3,)`` uint8 color of instance slot ``index`` (the palette repeats after 20)."""
    return _INSTANCE_COLORS[index % len(_INSTANCE_COLORS)]


def _auto_scale(height: int, width: int) -> int:
    # Labels in the default font are ~10 px tall: small images get enlarged so
    # that text does not cover the objects it names.
    return int(max(1, min(4, 256 // max(height, width, 1))))


def draw_instances(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray,
    valid: np.ndarray,
    class_names: Sequence[str],
    scores: np.ndarray | None = None,
    *,
    scale: int = 1,
    alpha: float = 0.5,
    regions: np.ndarray | None = None,
) -> np.ndarray:
    """Draws instances over an image: tinted masks, box outlines and labels.

    Letters: H, W image size, N instance slots.

    Instance slot ``n`` gets `instance_color` ``(n)``: its mask pixels are
    blended with it, its box is outlined in it and its label ("class" or
    "class score") is written in a box of that color at the box's top-left
    corner. A pixel is blended once, with the color of the first valid slot
    whose mask covers it (detections come in descending score order, so where
    masks overlap the most confident one shows), as Pillow blends: in integers,
    with ``m = round(255 * alpha)`` a channel value ``v`` becomes ``round((v *
    (255 - m) + color * m) / 255)``. The picture is first enlarged ``scale``
    times (nearest neighbour) so that text stays legible on small images.

    Args:
      image: (H, W, 3) float in [0, 1] or uint8.
      boxes: (N, 4) pixel-edge (x1, y1, x2, y2) in ``image`` coordinates.
      classes: (N,) int class ids, indices into ``class_names``.
      masks: (N, H, W) 0/1 or bool; with ``regions``, mask ``n`` may also be
        given as its region only (N arrays of the regions' shapes).
      valid: (N,) bool; only these slots are drawn.
      class_names: name of each class id.
      scores: optional (N,) float, appended to the labels.
      scale: integer enlargement factor.
      alpha: mask tint strength.
      regions: optional (N, 4) ``(row0, row1, col0, col1)``: mask ``n`` is 0
        outside those rows and columns (as `jfcnn.tasks.instance.detections_in_original`
        returns them), so that only they are searched: a mask costs its region,
        not the image.

    Returns:
      (scale * H, scale * W, 3) uint8.

    >>> picture = draw_instances(np.zeros((64, 64, 3)), np.array([[8, 8, 40, 30]]),
    ...                          np.array([1]), np.ones((1, 64, 64)), np.array([True]),
    ...                          ["background", "cat"], np.array([0.9]), scale=4)
    >>> picture.shape
    (256, 256, 3)
    """
    from PIL import Image, ImageDraw

    image8 = to_uint8(image)
    height, width = image8.shape[:2]
    num = len(valid)
    masks_shape = np.shape(masks) if regions is None else (len(masks), height, width)
    if boxes.shape != (num, 4) or classes.shape != (num,) or masks_shape != (num, height, width):
        raise ValueError(
            f"Expected boxes (N, 4), classes (N,), masks (N, H, W) with N={num} and "
            f"(H, W)={(height, width)}; got {boxes.shape}, {classes.shape}, {masks_shape}"
        )
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    slots = [int(n) for n in np.flatnonzero(valid)]

    # Each pixel is tinted once, with the color of the first slot whose mask covers
    # it: a map of priorities (the first slot highest, 0 for none) is the maximum
    # of the masks times their slot's priority, a region each; then one masked
    # paste blends the priorities' colors in integers.
    dtype = np.min_scalar_type(len(slots))  # uint8 up to 255 slots.
    priority = np.zeros((height, width), dtype)
    for k, n in enumerate(slots):
        mask = np.asarray(masks[n])
        rows, cols = slice(0, height), slice(0, width)
        if regions is not None:  # The mask's region is given: clip it to the image.
            row0, row1, col0, col1 = (int(v) for v in regions[n])
            rows = slice(max(row0, 0), min(row1, height))
            cols = slice(max(col0, 0), min(col1, width))
            if mask.shape == (row1 - row0, col1 - col0):  # The region's crop: its part inside.
                mask = mask[
                    rows.start - row0 : rows.stop - row0, cols.start - col0 : cols.stop - col0
                ]
            else:  # A full mask.
                mask = mask[rows, cols]
        inside = priority[rows, cols]
        np.maximum(inside, np.multiply(mask != 0, len(slots) - k, dtype=dtype), out=inside)
    canvas = Image.fromarray(image8)
    if slots:
        colors = np.zeros((max(256, len(slots) + 1), 3), np.uint8)
        colors[len(slots) : 0 : -1] = [instance_color(n) for n in slots]
        if dtype == np.uint8:  # A palette image: Pillow looks the colors up.
            tint = Image.frombytes("P", (width, height), priority.tobytes())
            tint.putpalette(colors.tobytes())
            tint = tint.convert("RGB")
        else:
            tint = Image.fromarray(np.take(colors, priority, axis=0))
        weight = np.multiply(priority != 0, int(round(float(alpha) * 255)), dtype=np.uint8)
        canvas.paste(tint, (0, 0), Image.fromarray(weight))
    if scale > 1:
        canvas = canvas.resize((scale * width, scale * height), Image.NEAREST)

    draw = ImageDraw.Draw(canvas)
    font = _default_font()
    line_width = max(1, scale // 2)
    for n in slots:
        color = tuple(int(c) for c in instance_color(n))
        x1, y1, x2, y2 = (float(v) * scale for v in boxes[n])
        # Pixel-edge box: the outline covers the boundary pixels inside it (a box
        # under a pixel wide or high, which a detector may give, draws one pixel).
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=color, width=line_width)
    for n in slots:
        color = tuple(int(c) for c in instance_color(n))
        class_id = int(classes[n])
        name = class_names[class_id] if 0 <= class_id < len(class_names) else str(class_id)
        text = name if scores is None else f"{name} {float(scores[n]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left + 2, bottom - top + 2
        x = min(max(float(boxes[n, 0]) * scale, 0.0), max(scale * width - text_w, 0))
        y = min(max(float(boxes[n, 1]) * scale, 0.0), max(scale * height - text_h, 0))
        draw.rectangle([x, y, x + text_w - 1, y + text_h - 1], fill=color)
        # Dark text on light colors, light text on dark ones.
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        text_color = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        draw.text((x + 1 - left, y + 1 - top), text, fill=text_color, font=font)
    return np.asarray(canvas)


def instance_panel(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    valid: np.ndarray,
    class_names: Sequence[str],
    *,
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    gt_masks: np.ndarray,
    gt_valid: np.ndarray,
    score_threshold: float = 0.0,
    scale: int | None = None,
) -> np.ndarray:
    """``(s H, 3 s W + 8, 3)`` uint8: input | ground-truth instances | predicted instances.

    Letters: H, W image size, D detection slots, M ground-truth slots,
    s = ``scale``.

    Each instance is drawn by `draw_instances` (color per slot index, tinted
    mask, box, label; predictions labelled "class score").

    Args:
      image: (H, W, 3) float in [0, 1] or uint8.
      boxes: (D, 4) predicted pixel-edge (x1, y1, x2, y2).
      classes: (D,) int predicted class ids.
      scores: (D,) float.
      masks: (D, H, W) predicted 0/1 masks.
      valid: (D,) bool detection validity.
      class_names: name of each class id (index 0: background).
      gt_boxes, gt_classes, gt_masks, gt_valid: the ground truth, shaped like
        the predictions with M slots.
      score_threshold: detections scoring below it are not drawn.
      scale: enlargement factor; None picks 4 for images up to 64 px, 2 up to
        128 px, 1 from 256 px.

    Returns:
      The panel, uint8.
    """
    image8 = to_uint8(image)
    height, width = image8.shape[:2]
    if scale is None:
        scale = _auto_scale(height, width)
    scores = np.asarray(scores, np.float32)
    shown = np.asarray(valid, bool) & (scores >= score_threshold)
    truth = draw_instances(
        image8,
        gt_boxes,
        gt_classes,
        gt_masks,
        np.asarray(gt_valid, bool),
        class_names,
        scale=scale,
    )
    prediction = draw_instances(
        image8, boxes, classes, masks, shown, class_names, scores, scale=scale
    )
    enlarged = np.repeat(np.repeat(image8, scale, axis=0), scale, axis=1)
    gap = np.full((scale * height, 4, 3), 255, np.uint8)
    return np.concatenate([enlarged, gap, truth, gap, prediction], axis=1)


def save_preview(
    batch: dict[str, np.ndarray],
    path: str,
    max_examples: int = 8,
    *,
    class_names: Sequence[str] = (),
) -> str:
    """Saves a PNG to eyeball an input batch: one row per example.

    Letters: B examples, S image size, M instance slots.

    Columns: the image; the semantic mask in `palette` colors (class ids taken
    modulo the palette size, so a negative id is colored too); with instances,
    the image with each valid instance drawn by `draw_instances` (tinted mask,
    box outline and class label).

    Args:
      batch: a batch from ``jfcnn.data.create_train_iterator`` /
        ``create_eval_iterator``: ``image`` (B, S, S, 3) in [0, 1], ``mask``
        (B, S, S) int; optionally ``boxes`` (B, M, 4), ``labels`` (B, M),
        ``instance_masks`` (B, M, S, S) and ``instance_valid`` (B, M).
      path: output PNG path.
      max_examples: number of rows.
      class_names: name of each class id, for the instance labels (ids are
        written as numbers without them).

    Returns:
      ``path``.
    """
    from PIL import Image

    num_rows = min(max_examples, len(batch["image"]))
    num_colors = max(len(class_names), int(np.max(batch["mask"][:num_rows], initial=0)) + 1)
    colors = palette(num_colors)
    rows = []
    for i in range(num_rows):
        image = to_uint8(batch["image"][i])
        panels = [image, colors[np.mod(batch["mask"][i], len(colors))]]
        if "instance_masks" in batch:
            panels.append(
                draw_instances(
                    image,
                    batch["boxes"][i],
                    batch["labels"][i],
                    batch["instance_masks"][i],
                    batch["instance_valid"][i],
                    class_names,
                )
            )
        rows.append(np.concatenate(panels, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


# ---------------------------------------------------------------------------
# Legends (prediction overlays)

_LEGEND_MARGIN = 4  # Pixels around the legend and between its rows.


def legend(names: Sequence[str], colors: np.ndarray) -> np.ndarray:
    """A white ``(h, w, 3)`` uint8 panel listing ``names``, one row each, after a color swatch.

    Drawn with Pillow's built-in bitmap font (`_default_font`), so
    it needs no font file. ``colors`` is ``(len(names), 3)`` uint8. With no
    names the panel is a small empty white square.
    """
    from PIL import Image, ImageDraw

    colors = np.asarray(colors, np.uint8).reshape(-1, 3)
    if len(colors) != len(names):
        raise ValueError(f"legend: {len(names)} names but {len(colors)} colors")
    font = _default_font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), str(name), font=font) for name in names]
    # One row height for all names, so that rows line up whatever letters they hold.
    row = max([bottom - top for _, top, _, bottom in boxes] + [8]) + 2
    swatch = row
    text_width = max([right - left for left, _, right, _ in boxes], default=0)
    width = 2 * _LEGEND_MARGIN + swatch + _LEGEND_MARGIN + text_width
    height = _LEGEND_MARGIN + len(names) * (row + _LEGEND_MARGIN)
    panel = Image.new("RGB", (max(width, 2 * _LEGEND_MARGIN), max(height, 2 * _LEGEND_MARGIN)))
    panel.paste((255, 255, 255), (0, 0, *panel.size))
    draw = ImageDraw.Draw(panel)
    for i, (name, color, box) in enumerate(zip(names, colors, boxes, strict=True)):
        y = _LEGEND_MARGIN + i * (row + _LEGEND_MARGIN)
        x = _LEGEND_MARGIN
        draw.rectangle(
            [x, y, x + swatch - 1, y + row - 1],
            fill=tuple(int(c) for c in color),
            outline=(0, 0, 0),
        )
        text_xy = (x + swatch + _LEGEND_MARGIN - box[0], y + 1 - box[1])
        draw.text(text_xy, str(name), fill=(0, 0, 0), font=font)
    return np.asarray(panel)


def with_legend(picture: np.ndarray, names: Sequence[str], colors: np.ndarray) -> np.ndarray:
    """``picture`` with a `legend` of ``names`` to its right (white fills the shorter side).

    Returns ``(max(H, h), W + w, 3)`` uint8: the picture stays top-left, pixel
    for pixel, so its coordinates are those of the input.
    """
    picture = to_uint8(picture)
    out, left = _legend_canvas(picture.shape[:2], names, colors)
    left[...] = picture
    return out


def _legend_canvas(
    size: Sequence[int], names: Sequence[str], colors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The `with_legend` picture of an (H, W) image, legend drawn, and a view of its
    image part for the caller to fill (no copy of the image)."""
    height, width = (int(n) for n in size)
    panel = legend(names, colors)
    out = np.empty((max(height, panel.shape[0]), width + panel.shape[1], 3), np.uint8)
    out[height:, :width] = 255
    out[: panel.shape[0], width:] = panel
    out[panel.shape[0] :, width:] = 255
    return out, out[:height, :width]


def semantic_overlay(
    image: np.ndarray, classes: np.ndarray, class_names: Sequence[str], alpha: float = 0.5
) -> np.ndarray:
    """``image`` with the classes of ``classes (H, W)`` tinted (`overlay`) and a legend.

    The legend names the classes present in ``classes`` other than class 0
    (background, left untinted), in `palette` colors; the picture's first
    ``W`` columns are the tinted image at its own size.
    """
    num_classes = len(class_names)
    classes = np.asarray(classes)
    # Counting beats sorting (np.unique); out-of-range values fall in the bins left out.
    counts = np.bincount(np.clip(classes, 0, max(num_classes, 1)).ravel())
    present = [k for k in range(1, min(num_classes, len(counts))) if counts[k]]
    colors = palette(num_classes)
    names = [class_names[k] for k in present]
    out, left = _legend_canvas(classes.shape[:2], names, colors[present])
    overlay(image, classes, num_classes, alpha, out=left)
    return out
