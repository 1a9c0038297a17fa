"""The procedural default dataset: multi-camera pedestrians in Market-1501 layout.

A benchmark where resolution matters. Every identity has

- coarse attributes, drawn from small palettes, that survive down-sampling: top
  colour, bottom colour, hair colour, hair length, bag yes/no, skin tone. Only
  ``ceil(N / 50)`` coarse combinations are used, so about fifty identities share
  each one, and a random test split of a fifth of them still holds about ten of
  each: those cannot be told apart at low resolution (with groups of twelve, a
  test split held two or three of a group, and the coarse look alone nearly
  identified a person, so resolution hardly mattered);
- fine attributes that need resolution: a zero-mean stripe / check / diagonal
  pattern of period 2-4 detail units in an accent colour (the garment's mean colour
  stays the coarse top colour, so down-sampling averages the pattern away), a
  3-5 unit chest logo, a 1-2 unit belt or sash, the shoe colour. A detail unit is
  ``height // 64`` pixels (2 px at the default 128 x 64): large enough for x2
  down-sampling to keep part of it (period 8 px -> 4 px), small enough that x4
  removes it (period <= 8 px -> <= 2 px, the Nyquist limit).

The full (coarse + fine) combination is unique per identity. Cameras differ in
background scene (corridor with wall bands and floor tiles, street with
windows and paving, park with sky and grass), illumination (gain and colour
cast), blur (camera 1 sharp, camera 2 half through a 3x3 box blur) and viewpoint (even
cameras are mirrored); every image has its own pose (leg spread, arm swing),
position / scale jitter and a little sensor noise.

Determinism: the same params give the same bytes on every machine. Random numbers
come only from integer draws of ``numpy.random.default_rng`` seeded with integer
lists (``[seed, tag, pid, camera, index]``), all rendering is int32/int64
arithmetic (integer ellipse / trapezoid masks, integer box blur, fixed-point
gains ``(pixel * gain + 128) >> 8``), and files are written by
:func:`components.images.encode_png_stored`, whose bytes depend only on the pixels.
Changing anything here changes ``data/raw`` and so the md5 in ``data.dvc``.
"""

from __future__ import annotations

import logging
import math
import statistics
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from components.config import SyntheticParams
from components.images import encode_png_stored

log = logging.getLogger(__name__)

TRAIN_DIR = "bounding_box_train"
GALLERY_DIR = "bounding_box_test"
QUERY_DIR = "query"

GENERATOR_VERSION = 4  # bump when a change of this module changes the bytes (the manifest records it)
IDENTITIES_PER_COARSE_GROUP = 50  # about this many identities share one coarse combination

# rng tags: the first integer after the seed, so the streams never collide
_TAG_IDENTITIES = 1
_TAG_CAMERA = 2
_TAG_IMAGE = 3

# ---------------------------------------------------------------- coarse palettes
TOPS = (
    ("red", (170, 56, 52)),
    ("blue", (58, 86, 166)),
    ("green", (62, 134, 76)),
    ("grey", (128, 128, 126)),
    ("mustard", (186, 160, 64)),
)
BOTTOMS = (
    ("black", (40, 40, 44)),
    ("navy", (44, 56, 98)),
    ("khaki", (152, 136, 98)),
)
HAIR_COLOURS = (("dark", (30, 24, 22)), ("brown", (116, 74, 40)))
HAIR_LENGTHS = ("short", "long")
BAGS = (False, True)
SKINS = (("light", (234, 194, 166)), ("medium", (194, 144, 106)), ("dark", (118, 80, 58)))
BAG_RGB = (84, 58, 38)
COARSE_SIZES = (len(TOPS), len(BOTTOMS), len(HAIR_COLOURS), len(HAIR_LENGTHS), len(BAGS), len(SKINS))

# ---------------------------------------------------------------- fine palettes
PATTERNS = ("hstripe", "vstripe", "check", "diagonal")
PERIODS = (2, 3, 4)  # detail units (see detail_unit)
# the accent is a signed offset from the top colour: stripes are top+a*(n-k)/k, the
# rest top-a, so the garment's mean colour is the top colour (the pattern is zero-mean)
ACCENTS = (
    ("white", (46, 46, 46)),
    ("warm", (50, 8, -40)),
    ("cool", (-40, 8, 50)),
    ("lime", (-30, 48, -24)),
)
LOGOS = ("none", "ring", "cross", "diamond", "tee")
LOGO_COLOURS = (("white", (242, 242, 236)), ("black", (18, 18, 22)), ("orange", (244, 140, 20)))
BELTS = ("none", "belt1", "belt2", "sash1", "sash2")  # kind + thickness in detail units
BELT_COLOURS = (("black", (24, 22, 20)), ("tan", (184, 132, 72)))
SHOES = (("black", (26, 26, 28)), ("brown", (112, 70, 40)), ("red", (168, 36, 40)))
_PATTERN_CODES = len(PATTERNS) * len(PERIODS) * len(ACCENTS)
_LOGO_CODES = 1 + (len(LOGOS) - 1) * len(LOGO_COLOURS)
_BELT_CODES = 1 + (len(BELTS) - 1) * len(BELT_COLOURS)
FINE_COMBINATIONS = _PATTERN_CODES * _LOGO_CODES * _BELT_CODES * len(SHOES)
COARSE_COMBINATIONS = math.prod(COARSE_SIZES)

_LOGO_BITMAPS = {
    "ring": ((0, 1, 1, 0), (1, 0, 0, 1), (1, 0, 0, 1), (0, 1, 1, 0)),
    "cross": ((0, 0, 1, 0, 0), (0, 0, 1, 0, 0), (1, 1, 1, 1, 1), (0, 0, 1, 0, 0), (0, 0, 1, 0, 0)),
    "diamond": ((0, 1, 0), (1, 1, 1), (0, 1, 0)),
    "tee": ((1, 1, 1, 1, 1), (0, 0, 1, 0, 0), (0, 0, 1, 0, 0), (0, 0, 1, 0, 0)),
}


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"data.synthetic.seed = {seed!r}: use an integer >= 0")


def _unrank(code: int, sizes: tuple[int, ...]) -> list[int]:
    """Mixed-radix digits of ``code`` (first digit most significant)."""
    digits = []
    for size in reversed(sizes):
        code, d = divmod(code, size)
        digits.append(d)
    return digits[::-1]


def _draw_distinct(rng: np.random.Generator, n: int, used: set[int]) -> int:
    """An integer in [0, n) not in ``used`` (rejection sampling, integer draws only)."""
    while True:
        code = int(rng.integers(0, n))
        if code not in used:
            used.add(code)
            return code


def identity_attributes(seed: int, identities: int) -> list[dict]:
    """Attributes of every identity, person ids 1..identities in order.

    Each dict holds ``pid``, the hashable index tuples ``coarse`` and ``fine``, and
    the names / RGB values :func:`render` paints with. ``ceil(identities / 50)``
    distinct coarse combinations are drawn and dealt out evenly; within one coarse
    group every identity gets a different fine combination (and a different garment
    pattern while the group has fewer than 48 members), so no two identities share both.
    """
    _check_seed(seed)
    if identities < 1:
        raise ValueError(f"identities = {identities}: need at least 1")
    groups = min(COARSE_COMBINATIONS, -(-identities // IDENTITIES_PER_COARSE_GROUP))
    if identities > groups * FINE_COMBINATIONS:
        raise ValueError(
            f"identities = {identities}: at most {COARSE_COMBINATIONS * FINE_COMBINATIONS} "
            "distinct identities can be generated"
        )
    rng = np.random.default_rng([seed, _TAG_IDENTITIES])
    used_coarse: set[int] = set()
    coarse_codes = [_draw_distinct(rng, COARSE_COMBINATIONS, used_coarse) for _ in range(groups)]
    deal = [i % groups for i in range(identities)]
    for i in range(identities - 1, 0, -1):  # Fisher-Yates with integer draws
        j = int(rng.integers(0, i + 1))
        deal[i], deal[j] = deal[j], deal[i]
    used_fine: list[set[int]] = [set() for _ in range(groups)]
    used_patterns: list[set[int]] = [set() for _ in range(groups)]
    fine_sizes = (_PATTERN_CODES, _LOGO_CODES, _BELT_CODES, len(SHOES))
    out = []
    for pid, g in enumerate(deal, start=1):
        coarse = tuple(_unrank(coarse_codes[g], COARSE_SIZES))
        while True:  # a new garment pattern in the group while there are any left
            fine_code = int(rng.integers(0, FINE_COMBINATIONS))
            pattern_code = _unrank(fine_code, fine_sizes)[0]
            fresh = pattern_code not in used_patterns[g] or len(used_patterns[g]) == _PATTERN_CODES
            if fresh and fine_code not in used_fine[g]:
                break
        used_fine[g].add(fine_code)
        used_patterns[g].add(pattern_code)
        pattern_code, logo_code, belt_code, shoe = _unrank(fine_code, fine_sizes)
        pattern, period, accent = _unrank(pattern_code, (len(PATTERNS), len(PERIODS), len(ACCENTS)))
        logo, logo_colour = (0, 0) if logo_code == 0 else divmod(logo_code - 1, len(LOGO_COLOURS))
        belt, belt_colour = (0, 0) if belt_code == 0 else divmod(belt_code - 1, len(BELT_COLOURS))
        logo, belt = logo + (logo_code > 0), belt + (belt_code > 0)  # 0 is "none"
        top, bottom, hair, hair_length, bag, skin = coarse
        accent_rgb = _fit_accent(TOPS[top][1], ACCENTS[accent][1], PATTERNS[pattern], PERIODS[period])
        out.append(
            {
                "pid": pid,
                "coarse": coarse,
                "fine": (pattern, period, accent, logo, logo_colour, belt, belt_colour, shoe),
                "top": TOPS[top][0],
                "top_rgb": TOPS[top][1],
                "bottom": BOTTOMS[bottom][0],
                "bottom_rgb": BOTTOMS[bottom][1],
                "hair": HAIR_COLOURS[hair][0],
                "hair_rgb": HAIR_COLOURS[hair][1],
                "hair_length": HAIR_LENGTHS[hair_length],
                "bag": BAGS[bag],
                "bag_rgb": BAG_RGB,
                "skin": SKINS[skin][0],
                "skin_rgb": SKINS[skin][1],
                "pattern": PATTERNS[pattern],
                "period": PERIODS[period],
                "accent": ACCENTS[accent][0],
                "accent_rgb": accent_rgb,  # scaled down where the palette one would clip
                "logo": LOGOS[logo],
                "logo_rgb": LOGO_COLOURS[logo_colour][1] if logo else None,
                "belt": BELTS[belt],
                "belt_rgb": BELT_COLOURS[belt_colour][1] if belt else None,
                "shoes": SHOES[shoe][0],
                "shoes_rgb": SHOES[shoe][1],
            }
        )
    return out


# ---------------------------------------------------------------- cameras
_SCENES = ("corridor", "street", "park")
_SCENE_GAINS = ((270, 258, 230), (206, 220, 252), (244, 252, 232))  # x/256 per channel


@lru_cache(maxsize=16)
def _camera(seed: int, camera: int) -> dict:
    """Per-camera settings: scene, colours, gain / cast, blur radius, mirroring."""
    if camera < 1:
        raise ValueError(f"camera = {camera}: cameras are numbered from 1")
    rng = np.random.default_rng([seed, _TAG_CAMERA, camera])
    scene = (camera - 1) % len(_SCENES)

    def jitter(rgb, amount=12):
        return tuple(int(c) + int(d) for c, d in zip(rgb, rng.integers(-amount, amount + 1, 3)))

    if scene == 0:
        colours = {"wall": (198, 188, 166), "band": (146, 132, 112), "floor": (128, 128, 136), "grout": (84, 84, 92)}
    elif scene == 1:
        colours = {"facade": (172, 150, 128), "window": (66, 78, 96), "pave": (112, 110, 106), "mortar": (150, 148, 142)}
    else:
        colours = {"sky": (176, 204, 232), "horizon": (226, 232, 236), "grass": (86, 128, 62), "path": (168, 156, 132)}
    return {
        "scene": _SCENES[scene],
        "colours": {k: jitter(v) for k, v in colours.items()},
        "gain": tuple(g + int(d) for g, d in zip(_SCENE_GAINS[scene], rng.integers(-8, 9, 3))),
        "blur": 0 if camera == 1 else 1 if camera == 2 else int(rng.integers(0, 2)),  # box radius
        "mirror": camera % 2 == 0,
        "horizon": int(rng.integers(50, 62)),  # percent of the height
    }


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.int64)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _fill(canvas: np.ndarray, mask: np.ndarray, rgb) -> None:
    canvas[mask] = np.asarray(rgb, dtype=np.int64)


def _pan(height: int, width: int) -> tuple[int, int]:
    """How far (rows, columns) the camera's view of its scene shifts between images."""
    return max(height // 16, 1), max(width // 4, 1)


@lru_cache(maxsize=16)
def _scene(seed: int, camera: int, height: int, width: int) -> np.ndarray:
    """The camera's background, larger than an image by the pan range (read-only).

    Each image crops its own window of it, so the view shifts a little per image.
    """
    cam = _camera(seed, camera)
    pan_y, pan_x = _pan(height, width)
    yy, xx = _grid(height + pan_y, width + pan_x)
    h, w = height, width  # textures and gradients are sized by the image, not the pad
    c = {k: np.asarray(v, dtype=np.int64) for k, v in cam["colours"].items()}
    hy = h * cam["horizon"] // 100 + pan_y // 2
    img = np.empty(yy.shape + (3,), dtype=np.int64)
    above = yy < hy
    below = ~above
    if cam["scene"] == "corridor":
        # wall: vertical gradient, dark bands every fifth of the height, a skirting board
        img[:] = c["wall"] + ((yy * 28) // max(hy, 1) - 14)[..., None]
        band_period = max(h // 5, 4)
        bands = above & ((yy % band_period) < max(h // 64, 1) + 1)
        _fill(img, bands, c["band"])
        _fill(img, above & (yy >= hy - max(h // 40, 2)), c["grout"])
        # floor: tiles with grout lines and a checker of two shades
        tile_w, tile_h = max(w // 5, 4), max(h // 14, 3)
        fy, fx = yy - hy, xx
        shade = (((fx // tile_w) + (fy // tile_h)) % 2 * 16 - 8)[..., None]
        floor = c["floor"] + shade + (fy * 24 // max(h + pan_y - hy, 1))[..., None]
        img[below] = floor[below]
        _fill(img, below & (((fx % tile_w) == 0) | ((fy % tile_h) == 0)), c["grout"])
    elif cam["scene"] == "street":
        # facade with a grid of windows, then paving stones in a running bond
        img[:] = c["facade"] + ((xx * 24) // w - 12)[..., None]
        win_w, win_h = max(w // 6, 3), max(h // 10, 3)
        windows = above & ((xx % (2 * win_w)) < win_w) & ((yy % (2 * win_h)) < win_h) & (yy < hy - win_h // 2)
        _fill(img, windows, c["window"])
        row_h, brick_w = max(h // 18, 3), max(w // 4, 4)
        py = yy - hy
        px = xx + ((py // row_h) % 2) * (brick_w // 2)
        pave = c["pave"] + ((((px // brick_w) * 7 + (py // row_h) * 3) % 5) * 4 - 8)[..., None]
        img[below] = pave[below]
        _fill(img, below & (((py % row_h) == 0) | ((px % brick_w) == 0)), c["mortar"])
    else:
        # park: sky gradient to a hazy horizon, grass with an integer-hash texture, a path
        t = (yy * 256) // max(hy, 1)
        sky = (c["sky"] * (256 - t)[..., None] + c["horizon"] * t[..., None] + 128) >> 8
        img[above] = sky[above]
        texture = ((xx * 73 + yy * 151) ^ (xx * yy * 19)) % 23 - 11
        grass = c["grass"] + texture[..., None] + ((yy - hy) * 20 // max(h + pan_y - hy, 1))[..., None]
        img[below] = grass[below]
        path = below & (np.abs(2 * xx - w + (yy - hy) // 3) < w // 3 + (yy - hy) // 2)
        img[path] = (c["path"] + (texture // 2)[..., None])[path]
    img = img.astype(np.int32)
    img.flags.writeable = False
    return img


# ---------------------------------------------------------------- the person
def _ellipse(yy, xx, cy, cx, ry, rx):
    ry, rx = max(ry, 1), max(rx, 1)
    dy, dx = yy - cy, xx - cx
    return dx * dx * (ry * ry) + dy * dy * (rx * rx) <= (rx * rx) * (ry * ry)


def _limb(yy, xx, y0, x0, y1, x1, hw0, hw1):
    """Rows y0..y1; the centre moves linearly from x0 to x1, the half-width from hw0 to hw1."""
    span = max(y1 - y0, 1)
    t = yy - y0
    xc = x0 + ((x1 - x0) * t) // span
    hw = hw0 + ((hw1 - hw0) * t) // span
    return (yy >= y0) & (yy <= y1) & (np.abs(xx - xc) <= hw)


def _line(yy, xx, y0, x0, y1, x1, px):
    """A line ``px`` pixels wide (horizontally) from (y0, x0) to (y1, x1)."""
    span = max(y1 - y0, 1)
    xc = x0 + ((x1 - x0) * (yy - y0)) // span
    return (yy >= y0) & (yy <= y1) & (xx >= xc) & (xx < xc + px)


def detail_unit(height: int) -> int:
    """Pixels per detail unit of the fine attributes: 1 up to 127 px high, 2 at 128."""
    return max(1, height // 64)


def _pattern_duty(pattern: str, period: int) -> tuple[int, int, int]:
    """(stripe width w, accent pixels k, pixels n) of one period cell of the pattern."""
    w = period // 2
    if pattern == "check":
        return w, 2 * w * (period - w), period * period
    return w, w, period


def _fit_accent(top, accent, pattern: str, period: int) -> tuple[int, int, int]:
    """The accent scaled by s/16 (largest s) so that no pattern colour leaves 0..255,
    which keeps the garment's mean colour exactly the coarse top colour."""
    _, k, n = _pattern_duty(pattern, period)
    for s in range(16, -1, -1):
        a = [(c * s) // 16 for c in accent]
        if all(0 <= t + (d * (n - k)) // k <= 255 and 0 <= t - d <= 255 for t, d in zip(top, a)):
            return tuple(a)
    return (0, 0, 0)  # unreachable: s = 0 always fits


def _pattern(attrs: dict, ry, rx, unit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top garment's zero-mean pattern: (mask of the accent pixels, their colour, the rest's).

    The accent was fitted to one-pixel units (:func:`_fit_accent`); larger units keep the
    duty near one half, so the on-colour's offset is no larger and no colour clips."""
    p, kind = attrs["period"] * unit, attrs["pattern"]
    w, k, n = _pattern_duty(kind, p)
    if kind == "hstripe":
        on = (ry % p) < w
    elif kind == "vstripe":
        on = (rx % p) < w
    elif kind == "diagonal":
        on = ((ry + rx) % p) < w
    else:  # check
        on = ((ry % p) < w) ^ ((rx % p) < w)
    top = np.asarray(attrs["top_rgb"], dtype=np.int64)
    accent = np.asarray(attrs["accent_rgb"], dtype=np.int64)
    on_rgb = np.clip(top + (accent * (n - k)) // k, 0, 255)  # k of n pixels: mean = top
    off_rgb = np.clip(top - accent, 0, 255)
    return on, on_rgb, off_rgb


def _person(attrs: dict, pose: dict, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint one pedestrian (front view, the person's right on the image left).

    Returns a label map (0 = background, k = ``palette[k]``) and the palette.
    Coordinates are a column and a row vector, so every mask is built by broadcasting.
    """
    yy = np.arange(h, dtype=np.int64)[:, None]
    xx = np.arange(w, dtype=np.int64)[None, :]
    bh = pose["body"]  # body height in pixels; the plan below is in 1/256 of it
    y0, cx = pose["top"], pose["centre"]

    def Y(u):
        return y0 + (u * bh) // 256

    def X(u):
        return cx + (u * bh) // 256

    def U(u):
        return max((u * bh) // 256, 1)

    label = np.zeros((h, w), dtype=np.uint8)
    palette = [(0, 0, 0)]

    def paint(mask, colour):
        label[mask] = len(palette)
        palette.append(tuple(int(c) for c in colour))

    # legs (trousers) and shoes
    hip_y, ankle_y = Y(124), Y(238)
    legs = np.zeros((h, w), dtype=bool)
    for side, spread in ((-1, pose["spread_r"]), (1, pose["spread_l"])):
        legs |= _limb(yy, xx, hip_y, X(side * 12), ankle_y, X(side * (12 + spread)), U(12), U(8))
    paint(legs, attrs["bottom_rgb"])
    for side, spread in ((-1, pose["spread_r"]), (1, pose["spread_l"])):
        paint(_ellipse(yy, xx, Y(244), X(side * (13 + spread)), U(7), U(10)), attrs["shoes_rgb"])

    # top garment: torso and both sleeves carry the pattern
    torso = _limb(yy, xx, Y(40), X(0), Y(128), X(0), U(30), U(24))
    torso &= _ellipse(yy, xx, Y(84), X(0), U(48), U(40)) | (yy >= Y(52))  # round the shoulders
    arms = np.zeros((h, w), dtype=bool)
    hands = []
    for side, swing in ((-1, pose["swing_r"]), (1, pose["swing_l"])):
        hx = X(side * (36 + swing))
        arms |= _limb(yy, xx, Y(46), X(side * 28), Y(118), hx, U(9), U(6))
        hands.append((Y(124), hx))
    unit = detail_unit(h)
    on, on_rgb, off_rgb = _pattern(attrs, yy - y0, xx - cx, unit)
    paint((torso | arms) & ~on, off_rgb)
    paint((torso | arms) & on, on_rgb)
    for hy, hx in hands:
        paint(_ellipse(yy, xx, hy, hx, U(7), U(6)), attrs["skin_rgb"])

    # belt (horizontal, at the waist) or sash (diagonal, right shoulder to left hip)
    belt = attrs["belt"]
    if belt != "none":
        px = int(belt[-1]) * unit
        if belt.startswith("belt"):
            line = torso & (yy >= Y(122)) & (yy < Y(122) + px)
        else:
            line = torso & _line(yy, xx, Y(42), X(-24), Y(126), X(22), px)
        paint(line, attrs["belt_rgb"])

    # chest logo: a 3-5 unit bitmap on the left chest
    if attrs["logo"] != "none":
        bitmap = np.asarray(_LOGO_BITMAPS[attrs["logo"]], dtype=bool).repeat(unit, 0).repeat(unit, 1)
        bh_, bw_ = bitmap.shape
        ly, lx = Y(64) - bh_ // 2, X(10) - bw_ // 2
        stamp = np.zeros((h, w), dtype=bool)
        ys, xs = slice(max(ly, 0), max(min(ly + bh_, h), 0)), slice(max(lx, 0), max(min(lx + bw_, w), 0))
        stamp[ys, xs] = bitmap[ys.start - ly : ys.stop - ly, xs.start - lx : xs.stop - lx]
        paint(stamp & torso, attrs["logo_rgb"])

    # neck, long hair over the shoulders, head, hair cap
    paint(_limb(yy, xx, Y(30), X(0), Y(44), X(0), U(6), U(6)), attrs["skin_rgb"])
    if attrs["hair_length"] == "long":
        for side in (-1, 1):
            paint(_limb(yy, xx, Y(14), X(side * 12), Y(60), X(side * 16), U(5), U(5)), attrs["hair_rgb"])
    head_y = Y(19)
    paint(_ellipse(yy, xx, head_y, X(0), U(18), U(14)), attrs["skin_rgb"])
    cap = _ellipse(yy, xx, head_y - U(2), X(0), U(18), U(15)) & (yy <= head_y - U(6))
    paint(cap, attrs["hair_rgb"])

    # shoulder bag on the right hip, its strap from the left shoulder
    if attrs["bag"]:
        paint(_line(yy, xx, Y(44), X(22), Y(106), X(-42), 1), attrs["bag_rgb"])
        bag = _limb(yy, xx, Y(104), X(-42), Y(152), X(-42), U(10), U(11))
        paint(bag, attrs["bag_rgb"])
        paint(bag & (yy == Y(118)), np.clip(np.asarray(attrs["bag_rgb"]) - 30, 0, 255))  # the flap
    return label, np.asarray(palette, dtype=np.int32)


def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Integer (2r+1)x(2r+1) box blur with edge padding and rounding."""
    if r <= 0:
        return img
    n = 2 * r + 1
    h, w = img.shape[:2]
    pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    rows = sum(pad[k : k + h] for k in range(n))  # separable: n rows, then n columns
    s = sum(rows[:, k : k + w] for k in range(n))
    return (s + (n * n) // 2) // (n * n)


def render(attrs: dict, camera: int, index: int, seed: int, height: int, width: int) -> np.ndarray:
    """Image ``index`` of one identity seen by ``camera``: an HxWx3 uint8 array.

    Pose, position, scale, background pan, brightness and noise are drawn from
    ``default_rng([seed, 3, attrs['pid'], camera, index])``; the camera's scene,
    cast, blur and mirroring from ``default_rng([seed, 2, camera])``.
    """
    _check_seed(seed)
    if height < 8 or width < 4:
        raise ValueError(f"image size {width}x{height} too small: need at least 4x8")
    cam = _camera(seed, camera)
    rng = np.random.default_rng([seed, _TAG_IMAGE, int(attrs["pid"]), camera, index])
    d = [int(v) for v in rng.integers(0, 1 << 16, 10)]  # one draw, then integer ranges

    def pick(i, lo, hi):  # an integer in [lo, hi] from draw i
        return lo + d[i] % (hi - lo + 1)

    body = height * pick(0, 210, 234) // 256
    pose = {
        "body": body,
        "top": (height - body) // 2 + pick(1, -(height // 32), height // 32),
        "centre": width // 2 + pick(2, -(width // 16), width // 16),
        "spread_r": pick(3, -3, 13),
        "spread_l": pick(4, -3, 13),
        "swing_r": pick(5, -6, 10),
        "swing_l": pick(6, -6, 10),
    }
    pan_y, pan_x = _pan(height, width)
    dy, dx = pick(7, 0, pan_y), pick(8, 0, pan_x)
    img = _scene(seed, camera, height, width)[dy : dy + height, dx : dx + width]
    label, palette = _person(attrs, pose, height, width)
    if cam["mirror"]:
        label = label[:, ::-1]
    img = img.copy()
    on = label > 0
    person = label[on]
    for c in range(3):  # one channel at a time: much faster than palette[label] on HxWx3
        img[..., c][on] = palette[person, c]
    if cam["blur"]:  # a softer lens: half the image through a 3x3 box blur
        img = (img + _box_blur(img, cam["blur"]) + 1) >> 1
    brightness = 256 + pick(9, -14, 14)
    gain = (np.asarray(cam["gain"], dtype=np.int32) * brightness + 128) >> 8
    img = (img * gain + 128) >> 8
    img = img + rng.integers(-3, 4, size=img.shape, dtype=np.int32)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the layout
def image_name(pid: int, camera: int, index: int) -> str:
    """Market-1501 file name; the frame number is ``index + 1``."""
    return f"{pid:04d}_c{camera}s1_{index + 1:06d}_00.png"


def generate(out_dir: str | Path, params: SyntheticParams, progress: bool = True) -> dict:
    """Write the dataset into ``out_dir`` (created; assumed new) in Market-1501 layout.

    Ids 1..train_identities go to ``bounding_box_train/``; for every other id and
    camera, image 0 goes to ``query/`` and the rest to ``bounding_box_test/``.
    Returns the counts.
    """
    out = Path(out_dir)
    for folder in (TRAIN_DIR, GALLERY_DIR, QUERY_DIR):
        (out / folder).mkdir(parents=True, exist_ok=True)
    attrs = identity_attributes(params.seed, params.identities)
    counts = {TRAIN_DIR: 0, GALLERY_DIR: 0, QUERY_DIR: 0}
    total = params.identities * params.cameras * params.images_per_camera
    with tqdm(total=total, desc="synthesize", unit="img", disable=None if progress else True) as bar:
        for a in attrs:
            pid = a["pid"]
            for camera in range(1, params.cameras + 1):
                for index in range(params.images_per_camera):
                    img = render(a, camera, index, params.seed, params.height, params.width)
                    if pid <= params.train_identities:
                        folder = TRAIN_DIR
                    else:
                        folder = QUERY_DIR if index == 0 else GALLERY_DIR
                    (out / folder / image_name(pid, camera, index)).write_bytes(encode_png_stored(img))
                    counts[folder] += 1
                    bar.update(1)
    group_sizes: dict[tuple, int] = {}
    for a in attrs:
        group_sizes[a["coarse"]] = group_sizes.get(a["coarse"], 0) + 1
    result = {
        "identities": params.identities,
        "images": total,
        "train_images": counts[TRAIN_DIR],
        "query_images": counts[QUERY_DIR],
        "gallery_images": counts[GALLERY_DIR],
        "coarse_groups": len(group_sizes),
        "median_identities_per_coarse_group": float(statistics.median(group_sizes.values())),
    }
    log.info("synthetic dataset: %d images of %d identities written to %s", total, params.identities, out)
    return result
