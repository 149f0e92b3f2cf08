"""Reading the user's image files: one decoder for training data, evaluation and prediction.

Every image that comes from a user's files (``folder`` and ``coco_json``
data sets, ``python -m jfcnn.predict``) is decoded here, by Pillow, so a
model sees a photo with the same pixels whether it was in its training set or
is predicted on later. Photos are turned upright as a viewer shows them (EXIF
orientation); grayscale, palette, RGBA, CMYK and 16-bit images become 8-bit
RGB.

This module imports no TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np

from jfcnn.errors import UserError

# What `find_images` collects from a directory (what Pillow reads; lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class ImageReadError(UserError, OSError):
    """An image file that cannot be read; the message names the file."""


def to_rgb8(image) -> np.ndarray:
    """A Pillow image as an (H, W, 3) uint8 RGB array.

    Integer grayscale images of more than 8 bits (Pillow's modes ``I;16*``
    and ``I``, which is how Pillow opens 16-bit PNGs) are scaled from the
    16-bit range, 0..65535 to 0..255, by their mode and never by their
    values, so that the frames of one series keep their relative brightness;
    float images (``F``) are taken as [0, 1]. The alpha channel is dropped.
    """
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        values = values * 255.0 if mode == "F" else values / 257.0  # 65535 -> 255
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as (H, W, 3) uint8 RGB, upright as a viewer shows it.

    Raises:
      ImageReadError: naming the file, if it is missing or not an image Pillow reads.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return to_rgb8(image)
    except FileNotFoundError as e:
        raise ImageReadError(f"{os.fspath(path)}: no such file.") from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"{os.fspath(path)}: too large to decode safely ({e}). Tile or downscale it, or "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted."
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(
            f"{os.fspath(path)}: cannot be read as an image ({e}). Re-save it as PNG or JPEG, "
            "or remove it."
        ) from e


def find_images(directory: str | os.PathLike) -> list[str]:
    """The image files under ``directory`` (recursively, by extension), sorted."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.join(root, name))
    return found
