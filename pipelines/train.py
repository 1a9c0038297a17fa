"""Joint training on Ray Train, from the pretrained weights (PRI Sec. 3.4-3.5; FFSR paper step 3).

PRI: all four losses (Eq. 6); r_p = argmax P(x_l) per sample; dynamic soft
labels (Eq. 3) from a label bank refreshed in a no-grad pass every model.omega
epochs (train.label_refresh = naive: every step); learning rates x
train.lr_decay; train.epochs (T2) epochs. FFSR + RIFE: L^FFSR + alpha L^RIFE (Eq. 4).

Inputs:  data/split/*.parquet, models/pretrain.pt
Outputs: models/model.pt, reports/train.json, reports/plots/r_p_history.csv;
         an MLflow run (mlflow.db) and Ray checkpoints under train.storage_path.
         With --variant V: models/ablation/V/model.pt (from models/ablation/V/pretrain.pt),
         reports/ablation/V/train.json
Params:  model.*, loss.*, train.*
Running it again after a crash resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.common import REPORTS, SPLIT_DIR, add_params_arg, add_variant_arg, params_from, variant_path
from pipelines.pretrain import OUT as PRETRAINED

OUT = "models/model.pt"


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    add_variant_arg(parser)
    parser.add_argument("--split", default=SPLIT_DIR, help=f"split folder (default: {SPLIT_DIR})")
    parser.add_argument("--init", default=None, help=f"pretrained weights (default: {PRETRAINED}, or the variant's)")
    parser.add_argument("--out", default=None, help=f"weights (default: {OUT}, or the variant's)")


def run(args: argparse.Namespace) -> None:
    from pipelines.training_stage import run_stage

    params = params_from(args)
    v = args.variant
    run_stage(params, phase="joint", split_dir=Path(args.split), out=Path(args.out or variant_path(OUT, v)),
              report=variant_path(Path(REPORTS) / "train.json", v),
              init=Path(args.init or variant_path(PRETRAINED, v)), variant=v)
