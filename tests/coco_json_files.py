"""A small COCO-format data set written to a directory, as annotation tools export them.

Shared by the ``coco_json`` data tests and the evaluation tests. It holds what
exports contain: polygons (an object in two parts), compressed and
uncompressed RLE, a crowd region (uncompressed RLE, as COCO stores them),
category ids that are neither contiguous nor listed in order, images of
several sizes and aspect ratios, and an image without objects.

``write_dataset(root)`` returns the paths and, per image, the masks that were
drawn, so tests compare against what was drawn, not against the code under
test.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# Category ids 7 and 3, listed out of order: class ids 1 = "square" (3), 2 = "disk" (7).
CATEGORIES = [{"id": 7, "name": "disk"}, {"id": 3, "name": "square"}]
CLASS_NAMES = ("background", "square", "disk")
CATEGORY_IDS = (0, 3, 7)
SQUARE, DISK = 3, 7
COLORS = {SQUARE: (220, 60, 40), DISK: (40, 90, 230)}
# (width, height) of the images of each split, in file order.
SIZES = {
    "train": [(80, 64), (64, 96), (72, 72), (96, 64), (64, 64), (80, 80), (64, 80), (88, 64)],
    "eval": [(80, 64), (64, 88), (72, 72), (64, 64)],
}
EMPTY_IMAGE = {"train": 4, "eval": 3}  # Index of the image without objects.
CROWD_IMAGE = {"train": 2, "eval": 2}  # Index of the image with a crowd region.


def _square(height: int, width: int, x: int, y: int, side: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + side, x : x + side] = 1
    return mask


def _disk(height: int, width: int, cx: float, cy: float, radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return (((rows + 0.5 - cy) ** 2 + (cols + 0.5 - cx) ** 2) <= radius**2).astype(np.uint8)


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths of 0s and 1s in column-major order."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _square_polygon(x: int, y: int, side: int) -> list[float]:
    # Pixel-edge corners; pycocotools rasterizes this to the same pixels as the square.
    return [x, y, x + side, y, x + side, y + side, x, y + side]


def _box(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] + 1 - cols[0]),
        float(rows[-1] + 1 - rows[0]),
    ]


def _image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(90, 140, size=(height, width, 3)).astype(np.uint8)


def make_split(split: str, seed: int) -> tuple[dict[str, Any], list[np.ndarray], list[list]]:
    """(COCO dict, images, drawn objects per image: (annotation id, category, mask, crowd))."""
    rng = np.random.default_rng(seed)
    images, records, annotations, drawn = [], [], [], []
    next_id = 100  # Annotation ids need not start at 1.
    for index, (width, height) in enumerate(SIZES[split]):
        image_id = 1000 + 7 * index  # Image ids are neither contiguous nor from 0.
        pixels = _image(height, width, rng)
        objects = []
        if index != EMPTY_IMAGE[split]:
            side = int(rng.integers(16, 24))
            x, y = int(rng.integers(2, width - side - 2)), int(rng.integers(2, height // 2 - 4))
            square = _square(height, width, x, y, side)
            radius = float(rng.uniform(8, 11))
            cx = float(rng.uniform(radius + 1, width - radius - 1))
            cy = float(rng.uniform(height // 2 + radius / 2, height - radius - 1))
            disk = _disk(height, width, cx, cy, radius)
            disk &= 1 - square
            # Alternate the encodings an export may use.
            if index % 2:
                polygon = [_square_polygon(x, y, side)]
            else:  # One object in two parts: the left and right halves.
                half = side // 2
                polygon = [
                    [x, y, x + half, y, x + half, y + side, x, y + side],
                    [x + half, y, x + side, y, x + side, y + side, x + half, y + side],
                ]
            disk_rle = _uncompressed_rle(disk) if index % 3 == 0 else _compressed_rle(disk)
            for category, mask, segmentation in (
                (SQUARE, square, polygon),
                (DISK, disk, disk_rle),
            ):
                objects.append((next_id, category, mask, False))
                annotations.append(
                    {
                        "id": next_id,
                        "image_id": image_id,
                        "category_id": category,
                        "segmentation": segmentation,
                        "area": float(mask.sum()),
                        "bbox": _box(mask),
                        "iscrowd": 0,
                    }
                )
                next_id += 1
            if index == CROWD_IMAGE[split]:  # A crowd of small squares, bottom-left.
                crowd = np.zeros((height, width), np.uint8)
                for cx0 in range(2, 20, 6):
                    crowd[height - 12 : height - 8, cx0 : cx0 + 4] = 1
                crowd &= 1 - (square | disk)
                objects.append((next_id, SQUARE, crowd, True))
                annotations.append(
                    {
                        "id": next_id,
                        "image_id": image_id,
                        "category_id": SQUARE,
                        "segmentation": _uncompressed_rle(crowd),
                        "area": float(crowd.sum()),
                        "bbox": _box(crowd),
                        "iscrowd": 1,
                    }
                )
                next_id += 1
            for _, category, mask, _ in objects:
                pixels[mask.astype(bool)] = COLORS[category]
        images.append(pixels)
        records.append(
            {"id": image_id, "file_name": f"img_{index:02d}.png", "width": width, "height": height}
        )
        drawn.append(objects)
    coco = {
        "info": {"description": "jfcnn test export"},
        "images": records,
        "categories": copy.deepcopy(CATEGORIES),
        "annotations": annotations,
    }
    return coco, images, drawn


def write_dataset(root: str) -> dict[str, Any]:
    """Writes ``root/{train,eval}.json`` and ``root/{train,eval}/img_NN.png``.

    Returns ``{"train_annotations", "train_images", "eval_annotations",
    "eval_images"}`` (the config.data values) plus ``"drawn"``: split -> per
    image the list of ``(annotation id, category id, mask, crowd)``, and
    ``"pixels"``: split -> the images.
    """
    out: dict[str, Any] = {"drawn": {}, "pixels": {}}
    for split, seed in (("train", 0), ("eval", 1)):
        coco, images, drawn = make_split(split, seed)
        image_dir = os.path.join(root, split)
        os.makedirs(image_dir, exist_ok=True)
        for record, pixels in zip(coco["images"], images, strict=True):
            Image.fromarray(pixels).save(os.path.join(image_dir, record["file_name"]))
        path = os.path.join(root, f"{split}.json")
        write_json(path, coco)
        out[f"{split}_annotations"] = path
        out[f"{split}_images"] = image_dir
        out["drawn"][split] = drawn
        out["pixels"][split] = images
    return out


def write_json(path: str, coco: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(coco, f)


def read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
