"""Synthesise the low-resolution dataset with one of the papers' protocols.

Inputs:  data/canonical.parquet
Outputs: data/degraded.parquet (canonical columns + role 'hr'|'lr', scale,
         source_image_id), reports/degrade.json
         (with another --out, x.parquet: the report goes next to it, x.json)
Params:  degrade.protocol (mlr | vr | genuine), degrade.seed, degrade.hr_height,
         degrade.hr_width, degrade.scales (MLR), degrade.width_range (VR),
         degrade.lr_camera (genuine), degrade.lr_noise (LR sensor noise)
Identities seen by one camera only are dropped and counted (MLR, genuine).
"""

from __future__ import annotations

import argparse
from collections import Counter

from components.data import table as T
from components.data.protocols import degrade
from components.fsutil import write_json
from pipelines.common import CANONICAL, DEGRADED, add_params_arg, add_report_arg, log, params_from, report_path, timed


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--input", default=CANONICAL, help=f"canonical table (default: {CANONICAL})")
    parser.add_argument("--out", default=DEGRADED, help=f"output table (default: {DEGRADED})")
    add_report_arg(parser, "degrade.json")


def run(args: argparse.Namespace) -> None:
    params = params_from(args)
    canonical = T.read_table(args.input, T.CANONICAL_SCHEMA)
    with timed(f"degrade ({params.degrade.protocol})"):
        result = degrade(canonical, params.degrade, progress=not args.no_progress)
    out = result.table
    T.write_table(out, args.out, T.DEGRADED_SCHEMA)
    roles = Counter(out[T.ROLE].to_pylist())
    lr_scales = Counter(s for s, r in zip(out[T.SCALE].to_pylist(), out[T.ROLE].to_pylist()) if r == "lr")
    report = {
        "protocol": params.degrade.protocol,
        "hr_images": roles.get("hr", 0),
        "lr_images": roles.get("lr", 0),
        "identities": len(set(out[T.PERSON_ID].to_pylist())),
        "dropped": result.dropped,
    }
    if params.degrade.protocol == "mlr":
        report["lr_images_per_scale"] = {f"x{s:g}": n for s, n in sorted(lr_scales.items())}
    if result.lr_noise:
        report["lr_images_per_noise_sigma"] = {f"{s:g}": n for s, n in result.lr_noise.items()}
    write_json(report_path(args, DEGRADED, "degrade.json"), report)
    for note in result.notes:
        log.info(note)
    for reason, n in result.dropped.items():
        log.info("dropped %d: %s", n, reason)
    log.info("wrote %s", args.out)
