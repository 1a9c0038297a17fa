"""Pretrain the SR and re-id modules on Ray Train (PRI Sec. 3.5; FFSR paper steps 1-2).

PRI: L_sr + alpha L_id + beta L_tri, x_l and x_sl each recovered at a randomly
chosen scale, for train.pretrain_epochs (T1) epochs; P is not trained yet.
FFSR + RIFE (train.model = ffsr_rife): FFSR fitted with its foreground-focus
loss for T1 epochs, then RIFE with L^RIFE for T1 epochs.

Inputs:  data/split/split.parquet, data/split/pairs.parquet
Outputs: models/pretrain.pt, reports/pretrain.json; an MLflow run (mlflow.db)
         and Ray checkpoints under train.storage_path. With --variant V (an
         ablation variant): models/ablation/V/pretrain.pt, reports/ablation/V/pretrain.json
Params:  model.*, loss.*, train.* (workers, epochs, learning rates, precision)
Running it again after a crash resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.common import REPORTS, SPLIT_DIR, add_params_arg, add_variant_arg, params_from, variant_path

OUT = "models/pretrain.pt"


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    add_variant_arg(parser)
    parser.add_argument("--split", default=SPLIT_DIR, help=f"split folder (default: {SPLIT_DIR})")
    parser.add_argument("--out", default=None, help=f"weights (default: {OUT}, or the variant's)")


def run(args: argparse.Namespace) -> None:
    from pipelines.ray_train import run_stage

    params = params_from(args)
    run_stage(params, phase="pretrain", split_dir=Path(args.split), out=Path(args.out or variant_path(OUT, args.variant)),
              report=variant_path(Path(REPORTS) / "pretrain.json", args.variant), variant=args.variant)
