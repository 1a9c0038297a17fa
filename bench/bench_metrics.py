"""Benchmark: components.metrics.evaluate against the straightforward per-query NumPy loop.

For each problem (num_query x num_gallery random float32 distances; num_gallery / 10
person ids, 6 cameras) it times evaluate() and the loop (reference_evaluate in
tests/test_metrics.py, torchreid's eval_market1501 in NumPy), checks that they
agree, and measures evaluate's peak memory above the distance matrix itself.
Each problem runs in a fresh process (multiprocessing "spawn"), which reads its
own peak RSS (ru_maxrss) after building the inputs and after evaluate().

    PYTHONPATH=. .venv/bin/python bench/bench_metrics.py [--problems 10000x10000,50000x20000]
        [--loop-queries 5000] [--repeats 3] [--features [50000x50000x512]]

--loop-queries N times the loop on the first N queries only and scales its time
linearly to all queries (the loop's cost per query does not depend on the
number of queries); the agreement check is then on those N queries.
--features also measures evaluate_features on random features (num_query x
num_gallery x dim), which never holds the full distance matrix.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import time

import numpy as np


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def random_ids(rng, num_q: int, num_g: int):
    num_ids = max(num_g // 10, 1)
    return (rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g),
            rng.integers(0, 6, num_q), rng.integers(0, 6, num_g))


def measure_distances(num_q: int, num_g: int, loop_queries: int, repeats: int, seed: int) -> dict:
    """In a fresh process: time (best of repeats) and memory (first run) of evaluate(), time of the
    loop (one run), and the differences of their results."""
    import torch

    from components.metrics import evaluate
    from tests.test_metrics import reference_evaluate

    rng = np.random.default_rng(seed)
    evaluate(rng.random((50, 100)), *random_ids(rng, 50, 100))  # warm-up: torch's thread pool, lazy imports
    distmat = rng.random((num_q, num_g), dtype=np.float32)
    ids = random_ids(rng, num_q, num_g)
    before = peak_rss_mib()
    start = time.perf_counter()
    result = evaluate(distmat, *ids)
    eval_s = time.perf_counter() - start
    extra_mib = peak_rss_mib() - before
    for _ in range(repeats - 1):
        start = time.perf_counter()
        evaluate(distmat, *ids)
        eval_s = min(eval_s, time.perf_counter() - start)

    n = min(loop_queries or num_q, num_q)
    subset = (distmat[:n], *(x[:n] if i in (0, 2) else x for i, x in enumerate(ids)))
    start = time.perf_counter()
    expected = reference_evaluate(*subset)
    loop_s = (time.perf_counter() - start) * num_q / n
    if n < num_q:
        result = evaluate(*subset)
    return {"problem": f"{num_q}x{num_g}", "loop_s": loop_s, "loop_queries": n, "eval_s": eval_s,
            "cmc_diff": float(np.abs(result["cmc"] - expected["cmc"]).max()),
            "map_diff": abs(result["mAP"] - expected["mAP"]), "minp_diff": abs(result["mINP"] - expected["mINP"]),
            "extra_mib": extra_mib, "input_mib": distmat.nbytes / 2**20, "threads": torch.get_num_threads()}


def measure_features(num_q: int, num_g: int, dim: int, seed: int) -> dict:
    """In a fresh process: time and memory of evaluate_features() on random features."""
    from components.metrics import evaluate_features

    rng = np.random.default_rng(seed)
    evaluate_features(rng.standard_normal((50, 8)), rng.standard_normal((100, 8)), *random_ids(rng, 50, 100))
    qf = rng.standard_normal((num_q, dim), dtype=np.float32)
    gf = rng.standard_normal((num_g, dim), dtype=np.float32)
    ids = random_ids(rng, num_q, num_g)
    before = peak_rss_mib()
    start = time.perf_counter()
    evaluate_features(qf, gf, *ids)
    return {"problem": f"features {num_q}x{num_g}x{dim}", "eval_s": time.perf_counter() - start,
            "extra_mib": peak_rss_mib() - before, "input_mib": (qf.nbytes + gf.nbytes) / 2**20,
            "full_mib": num_q * num_g * 4 / 2**20}


def in_fresh_process(fn, *args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def sizes(spec: str) -> list[int]:
    return [int(x) for x in spec.lower().split("x")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="10000x10000,50000x20000",
                    help="comma-separated num_query x num_gallery (default: %(default)s)")
    ap.add_argument("--loop-queries", type=int, default=0,
                    help="time the loop on this many queries and extrapolate (default: all queries)")
    ap.add_argument("--features", nargs="?", const="50000x50000x512", default=None,
                    help="also measure evaluate_features on num_query x num_gallery x dim random features "
                         "(default when given without a value: %(const)s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of evaluate; the best time counts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rows = [in_fresh_process(measure_distances, *sizes(p), args.loop_queries, args.repeats, args.seed)
            for p in args.problems.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}, torch threads {rows[0]['threads']}; evaluate: best of {args.repeats} runs, "
          "loop: one run; random float32 distances, num_gallery/10 person ids, 6 cameras\n")
    print("| problem | loop (s) | evaluate (s) | speed-up | max abs CMC diff | abs mAP diff | abs mINP diff "
          "| evaluate peak RSS above distmat (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for r in rows:
        num_q = sizes(r["problem"])[0]
        mark = ""
        if r["loop_queries"] < num_q:
            mark = "*"
            notes.append(f"\\* {r['problem']}: loop timed on the first {r['loop_queries']} queries and "
                         f"scaled x{num_q / r['loop_queries']:.1f}; differences on those queries.")
        print(f"| {r['problem']} ({r['input_mib']:.0f} MiB) | {r['loop_s']:.2f}{mark} | {r['eval_s']:.2f} "
              f"| {r['loop_s'] / r['eval_s']:.0f}x | {r['cmc_diff']:.1e} | {r['map_diff']:.1e} "
              f"| {r['minp_diff']:.1e} | {r['extra_mib']:.0f} |")
    for note in notes:
        print(f"\n{note}")

    if args.features:
        r = in_fresh_process(measure_features, *sizes(args.features), args.seed)
        print(f"\nevaluate_features, {r['problem']}: {r['eval_s']:.1f} s, peak RSS {r['extra_mib']:.0f} MiB "
              f"above the features ({r['input_mib']:.0f} MiB); the full distance matrix would be "
              f"{r['full_mib']:.0f} MiB.")


if __name__ == "__main__":
    main()
