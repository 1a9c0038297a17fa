"""Aggregate the per-probe records of several splits (the papers' ten random re-splits) into one table.

    mkdir -p resplits
    for k in 0 1 2 3 4 5 6 7 8 9; do
        dvc exp run -S split.seed=$k && cp reports/eval/per_probe.parquet resplits/split$k.parquet
    done
    lrreid compare resplits/*.parquet --out reports/resplits

Each file is one split's reports/eval/per_probe.parquet (the evaluate stage's records). The
table gives every row's rank-1 / mAP as mean +- std over the splits (each split: the mean
over its gallery draws), then the paired differences of the claims over all splits' records
together, with 95% intervals from a bootstrap of the test identities (a person in the test
set of several splits is one identity: its records go up and down together). Files from
different datasets (e.g. other data seeds of the synthetic generator: bench/claim_run.py)
take --distinct-datasets: person k of one file is then not person k of another.

Inputs:  two or more per_probe.parquet files of the same rows, each from another split
Outputs: <out>/resplits.md, <out>/resplits.json, <out>/paired_rank1.png, <out>/paired_mAP.png
Params:  evaluate.bootstrap (resamples); params.yaml is read for it only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.common import StageError, add_params_arg, log, params_from


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("files", nargs="+", type=Path, help="per_probe.parquet files, one per split")
    parser.add_argument("--out", type=Path, default=Path("reports/resplits"), help="output folder")
    parser.add_argument("--distinct-datasets", action="store_true",
                        help="the files come from different datasets: a person id names another identity in each file")


def run(args: argparse.Namespace) -> None:
    from components import comparisons as C
    from components import figures
    from components.data.table import read_table
    from components.fsutil import atomic_path, write_json

    params = params_from(args)
    tables = [read_table(f, C.PER_PROBE_SCHEMA) for f in args.files]
    rows = check_splits(tables, args.files)
    per_split = {r: [C.rank1_map(t, r) for t in tables] for r in rows}
    pooled = pool(tables, distinct_datasets=args.distinct_datasets)
    pairs = C.compare(pooled, C.claims(rows), n_resamples=params.evaluate.bootstrap)
    summary = {r: {m: {"mean": float(np.mean([s[m] for s in v])), "std": float(np.std([s[m] for s in v]))}
                   for m in ("rank1", "mAP")} for r, v in per_split.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "resplits.json", {
        "splits": [str(f) for f in args.files], "rows": summary, "per_split": per_split,
        "paired": [{"label": p["label"], **{m: vars(p[m]) for m in ("rank1", "mAP")}} for p in pairs]})
    with atomic_path(args.out / "resplits.md") as tmp:
        tmp.write_text(markdown(summary, len(tables)) + "\n" + C.paired_markdown(pairs, params.evaluate.bootstrap))
    for metric in ("rank1", "mAP"):
        figures.forest_plot([(p["label"], p[metric].mean, p[metric].low, p[metric].high, p[metric].p_value)
                             for p in pairs], args.out / f"paired_{metric}.png",
                            title=f"Paired differences of {metric} over {len(tables)} splits (95% CI)",
                            xlabel=f"{metric} difference (points)")
    log.info("wrote %s/resplits.{md,json} and the forest plots (%d splits)", args.out, len(tables))


def check_splits(tables: list[pa.Table], files: list[Path]) -> list[str]:
    """The rows every file holds (in the first file's order); StageError naming the file when one
    lacks a row or records, or two files come from the same split."""
    from components import comparisons as C

    if len(tables) < 2:
        raise StageError("lrreid compare needs the per-probe files of two or more splits")
    rows = list(dict.fromkeys(tables[0]["row"].to_pylist()))
    seen: dict[str, Path] = {}
    for table, path in zip(tables, files):
        C.check_per_probe(table, str(path), rows)
        split = C.provenance(table).get("split")
        if split is None:
            raise StageError(f"{path}: names no split in its metadata; write it with `lrreid evaluate`")
        if split in seen:
            raise StageError(f"{path} and {seen[split]} come from the same split (md5 {split}); give one file "
                             "per split (another split.seed)")
        seen[split] = path
    return rows


def pool(tables: list[pa.Table], distinct_datasets: bool = False) -> pa.Table:
    """All splits' records as one table, probe ids prefixed with the split ("k/<image_id>"), so
    that the records of two rows stay paired by (draw, probe) across splits. With
    ``distinct_datasets`` the person ids are made file-specific too (k * 2**32 + person_id), so
    that the bootstrap resamples each file's identities on their own."""
    parts = []
    for k, t in enumerate(tables):
        t = t.set_column(t.schema.get_field_index("image_id"), "image_id",
                         pa.array([f"{k}/{i}" for i in t["image_id"].to_pylist()]))
        if distinct_datasets:
            pids = t["person_id"].to_numpy() + (k << 32)
            t = t.set_column(t.schema.get_field_index("person_id"), "person_id", pa.array(pids, pa.int64()))
        parts.append(t.replace_schema_metadata(None))
    return pa.concat_tables(parts)


def markdown(summary: dict, splits: int) -> str:
    lines = ["| method | rank-1 (%) | mAP (%) |", "|---|---:|---:|"]
    lines += [f"| {r} | {v['rank1']['mean']:.1f} +- {v['rank1']['std']:.1f} | {v['mAP']['mean']:.1f} +- "
              f"{v['mAP']['std']:.1f} |" for r, v in summary.items()]
    return "\n".join(lines) + f"\n\nMean +- standard deviation over {splits} splits.\n"
