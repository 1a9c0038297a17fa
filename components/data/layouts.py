"""Importers: a person re-id dataset in its standard on-disk layout -> the canonical table.

``import_layout(raw_dir, layout)`` reads Market-1501 (and the synthetic dataset, which
is written in the same layout), DukeMTMC-reID, CUHK03 (``cuhk-03.mat`` or the extracted
``images_labeled/`` / ``images_detected/`` folders), MSMT17, VIPeR or CAVIAR4REID and
returns one row per image in ``CANONICAL_SCHEMA``: ids, camera, the layout's own split,
size and the image re-encoded as PNG. Naming rules follow torchreid.

Each layout has one function that lists its images as ``Entry`` rows (no pixels read);
``_load`` then decodes and re-encodes every image in a thread pool.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from components.config import CUHK03_VARIANTS, LAYOUTS
from components.images import IMAGE_SUFFIXES, ImageError, encode_png, from_array, read_image
from components.data.table import (
    CAMERA_ID,
    CANONICAL_SCHEMA,
    HEIGHT,
    IMAGE,
    IMAGE_ID,
    PERSON_ID,
    SOURCE_PATH,
    SOURCE_SPLIT,
    WIDTH,
)



class LayoutError(ValueError):
    """A dataset folder that does not match its layout; the message names the file and fix."""


@dataclass
class ImportResult:
    """The canonical table plus what was left out and why."""

    table: pa.Table                                       # CANONICAL_SCHEMA, sorted by image_id
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> number of images
    notes: list[str] = field(default_factory=list)         # lines for the stage log


class Entry(NamedTuple):
    """One image to import: where it is and whom it shows (pixels not read yet)."""

    path: str                 # source_path, relative to raw_dir
    person_id: int
    camera_id: int
    source_split: str         # "train" / "query" / "gallery" or ""
    image_id: str = ""        # default: path without its suffix
    load: Callable[[], np.ndarray] | None = None  # default: decode the file raw_dir / path


class Listing(NamedTuple):
    """What a layout's listing function found: entries, drop counts, log lines."""

    entries: list[Entry]
    dropped: dict[str, int]
    notes: list[str]


# -----------------------------------------------------------------------------
# small helpers


def _is_image(path: Path) -> bool:
    """An image file by its suffix; hidden files (._x.jpg from macOS, .DS_Store) are not."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _rel(path: Path, raw_dir: Path) -> str:
    return path.relative_to(raw_dir).as_posix()


def _require(raw_dir: Path, names: list[str], layout: str) -> None:
    """Raise a LayoutError naming the folders/files of ``names`` missing from raw_dir."""
    missing = [n for n in names if not (raw_dir / n).exists()]
    if not missing:
        return
    msg = (
        f"{raw_dir}: missing {', '.join(missing)}; the {layout} layout expects "
        f"{', '.join(names)} directly inside it"
    )
    nested = [d.name for d in sorted(raw_dir.iterdir()) if d.is_dir() and all((d / n).exists() for n in names)]
    if nested:
        msg += f". They are in {raw_dir / nested[0]}: move its contents up into {raw_dir}"
    else:
        msg += ". Place the dataset there as distributed, or pick the layout that matches it"
    raise LayoutError(msg)


def _bad_name(path: Path, pattern: str, example: str) -> LayoutError:
    return LayoutError(
        f"{path}: file name does not match the expected pattern {pattern} (e.g. {example}); "
        "rename or remove the file"
    )


def _ignored_note(count: int, where: str) -> list[str]:
    return [f"ignored {count} non-image files in {where}"] if count else []


# -----------------------------------------------------------------------------
# one listing function per layout

MARKET_FOLDERS = {"bounding_box_train": "train", "bounding_box_test": "gallery", "query": "query"}
MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)")  # 0002_c1s1_000451_03.jpg, 0001_c2_f0046182.jpg
JUNK = "junk (person id -1)"


def list_market(raw_dir: Path, layout: str = "market1501") -> Listing:
    """Market-1501 / DukeMTMC-reID / synthetic: three folders, id and camera in the name."""
    _require(raw_dir, list(MARKET_FOLDERS), layout)
    entries, ignored, junk, distractors = [], 0, 0, 0
    for folder, split in MARKET_FOLDERS.items():
        for path in sorted((raw_dir / folder).iterdir()):
            if not _is_image(path):
                ignored += 1
                continue
            m = MARKET_NAME.match(path.name)
            if m is None:
                raise _bad_name(path, "PPPP_cC..." + path.suffix, "0002_c1s1_000451_03.jpg")
            pid, cam = int(m.group(1)), int(m.group(2))
            if pid == -1:
                junk += 1
                continue
            distractors += pid == 0
            entries.append(Entry(_rel(path, raw_dir), pid, cam, split))
    notes = _ignored_note(ignored, f"{raw_dir} ({', '.join(MARKET_FOLDERS)})")
    if distractors:
        notes.append(f"kept {distractors} distractor images (person id 0)")
    return Listing(entries, {JUNK: junk} if junk else {}, notes)


CUHK03_NAME = re.compile(r"^(\d+)_(\d+)_([12])_(\d+)$")  # 1_001_1_01: pair, pid, view, image
CUHK03_MAT = ("cuhk-03.mat", "cuhk03_release/cuhk-03.mat")


def _cuhk03_ids(campid: int, pid: int, viewid: int) -> tuple[int, int]:
    """(person_id, camera_id) for 0-based camera pair and pid and 1-based view."""
    return (campid + 1) * 1000 + pid + 1, campid * 2 + viewid


def _cuhk03_name(campid: int, pid: int, viewid: int, imgid: int) -> str:
    """torchreid's file name stem for a CUHK03 image (all indices 0-based but viewid)."""
    return f"{campid + 1}_{pid + 1:03d}_{viewid}_{imgid + 1:02d}"


def list_cuhk03_folder(raw_dir: Path, variant: str) -> Listing:
    """CUHK03 extracted by torchreid: images_{variant}/{pair}_{pid:03d}_{view}_{img:02d}.png."""
    folder = raw_dir / f"images_{variant}"
    entries, ignored = [], 0
    for path in sorted(folder.iterdir()):
        if not _is_image(path):
            ignored += 1
            continue
        m = CUHK03_NAME.match(path.stem)
        if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise _bad_name(path, "PAIR_PID_VIEW_IMG.png (view 1 or 2)", "1_001_1_01.png")
        campid, pid, viewid = int(m.group(1)) - 1, int(m.group(2)) - 1, int(m.group(3))
        person_id, camera_id = _cuhk03_ids(campid, pid, viewid)
        entries.append(Entry(_rel(path, raw_dir), person_id, camera_id, ""))
    return Listing(entries, {}, [f"CUHK03 {variant}: read {folder}"] + _ignored_note(ignored, str(folder)))


def _mat_image(mat, ref, source: str) -> np.ndarray:
    """Read one image of cuhk-03.mat: stored 3xWxH, so .T gives HxWx3."""
    arr = np.asarray(mat[ref][()]).T
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"{source}: expected an HxWx3 uint8 image, found {arr.dtype} {arr.shape}")
    return from_array(arr)


def list_cuhk03_mat(raw_dir: Path, mat, mat_path: Path, variant: str) -> Listing:
    """CUHK03 from cuhk-03.mat (HDF5), read as torchreid does; ``mat`` is the open h5py.File."""
    rel = _rel(mat_path, raw_dir)
    if variant not in mat:
        raise LayoutError(f"{mat_path}: no '{variant}' entry (found {sorted(mat.keys())}); "
                          "is this the CUHK03 release file cuhk-03.mat?")
    entries, empty = [], 0
    for campid, camp_ref in enumerate(mat[variant][0]):  # 5 camera pairs
        camp = np.asarray(mat[camp_ref][()]).T            # (num_pids, 10) refs to images
        for pid in range(camp.shape[0]):
            for imgid, img_ref in enumerate(camp[pid]):
                shape = mat[img_ref].shape
                if len(shape) < 3 or 0 in shape:           # empty cell
                    empty += 1
                    continue
                viewid = 1 if imgid < 5 else 2
                person_id, camera_id = _cuhk03_ids(campid, pid, viewid)
                source = f"{rel}#{variant}/pair{campid + 1}/pid{pid + 1:03d}/img{imgid + 1:02d}"
                image_id = f"images_{variant}/{_cuhk03_name(campid, pid, viewid, imgid)}"
                load = partial(_mat_image, mat, img_ref, f"{raw_dir / source}")
                entries.append(Entry(source, person_id, camera_id, "", image_id, load))
    return Listing(entries, {}, [f"CUHK03 {variant}: read {mat_path} ({empty} empty cells skipped)"])


MSMT_LISTS = {"list_train.txt": "train", "list_val.txt": "train", "list_query.txt": "query",
              "list_gallery.txt": "gallery"}
MSMT_DIRS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))  # V1, V2


def _read_msmt_list(raw_dir: Path, list_name: str, image_dir: Path) -> list[tuple[str, int, int]]:
    """(path relative to raw_dir, label, camera) for each line of an MSMT17 list file."""
    list_path = raw_dir / list_name
    rows = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_path}, line {lineno}"
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise LayoutError(f"{where}: expected 'rel/path.jpg label', found {line!r}; fix the line")
        path = image_dir / parts[0]
        if not path.is_file():
            raise LayoutError(f"{where}: image {path} does not exist; restore it from the "
                              "MSMT17 archive or remove the line")
        fields = Path(parts[0]).name.split("_")
        if len(fields) < 3 or not fields[2].isdigit():
            raise LayoutError(f"{where}: cannot read the camera from {Path(parts[0]).name} (third "
                              "'_' field, e.g. 0000_000_01_0303morning_0015_0.jpg); fix the line")
        rows.append((_rel(path, raw_dir), int(parts[1]), int(fields[2])))
    return rows


def list_msmt17(raw_dir: Path) -> Listing:
    """MSMT17 (V1 train/ test/ or V2 mask_train_v2/ mask_test_v2/) from its four list files."""
    _require(raw_dir, list(MSMT_LISTS), "msmt17")
    dirs = next((d for d in MSMT_DIRS if all((raw_dir / x).is_dir() for x in d)), None)
    if dirs is None:
        raise LayoutError(f"{raw_dir}: missing image folders; the msmt17 layout expects train/ and "
                          "test/ (V1) or mask_train_v2/ and mask_test_v2/ (V2) next to the list files")
    rows = {name: _read_msmt_list(raw_dir, name, raw_dir / (dirs[0] if split == "train" else dirs[1]))
            for name, split in MSMT_LISTS.items()}
    train_labels = [label for name in ("list_train.txt", "list_val.txt") for _, label, _ in rows[name]]
    offset = max(train_labels, default=-1) + 1  # test labels restart at 0
    entries = []
    for name, split in MSMT_LISTS.items():
        shift = 0 if split == "train" else offset
        entries += [Entry(path, label + shift, cam, split) for path, label, cam in rows[name]]
    notes = [f"MSMT17 images from {dirs[0]}/ and {dirs[1]}/; test person ids offset by {offset}"]
    return Listing(entries, {}, notes)


VIPER_NAME = re.compile(r"^(\d+)_")  # 000_45.bmp: identity, viewing angle


def list_viper(raw_dir: Path) -> Listing:
    """VIPeR: cam_a/ (camera 1) and cam_b/ (camera 2); the leading number is the identity."""
    _require(raw_dir, ["cam_a", "cam_b"], "viper")
    entries, ignored = [], 0
    for camera_id, folder in ((1, "cam_a"), (2, "cam_b")):
        for path in sorted((raw_dir / folder).iterdir()):
            if not _is_image(path):
                ignored += 1
                continue
            m = VIPER_NAME.match(path.name)
            if m is None:
                raise _bad_name(path, "ID_ANGLE.bmp", "000_45.bmp")
            # VIPeR numbers people from 000; person id 0 means "distractor" in the
            # canonical table, so every VIPeR id is shifted by one
            entries.append(Entry(_rel(path, raw_dir), int(m.group(1)) + 1, camera_id, ""))
    notes = _ignored_note(ignored, f"{raw_dir} (cam_a, cam_b)") + ["VIPeR person ids = file number + 1"]
    return Listing(entries, {}, notes)


CAVIAR_NAME = re.compile(r"^(\d{4})(\d{3})$")  # 0001012: person 1, image 12


def list_caviar(raw_dir: Path) -> Listing:
    """CAVIAR4REID: PPPPIII.jpg in one folder; images 1-10 camera 1, 11-20 camera 2."""
    entries, ignored = [], 0
    for path in sorted(raw_dir.iterdir()):
        if not _is_image(path):
            ignored += 1
            continue
        m = CAVIAR_NAME.match(path.stem)
        if m is None or not 1 <= int(m.group(2)) <= 20:
            raise _bad_name(path, "PPPPIII.jpg (4-digit person, image 001-020)", "0001012.jpg")
        index = int(m.group(2))
        entries.append(Entry(_rel(path, raw_dir), int(m.group(1)), 1 if index <= 10 else 2, ""))
    if not entries:
        nested = [d.name for d in sorted(raw_dir.iterdir()) if d.is_dir() and any(map(_is_image, d.iterdir()))]
        hint = f"; they are in {raw_dir / nested[0]}: move them up" if nested else ""
        raise LayoutError(f"{raw_dir}: no images; the caviar layout expects the CAVIAR4REID "
                          f"images (PPPPIII.jpg) directly inside it{hint}")
    return Listing(entries, {}, _ignored_note(ignored, str(raw_dir)))


# -----------------------------------------------------------------------------
# decode + re-encode, the step every layout shares


def _load_one(raw_dir: Path, entry: Entry) -> tuple[bytes, int, int]:
    """PNG bytes, height, width of one entry; an unreadable image raises ImageError naming the file."""
    arr = entry.load() if entry.load is not None else read_image(raw_dir / entry.path)
    return encode_png(arr), arr.shape[0], arr.shape[1]


def _load(raw_dir: Path, entries: list[Entry], desc: str, progress: bool) -> pa.Table:
    """Decode and re-encode every entry in threads; rows come out in the entries' order."""
    ids = [e.image_id or e.path.rsplit(".", 1)[0] for e in entries]
    seen: dict[str, str] = {}
    for image_id, e in zip(ids, entries):
        if image_id in seen:
            raise LayoutError(f"{raw_dir}: {seen[image_id]} and {e.path} give the same image id "
                              f"{image_id!r}; remove one of them")
        seen[image_id] = e.path
    images = []
    with ThreadPoolExecutor() as pool:
        try:
            results = pool.map(partial(_load_one, raw_dir), entries)
            for result in tqdm(results, total=len(entries), desc=desc, unit="img", disable=None if progress else True):
                images.append(result)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return pa.table(
        {
            IMAGE_ID: ids,
            PERSON_ID: [e.person_id for e in entries],
            CAMERA_ID: [e.camera_id for e in entries],
            SOURCE_PATH: [e.path for e in entries],
            SOURCE_SPLIT: [e.source_split for e in entries],
            HEIGHT: [h for _, h, _ in images],
            WIDTH: [w for _, _, w in images],
            IMAGE: [png for png, _, _ in images],
        },
        schema=CANONICAL_SCHEMA,
    )


def _sort(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: e.image_id or e.path.rsplit(".", 1)[0])


def import_layout(
    raw_dir: str | Path, layout: str, *, cuhk03_variant: str = "labeled", progress: bool = True
) -> ImportResult:
    """Read the dataset in ``raw_dir`` (in ``layout``) into the canonical table."""
    raw_dir = Path(raw_dir)
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    if not raw_dir.is_dir():
        fix = "run `lrreid synthesize` to generate it" if layout == "synthetic" else (
            f"place the {layout} dataset there in its standard layout")
        raise LayoutError(f"{raw_dir}: dataset folder does not exist; {fix}")
    desc = f"import {layout}"

    if layout == "cuhk03":
        if cuhk03_variant not in CUHK03_VARIANTS:
            raise LayoutError(f"unknown cuhk03_variant {cuhk03_variant!r}; use one of {CUHK03_VARIANTS}")
        mat_path = next((raw_dir / p for p in CUHK03_MAT if (raw_dir / p).is_file()), None)
        if (raw_dir / f"images_{cuhk03_variant}").is_dir():  # prefer the extracted folder
            listing = list_cuhk03_folder(raw_dir, cuhk03_variant)
            table = _load(raw_dir, _sort(listing.entries), desc, progress)
        elif mat_path is not None:
            import h5py  # only CUHK03 needs it

            with h5py.File(mat_path, "r") as mat:
                listing = list_cuhk03_mat(raw_dir, mat, mat_path, cuhk03_variant)
                table = _load(raw_dir, _sort(listing.entries), desc, progress)
        else:
            raise LayoutError(f"{raw_dir}: missing images_{cuhk03_variant}/ and cuhk-03.mat; the "
                              "cuhk03 layout expects the release file cuhk-03.mat (or "
                              f"cuhk03_release/cuhk-03.mat) or torchreid's extracted images_{cuhk03_variant}/")
    else:
        if layout in ("synthetic", "market1501", "dukemtmc"):
            listing = list_market(raw_dir, layout)
        elif layout == "msmt17":
            listing = list_msmt17(raw_dir)
        elif layout == "viper":
            listing = list_viper(raw_dir)
        else:
            listing = list_caviar(raw_dir)
        table = _load(raw_dir, _sort(listing.entries), desc, progress)

    if table.num_rows == 0:
        raise LayoutError(f"{raw_dir}: no images found for the {layout} layout; check the folder")
    splits = {}
    for s in table.column(SOURCE_SPLIT).to_pylist():
        splits[s or "(none)"] = splits.get(s or "(none)", 0) + 1
    n_ids = len(set(table.column(PERSON_ID).to_pylist()))
    notes = [f"{layout}: {table.num_rows} images of {n_ids} identities from {raw_dir} "
             f"(source splits: {', '.join(f'{k} {v}' for k, v in sorted(splits.items()))})"]
    notes += listing.notes
    notes += [f"dropped {n} images: {reason}" for reason, n in listing.dropped.items()]
    return ImportResult(table, dict(listing.dropped), notes)
