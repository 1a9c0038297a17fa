"""Split identities into train and test, draw the galleries, list training pairs.

Inputs:  data/degraded.parquet
Outputs: data/split/split.parquet (degraded columns + split 'train'|'query'|
         'gallery' and repeat: the gallery draw 0..repeats-1, -1 on train and
         query rows, which are the same in every repeat),
         data/split/pairs.parquet (lr_image_id, hr_image_id, person_id: every
         x_l / x_h pair of one identity from different cameras),
         reports/split.json
Params:  split.seed (one identity split per seed), split.test_identities (null:
         the dataset's standard size), split.repeats (gallery draws);
         data.layout and degrade.protocol decide the standard sizes
The paper's ten random re-splits: ten experiments `dvc exp run -S split.seed=K`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.config import STANDARD_TEST_IDENTITIES, Params
from components.data import table as T
from components.data.splits import split_identities, split_standard
from components.fsutil import atomic_path, write_json
from pipelines.common import DEGRADED, REPORTS, SPLIT_DIR, add_params_arg, log, params_from

def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--input", default=DEGRADED, help=f"degraded table (default: {DEGRADED})")
    parser.add_argument("--out", default=SPLIT_DIR, help=f"output folder (default: {SPLIT_DIR})")

def test_identities(params: Params) -> int:
    """split.test_identities, or the standard test size of the configured dataset."""
    if params.split.test_identities is not None:
        return params.split.test_identities
    if params.data.layout == "synthetic":
        syn = params.data.synthetic
        return syn.identities - syn.train_identities
    return STANDARD_TEST_IDENTITIES[params.data.layout]

def run(args: argparse.Namespace) -> None:
    params = params_from(args)
    degraded = T.read_table(args.input, T.DEGRADED_SCHEMA)
    if params.degrade.protocol == "vr":
        log.info("VR protocol: the dataset's own train/query/gallery division (split.* seeds unused)")
        result = split_standard(degraded)
    else:
        result = split_identities(degraded, n_test=test_identities(params),
                                  repeats=params.split.repeats, seed=params.split.seed)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        T.write_table(result.table, tmp / "split.parquet", T.SPLIT_SCHEMA)
        T.write_table(result.pairs, tmp / "pairs.parquet", T.PAIRS_SCHEMA)
    write_json(Path(REPORTS) / "split.json", {**result.summary, "dropped": result.dropped})
    for reason, n in result.dropped.items():
        log.info("dropped %d: %s", n, reason)
    log.info("wrote %s: %s", args.out, result.summary)
