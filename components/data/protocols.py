"""Low-resolution protocols: turn the canonical table into HR / LR images.

- MLR (SING, used by both papers): HR images normalised to one canonical size;
  per identity the images of one camera stay HR and the images of every other
  camera are down-sampled, each by an r drawn uniformly from ``scales``.
- VR (FFSR paper): every image down-sampled to a width drawn from [lo, hi),
  keeping its aspect ratio; the dataset's own query/gallery division is kept.
  Training images also keep an HR copy (role ``hr``), the SR ground truth x_h.
- genuine (CAVIAR): no synthetic down-sampling; the LR camera's images are the
  LR set, the other cameras' images are HR (normalised to the canonical size).

Identities seen by one camera only cannot form an HR/LR pair: they are dropped
and counted, as the papers do (PRI Sec. 4.1: "we discard 22 identities...").

``degrade.lr_noise`` (off by default) adds the LR camera's sensor noise to every LR
image after its down-sampling: Gaussian, sigma drawn uniformly per image from the
list by :func:`noise_sigma`, a pure function of (degrade.seed, image id), so the
level is independent of r and any later analysis can recompute it. It gives probes
content that decides which recovery scale suits them (PRI Fig. 1): G learns L_sr on
clean x_sl, so a large scale turns noise into false detail.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from components import images
from components.config import DegradeParams
from components.data import table as T


class ProtocolError(ValueError):
    """The table cannot be degraded with the requested protocol; says which param to change."""


@dataclass
class DegradeResult:
    table: pa.Table  # DEGRADED_SCHEMA
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    lr_noise: dict[float, int] = field(default_factory=dict)  # LR images per sensor-noise sigma (degrade.lr_noise)


@dataclass(frozen=True)
class _Job:
    """One output row: which source row, which role, and how to resize it."""

    row: int
    role: str
    image_id: str
    target: tuple[int, int] | None  # (height, width) of the HR normalisation, or None
    r: float  # down-sampling factor after normalisation (1 = none)
    width: int | None = None  # VR: explicit target width
    ref_height: int | None = None  # genuine LR: scale is estimated as ref_height / height
    noise: float = 0.0  # sigma of the sensor noise added after down-sampling (degrade.lr_noise)
    noise_seed: tuple[int, ...] = ()


def _identity_cameras(table: pa.Table) -> dict[int, list[int]]:
    pids = table[T.PERSON_ID].to_numpy()
    cams = table[T.CAMERA_ID].to_numpy()
    out: dict[int, set[int]] = {}
    for p, c in zip(pids.tolist(), cams.tolist()):
        out.setdefault(p, set()).add(c)
    return {p: sorted(c) for p, c in out.items()}


def _drop_junk(table: pa.Table, dropped: Counter, keep_gallery_distractors: bool) -> pa.Table:
    pids = table[T.PERSON_ID].to_numpy()
    keep = pids > 0
    if keep_gallery_distractors:  # VR keeps the standard gallery, distractors (id 0) included
        keep |= (pids == 0) & (np.asarray(table[T.SOURCE_SPLIT].to_pylist()) == "gallery")
    if (~keep).any():
        dropped["distractor or junk image (person id <= 0)"] += int((~keep).sum())
    return table.filter(pa.array(keep))


def _drop_single_camera(table: pa.Table, dropped: Counter, cams_needed=2) -> pa.Table:
    cams = _identity_cameras(table)
    single = {p for p, c in cams.items() if len(c) < cams_needed}
    if single:
        dropped["identity seen by one camera only"] += len(single)
        pids = table[T.PERSON_ID].to_numpy()
        table = table.filter(pa.array(~np.isin(pids, np.array(sorted(single), dtype=np.int64))))
    return table


def _mlr_jobs(table: pa.Table, p: DegradeParams) -> list[_Job]:
    hr_size = (p.hr_height, p.hr_width)
    pids = table[T.PERSON_ID].to_numpy()
    cams = table[T.CAMERA_ID].to_numpy()
    ids = table[T.IMAGE_ID].to_pylist()
    jobs = []
    for pid, cam_list in sorted(_identity_cameras(table).items()):
        rng = np.random.default_rng([p.seed, pid])  # per identity: stable under subsetting
        hr_cam = cam_list[int(rng.integers(len(cam_list)))]
        for row in np.flatnonzero(pids == pid).tolist():
            if cams[row] == hr_cam:
                jobs.append(_Job(row, "hr", ids[row], hr_size, 1.0))
            else:
                r = float(p.scales[int(rng.integers(len(p.scales)))])
                jobs.append(_Job(row, "lr", ids[row], hr_size, r))
    return jobs


def _vr_jobs(table: pa.Table, p: DegradeParams) -> list[_Job]:
    splits = table[T.SOURCE_SPLIT].to_pylist()
    if not any(splits):
        raise ProtocolError(
            "degrade.protocol = 'vr' needs a layout with its own train/query/gallery division "
            "(market1501, dukemtmc, msmt17, synthetic); this table has none: use 'mlr' or 'genuine'"
        )
    ids = table[T.IMAGE_ID].to_pylist()
    lo, hi = p.width_range
    rng = np.random.default_rng(p.seed)
    widths = rng.integers(lo, hi, size=len(ids))  # one draw per image, in table order
    jobs = []
    for row, (image_id, src) in enumerate(zip(ids, splits)):
        jobs.append(_Job(row, "lr", image_id, None, 1.0, width=int(widths[row])))
        if src == "train":  # keep the HR ground truth x_h for SR supervision
            jobs.append(_Job(row, "hr", f"{image_id}#hr", (p.hr_height, p.hr_width), 1.0))
    return jobs


def _genuine_jobs(table: pa.Table, p: DegradeParams, notes: list[str]) -> list[_Job]:
    cams = table[T.CAMERA_ID].to_numpy()
    widths = table[T.WIDTH].to_numpy()
    present = sorted(set(cams.tolist()))
    if p.lr_camera == "auto":
        lr_cam = min(present, key=lambda c: (float(np.median(widths[cams == c])), c))
        notes.append(f"LR camera chosen by size (degrade.lr_camera = auto): camera {lr_cam}")
    else:
        lr_cam = p.lr_camera
        if lr_cam not in present:
            raise ProtocolError(
                f"degrade.lr_camera = {lr_cam} is not a camera of this dataset; cameras are {present}"
            )
    ids = table[T.IMAGE_ID].to_pylist()
    jobs = []
    for row, cam in enumerate(cams.tolist()):
        if cam == lr_cam:
            jobs.append(_Job(row, "lr", ids[row], None, 1.0, ref_height=p.hr_height))
        else:
            jobs.append(_Job(row, "hr", ids[row], (p.hr_height, p.hr_width), 1.0))
    return jobs


def _image_key(image_id: str) -> int:
    return zlib.crc32(image_id.encode())  # stable across processes and machines (unlike hash())


_NOISE_TAG = 7  # the noise streams' first integer after the seed


def noise_sigma(p: DegradeParams, image_id: str) -> float:
    """The sensor-noise sigma of LR image ``image_id`` (0 without degrade.lr_noise): one uniform
    draw from degrade.lr_noise seeded by (degrade.seed, the image id), apart from r's draw."""
    if not p.lr_noise:
        return 0.0
    rng = np.random.default_rng([p.seed, _NOISE_TAG, _image_key(image_id)])
    return float(p.lr_noise[int(rng.integers(len(p.lr_noise)))])


def _with_noise(jobs: list[_Job], p: DegradeParams) -> list[_Job]:
    """The LR jobs with their sensor-noise sigma and seed (degrade.lr_noise)."""
    return [replace(j, noise=noise_sigma(p, j.image_id), noise_seed=(p.seed, _NOISE_TAG + 1, _image_key(j.image_id)))
            if j.role == "lr" else j for j in jobs]


def add_noise(x: np.ndarray, sigma: float, seed) -> np.ndarray:
    """x (uint8) + Gaussian noise of ``sigma`` levels, rounded and clipped to [0, 255]."""
    noise = np.random.default_rng(list(seed)).normal(0.0, sigma, size=x.shape)
    return np.clip(np.rint(x.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def _apply(job: _Job, data: bytes, source: str) -> tuple[bytes, int, int, float]:
    """Decode, normalise, down-sample and re-encode one image; returns (png, h, w, scale)."""
    x = images.decode(data, source)
    orig_h, orig_w = x.shape[:2]
    if job.target is not None:
        x = images.resize(x, *job.target)
    scale = job.r
    if job.width is not None:  # VR: target width, keep the aspect ratio
        w = min(job.width, orig_w)
        h = max(1, round(orig_h * w / orig_w))
        x = images.resize(x, h, w)
        scale = orig_w / w
    elif job.r != 1:
        x = images.downsample(x, job.r)
    elif job.ref_height is not None:  # genuine LR: factor w.r.t. the canonical HR height
        scale = job.ref_height / orig_h
    if job.noise > 0:  # the LR camera's sensor noise, after down-sampling: its level does not depend on r
        x = add_noise(x, job.noise, job.noise_seed)
    return images.encode_png(x), x.shape[0], x.shape[1], float(scale)


def degrade(table: pa.Table, p: DegradeParams, *, progress: bool = True) -> DegradeResult:
    """Apply the protocol ``p.protocol`` to a canonical table; see the module docstring."""
    dropped: Counter = Counter()
    notes: list[str] = []
    table = _drop_junk(table, dropped, keep_gallery_distractors=p.protocol == "vr")
    if p.protocol in ("mlr", "genuine"):
        table = _drop_single_camera(table, dropped)
    if table.num_rows == 0:
        raise ProtocolError("no images left after dropping junk and single-camera identities")
    if p.protocol == "mlr":
        jobs = _mlr_jobs(table, p)
    elif p.protocol == "vr":
        jobs = _vr_jobs(table, p)
    else:
        jobs = _genuine_jobs(table, p, notes)
    jobs = _with_noise(jobs, p)
    col_image = table[T.IMAGE]
    sources = table[T.SOURCE_PATH].to_pylist()

    def work(job: _Job):
        return _apply(job, col_image[job.row].as_py(), sources[job.row])

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(tqdm(pool.map(work, jobs), total=len(jobs), desc=f"degrade ({p.protocol})",
                             disable=None if progress else True, unit="img"))
    rows = [j.row for j in jobs]
    base = table.take(pa.array(rows, type=pa.int64()))
    out = pa.table(
        {
            T.IMAGE_ID: pa.array([j.image_id for j in jobs], pa.string()),
            T.PERSON_ID: base[T.PERSON_ID],
            T.CAMERA_ID: base[T.CAMERA_ID],
            T.SOURCE_PATH: base[T.SOURCE_PATH],
            T.SOURCE_SPLIT: base[T.SOURCE_SPLIT],
            T.HEIGHT: pa.array([r[1] for r in results], pa.int32()),
            T.WIDTH: pa.array([r[2] for r in results], pa.int32()),
            T.IMAGE: pa.array([r[0] for r in results], pa.binary()),
            T.ROLE: pa.array([j.role for j in jobs], pa.string()),
            T.SCALE: pa.array([r[3] for r in results], pa.float64()),
            T.SOURCE_IMAGE_ID: base[T.IMAGE_ID],
        },
        schema=T.DEGRADED_SCHEMA,
    )
    out = out.sort_by(T.IMAGE_ID)
    roles = Counter(out[T.ROLE].to_pylist())
    notes.append(f"{roles.get('hr', 0)} HR and {roles.get('lr', 0)} LR images "
                 f"of {len(set(out[T.PERSON_ID].to_pylist()))} identities")
    levels = dict(sorted(Counter(j.noise for j in jobs if j.role == "lr").items())) if p.lr_noise else {}
    if levels:
        notes.append("LR sensor noise (sigma: images): " + ", ".join(f"{s:g}: {n}" for s, n in levels.items()))
    return DegradeResult(out, dict(dropped), notes, levels)
