"""The one image loader and writer of the project.

Every image enters as bytes or a path and leaves as an ``HxWx3 uint8`` RGB numpy
array; every resize goes through :func:`resize` (Pillow bicubic, which works in
fixed point on 8-bit images and so gives the same bytes on every machine).

``encode_png`` is the compact encoder used for the Parquet tables;
``encode_png_stored`` writes PNGs whose deflate stream is made of stored blocks,
so its bytes depend on nothing but the pixels (no zlib version, no SIMD path):
the synthetic dataset uses it so that ``data/raw`` has the same md5 everywhere.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the image header says, read by the format's plugin past Pillow's pixel limit."""
    for factory, accept in Image.OPEN.values():
        try:
            ok = not accept or accept(data[:16])
            if ok and not isinstance(ok, str):
                with factory(io.BytesIO(data), "") as im:  # reads the header only
                    return im.size
        except Exception:
            continue
    return None


def decode(data: bytes, source: str | Path = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, BMP...) into an HxWx3 uint8 RGB array."""
    if not data:
        raise ImageError(f"{source}: no image data (0 bytes); replace or delete the file")
    try:
        # Pillow refuses images over 2 x MAX_IMAGE_PIXELS and only warns above MAX_IMAGE_PIXELS:
        # decode refuses those too (one error line naming the file, no warning, no huge decode)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{im.width}x{im.height}")
            im.load()  # force a full decode: truncated files fail here, not later
            rgb = im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = _claimed_size(data)
        claims = f"a {size[0]}x{size[1]} image ({size[0] * size[1]:,} pixels)" if size else "a huge image"
        raise ImageError(f"{source}: its header claims {claims}, over Pillow's limit of "
                         f"{Image.MAX_IMAGE_PIXELS:,} pixels; remove or resize it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(
            f"{source}: not a readable image ({exc}); replace or delete the file"
        ) from None
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"{source}: empty image of size {arr.shape[1]}x{arr.shape[0]}")
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file into an HxWx3 uint8 RGB array, with a clear error if it is bad."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except PermissionError:
        raise ImageError(f"{path}: permission denied; make it readable (chmod a+r) or remove it") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc}); replace or remove it") from None
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes); replace or remove it")
    return decode(data, path)


def from_array(arr: np.ndarray) -> np.ndarray:
    """Check and convert an array (HxW gray, HxWx3 RGB, HxWx4 RGBA; uint8) to HxWx3 uint8."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ImageError(f"image array has dtype {arr.dtype}; expected uint8")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError(f"image array has shape {arr.shape}; expected HxW, HxWx3 or HxWx4")
    return np.ascontiguousarray(arr[:, :, :3])


def encode_png(arr: np.ndarray) -> bytes:
    """Encode an HxWx3 uint8 array as a compact PNG (for tables; bytes may vary by zlib)."""
    buf = io.BytesIO()
    Image.fromarray(from_array(arr), "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def encode_png_stored(arr: np.ndarray) -> bytes:
    """Encode an HxWx3 uint8 array as a PNG whose bytes depend only on the pixels.

    The zlib stream is written by hand with stored (uncompressed) deflate blocks,
    so no compressor version or CPU feature can change a byte.
    """
    arr = from_array(arr)
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))  # filter 0 per row
    blocks = []
    step = 65535
    for start in range(0, max(len(raw), 1), step):
        block = raw[start : start + step]
        last = 1 if start + step >= len(raw) else 0
        blocks.append(struct.pack("<BHH", last, len(block), 0xFFFF ^ len(block)) + block)
    stream = b"\x78\x01" + b"".join(blocks) + struct.pack(">I", zlib.adler32(raw) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", stream)
        + _png_chunk(b"IEND", b"")
    )


def resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an HxWx3 uint8 array to (height, width); the project's only resize."""
    if height < 1 or width < 1:
        raise ImageError(f"cannot resize to {width}x{height}: both sides must be >= 1")
    arr = from_array(arr)
    if arr.shape[0] == height and arr.shape[1] == width:
        return arr
    im = Image.fromarray(arr, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def downsample(arr: np.ndarray, r: float) -> np.ndarray:
    """Down-sample by factor r: output floor(H/r) x floor(W/r) (at least 1x1), bicubic."""
    if r < 1:
        raise ImageError(f"down-sampling factor {r} < 1")
    h, w = arr.shape[:2]
    return resize(arr, max(1, int(h // r)), max(1, int(w // r)))
