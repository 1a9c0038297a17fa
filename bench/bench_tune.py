"""Benchmark: a small `lrreid tune` search (issue 6) on this machine.

Runs pipelines.tune.search in a temporary folder on the first ``--identities``
training identities of the default split (data/split: `make run` or `dvc repro
split`) with the default model, ``--trials`` trials of the default search space,
ASHA over ``--epochs`` joint epochs (grace 1, reduction factor 2), one trial at a
time. Prints, as Markdown rows:

- trials per hour (wall time of the whole search, shared pretraining included);
- trial-epochs run vs every trial run to the end (the share ASHA stopped);
- the scheduling overhead of a trial: Tune starting the trial -> its Ray Train
  workers starting the first training step (median and range).

    PYTHONPATH=. .venv/bin/python bench/bench_tune.py [--identities 40] [--trials 6] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from components.config import load_params, merge, validate_params
from components.data import table as T

REPO = Path(__file__).resolve().parents[1]


def small_split(split_dir: Path, identities: int, out: Path) -> None:
    """The split with only its first ``identities`` training identities (test rows dropped)."""
    split = T.read_table(split_dir / "split.parquet", T.SPLIT_SCHEMA)
    train = split.filter(pc.equal(split[T.SPLIT], "train"))
    keep = pa.array(sorted(set(train[T.PERSON_ID].to_pylist()))[:identities])
    pairs = T.read_table(split_dir / "pairs.parquet", T.PAIRS_SCHEMA)
    out.mkdir(parents=True)
    T.write_table(train.filter(pc.is_in(train[T.PERSON_ID], value_set=keep)), out / "split.parquet", T.SPLIT_SCHEMA)
    T.write_table(pairs.filter(pc.is_in(pairs[T.PERSON_ID], value_set=keep)), out / "pairs.parquet", T.PAIRS_SCHEMA)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--val-identities", type=int, default=8)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()

    from pipelines.tune import search

    base = load_params(REPO / "params.yaml").model_dump(mode="json")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small_split(REPO / "data" / "split", args.identities, tmp / "split")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        os.chdir(tmp)
        params = validate_params(merge(base, {
            "train": {"storage_path": str(tmp / "ray")},
            "tune": {"num_samples": args.trials, "epochs": args.epochs, "grace_period": 1, "reduction_factor": 2,
                     "val_identities": args.val_identities, "name": "bench"}}))
        start = time.perf_counter()
        report = search(params, tmp / "split")
        wall = time.perf_counter() - start
    overheads = [t["start_overhead_s"] for t in report["trials"] if t["start_overhead_s"] is not None]
    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs; {args.identities} training identities "
          f"({args.val_identities} held out), default model, {args.trials} trials x up to {args.epochs} joint epochs")
    print("| trials | wall (s) | trials / hour | trial-epochs run | without ASHA | stopped early | "
          "start overhead median (min-max) s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {report['num_trials']} | {wall:.0f} | {report['num_trials'] / wall * 3600:.1f} | "
          f"{report['trial_epochs']} | {report['trial_epochs_without_asha']} | "
          f"{report['stopped_early']} ({report['asha_saved']:.0%} of the epochs saved) | "
          f"{report['median_start_overhead_s']:.1f} ({min(overheads):.1f}-{max(overheads):.1f}) |")
    print(json.dumps({k: v for k, v in report.items() if k != "trials"}, indent=1, default=str))


if __name__ == "__main__":
    main()
