"""The procedural default dataset: determinism, layout, and that resolution matters."""

from __future__ import annotations

import hashlib
import itertools
import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from components.config import SyntheticParams
from components.data.synthetic import generate, identity_attributes, render
from components.images import downsample, read_image, resize

NAME = re.compile(r"([-\d]+)_c(\d+)")
SMALL = dict(identities=20, train_identities=12, cameras=2, images_per_camera=3, height=64, width=32)


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn") / "raw"
    return out, generate(out, SyntheticParams(seed=0, **SMALL), progress=False)


def test_same_params_give_the_same_bytes(small, tmp_path):
    first, _ = small
    generate(tmp_path / "again", SyntheticParams(seed=0, **SMALL), progress=False)
    generate(tmp_path / "seed1", SyntheticParams(seed=1, **SMALL), progress=False)
    a, b, c = _digests(first), _digests(tmp_path / "again"), _digests(tmp_path / "seed1")
    assert len(a) == 20 * 2 * 3
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) == len(a)  # another seed: every file differs


def test_market1501_layout(small):
    root, counts = small
    assert sorted(p.name for p in root.iterdir()) == ["bounding_box_test", "bounding_box_train", "query"]
    seen = {}
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        for p in (root / folder).iterdir():
            m = NAME.match(p.name)
            assert m and p.suffix == ".png", p.name
            assert re.fullmatch(r"\d{4}_c\d+s1_\d{6}_00\.png", p.name), p.name
            seen.setdefault(folder, []).append((int(m.group(1)), int(m.group(2)), p.name))
    train, gallery, query = seen["bounding_box_train"], seen["bounding_box_test"], seen["query"]
    assert {pid for pid, _, _ in train} == set(range(1, 13))
    assert {pid for pid, _, _ in gallery} == {pid for pid, _, _ in query} == set(range(13, 21))
    assert len(train) == 12 * 2 * 3 and len(gallery) == 8 * 2 * 2 and len(query) == 8 * 2
    assert Counter((pid, cam) for pid, cam, _ in query) == {(p, c): 1 for p in range(13, 21) for c in (1, 2)}
    names = [n for rows in seen.values() for _, _, n in rows]
    assert len(set(names)) == len(names)  # frame numbers unique per (pid, camera)
    assert counts["images"] == 120 and counts["identities"] == 20
    assert (counts["train_images"], counts["gallery_images"], counts["query_images"]) == (72, 32, 16)
    assert counts["coarse_groups"] == 1 and counts["median_identities_per_coarse_group"] == 20
    img = read_image(root / "query" / query[0][2])
    assert img.shape == (64, 32, 3) and img.dtype == np.uint8


def test_every_identity_is_unique_but_many_share_the_coarse_look():
    attrs = identity_attributes(0, 500)
    assert [a["pid"] for a in attrs] == list(range(1, 501))
    assert len({(a["coarse"], a["fine"]) for a in attrs}) == 500
    sizes = Counter(a["coarse"] for a in attrs)
    assert len(sizes) == 10 and set(sizes.values()) == {50}
    for group in itertools.groupby(sorted(attrs, key=lambda a: (a["coarse"], a["pid"])), key=lambda a: a["coarse"]):
        members = list(group[1])  # within a group the first 48 garment patterns all differ
        assert len({a["fine"][:3] for a in members[:48]}) == len(members[:48])
    assert identity_attributes(0, 500) == attrs
    assert identity_attributes(1, 500) != attrs


def _mad(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x.astype(np.int32) - y.astype(np.int32)).mean())


def _low(x: np.ndarray, r: int = 4) -> np.ndarray:
    return resize(downsample(x, r), x.shape[0], x.shape[1])


def test_resolution_matters():
    """Same-coarse identities differ most at full resolution, less after every down-sampling
    and the more the larger r; x4 removes more than half of the difference (the shoe colour,
    a fine attribute too, survives any r)."""
    attrs = identity_attributes(0, 200)
    groups: dict[tuple, list[dict]] = {}
    for a in attrs:
        groups.setdefault(a["coarse"], []).append(a)
    assert len(groups) == 4
    full, low = [], {2: [], 3: [], 4: []}
    for members in groups.values():
        for a, b in itertools.combinations(members[:4], 2):
            b = dict(b, pid=a["pid"])  # the same pid: the same pose, position, noise
            x, y = render(a, 1, 0, 0, 128, 64), render(b, 1, 0, 0, 128, 64)
            full.append(_mad(x, y))
            for r in low:
                low[r].append(_mad(_low(x, r), _low(y, r)))
    assert all(f > l for f, l in zip(full, low[2]))
    assert np.mean(full) > np.mean(low[2]) > np.mean(low[3]) > np.mean(low[4])
    assert np.mean(full) > 2 * np.mean(low[4])
    low = low[4]
    # ... while identities of different coarse groups stay apart at low resolution
    firsts = [m[0] for m in groups.values()]
    across = [
        _mad(_low(render(a, 1, 0, 0, 128, 64)), _low(render(dict(b, pid=a["pid"]), 1, 0, 0, 128, 64)))
        for a, b in itertools.combinations(firsts, 2)
    ]
    assert min(across) > 3 * np.mean(low)


def test_cameras_differ_in_scene_and_viewpoint():
    attrs = identity_attributes(0, 24)

    def border(img):  # the two outer columns each side: background only
        return np.concatenate([img[:, :2], img[:, -2:]], axis=1).reshape(-1, 3).mean(axis=0)

    means = {cam: np.mean([border(render(a, cam, 0, 0, 128, 64)) for a in attrs[:8]], axis=0) for cam in (1, 2, 3)}
    for c1, c2 in itertools.combinations(means, 2):
        assert np.abs(means[c1] - means[c2]).sum() > 30, (c1, c2, means)
    # the bag hangs on the person's right: image left in camera 1, image right in (mirrored) camera 2
    a = dict(attrs[0], bag=True, bag_rgb=(255, 0, 255))
    for cam, side in ((1, -1), (2, 1)):
        for index in range(3):
            img = render(a, cam, index, 0, 128, 64).astype(np.int32)
            magenta = (img[..., 0] - img[..., 1] > 120) & (img[..., 2] - img[..., 1] > 120)
            assert magenta.sum() > 30
            assert np.sign(np.nonzero(magenta)[1].mean() - 31.5) == side
    # pose and position change from image to image of one camera
    views = [render(attrs[0], 1, k, 0, 128, 64) for k in range(3)]
    assert all(_mad(u, v) > 5 for u, v in itertools.combinations(views, 2))


def test_small_sizes_and_bad_seed():
    a = identity_attributes(3, 4)[0]
    for h, w in ((32, 16), (48, 48), (256, 128)):
        img = render(a, 3, 0, 3, h, w)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError, match="seed"):
        identity_attributes(-1, 10)


def test_golden_render():
    # A change of the renderer changes data/raw: if this md5 moves on purpose,
    # regenerate data/raw and update data.dvc (and this value) in the same commit.
    img = render(identity_attributes(0, 20)[0], 2, 1, 0, 64, 32)
    assert hashlib.md5(img.tobytes()).hexdigest() == "6386219f9e82d6cc0890d81dfa931849"
