"""jfcnn.data.images: one decoder of users' image files (modes, EXIF, bad files)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jfcnn.data import images


def test_sixteen_bit_images_scale_by_their_mode_not_their_values(tmp_path):
    # Two frames of one 16-bit series: a dark one (all values below 256) and a bright one.
    dark = np.array([[0, 100, 200], [255, 50, 0]], np.uint16)
    for name, values in (("dark.png", dark), ("bright.png", dark * 257)):
        Image.fromarray(values).save(tmp_path / name)
    got_dark = images.load_image(tmp_path / "dark.png")
    got_bright = images.load_image(tmp_path / "bright.png")
    np.testing.assert_array_equal(got_bright[..., 0], dark.astype(np.uint8))
    np.testing.assert_array_equal(got_dark[..., 0], np.round(dark / 257).astype(np.uint8))
    assert got_dark.shape == (2, 3, 3) and (got_dark[..., 0] == got_dark[..., 2]).all()


def test_exif_rotated_photo_is_upright(tmp_path):
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[0, 0] = 255  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    upright = images.load_image(tmp_path / "photo.png")
    assert upright.shape == (4, 2, 3)
    np.testing.assert_array_equal(upright, np.rot90(pixels, k=-1))


def test_unreadable_missing_and_oversized_files_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(images.ImageReadError, match=r"broken\.jpg: cannot be read"):
        images.load_image(tmp_path / "broken.jpg")
    with pytest.raises(images.ImageReadError, match=r"nothere\.png: no such file"):
        images.load_image(tmp_path / "nothere.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100: a "bomb"
    with pytest.raises(images.ImageReadError, match=r"big\.png: too large.*MAX_IMAGE_PIXELS"):
        images.load_image(tmp_path / "big.png")
