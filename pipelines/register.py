"""Register the trained model in the MLflow model registry; move `champion` only if it is better.

The model (PRI with its weights, as an MLflow pyfunc: pipelines/pyfunc_model.py)
is logged in an MLflow run named "register" and registered as a new version of
registry.model_name, with tags (git commit, data.dvc md5, params hash, dataset,
protocol, rank-1, mAP, the MLflow runs of pretrain / train / evaluate) and a
Markdown description (metrics mean +- std, the ablation table, the runs).

Aliases: registry.challenger_alias is set on every new version;
registry.champion_alias moves to it only when there is no champion yet, or when
its rank-1 is strictly higher than the champion's on the same dataset AND
protocol. A champion evaluated on another dataset or protocol is kept (rank-1
is not comparable); move it by hand if that is what you want:
`MlflowClient().set_registered_model_alias(name, "champion", version)`.

Inputs:  models/model.pt, models/pretrain.pt (its MLflow run id only),
         reports/evaluate.json, reports/ablation.md
Outputs: reports/register.json {model_name, version, champion_version, promoted,
         model_uri}; an MLflow run and a registered model version
Params:  registry.model_name, registry.challenger_alias, registry.champion_alias, model.*
Load the champion with `lrreid query --model models:/<model_name>@champion ...`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from components.config import Params
from components.fsutil import write_json
from pipelines.common import REPORTS, StageError, add_params_arg, log, params_from
from pipelines.pretrain import OUT as PRETRAINED
from pipelines.train import OUT as TRAINED

EVALUATE = f"{REPORTS}/evaluate.json"
ABLATION = f"{REPORTS}/ablation.md"
OUT = f"{REPORTS}/register.json"
METRICS = ("rank1", "rank5", "rank10", "mAP", "rank1_std", "mAP_std")  # percentages
STRINGS = ("predictor", "dataset", "protocol", "mlflow_run_id")


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--model", default=TRAINED, help=f"trained weights (default: {TRAINED})")
    parser.add_argument("--pretrain", default=PRETRAINED,
                        help=f"pretrained weights, for their MLflow run id (default: {PRETRAINED})")
    parser.add_argument("--evaluate", default=EVALUATE, help=f"evaluation metrics (default: {EVALUATE})")
    parser.add_argument("--ablation", default=ABLATION, help=f"ablation table (default: {ABLATION})")
    parser.add_argument("--out", default=OUT, help=f"registration report (default: {OUT})")


def run(args: argparse.Namespace) -> None:
    register(params_from(args), model=Path(args.model), pretrain=Path(args.pretrain),
             evaluate=Path(args.evaluate), ablation=Path(args.ablation), out=Path(args.out))


# ---------------------------------------------------------------------- inputs
def read_evaluation(path: Path) -> dict:
    """reports/evaluate.json, checked against its contract."""
    fix = "run `lrreid evaluate` (or `dvc repro evaluate`) to write it"
    if not path.is_file():
        raise StageError(f"{path}: missing; {fix}")
    try:
        ev = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageError(f"{path}: not readable JSON ({exc}); {fix}") from None
    if not isinstance(ev, dict):
        raise StageError(f"{path}: expected a JSON object, got {type(ev).__name__}; {fix}")
    for key in METRICS:
        v = ev.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise StageError(f"{path}: '{key}' = {v!r}: expected a finite number (a percentage); {fix}")
    if not 0 <= ev["rank1"] <= 100:
        raise StageError(f"{path}: 'rank1' = {ev['rank1']!r}: expected a percentage in [0, 100]; {fix}")
    if isinstance(ev.get("repeats"), bool) or not isinstance(ev.get("repeats"), int) or ev["repeats"] < 1:
        raise StageError(f"{path}: 'repeats' = {ev.get('repeats')!r}: expected an integer >= 1; {fix}")
    for key in STRINGS:
        if not isinstance(ev.get(key), str) or not ev[key]:
            raise StageError(f"{path}: '{key}' = {ev.get(key)!r}: expected a non-empty string; {fix}")
    return ev


def read_ablation(path: Path) -> str:
    """reports/ablation.md: must hold a Markdown table."""
    fix = "run `lrreid evaluate` (or `dvc repro evaluate`) to write it"
    if not path.is_file():
        raise StageError(f"{path}: missing; {fix}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not readable text ({exc}); {fix}") from None
    rows = [line for line in text.splitlines() if line.strip().startswith("|")]
    if len(rows) < 2 or not any(set(r.replace("|", "").strip()) <= set("-: ") for r in rows):
        raise StageError(f"{path}: no Markdown table (| header | ... / |---|) in it; {fix}")
    return text.strip()


def read_weights(path: Path, params: Params, command: str) -> dict:
    """The weights' meta; they must be a PRI with P (joint training) that fits params.model."""
    from components.models import build_model
    from components.training import load_weights_file
    from pipelines.pyfunc_model import inference_params

    fix = f"run `lrreid {command}` (or `dvc repro {command}`) to write it"
    try:
        state, meta = load_weights_file(path)
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(f"{exc}; {fix}") from None
    if meta.get("model", "pri") != "pri":
        raise StageError(f"{path}: trained with train.model = {meta['model']!r}; the registry model "
                         "wraps PRI only (train.model: pri)")
    if command != "train":
        return meta
    if meta.get("phase") != "joint" or not isinstance(meta.get("num_classes"), int):
        raise StageError(f"{path}: not the joint-trained PRI (phase {meta.get('phase')!r}, num_classes "
                         f"{meta.get('num_classes')!r}); {fix}")
    pri = build_model("pri", inference_params(params.model.model_dump(mode="json")), meta["num_classes"])
    try:
        pri.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise StageError(f"{path}: does not fit params.yaml model.* ({first[0].strip()}); "
                         f"register with the params it was trained with, or {fix}") from None
    return meta


# ---------------------------------------------------------------------- the champion
def champion_decision(champion, new_rank1: float, dataset: str, protocol: str) -> tuple[bool, str]:
    """(promote?, why) for a new version against the current champion (a ModelVersion or None)."""
    if champion is None:
        return True, "no champion before"
    tags, v = champion.tags or {}, champion.version
    where = f"{tags.get('dataset', '?')}/{tags.get('protocol', '?')}"
    if tags.get("dataset") != dataset or tags.get("protocol") != protocol:
        return False, (f"it was evaluated on {where}, this version on {dataset}/{protocol}: rank-1 is not "
                       "comparable; move the alias by hand if this version should serve instead")
    try:
        old = float(tags["rank1"])
    except (KeyError, ValueError):
        return False, "it has no rank1 tag to compare with; move the alias by hand if wanted"
    if new_rank1 > old:
        return True, f"rank-1 {new_rank1:.2f}% > {old:.2f}% of version {v}"
    return False, f"rank-1 {old:.2f}% >= {new_rank1:.2f}%"


# ---------------------------------------------------------------------- the description
def _run_cell(run_id: str) -> str:
    from pipelines.tracking import run_link

    if not run_id:
        return "(unknown)"
    link = run_link(run_id)
    return f"[`{run_id}`]({link})" if link else f"`{run_id}` (not in this tracking store)"


def describe(ev: dict, ablation: str, runs: dict[str, str], tags: dict, decision: str) -> str:
    """The version's Markdown description: metrics mean +- std, the ablation table, the runs."""
    lines = [
        f"PRI evaluated on **{ev['dataset']}**, protocol **{ev['protocol']}**, predictor "
        f"**{ev['predictor']}**; mean ± std over {ev['repeats']} gallery draw(s).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| rank-1 | {ev['rank1']:.2f} ± {ev['rank1_std']:.2f} % |",
        f"| rank-5 | {ev['rank5']:.2f} % |",
        f"| rank-10 | {ev['rank10']:.2f} % |",
        f"| mAP | {ev['mAP']:.2f} ± {ev['mAP_std']:.2f} % |",
        "",
        "**MLflow runs**",
        "",
        "| stage | run |",
        "|---|---|",
        *[f"| {stage} | {_run_cell(run_id)} |" for stage, run_id in runs.items()],
        "",
        f"git commit `{tags['git_commit']}`, data.dvc md5 `{tags['data_dvc_md5'] or '-'}`, "
        f"params hash `{tags['params_hash']}`.",
        "",
        f"Champion decision at registration: {decision}.",
        "",
        "**Ablation** (reports/ablation.md)",
        "",
        ablation,
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the stage
def register(params: Params, *, model: Path, pretrain: Path, evaluate: Path, ablation: Path, out: Path) -> dict:
    from pipelines import registry, tracking

    ev = read_evaluation(evaluate)
    ablation_md = read_ablation(ablation)
    meta = read_weights(model, params, "train")
    pre_meta = {}
    if pretrain.is_file():
        pre_meta = read_weights(pretrain, params, "pretrain")
    else:
        log.warning("%s: missing; the version's pretrain run id is left empty", pretrain)
    if (ev["dataset"], ev["protocol"]) != (params.data.layout, params.degrade.protocol):
        log.warning("%s says dataset %s / protocol %s, params.yaml %s / %s: the tags follow %s", evaluate,
                    ev["dataset"], ev["protocol"], params.data.layout, params.degrade.protocol, evaluate)
    reg = params.registry
    name = reg.model_name
    sections = params.model_dump(mode="json")
    run_id_file = Path(".lrreid") / "runs" / "register.mlflow_run_id"
    run_id_file.unlink(missing_ok=True)  # never re-open an earlier register run: one run per registration
    run_id = tracking.start_run("register", sections, run_id_file, tags={"stage": "register"})
    try:
        runs = {"pretrain": str(pre_meta.get("mlflow_run_id", "")), "train": str(meta.get("mlflow_run_id", "")),
                "evaluate": ev["mlflow_run_id"], "register": run_id}
        tags = {
            "git_commit": tracking.git_commit(), "data_dvc_md5": tracking.data_md5(),
            "params_hash": tracking.params_hash(sections),
            "dataset": ev["dataset"], "protocol": ev["protocol"], "predictor": ev["predictor"],
            "rank1": repr(float(ev["rank1"])), "mAP": repr(float(ev["mAP"])),
            "rank1_std": repr(float(ev["rank1_std"])), "mAP_std": repr(float(ev["mAP_std"])),
            "repeats": str(ev["repeats"]),
            **{f"{stage}_run_id": rid for stage, rid in runs.items()},
        }
        tracking.log_metrics(run_id, {k: ev[k] for k in METRICS}, step=0)
        tracking.log_artifact(run_id, evaluate, "reports")
        tracking.log_artifact(run_id, ablation, "reports")
        logged_uri = registry.log_reid_model(run_id, model, sections["model"])
        champion = registry.current_alias_version(name, reg.champion_alias)
        promote, why = champion_decision(champion, float(ev["rank1"]), ev["dataset"], ev["protocol"])
        version = registry.register_version(logged_uri, name, tags, describe(ev, ablation_md, runs, tags, why))
        registry.set_alias(name, reg.challenger_alias, version)
        if promote:
            registry.set_alias(name, reg.champion_alias, version)
            log.info("%s -> version %s (%s)", reg.champion_alias, version, why)
        else:
            log.info("%s stays at version %s (%s)", reg.champion_alias, champion.version, why)
        champion_version = int(version) if promote else int(champion.version)
        report = {"model_name": name, "version": int(version), "champion_version": champion_version,
                  "promoted": promote, "model_uri": f"models:/{name}/{version}", "logged_model_uri": logged_uri,
                  "champion_reason": why, "mlflow_run_id": run_id}
        write_json(out, report)
        tracking.log_artifact(run_id, out, "reports")
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    log.info("registered %s version %s (%s = version %s); wrote %s", name, version, reg.champion_alias,
             champion_version, out)
    return report
