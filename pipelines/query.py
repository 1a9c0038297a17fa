"""Rank a gallery for one low-resolution probe image with a registered model (a tool, not a stage).

    lrreid query --gallery data/raw/bounding_box_test probe.jpg
    lrreid query --model models:/lrreid-pri@challenger --gallery data/split/split.parquet \\
        --top-k 5 --picture ranked.png probe.png

The model is loaded with mlflow.pyfunc from the tracking store (MLFLOW_TRACKING_URI,
default sqlite:///mlflow.db here); --model defaults to
models:/<registry.model_name>@<registry.champion_alias> from params.yaml; a local
MLflow model folder works too. A missing model or store is said before MLflow is
touched (no empty mlflow.db is left behind).

Probe: any image file (RGBA and grayscale are converted to RGB), used at its own
size: P predicts its scale r_p and G recovers it at r_p before F embeds it.
Gallery (high-resolution, F only): a folder of images (searched recursively;
the person id is read from Market-1501 / DukeMTMC style names such as
0002_c1s1_000451_03.jpg, else shown as ?), or a Parquet table of the pipeline:
a split table (its gallery rows), a degraded table (its HR rows) or the
canonical table (all rows). Gallery images are resized to the model's HR input
size and embedded in batches.

Prints the top-k gallery entries (rank, image, person id, Euclidean distance)
and the probe's r_p with P's probability of every scale; --picture also writes
the ranked list as a PNG (components/figures.py).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import images
from pipelines.common import StageError, log

PID_RE = re.compile(r"^(-?\d+)_c(\d+)")  # Market-1501 / DukeMTMC: 0002_c1s1_000451_03.jpg


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("probe", help="the probe image (any size; PNG, JPEG, BMP)")
    parser.add_argument("--model", default=None,
                        help="model URI (default: models:/<registry.model_name>@<registry.champion_alias> "
                        "from --params)")
    parser.add_argument("--gallery", required=True, help="a folder of images or a Parquet table")
    parser.add_argument("--top-k", type=int, default=10, help="gallery entries to show (default: 10)")
    parser.add_argument("--picture", default=None, help="also write the ranked list as this PNG")
    parser.add_argument("--batch-size", type=int, default=64, help="gallery images per forward pass")
    parser.add_argument("--params", default="params.yaml",
                        help="params file, for the default --model (default: params.yaml)")


def run(args: argparse.Namespace) -> None:
    if args.top_k < 1 or args.batch_size < 1:
        raise StageError(f"--top-k {args.top_k} / --batch-size {args.batch_size}: use integers >= 1")
    model_uri = args.model or default_model_uri(args.params)
    check_model_ref(model_uri)  # before MLflow is touched: it would create an empty mlflow.db
    probe = read_probe(Path(args.probe))
    gallery = read_gallery(Path(args.gallery))  # cheap checks before loading the model
    from pipelines.registry import load_pyfunc

    model = load_pyfunc(model_uri)
    result = query(model, probe, gallery, top_k=args.top_k, batch_size=args.batch_size)
    probe_pid = person_id(args.probe)
    print_result(args.probe, probe, gallery, result, model_uri, probe_pid)
    if args.picture:
        write_picture(Path(args.picture), model, probe, gallery, result, probe_pid)


def default_model_uri(params_path: str) -> str:
    from components.config import RegistryParams, load_params

    reg = load_params(params_path).registry if Path(params_path).is_file() else RegistryParams()
    return f"models:/{reg.model_name}@{reg.champion_alias}"


def check_model_ref(model_uri: str) -> None:
    """A local model (a path or file: URI) must be an MLflow model folder; a models:/ or runs:/ URI
    needs a tracking store to look it up in (a missing sqlite store is not created)."""
    from urllib.parse import urlparse

    from pipelines.tracking import tracking_uri

    scheme = urlparse(model_uri).scheme
    if scheme in ("", "file"):
        path = Path(urlparse(model_uri).path if scheme else model_uri)
        if not (path / "MLmodel").is_file():
            what = "is not an MLflow model folder (no MLmodel file)" if path.exists() else "does not exist"
            raise StageError(f"--model {model_uri}: {what}; give an MLflow model folder, or a registered model "
                             "as models:/<name>@<alias> (`dvc repro` registers one: its register stage)")
    elif scheme in ("models", "runs"):
        uri = tracking_uri()
        store = Path(uri.removeprefix("sqlite:///"))
        if uri.startswith("sqlite:///") and not store.is_file():
            raise StageError(f"model {model_uri}: no MLflow store at {store} to load it from; run `dvc repro` "
                             "(its register stage registers the model), or set MLFLOW_TRACKING_URI to the store")


# ---------------------------------------------------------------------- inputs
def to_chw(arr: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1] (the model's input), via the one converter."""
    from components.data.dataset import to_tensor

    return to_tensor(arr).numpy()


def read_probe(path: Path) -> np.ndarray:
    if not path.is_file():
        raise StageError(f"{path}: no such probe image")
    return images.read_image(path)  # ImageError (a ValueError) names the file


@dataclass
class Gallery:
    names: list[str]  # file (relative to the folder) or image_id
    person_ids: list[int | None]
    images: list[np.ndarray]  # HxWx3 uint8


def person_id(name: str) -> int | None:
    m = PID_RE.match(Path(name).name)
    return int(m.group(1)) if m else None


def read_gallery(path: Path) -> Gallery:
    if path.is_dir():
        return _gallery_folder(path)
    if path.is_file() and path.suffix == ".parquet":
        return _gallery_table(path)
    if path.exists():
        raise StageError(f"--gallery {path}: neither a folder of images nor a .parquet table")
    raise StageError(f"--gallery {path}: no such folder or table")


def _gallery_folder(folder: Path) -> Gallery:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in images.IMAGE_SUFFIXES)
    g, bad = Gallery([], [], []), []
    for p in files:
        try:
            g.images.append(images.read_image(p))
        except images.ImageError as exc:
            bad.append(str(exc))
            continue
        name = p.relative_to(folder).as_posix()
        g.names.append(name)
        g.person_ids.append(person_id(name))
    if bad:
        log.warning("gallery: skipped %d unreadable image(s), e.g. %s", len(bad), bad[0])
    if not g.images:
        raise StageError(f"--gallery {folder}: no readable images ({', '.join(images.IMAGE_SUFFIXES)}) in it")
    return g


def _gallery_table(path: Path) -> Gallery:
    import pyarrow.compute as pc

    from components.data import table as T

    t = T.read_table(path)  # TableError (a ValueError) names the file
    missing = [c for c in (T.IMAGE_ID, T.PERSON_ID, T.IMAGE) if c not in t.column_names]
    if missing:
        raise StageError(f"--gallery {path}: no column(s) {missing}; use a canonical, degraded or split table")
    if T.SPLIT in t.column_names:
        t = t.filter(pc.equal(t[T.SPLIT], "gallery"))
    elif T.ROLE in t.column_names:
        t = t.filter(pc.equal(t[T.ROLE], "hr"))
    g, seen = Gallery([], [], []), set()
    for image_id, pid, data in zip(t[T.IMAGE_ID].to_pylist(), t[T.PERSON_ID].to_pylist(), t[T.IMAGE].to_pylist()):
        if image_id in seen:  # a split table repeats gallery images over its draws
            continue
        seen.add(image_id)
        g.names.append(image_id)
        g.person_ids.append(int(pid))
        g.images.append(images.decode(data, f"{path}:{image_id}"))
    if not g.images:
        raise StageError(f"--gallery {path}: no gallery images in it")
    return g


# ---------------------------------------------------------------------- ranking
@dataclass
class QueryResult:
    order: np.ndarray  # gallery indices, best first (top-k)
    distances: np.ndarray  # their distances
    r_p: float
    scale_probs: np.ndarray  # [N]
    scales: list[float]


def embed_gallery(model, gallery: Gallery, batch_size: int) -> np.ndarray:
    """F's embeddings [M, D]: images resized to the model's HR input size, in batches."""
    meta = (model.metadata.metadata or {}) if model.metadata else {}
    size = (meta.get("input_height"), meta.get("input_width"))
    if None not in size:
        resized = [images.resize(im, int(size[0]), int(size[1])) for im in gallery.images]
    else:  # a model without the size in its metadata: one call per image size
        resized = list(gallery.images)
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(resized):
        groups.setdefault(im.shape, []).append(i)
    out = [None] * len(resized)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            emb = model.predict(np.stack([to_chw(resized[i]) for i in chunk]), params={"role": "gallery"})
            for i, e in zip(chunk, emb["embedding"]):
                out[i] = e
    return np.stack(out)


def query(model, probe: np.ndarray, gallery: Gallery, top_k: int = 10, batch_size: int = 64) -> QueryResult:
    from components.metrics import euclidean_distances

    p = model.predict(to_chw(probe)[None], params={"role": "probe"})
    g = embed_gallery(model, gallery, batch_size)
    d = euclidean_distances(p["embedding"], g).numpy()[0]
    order = np.argsort(d, kind="stable")[:top_k]
    meta = (model.metadata.metadata or {}) if model.metadata else {}
    probs = np.asarray(p["scale_probs"][0], dtype=np.float64)
    scales = [float(s) for s in meta.get("scales", range(1, len(probs) + 1))]
    return QueryResult(order, d[order], float(p["r_p"][0]), probs, scales)


def print_result(probe_name: str, probe: np.ndarray, gallery: Gallery, r: QueryResult, model_uri: str,
                 probe_pid: int | None = None) -> None:
    probs = "  ".join(f"x{s:g} {p:.3f}" for s, p in zip(r.scales, r.scale_probs))
    who = "" if probe_pid is None else f", person {probe_pid}"
    print(f"model {model_uri}; gallery of {len(gallery.images)} image(s)")
    print(f"probe {probe_name} ({probe.shape[1]}x{probe.shape[0]}{who}): r_p = x{r.r_p:g}   P: {probs}")
    width = max([7, *(len(gallery.names[i]) for i in r.order)])
    print(f"{'rank':>4}  {'gallery':<{width}}  {'person':>6}  {'distance':>10}")
    for rank, (i, d) in enumerate(zip(r.order, r.distances), start=1):
        pid = "?" if gallery.person_ids[i] is None else str(gallery.person_ids[i])
        print(f"{rank:>4}  {gallery.names[i]:<{width}}  {pid:>6}  {d:>10.4f}")


def write_picture(path: Path, model, probe: np.ndarray, gallery: Gallery, r: QueryResult,
                  probe_pid: int | None = None) -> None:
    """The ranked list as a PNG via components.figures.ranked_list (skipped if that is not there);
    gallery images framed green / red when the probe's file name gives its person id."""
    try:
        from components.figures import ranked_list
    except ImportError as exc:
        log.warning("--picture: components.figures.ranked_list is not available (%s); no picture written", exc)
        return
    x = to_chw(probe)
    try:  # G's recoveries at every scale, from the loaded LRReIDModel
        recoveries = model.unwrap_python_model().recover_all(x)
    except AttributeError:  # another pyfunc model: no recoveries drawn
        recoveries = None
    ids = lambda i: "?" if gallery.person_ids[i] is None else str(gallery.person_ids[i])  # noqa: E731
    try:
        ranked_list([x], [recoveries or []], [[gallery.images[i] for i in r.order]], path,
                    probe_labels=[f"r_p = x{r.r_p:g}"],
                    scale_probs=[list(r.scale_probs)] if recoveries else None,
                    scales=r.scales if recoveries else None,
                    chosen=[r.r_p] if recoveries else None,
                    matches=None if probe_pid is None else [[gallery.person_ids[i] == probe_pid for i in r.order]],
                    gallery_labels=[[f"id {ids(i)}, d={d:.2f}" for i, d in zip(r.order, r.distances)]],
                    top_k=len(r.order))
    except (TypeError, ValueError) as exc:
        raise StageError(f"--picture {path}: components.figures.ranked_list failed ({exc})") from None
    log.info("wrote %s", path)
