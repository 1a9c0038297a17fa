"""Show a preset of params (presets/<name>.yaml), or turn it into `dvc exp run -S` arguments.

    lrreid preset paper --show                       # the keys it changes, old -> new
    dvc exp run $(lrreid preset paper --set-args)    # run the pipeline with them

The preset is validated together with params.yaml before anything is printed.
Presets: paper (both papers' settings, GPUs: PRI with resnet50, 384x128, RDN
16/8/64/64, T1/T2 = 20/60, batch 16 = 4 x 4, Adam 0.01 / 0.1; FFSR + RIFE with
RIFE-50, FFSR at 32 channels, SGD 0.01 / 0.01 / 0.001 over three steps of 60
epochs, /10 after 30, batch 32); claim (PRI's claim run on CPUs: 500 identities,
128x64, LR sensor noise [0, 16, 48], T1/T2 = 10/8, Bicubic + F; bench/claim_run.py
runs its seeds).
"""

from __future__ import annotations

import argparse
import json

import yaml

from components.config import load_params, preset_overrides
from pipelines.tracking import flatten


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="preset name (a file presets/<name>.yaml)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--show", action="store_true", help="list the changed keys (the default)")
    group.add_argument("--set-args", action="store_true", help="print `-S key=value` arguments for dvc exp run")


def run(args: argparse.Namespace) -> None:
    load_params(args.params, preset=args.name)  # the merged params must validate
    base = flatten(yaml.safe_load(open(args.params)) or {})
    overrides = flatten(preset_overrides(args.name))
    if args.set_args:
        items = [f"-S {k}={json.dumps(yaml.safe_load(v)) if v.startswith('[') else v}" for k, v in overrides.items()]
        print(" ".join(items))
        return
    for key, value in overrides.items():
        print(f"{key}: {base.get(key, '(default)')} -> {value}")
