"""What one Ray Train fit costs before and after its training loop, on this machine.

Starts a local Ray the way the stages do (``pipelines.cluster.start_local_ray``), then runs
``--fits`` TorchTrainer fits whose loop only reports once, one worker of one CPU, and prints
each fit's wall time (the first one also creates Train's cluster-wide actors). Run it once per
setting of Ray Train's environment flags, each in a fresh process, e.g.:

    PYTHONPATH=. .venv/bin/python bench/bench_ray_fit_startup.py
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 PYTHONPATH=. .venv/bin/python bench/bench_ray_fit_startup.py

The tests' tiny fits are mostly this overhead (tests/test_train_ray.py, tests/test_tune.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def loop(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fits", type=int, default=3)
    ap.add_argument("--setup-hook", help="a worker_process_setup_hook for every Ray worker (e.g. tests.faults.break_bf16)")
    args = ap.parse_args()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.cluster import start_local_ray

    t0 = time.perf_counter()
    hook = {"worker_process_setup_hook": args.setup_hook, "env_vars": {"PYTHONPATH": os.getcwd()}}
    start_local_ray(num_cpus=2, runtime_env=hook if args.setup_hook else None)
    start = time.perf_counter() - t0
    seconds = []
    with tempfile.TemporaryDirectory() as storage:
        for k in range(args.fits):
            t = time.perf_counter()
            TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name=f"fit{k}", storage_path=storage)).fit()
            seconds.append(round(time.perf_counter() - t, 1))
    flags = {k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")}
    print(json.dumps({"ray_start_s": round(start, 1), "fit_s": seconds, "setup_hook": args.setup_hook, "flags": flags}))


if __name__ == "__main__":
    main()
