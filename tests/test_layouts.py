"""Tests for components.data.layouts: tiny fixture trees in each dataset layout."""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from components.data.layouts import LAYOUTS, LayoutError, import_layout
from components.data.table import CANONICAL_SCHEMA
from components.images import ImageError, _png_chunk, decode, encode_png


def pixels(seed: int, h: int = 12, w: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write(path: Path, seed: int = 0, h: int = 12, w: int = 6) -> np.ndarray:
    """Write a small random image at ``path`` (format from the suffix); return its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = pixels(seed, h, w)
    if path.suffix == ".png":
        path.write_bytes(encode_png(arr))
    else:
        Image.fromarray(arr).save(path)
    return arr


def rows(result):
    """{image_id: (person_id, camera_id, source_split)}"""
    t = result.table.to_pydict()
    return {i: (p, c, s) for i, p, c, s in zip(t["image_id"], t["person_id"], t["camera_id"], t["source_split"])}


def imp(raw, layout, **kw):
    return import_layout(raw, layout, progress=False, **kw)


# ----------------------------------------------------------------------------- market / duke


def make_market(raw: Path, suffix: str = ".jpg") -> None:
    names = {
        "bounding_box_train": ["0002_c1s1_000451_03", "0002_c2s1_000301_01", "0007_c3s3_000001_02"],
        "bounding_box_test": ["0003_c1s1_000151_01", "0000_c6s1_000001_01", "-1_c1s1_000401_03", "-1_c2s1_000001_01"],
        "query": ["0003_c2s1_000301_00"],
    }
    for i, (folder, stems) in enumerate(names.items()):
        for j, stem in enumerate(stems):
            write(raw / folder / f"{stem}{suffix}", seed=10 * i + j, h=8 + j, w=4 + i)
    (raw / "bounding_box_test" / "Thumbs.db").write_bytes(b"junk")
    (raw / "query" / "readme.txt").write_text("hello")
    (raw / "gt_bbox").mkdir()  # other Market folders are ignored


@pytest.mark.parametrize("layout,suffix", [("market1501", ".jpg"), ("synthetic", ".png")])
def test_market_style(tmp_path, layout, suffix):
    make_market(tmp_path, suffix)
    res = imp(tmp_path, layout)
    assert res.table.schema == CANONICAL_SCHEMA
    assert rows(res) == {
        "bounding_box_test/0000_c6s1_000001_01": (0, 6, "gallery"),
        "bounding_box_test/0003_c1s1_000151_01": (3, 1, "gallery"),
        "bounding_box_train/0002_c1s1_000451_03": (2, 1, "train"),
        "bounding_box_train/0002_c2s1_000301_01": (2, 2, "train"),
        "bounding_box_train/0007_c3s3_000001_02": (7, 3, "train"),
        "query/0003_c2s1_000301_00": (3, 2, "query"),
    }
    ids = res.table.column("image_id").to_pylist()
    assert ids == sorted(ids)
    assert res.dropped == {"junk (person id -1)": 2}
    assert any("1 distractor" in n for n in res.notes)
    t = res.table.to_pydict()
    for path, png, h, w in zip(t["source_path"], t["image"], t["height"], t["width"]):
        assert path.endswith(suffix) and (tmp_path / path).is_file()
        arr = decode(png)
        assert arr.shape == (h, w, 3)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    if suffix == ".png":  # lossless source: the stored pixels are the source pixels
        i = t["image_id"].index("bounding_box_train/0007_c3s3_000001_02")
        assert np.array_equal(decode(t["image"][i]), pixels(2, 10, 4))


def test_import_is_deterministic(tmp_path):
    make_market(tmp_path)
    a = import_layout(tmp_path, "market1501")  # with the progress bar
    b = imp(tmp_path, "market1501")
    assert a.table.equals(b.table)


def test_dukemtmc(tmp_path):
    write(tmp_path / "bounding_box_train/0001_c2_f0046182.jpg", 1)
    write(tmp_path / "bounding_box_test/0005_c8_f0001234.jpg", 2)
    write(tmp_path / "query/0005_c7_f0000001.jpg", 3)
    res = imp(tmp_path, "dukemtmc")
    assert sorted(rows(res).values()) == [(1, 2, "train"), (5, 7, "query"), (5, 8, "gallery")]
    assert res.dropped == {}


# ----------------------------------------------------------------------------- cuhk03

# (campid, pid) -> image indices 0..9 present; empty cells elsewhere
CUHK_CELLS = {(0, 0): [0, 1, 5], (0, 1): [2, 4, 7, 8], (1, 0): [0, 9]}
NUM_PIDS = {0: 2, 1: 1}


def cuhk_pixels(variant, campid, pid, imgid):
    seed = 1000 * (variant == "detected") + 100 * campid + 10 * pid + imgid
    return pixels(seed, h=10 + imgid, w=5)


def make_cuhk03_mat(path: Path, variants=("labeled", "detected")) -> None:
    """cuhk-03.mat as MATLAB v7.3 writes it: cells of refs, arrays stored transposed."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        empty = refs.create_dataset("empty", data=np.zeros(2, np.uint64))  # MATLAB's empty cell
        for variant in variants:
            pairs = f.create_dataset(variant, (1, 5), dtype=h5py.ref_dtype)
            for campid in range(5):
                n = NUM_PIDS.get(campid, 0)
                camp = refs.create_dataset(f"{variant}_camp{campid}", (10, n), dtype=h5py.ref_dtype)
                for pid in range(n):
                    for imgid in range(10):
                        if imgid in CUHK_CELLS[(campid, pid)]:
                            arr = cuhk_pixels(variant, campid, pid, imgid)
                            ds = refs.create_dataset(f"{variant}_{campid}_{pid}_{imgid}", data=arr.T)
                            camp[imgid, pid] = ds.ref
                        else:
                            camp[imgid, pid] = empty.ref
                pairs[0, campid] = camp.ref


def make_cuhk03_folder(raw: Path, variant: str) -> None:
    for (campid, pid), imgids in CUHK_CELLS.items():
        for imgid in imgids:
            view = 1 if imgid < 5 else 2
            out = raw / f"images_{variant}" / f"{campid + 1}_{pid + 1:03d}_{view}_{imgid + 1:02d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(encode_png(cuhk_pixels(variant, campid, pid, imgid)))


CUHK_EXPECTED = {
    "images_labeled/1_001_1_01": (1001, 1, ""),
    "images_labeled/1_001_1_02": (1001, 1, ""),
    "images_labeled/1_001_2_06": (1001, 2, ""),
    "images_labeled/1_002_1_03": (1002, 1, ""),
    "images_labeled/1_002_1_05": (1002, 1, ""),  # images 1-5: view 1
    "images_labeled/1_002_2_08": (1002, 2, ""),
    "images_labeled/1_002_2_09": (1002, 2, ""),
    "images_labeled/2_001_1_01": (2001, 3, ""),
    "images_labeled/2_001_2_10": (2001, 4, ""),
}


def test_cuhk03_mat_and_folder_agree(tmp_path):
    mat_raw, dir_raw = tmp_path / "mat", tmp_path / "dir"
    mat_raw.mkdir()
    make_cuhk03_mat(mat_raw / "cuhk-03.mat")
    make_cuhk03_folder(dir_raw, "labeled")
    from_mat, from_dir = imp(mat_raw, "cuhk03"), imp(dir_raw, "cuhk03")
    assert rows(from_mat) == rows(from_dir) == CUHK_EXPECTED
    m, d = from_mat.table.to_pydict(), from_dir.table.to_pydict()
    for col in ("height", "width"):
        assert m[col] == d[col]
    for a, b in zip(m["image"], d["image"]):
        assert np.array_equal(decode(a), decode(b))
    assert m["source_path"][0] == "cuhk-03.mat#labeled/pair1/pid001/img01"
    assert d["source_path"][0] == "images_labeled/1_001_1_01.png"
    assert np.array_equal(decode(m["image"][0]), cuhk_pixels("labeled", 0, 0, 0))  # HxWx3 after .T


def test_cuhk03_variants_and_preference(tmp_path):
    make_cuhk03_mat(tmp_path / "cuhk-03.mat")
    detected = imp(tmp_path, "cuhk03", cuhk03_variant="detected")
    assert {k.replace("detected", "labeled"): v for k, v in rows(detected).items()} == CUHK_EXPECTED
    labeled = imp(tmp_path, "cuhk03").table.to_pydict()
    assert not np.array_equal(decode(labeled["image"][0]), decode(detected.table["image"][0].as_py()))
    # an extracted folder wins over the .mat
    write(tmp_path / "images_labeled" / "3_004_2_07.png", 5)
    assert rows(imp(tmp_path, "cuhk03")) == {"images_labeled/3_004_2_07": (3004, 6, "")}
    with pytest.raises(LayoutError, match="cuhk03_variant"):
        imp(tmp_path, "cuhk03", cuhk03_variant="both")


def test_cuhk03_missing(tmp_path):
    with pytest.raises(LayoutError, match="cuhk-03.mat"):
        imp(tmp_path, "cuhk03")


# ----------------------------------------------------------------------------- msmt17


def make_msmt(raw: Path) -> None:
    lists = {
        "list_train.txt": ("train", [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                     ("0001/0001_003_05_0303morning_0020_1.jpg", 1)]),
        "list_val.txt": ("train", [("0004/0004_010_11_0303noon_0100_2.jpg", 4)]),
        "list_query.txt": ("test", [("0000/0000_000_15_0303afternoon_0001_0.jpg", 0)]),
        "list_gallery.txt": ("test", [("0000/0000_001_03_0303afternoon_0002_0.jpg", 0),
                                      ("0002/0002_002_02_0303afternoon_0003_0.jpg", 2)]),
    }
    seed = 0
    for name, (folder, items) in lists.items():
        for rel, _ in items:
            seed += 1
            write(raw / folder / rel, seed)
        (raw / name).write_text("".join(f"{rel} {label}\n" for rel, label in items))


def test_msmt17(tmp_path):
    make_msmt(tmp_path)
    res = imp(tmp_path, "msmt17")
    assert rows(res) == {
        "train/0000/0000_000_01_0303morning_0015_0": (0, 1, "train"),
        "train/0001/0001_003_05_0303morning_0020_1": (1, 5, "train"),
        "train/0004/0004_010_11_0303noon_0100_2": (4, 11, "train"),
        "test/0000/0000_000_15_0303afternoon_0001_0": (5, 15, "query"),  # offset max(0,1,4)+1
        "test/0000/0000_001_03_0303afternoon_0002_0": (5, 3, "gallery"),
        "test/0002/0002_002_02_0303afternoon_0003_0": (7, 2, "gallery"),
    }
    assert any("offset by 5" in n for n in res.notes)


def test_msmt17_v2_folders(tmp_path):
    make_msmt(tmp_path)
    (tmp_path / "train").rename(tmp_path / "mask_train_v2")
    (tmp_path / "test").rename(tmp_path / "mask_test_v2")
    res = imp(tmp_path, "msmt17")
    assert res.table.num_rows == 6
    assert all(p.startswith("mask_") for p in res.table.column("source_path").to_pylist())


def test_msmt17_missing_image_names_list_and_line(tmp_path):
    make_msmt(tmp_path)
    (tmp_path / "test/0002/0002_002_02_0303afternoon_0003_0.jpg").unlink()
    with pytest.raises(LayoutError, match=r"list_gallery\.txt, line 2.*does not exist"):
        imp(tmp_path, "msmt17")


# ----------------------------------------------------------------------------- viper / caviar


def test_viper(tmp_path):
    for cam, angle in (("cam_a", 0), ("cam_b", 90)):
        for pid in (0, 5, 872):
            write(tmp_path / cam / f"{pid:03d}_{angle}.bmp", pid + angle)
    (tmp_path / "cam_a" / "Thumbs.db").write_bytes(b"x")
    res = imp(tmp_path, "viper")
    # person id = file number + 1: 0 is reserved for Market-1501 distractors
    assert rows(res)["cam_a/872_0"] == (873, 1, "")
    assert rows(res)["cam_b/000_90"] == (1, 2, "")
    assert res.table.num_rows == 6
    assert sorted(set(res.table.column("person_id").to_pylist())) == [1, 6, 873]


def test_caviar(tmp_path):
    for pid, imgs in ((1, (1, 10, 11, 20)), (42, (3,))):
        for i in imgs:
            write(tmp_path / f"{pid:04d}{i:03d}.jpg", pid * 100 + i)
    res = imp(tmp_path, "caviar")
    assert rows(res) == {
        "0001001": (1, 1, ""), "0001010": (1, 1, ""), "0001011": (1, 2, ""),
        "0001020": (1, 2, ""), "0042003": (42, 1, ""),
    }
    write(tmp_path / "0001021.jpg")
    with pytest.raises(LayoutError, match="0001021.jpg"):
        imp(tmp_path, "caviar")


# ----------------------------------------------------------------------------- errors


def test_unknown_layout(tmp_path):
    with pytest.raises(LayoutError) as err:
        imp(tmp_path, "market")
    for name in LAYOUTS:
        assert name in str(err.value)


def test_missing_raw_dir(tmp_path):
    with pytest.raises(LayoutError, match=r"does-not-exist.*lrreid synthesize"):
        imp(tmp_path / "does-not-exist", "synthetic")
    with pytest.raises(LayoutError, match=r"does-not-exist.*place the market1501 dataset"):
        imp(tmp_path / "does-not-exist", "market1501")


def test_missing_folders(tmp_path):
    write(tmp_path / "bounding_box_train" / "0001_c1s1_000001_01.jpg")
    with pytest.raises(LayoutError) as err:
        imp(tmp_path, "market1501")
    msg = str(err.value)
    assert "bounding_box_test" in msg and "query" in msg and "market1501" in msg


def test_nested_dataset_hint(tmp_path):
    make_market(tmp_path / "Market-1501-v15.09.15")
    with pytest.raises(LayoutError, match="Market-1501-v15.09.15: move its contents up"):
        imp(tmp_path, "market1501")


def test_unparsable_name(tmp_path):
    make_market(tmp_path)
    write(tmp_path / "query" / "person3_cam2.jpg")
    with pytest.raises(LayoutError, match=r"person3_cam2\.jpg.*pattern"):
        imp(tmp_path, "market1501")


def test_truncated_image_names_file(tmp_path):
    make_market(tmp_path)
    bad = tmp_path / "bounding_box_train" / "0002_c1s1_000451_03.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(ImageError, match="0002_c1s1_000451_03.jpg"):
        imp(tmp_path, "market1501")


def test_empty_dataset(tmp_path):
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        (tmp_path / folder).mkdir()
    with pytest.raises(LayoutError, match="no images"):
        imp(tmp_path, "market1501")


def huge_png(side: int = 20000) -> bytes:
    """A 65-byte PNG whose header claims side x side pixels (no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"")) \
        + _png_chunk(b"IEND", b"")


def spoil(path: Path, kind: str, monkeypatch) -> str:
    """Make the image at ``path`` bad in the way ``kind`` says; return what its error says after the name."""
    if kind == "huge":
        path.write_bytes(huge_png())
        return "its header claims a 20000x20000 image (400,000,000 pixels)"
    if kind == "empty":
        path.write_bytes(b"")
        return "empty file (0 bytes)"
    if kind == "unreadable":  # a read that fails for root too: reading address 0 of a process is EIO
        path.unlink()
        path.symlink_to("/proc/self/mem")
        return "cannot read (Input/output error)"
    path.chmod(0)  # "locked"
    if os.access(path, os.R_OK):  # root reads it anyway: fail the read as it fails for a user
        real = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(self))) if self.name == path.name else real(self))
    return "permission denied; make it readable (chmod a+r) or remove it"


@pytest.mark.parametrize("kind", ["huge", "empty", "unreadable", "locked"])
def test_bad_image_stops_ingest_with_one_line(tmp_path, monkeypatch, capsys, kind):
    """`lrreid ingest`: the file named, what is wrong, exit 2, no traceback, nothing written."""
    from components.config import Params
    from pipelines.cli import main

    if kind == "unreadable" and not Path("/proc/self/mem").is_file():
        pytest.skip("needs Linux's /proc/self/mem")
    raw = tmp_path / "raw"
    make_market(raw)
    bad = raw / "bounding_box_train" / "0002_c2s1_000301_01.jpg"
    words = spoil(bad, kind, monkeypatch)
    with pytest.raises(ImageError, match=re.escape(f"{bad}: {words}")):
        imp(raw, "market1501")

    monkeypatch.chdir(tmp_path)
    params = {name: {} for name in Params.model_fields} | {"data": {"layout": "market1501"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    capsys.readouterr()
    assert main(["ingest", "--no-progress", "--input", "raw", "--out", "data/canonical.parquet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lrreid ingest: error: raw/bounding_box_train/{bad.name}: {words}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "raw"]  # no data/, no reports/
