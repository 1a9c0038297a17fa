"""What the `pretrain` and `train` stages share: one phase end to end, and its DVC outs.

:func:`run_stage` opens the stage's MLflow run, trains through Ray Train
(pipelines/ray_train.py ``fit``), and writes the final weights, the metrics JSON, the
losses and validation rank-1 per epoch (``<phase>_curve.csv``, DVC plots) and, for
the main model's joint training, r_p of the tracked images (PRI Fig. 3).
The Ray run is named after the params, inputs and code, so running the stage again
after a crash resumes it, while changed params, data or code start a new one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from components.config import Params
from pipelines.ray_train import fit

log = logging.getLogger("lrreid")


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_r_p_history(history: list[dict], path: Path) -> None:
    """The tracked images' r_p and optimal scale per joint epoch (PRI Fig. 3), as a DVC plots CSV."""
    import csv

    from components.fsutil import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "image", "r_p", "r_opt"])
        for metrics in history:
            for key, value in sorted(metrics.items()):
                if key.startswith("r_p/"):
                    image = key[len("r_p/"):]
                    w.writerow([int(metrics["epoch"]), image, value, metrics.get(f"r_opt/{image}", "")])


CURVE_COLUMNS = ("epoch", "L", "L_id", "L_tri", "L_sr", "L_p", "val_rank1", "val_mAP", "lr_backbone", "lr_head",
                 "L_ffsr", "L_x", "L_r")  # the last three: FFSR + RIFE


def write_curve(history: list[dict], path: Path) -> None:
    """One row per epoch: the losses, the validation rank-1 / mAP and the rates (a DVC plots CSV)."""
    import csv

    from components.fsutil import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        for metrics in history:
            w.writerow([int(metrics["epoch"])] + [metrics.get(k, "") for k in CURVE_COLUMNS[1:]])


def read_curve(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def code_md5() -> str:
    """md5 of the package's Python sources: changed code is a new Ray run, never a resumed old one."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.md5()
    for path in sorted([*root.glob("components/**/*.py"), *root.glob("pipelines/**/*.py")]):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_stage(params: Params, *, phase: str, split_dir: Path, out: Path, report: Path,
              init: Path | None = None, variant: str | None = None) -> dict:
    """Train one phase end to end: MLflow run, Ray Train fit, final weights + metrics JSON (the DVC outs).
    ``variant``: an ablation variant (params already carry its overrides; only tags and the r_p plot differ)."""
    from components.data import table as T
    from components.data.splits import training_rows
    from components.fsutil import write_json
    from components.training import load_weights_file, save_weights_dict
    from pipelines import tracking

    split_file, pairs_file = split_dir / "split.parquet", split_dir / "pairs.parquet"
    table, pairs, validation = training_rows(T.read_table(split_file, T.SPLIT_SCHEMA),
                                             T.read_table(pairs_file, T.PAIRS_SCHEMA),
                                             n_val=params.split.val_identities, seed=params.split.seed)
    init_state = None
    inputs = {"split": _md5(split_file), "pairs": _md5(pairs_file), "code": code_md5(),
              "val_identities": params.split.val_identities}
    if init is not None:
        init_state, _ = load_weights_file(init)
        inputs["init"] = _md5(init)
    sections = params.model_dump(mode="json")
    key = {k: sections[k] for k in ("model", "loss", "train", "ffsr_rife")} | {"phase": phase, "inputs": inputs}
    name = f"{phase}-{tracking.params_hash(key)}"
    tags = {"stage": phase, "ray_run": name, "model": params.train.model, "variant": variant or "main"}
    run_id = tracking.start_run(phase if variant is None else f"{phase}-{variant}", sections,
                                Path(".lrreid") / "runs" / f"{name}.mlflow_run_id", tags=tags)
    started = time.perf_counter()
    try:
        state, metrics = fit(params, phase=phase, name=name, table=table, pairs=pairs, run_id=run_id,
                             init_state=init_state, validation=validation)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    meta = {"phase": phase, "model": params.train.model, "num_classes": int(len(set(table[T.PERSON_ID].to_pylist()))),
            "epochs": int(state["epoch"]) + 1, "mlflow_run_id": run_id, "ray_run": name, "variant": variant or ""}
    save_weights_dict(state["model"], out, meta)
    history = state["extra"].get("history", [])
    # losses and validation rank-1 per epoch (the main model's: evaluate draws them)
    write_curve(history, Path(report).parent / ("plots" if variant is None else "") / f"{phase}_curve.csv")
    if phase == "joint" and params.train.model == "pri" and variant is None:  # the main model's Fig. 3
        write_r_p_history(history, Path(report).parent / "plots" / "r_p_history.csv")
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary.update({k: metrics[k] for k in tracking.RUN_INFO if k in metrics})  # precision and why, threads
    summary["wall_seconds"] = time.perf_counter() - started
    write_json(report, summary)
    tracking.log_artifact(run_id, report)
    tracking.end_run(run_id)
    log.info("wrote %s and %s (MLflow run %s)", out, report, run_id)
    return summary
