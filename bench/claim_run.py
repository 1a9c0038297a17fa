"""The claim run (issue 24): presets/claim.yaml over (data seed, split seed) pairs, pooled.

For each seed k, in this DVC workspace:

1. params.yaml := params.yaml + presets/claim.yaml + data.synthetic.seed = degrade.seed =
   split.seed = k (validated as every stage validates it);
2. ``lrreid synthesize`` (seed k's data) and ``dvc add data/raw``;
3. ``dvc exp run -n claim-seed<k>``: the pipeline as a named DVC experiment (``dvc exp show``);
4. its table, curves, figures and per-probe records are copied to ``reports/claim/seed<k>/``
   (the variants' curves to ``seed<k>/ablation/<variant>/``; the seed's wall time in ``time.json``).

Then ``lrreid compare --distinct-datasets`` pools the seeds' records into
``reports/claim/resplits.{md,json}`` (paired identity-bootstrap intervals over every seed's test
identities; each seed has its own people). params.yaml, data.dvc,
dvc.lock and the tracked reports are restored from git at the end, and ``dvc checkout`` brings back their outputs;
``dvc exp apply claim-seed<k>`` brings back a seed's (e.g. for bench/bench_scale_content.py).

    PYTHONPATH=. .venv/bin/python bench/claim_run.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from components.config import merge, preset_overrides, validate_params

OUT = Path("reports/claim")
COPIED = ["reports/ablation.md", "reports/ablation.json", "reports/eval/per_probe.parquet", "reports/degrade.json",
          "reports/plots/pretrain_curve.csv", "reports/plots/joint_curve.csv", "reports/figures/training_curves.png",
          "reports/figures/scale_histogram.png", "reports/train.json", "reports/pretrain.json"]
RESTORED = ["params.yaml", "data.dvc", "dvc.lock", "reports", ":(exclude)reports/claim"]  # the seeds' copies stay


def sh(*cmd: str, check: bool = True) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check).returncode


def write_params(base: dict, preset: str, seed: int) -> dict:
    """params.yaml for one seed: the preset on top of ``base``, the three seeds set to ``seed``; returns it."""
    seeds = {"data": {"synthetic": {"seed": seed}}, "degrade": {"seed": seed}, "split": {"seed": seed}}
    raw = merge(merge(base, preset_overrides(preset)), seeds)
    validate_params(raw, f"params.yaml + preset {preset} + seed {seed}")
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def run_seed(base: dict, preset: str, seed: int) -> None:
    variants = write_params(base, preset, seed)["ablation"]["variants"]
    start = time.perf_counter()
    sh("lrreid", "synthesize")
    sh("dvc", "add", "-q", "data/raw")
    sh("dvc", "exp", "run", "-n", f"{preset}-seed{seed}")
    out = OUT / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if Path(name).exists():
            shutil.copy2(name, out / Path(name).name)
    for variant in variants:  # the curves of the variants this run trained (the demo's others stay in git)
        (out / "ablation" / variant).mkdir(parents=True, exist_ok=True)
        for name in ("pretrain_curve.csv", "joint_curve.csv", "pretrain.json", "train.json"):
            if (Path("reports/ablation") / variant / name).exists():
                shutil.copy2(Path("reports/ablation") / variant / name, out / "ablation" / variant / name)
    (out / "time.json").write_text(json.dumps({"seed": seed, "wall_seconds": time.perf_counter() - start}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="claim")
    args = ap.parse_args()
    base = yaml.safe_load(Path("params.yaml").read_text())
    try:
        for seed in args.seeds:
            run_seed(base, args.preset, seed)
    finally:  # the workspace as committed; a seed's outputs stay reachable: `dvc exp apply claim-seed<k>`
        sh("git", "checkout", "--", *RESTORED)
        if sh("dvc", "checkout", "-q", check=False):
            print("dvc checkout: some outputs of the committed params are not in the cache; `dvc repro` "
                  "makes them", flush=True)
    files = sorted(str(p) for p in OUT.glob("seed*/per_probe.parquet") if p.parent.name[4:].isdigit())  # not seed0-64x32
    if len(files) > 1:
        sh("lrreid", "compare", *files, "--distinct-datasets", "--out", str(OUT))  # seed k: its own data


if __name__ == "__main__":
    main()
