"""Benchmark: training throughput (issue 4) on the default params and data/split.

Three measurements, each printed as a Markdown table row:

- ``labels``: joint-training samples/s with the cached label bank (one no-grad
  refresh per omega epochs, counted in the epoch's time) vs the naive soft labels
  recomputed for every batch; same model, data and seed, in one process.
- ``overhead``: one pretraining epoch through ``TorchTrainer`` (1 worker with
  ``train.cpus_per_worker`` CPUs) vs the same epoch function in this process with
  the same number of torch threads: the epoch time inside the loop, and the wall
  time of the whole call (Ray start, worker group, checkpoint included).
- ``workers``: the same pretraining epoch through TorchTrainer with 1 worker x 2
  CPUs and with 2 workers x 1 CPU (DDP over gloo), and each worker's peak RSS.

``--identities N`` trains on the first N training identities only (the default
dataset has 400; all of them: ``--identities 0``). Needs data/split
(``make run`` or ``dvc repro split``); weights start random (ImageNet weights are
not downloaded), which does not change the cost of a step.

    PYTHONPATH=. .venv/bin/python bench/bench_train.py [labels overhead workers] [--identities 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from components.config import Params, available_cpus, load_params, merge, validate_params
from components.data import table as T
from components.data.dataset import make_train_loader
from components.models.pri import build_pri
from components.soft_label import LabelBank
from components.optim import build_optimizer
from components.precision import resolve_precision
from components.training import refresh_label_bank, run_pri_epoch


def training_data(split_dir: Path, identities: int):
    """The split's training rows and LR/HR pairs, restricted to the first ``identities`` ids."""
    split = T.read_table(split_dir / "split.parquet", T.SPLIT_SCHEMA)
    table = split.filter(pc.equal(split[T.SPLIT], "train"))
    pairs = T.read_table(split_dir / "pairs.parquet", T.PAIRS_SCHEMA)
    if identities:
        keep = sorted(set(table[T.PERSON_ID].to_pylist()))[:identities]
        table = table.filter(pc.is_in(table[T.PERSON_ID], value_set=pa.array(keep)))
        pairs = pairs.filter(pc.is_in(pairs[T.PERSON_ID], value_set=pa.array(keep)))
    return table, pairs


def loader_for(params: Params, table, pairs):
    t = params.train
    return make_train_loader(table, pairs, scales=params.model.scales, P=t.identities_per_batch,
                             K=t.images_per_identity, flip_p=t.flip_p, seed=t.seed)


def warm_up(params: Params, loader, precision: str) -> None:
    """Two joint steps with naive labels on a throw-away model: the first calls of the
    bf16 kernels and the allocator's growth are not billed to either measurement."""
    m, t = params.model, params.train
    model = build_pri(m, loader.dataset.num_classes)
    bank = LabelBank(len(loader.dataset), len(m.scales), m.omega, kind=m.label, gamma=m.gamma, seed=t.seed)
    batches = [b for _, b in zip(range(2), loader)]
    run_pri_epoch(model, batches, build_optimizer(model, t, "joint"), phase="joint", epoch=0, loss=params.loss,
                  bank=bank, naive_labels=True, device=torch.device("cpu"), precision=precision)


def bench_labels(params: Params, table, pairs) -> list[str]:
    """Cached label bank vs naive per-step labels: one joint epoch each from the same weights."""
    torch.set_num_threads(params.train.local_cpus())
    device = torch.device("cpu")
    precision = resolve_precision(device, params.train.precision)
    loader = loader_for(params, table, pairs)
    dataset = loader.dataset
    m, t = params.model, params.train
    torch.manual_seed(t.seed)
    start_weights = build_pri(m, dataset.num_classes).state_dict()
    warm_up(params, loader, precision)
    rows = []
    for way in ("cached", "naive"):
        model = build_pri(m, dataset.num_classes)
        model.load_state_dict(start_weights)
        optimizer = build_optimizer(model, t, "joint")
        bank = LabelBank(len(dataset), len(m.scales), m.omega, kind=m.label, gamma=m.gamma, seed=t.seed)
        generator = torch.Generator().manual_seed(t.seed)
        start = time.perf_counter()
        refresh = 0.0
        if way == "cached":
            refresh = refresh_label_bank(model, dataset, bank, 0, device=device, precision=precision)
        metrics = run_pri_epoch(model, loader, optimizer, phase="joint", epoch=0, loss=params.loss, bank=bank,
                                naive_labels=way == "naive", device=device, precision=precision,
                                generator=generator)
        seconds = time.perf_counter() - start
        rows.append((way, metrics["samples"], refresh, seconds, metrics["samples"] / seconds, metrics["L"]))
        print(f"  {way}: {seconds:.1f} s", flush=True)
    cached, naive = rows[0][4], rows[1][4]
    out = ["| labels | samples | refresh s | epoch s (refresh included) | samples/s | L |", "|---|---:|---:|---:|---:|---:|"]
    out += [f"| {w} | {n:.0f} | {r:.1f} | {s:.1f} | {v:.2f} | {L:.4f} |" for w, n, r, s, v, L in rows]
    out.append(f"\ncached / naive at omega = {m.omega}: **{cached / naive:.2f}x** samples/s")
    # The bank is refreshed once per omega epochs: amortise the measured refresh over omega
    _, n, refresh, seconds, _, _ = rows[0]
    train_only = seconds - refresh
    for omega in (2, 5, 10):
        out.append(f"- omega = {omega} (from the same measurement, refresh / omega per epoch): "
                   f"{n / (train_only + refresh / omega) / naive:.2f}x")
    out.append(f"- no refresh at all (the bound): {n / train_only / naive:.2f}x")
    return out


def plain_epoch(params: Params, table, pairs) -> dict:
    """One pretraining epoch in this process (the worker's loop without Ray)."""
    start = time.perf_counter()
    torch.set_num_threads(params.train.local_cpus())
    t = params.train
    torch.manual_seed(t.seed)
    loader = loader_for(params, table, pairs)
    model = build_pri(params.model, loader.dataset.num_classes, with_predictor=False)
    optimizer = build_optimizer(model, t, "pretrain")
    device = torch.device("cpu")
    metrics = run_pri_epoch(model, loader, optimizer, phase="pretrain", epoch=0, loss=params.loss, bank=None,
                            naive_labels=False, device=device, precision=resolve_precision(device, t.precision),
                            generator=torch.Generator().manual_seed(t.seed))
    return {"epoch_seconds": metrics["seconds"], "samples_per_s": metrics["samples_per_s"],
            "wall_seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ray_epoch(params: Params, table, pairs, *, num_workers: int, cpus_per_worker: int, work: Path) -> dict:
    """One pretraining epoch through pipelines.ray_train.fit (TorchTrainer), in a fresh local Ray."""
    import ray

    from pipelines import tracking
    from pipelines.ray_train import fit

    p = validate_params(merge(params.model_dump(mode="json"), {"train": {
        "num_workers": num_workers, "cpus_per_worker": cpus_per_worker, "pretrain_epochs": 1,
        "storage_path": str(work / "ray")}}))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    name = f"bench-{num_workers}x{cpus_per_worker}-{time.time_ns()}"
    start = time.perf_counter()
    run_id = tracking.start_run(name, p.model_dump(mode="json"), work / f"{name}.run_id")
    try:
        _, metrics = fit(p, phase="pretrain", name=name, table=table, pairs=pairs, run_id=run_id)
    finally:
        tracking.end_run(run_id)
    wall = time.perf_counter() - start
    ray.shutdown()
    peak = max(m.value for m in tracking.client().get_metric_history(run_id, "peak_rss_mb"))
    return {"epoch_seconds": metrics["seconds"], "samples_per_s": metrics["samples_per_s"],
            "wall_seconds": wall, "peak_rss_mb": peak}


def row(what: str, r: dict) -> str:
    return (f"| {what} | {r['epoch_seconds']:.1f} | {r['samples_per_s']:.2f} | {r['wall_seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} |")


HEADER = ["| run | epoch s (in loop) | samples/s | wall s (whole call) | peak RSS MiB (worker) |",
          "|---|---:|---:|---:|---:|"]


MEASUREMENTS = ("labels", "overhead", "workers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", default=list(MEASUREMENTS), help=" | ".join(MEASUREMENTS))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--split", default="data/split")
    ap.add_argument("--identities", type=int, default=100, help="first N training identities (0: all)")
    ap.add_argument("--repeats", type=int, default=2, help="overhead: interleaved runs of each way")
    args = ap.parse_args()
    unknown = set(args.what) - set(MEASUREMENTS)
    if unknown:
        ap.error(f"unknown measurement(s) {sorted(unknown)}: choose from {', '.join(MEASUREMENTS)}")
    params = load_params(args.params)
    table, pairs = training_data(Path(args.split), args.identities)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{table.num_rows} training images, {pairs.num_rows} LR/HR pairs, "
          f"{params.model.backbone} at {params.model.input_height}x{params.model.input_width}, "
          f"precision {params.train.precision}\n", flush=True)
    out = []
    if "labels" in args.what:
        out += ["### Joint training: cached label bank vs naive per-step soft labels", ""]
        out += bench_labels(params, table, pairs) + [""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "overhead" in args.what:  # interleaved, best of --repeats: this machine's timings are noisy
            plains, rays = [], []
            for _ in range(args.repeats):
                plains.append(plain_epoch(params, table, pairs))
                rays.append(ray_epoch(params, table, pairs, num_workers=1,
                                      cpus_per_worker=params.train.cpus_per_worker, work=work))
            plain = min(plains, key=lambda r: r["epoch_seconds"])
            ray1 = min(rays, key=lambda r: r["epoch_seconds"])
            out += [f"### One pretraining epoch: TorchTrainer (1 worker) vs a plain process "
                    f"(interleaved, best of {args.repeats})", ""] + HEADER
            out += [row(f"plain process, run {i + 1}", r) for i, r in enumerate(plains)]
            out += [row(f"TorchTrainer, 1 worker, run {i + 1}", r) for i, r in enumerate(rays)] + [""]
            out.append(f"Ray overhead: {100 * (ray1['epoch_seconds'] / plain['epoch_seconds'] - 1):+.1f}% epoch time, "
                       f"{100 * (ray1['wall_seconds'] / plain['wall_seconds'] - 1):+.1f}% wall time")
            out.append("")
        if "workers" in args.what:
            n = available_cpus()  # train.cpus_per_worker: auto gives one worker all of them
            one = ray_epoch(params, table, pairs, num_workers=1, cpus_per_worker=n, work=work)
            two = ray_epoch(params, table, pairs, num_workers=2, cpus_per_worker=max(1, n // 2), work=work)
            out += [f"### One pretraining epoch: 1 worker x {n} CPUs vs 2 workers x {max(1, n // 2)} CPUs "
                    "(DDP, gloo)", ""] + HEADER
            out += [row(f"1 worker x {n} CPUs", one), row(f"2 workers x {max(1, n // 2)} CPUs", two), ""]
            out.append(f"epoch time 2 workers / 1 worker: {two['epoch_seconds'] / one['epoch_seconds']:.2f}x")
    print("\n".join(out))


if __name__ == "__main__":
    main()
