"""Benchmark: synthesis + ingest + degrade + split of the default dataset.

Runs each `lrreid` stage as a user does (a fresh process, default params.yaml)
in a temporary folder, and prints per-stage wall time and images per second as
a Markdown table for BENCHMARKS.md.

    .venv/bin/python bench/bench_data.py [--params params.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["synthesize", "ingest", "degrade", "split"]


def run_once(params: Path) -> dict[str, float]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(params, Path(tmp) / "params.yaml")
        for stage in STAGES:
            start = time.perf_counter()
            subprocess.run(["lrreid", stage, "--no-progress"], cwd=tmp, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[stage] = time.perf_counter() - start
        times["images"] = json.loads((Path(tmp) / "reports" / "ingest.json").read_text())["images"]
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = [run_once(args.params) for _ in range(args.repeats)]
    n = runs[0]["images"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{n} images; median of {args.repeats} runs\n")
    print("| stage | wall time (s) | images/s |")
    print("|---|---:|---:|")
    total = 0.0
    for stage in STAGES:
        t = statistics.median(r[stage] for r in runs)
        total += t
        print(f"| {stage} | {t:.1f} | {n / t:.0f} |")
    print(f"| **total** | **{total:.1f}** | **{n / total:.0f}** |")


if __name__ == "__main__":
    main()
