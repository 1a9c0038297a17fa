"""The one image module: decode errors name the file; the stored PNG is exact and readable."""

import hashlib

import numpy as np
import pytest

from components import images


def test_stored_png_roundtrip_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(300, 250, 3), dtype=np.uint8)  # > 65535 bytes: several blocks
    png = images.encode_png_stored(x)
    np.testing.assert_array_equal(images.decode(png), x)
    assert png == images.encode_png_stored(x.copy())
    # the bytes depend only on the pixels: pinned digest of a fixed tiny image
    tiny = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert hashlib.md5(images.encode_png_stored(tiny)).hexdigest() == "2351d610a2a768f37e11f1bc7d13c43d"
    np.testing.assert_array_equal(images.decode(images.encode_png_stored(tiny)), tiny)


def test_truncated_image_names_the_file(tmp_path):
    x = np.full((20, 10, 3), 128, np.uint8)
    path = tmp_path / "0001_c1s1_000001_00.png"
    path.write_bytes(images.encode_png(x)[:40])
    with pytest.raises(images.ImageError, match="0001_c1s1_000001_00.png"):
        images.read_image(path)
    with pytest.raises(images.ImageError, match="cannot read"):
        images.read_image(tmp_path / "missing.png")


def test_gray_and_rgba_become_rgb():
    assert images.from_array(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert images.from_array(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(images.ImageError, match="dtype"):
        images.from_array(np.zeros((4, 5, 3), np.float32))


@pytest.mark.parametrize("r, expected", [(2, (64, 32)), (3, (42, 21)), (4, (32, 16)), (2.5, (51, 25))])
def test_downsample_sizes(r, expected):
    x = np.zeros((128, 64, 3), np.uint8)
    assert images.downsample(x, r).shape[:2] == expected
