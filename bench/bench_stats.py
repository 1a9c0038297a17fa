"""Benchmark: components.stats.paired_bootstrap and oracle_baselines at the evaluate stage's size.

The bootstrap: 100,000 probe-draw records of 750 identities (Market-1501's test set,
10 gallery draws), 10,000 resamples of the identities, for K = 8 comparisons at
once and for K = 1. Then oracle_baselines on 10 draws x 3368 probes (MLR-Market-1501's
query set) x 4 scales (in-sample and held-out oracles). Random data: the time does
not depend on the values. Each figure is the best of --repeats runs; one Markdown
table row per case.

    PYTHONPATH=. .venv/bin/python bench/bench_stats.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from components.stats import oracle_baselines, paired_bootstrap

RECORDS, IDENTITIES, RESAMPLES = 100_000, 750, 10_000
DRAWS, PROBES, SCALES = 10, 3368, 4


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    groups = np.sort(rng.integers(0, IDENTITIES, RECORDS))
    diffs = rng.choice([-100.0, 0.0, 100.0], size=(8, RECORDS), p=[0.1, 0.8, 0.1])
    s = rng.uniform(0.2, 0.8, PROBES)
    rank = rng.geometric(s[None, :, None], size=(DRAWS, PROBES, SCALES)) - 1
    rank[rng.random((DRAWS, PROBES)) < 0.05] = -1
    ap = np.where(rank >= 0, 1.0 / np.maximum(rank + 1, 1), 0.0)

    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}, best of {args.repeats}\n")
    print("| case | records | identities | resamples | K | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for K in (8, 1):
        t = best_of(args.repeats, lambda: paired_bootstrap(diffs[:K], groups, n_resamples=RESAMPLES))
        print(f"| paired_bootstrap | {RECORDS} | {IDENTITIES} | {RESAMPLES} | {K} | {t:.2f} |")
    t = best_of(args.repeats, lambda: oracle_baselines(rank, ap))
    print(f"| oracle_baselines ({DRAWS} draws x {PROBES} probes x {SCALES} scales) "
          f"| {DRAWS * PROBES} | - | - | - | {t:.2f} |")


if __name__ == "__main__":
    main()
