"""Pretrain the SR and re-id modules on Ray Train (PRI Sec. 3.5; FFSR paper steps 1-2).

PRI: L_sr + alpha L_id + beta L_tri, x_l and x_sl each recovered at a randomly
chosen scale, for train.pretrain_epochs (T1) epochs; P is not trained yet.
FFSR + RIFE (train.model = ffsr_rife): FFSR fitted with its foreground-focus
loss for T1 epochs, then RIFE with L^RIFE for T1 epochs.

Inputs:  data/split/split.parquet, data/split/pairs.parquet
Outputs: models/pretrain.pt, reports/pretrain.json; an MLflow run (mlflow.db)
         and Ray checkpoints under train.storage_path
Params:  model.*, loss.*, train.* (workers, epochs, learning rates, precision)
Running it again after a crash resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.common import REPORTS, SPLIT_DIR, add_params_arg, params_from

OUT = "models/pretrain.pt"


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--split", default=SPLIT_DIR, help=f"split folder (default: {SPLIT_DIR})")
    parser.add_argument("--out", default=OUT, help=f"weights (default: {OUT})")


def run(args: argparse.Namespace) -> None:
    from pipelines.ray_train import run_stage

    params = params_from(args)
    run_stage(params, phase="pretrain", split_dir=Path(args.split), out=Path(args.out),
              report=Path(REPORTS) / "pretrain.json")
