"""Benchmark: `dvc repro` with nothing changed (run `make run` once first).

    .venv/bin/python bench/bench_repro_noop.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    env = dict(os.environ, DVC_NO_ANALYTICS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    dvc = [str(Path(sys.executable).parent / "dvc"), "repro", "-q"]
    subprocess.run(dvc, cwd=REPO, env=env, check=True)  # bring everything up to date first
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = subprocess.run(dvc[:-1], cwd=REPO, env=env, check=True, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if "Running stage" in out.stdout:
            raise SystemExit(f"a stage ran, so this was not a no-op:\n{out.stdout}")
    print(f"dvc repro (no change): {', '.join(f'{t:.2f}' for t in times)} s; "
          f"median {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
