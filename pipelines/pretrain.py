"""Pretrain the SR and re-id modules on Ray Train (PRI Sec. 3.5; FFSR paper steps 1-2).

PRI: L_sr + alpha L_id + beta L_tri, x_l and x_sl each recovered at a randomly
chosen scale, for train.pretrain_epochs (T1) epochs; P is not trained yet.
FFSR + RIFE (train.model = ffsr_rife, or --variant ffsr_rife): step 1, FFSR
fitted with L^FFSR (ffsr_rife.ffsr), then step 2, RIFE with L^RIFE on FFSR's fixed
outputs (ffsr_rife.rife); each step its own optimiser and schedule. FFSR starts from
model.ffsr.weights if set (e.g. `lrreid pretrain-ffsr` on generic images).

Inputs:  data/split/split.parquet, data/split/pairs.parquet
Outputs: models/pretrain.pt, reports/pretrain.json; an MLflow run (mlflow.db)
         and Ray checkpoints under train.storage_path. With --variant V (an
         ablation variant): models/ablation/V/pretrain.pt, reports/ablation/V/pretrain.json;
         the curve (losses, validation rank-1 per epoch): reports/plots/pretrain_curve.csv
         or reports/ablation/V/pretrain_curve.csv
Params:  model.*, loss.*, train.* (workers, epochs, learning rates, precision), ffsr_rife.*
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
    from pipelines.training_stage import run_stage

    params = params_from(args)
    run_stage(params, phase="pretrain", split_dir=Path(args.split), out=Path(args.out or variant_path(OUT, args.variant)),
              report=variant_path(Path(REPORTS) / "pretrain.json", args.variant), variant=args.variant)
