"""Read the source dataset in its standard layout into the canonical table.

Inputs:  data/raw (data.layout: synthetic, market1501, dukemtmc, cuhk03, msmt17,
         viper, caviar)
Outputs: data/canonical.parquet (image_id, person_id, camera_id, source_path,
         source_split, height, width, image as PNG bytes), reports/ingest.json
         (with another --out, x.parquet: the report goes next to it, x.json)
Params:  data.layout, data.cuhk03_variant
Junk images (person id -1) are dropped and counted; a corrupt image or a file
name that does not parse stops the stage with the file named.
"""

from __future__ import annotations

import argparse

from components.data import table as T
from components.data.layouts import import_layout
from components.fsutil import write_json
from pipelines.common import CANONICAL, RAW, add_params_arg, add_report_arg, log, params_from, report_path, timed


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--input", default=RAW, help=f"dataset folder (default: {RAW})")
    parser.add_argument("--out", default=CANONICAL, help=f"output table (default: {CANONICAL})")
    add_report_arg(parser, "ingest.json")


def run(args: argparse.Namespace) -> None:
    params = params_from(args)
    with timed("ingest"):
        result = import_layout(args.input, params.data.layout,
                               cuhk03_variant=params.data.cuhk03_variant, progress=not args.no_progress)
    table = result.table
    T.write_table(table, args.out, T.CANONICAL_SCHEMA)
    report = {
        "images": table.num_rows,
        "identities": len(set(table[T.PERSON_ID].to_pylist())),
        "cameras": len(set(table[T.CAMERA_ID].to_pylist())),
        "dropped": result.dropped,
    }
    write_json(report_path(args, CANONICAL, "ingest.json"), report)
    for note in result.notes:
        log.info(note)
    for reason, n in result.dropped.items():
        log.info("dropped %d: %s", n, reason)
    log.info("wrote %s: %d images of %d identities", args.out, report["images"], report["identities"])
