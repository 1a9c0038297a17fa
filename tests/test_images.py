"""The one image module: decode errors name the file; the stored PNG is exact and readable."""

import hashlib
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A 65-byte PNG whose header claims width x height pixels (no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + images._png_chunk(b"IHDR", ihdr)
            + images._png_chunk(b"IDAT", zlib.compress(b"")) + images._png_chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20000, 10000])  # over 2x Pillow's limit: its error; over 1x: its warning
def test_decompression_bomb_names_file_and_claimed_size(tmp_path, side):
    path = tmp_path / "0001_c1s1_000001_00.png"
    path.write_bytes(huge_png(side, side))
    for action in ("error", "ignore"):  # Pillow's warning raised (as images.py sets it), or silenced
        with warnings.catch_warnings():
            warnings.simplefilter(action, Image.DecompressionBombWarning)
            with pytest.raises(images.ImageError) as e:
                images.read_image(path)
        assert str(e.value) == (f"{path}: its header claims a {side}x{side} image ({side * side:,} pixels), "
                                f"over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels; remove or resize it")


def test_empty_and_unreadable_files_are_named(tmp_path, monkeypatch):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(images.ImageError, match=r"empty.jpg: empty file \(0 bytes\); replace or remove it$"):
        images.read_image(empty)
    with pytest.raises(images.ImageError, match=r"no image data \(0 bytes\)"):
        images.decode(b"", "table.parquet:0001_c1")

    locked = tmp_path / "locked.jpg"
    Image.new("RGB", (4, 8)).save(locked)
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads it anyway: fail the read as it fails for a user
        real = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(self))) if self == locked else real(self))
    with pytest.raises(images.ImageError, match=r"locked.jpg: permission denied; make it readable"):
        images.read_image(locked)


def test_query_with_a_huge_probe_is_one_error_line(tmp_path, capsys):
    """`lrreid query`: the probe goes through read_image too (checked before the model loads)."""
    from pipelines.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("")  # a local model folder; never loaded
    (tmp_path / "gallery").mkdir()
    Image.new("RGB", (8, 16)).save(tmp_path / "gallery" / "0001_c1s1_000001_00.png")
    probe = tmp_path / "probe.png"
    probe.write_bytes(huge_png())
    assert main(["query", "--model", str(tmp_path / "model"), "--gallery", str(tmp_path / "gallery"), str(probe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lrreid query: error: {probe}: its header claims a 20000x20000 image (400,000,000 pixels), "
                   f"over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels; remove or resize it"], err
