"""Benchmark: probes per second through the full PRI path (P -> r_p -> G at r_p -> F).

The LR probes of the default test split (data/split, mixed x2 / x3 / x4 sizes)
go through ``PRI.embed_probe`` with the adaptive choice, one probe at a time
(batch 1) and in batches of 64 (grouped by size inside, as the evaluate stage
does), in fp32 and under bf16 autocast. Weights: models/model.pt if it exists
(else random: the cost is the same).

    PYTHONPATH=. .venv/bin/python bench/bench_inference.py [--probes 256] [--preset paper]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from pathlib import Path

import torch

from components.config import load_params
from components.data import table as T
from components.data.dataset import SizeGroups
from components.evaluation import decode_images, load_test_set
from components.models.pri import Adaptive, build_pri
from components.training import load_weights_file


def probes_per_second(pri, probes: list[torch.Tensor], batch: int, precision: str) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        pri.embed_probe(SizeGroups.of(probes[:batch]), Adaptive())  # warm-up
        start = time.perf_counter()
        for i in range(0, len(probes), batch):
            pri.embed_probe(SizeGroups.of(probes[i:i + batch]), Adaptive())
        return len(probes) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None, help="e.g. paper (random weights at the paper's sizes)")
    ap.add_argument("--split", default="data/split/split.parquet")
    ap.add_argument("--probes", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params, preset=args.preset)
    test = load_test_set(T.read_table(Path(args.split), T.SPLIT_SCHEMA), repeats=1)
    probes = decode_images(test.query.slice(0, args.probes))
    base = load_params(args.params)
    if params.degrade.hr_height != base.degrade.hr_height:  # a preset's HR size: scale the probes with it
        f = params.degrade.hr_height / base.degrade.hr_height
        probes = [torch.nn.functional.interpolate(p[None], scale_factor=f, mode="bilinear")[0] for p in probes]
    weights = Path("models/model.pt")
    if weights.exists() and not args.preset:
        state, meta = load_weights_file(weights)
        pri = build_pri(params.model, int(meta["num_classes"]))
        pri.load_state_dict(state)
        source = str(weights)
    else:
        pri = build_pri(params.model, 400)
        source = "random weights"
    pri.eval()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
          f"{len(probes)} probes ({sorted({tuple(p.shape[-2:]) for p in probes})}), "
          f"{params.model.backbone} at {params.model.input_height}x{params.model.input_width}, {source}\n")
    print("| precision | batch | probes/s | ms/probe |\n|---|---:|---:|---:|")
    for precision in ("fp32", "bf16"):
        for batch in (1, 64):
            n = probes if batch > 1 else probes[: max(16, len(probes) // 4)]
            rate = probes_per_second(pri, n, batch, precision)
            print(f"| {precision} | {batch} | {rate:.1f} | {1000 / rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
