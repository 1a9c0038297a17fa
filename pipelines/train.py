"""Joint training on Ray Train, from the pretrained weights (PRI Sec. 3.4-3.5; FFSR paper step 3).

PRI: all four losses (Eq. 6); r_p = argmax P(x_l) per sample; dynamic soft
labels (Eq. 3) from a label bank refreshed in a no-grad pass every model.omega
epochs (train.label_refresh = naive: every step); learning rates x
train.lr_decay; train.epochs (T2) epochs. FFSR + RIFE: L^FFSR + alpha L^RIFE (Eq. 4).

Inputs:  data/split/*.parquet, models/pretrain.pt
Outputs: models/model.pt, reports/train.json; an MLflow run (mlflow.db) and Ray
         checkpoints under train.storage_path
Params:  model.*, loss.*, train.*
Running it again after a crash resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.common import REPORTS, SPLIT_DIR, add_params_arg, params_from
from pipelines.pretrain import OUT as PRETRAINED

OUT = "models/model.pt"


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--split", default=SPLIT_DIR, help=f"split folder (default: {SPLIT_DIR})")
    parser.add_argument("--init", default=PRETRAINED, help=f"pretrained weights (default: {PRETRAINED})")
    parser.add_argument("--out", default=OUT, help=f"weights (default: {OUT})")


def run(args: argparse.Namespace) -> None:
    from pipelines.ray_train import run_stage

    params = params_from(args)
    run_stage(params, phase="joint", split_dir=Path(args.split), out=Path(args.out),
              report=Path(REPORTS) / "train.json", init=Path(args.init))
