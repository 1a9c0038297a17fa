"""Hyperparameter search on Ray Tune: each trial runs the training driver, ASHA on validation rank-1.

`split.val_identities` training identities are held out of the split as a
validation set (probes: their LR images; gallery: one HR image each; never a
test identity). Each of `tune.num_samples` trials draws a point of `tune.space`
and is a Tune function that builds and fits the project's TorchTrainer
(pipelines/ray_train.fit); after every epoch rank 0 scores the validation set
(adaptive r_p) and TuneReportCallback hands the metrics to Tune, where ASHA
(time = epochs_done) stops the worst trials early. A trial that crashes is
reported and the others go on.

tune.pretrain = shared: the search pretrains once with the base params on the
remaining training identities; every trial starts its joint training
(tune.epochs epochs) from there. per_trial: each trial first pretrains with its
own config (train.pretrain_epochs, also counted by ASHA).

Inputs:  data/split/{split,pairs}.parquet
Outputs: reports/tune.json (every trial, the best config), reports/tune.png;
         MLflow: a parent run and one child run per trial (tag mlflow.parentRunId);
         Ray: <train.storage_path>/<tune.name>/ (the search) and <tune.name>-train/ (trials)
Params:  tune.*; model / loss / train are every trial's base
--resume continues an interrupted search (finished trials are not re-run);
--apply writes the best trial's searched keys into params.yaml (then `dvc repro`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from components.config import Params, merge, validate_params
from pipelines.common import REPORTS, SPLIT_DIR, StageError, add_params_arg, params_from

log = logging.getLogger("lrreid")

REPORT = Path(REPORTS) / "tune.json"
FIGURE = Path(REPORTS) / "tune.png"
METRIC = "val_rank1"
TRIAL_DRIVER_MEMORY = 64 * 2**20  # bytes of Ray's logical "memory" resource a trial's driver reserves


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--split", default=SPLIT_DIR, help=f"split folder (default: {SPLIT_DIR})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the interrupted search named tune.name")
    mode.add_argument("--apply", action="store_true",
                      help=f"write the best config of the finished search ({REPORT}) into the params file")


def run(args: argparse.Namespace) -> None:
    params = params_from(args)
    if args.apply:
        apply_best(Path(args.params), params)
        return
    search(params, Path(args.split), resume=args.resume)


# ---------------------------------------------------------------------- the search space
def nested(flat: dict) -> dict:
    """{"model.gamma": 3} -> {"model": {"gamma": 3}}."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def trial_params(base: dict, config: dict) -> Params:
    """A trial's params: the base with the trial's point of the space (validated)."""
    return validate_params(merge(base, nested(config)), "a trial's params")


def param_space(space: dict[str, dict]) -> dict:
    """tune.space -> Tune samplers (a grid is crossed with everything and run num_samples times)."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        out[key] = {"choice": lambda v: tune.choice(list(v)), "grid": lambda v: tune.grid_search(list(v)),
                    "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}[kind](values)
    return out


def max_epochs(params: Params) -> int:
    """The epochs of a trial that ASHA never stops (its max_t)."""
    t = params.tune
    return t.epochs + (params.train.pretrain_epochs if t.pretrain == "per_trial" else 0)


def check_concurrency(params: Params, nodes: list[dict] | None = None) -> int:
    """How many trials' worker groups the cluster holds at once; an error when not even one fits
    (`check_resources`), a warning when tune.max_concurrent_trials asks for more (Tune does not
    see a trial's workers: the extra trials would start and wait for resources)."""
    from pipelines.cluster import check_resources

    fits = check_resources(params, nodes) // params.train.num_workers
    if params.tune.max_concurrent_trials > fits:
        log.warning("tune.max_concurrent_trials = %d, but the cluster holds the workers of %d trial(s) at once: "
                    "the others wait for free resources (lower it, or add nodes)", params.tune.max_concurrent_trials,
                    fits)
    return fits


# ---------------------------------------------------------------------- one trial (in a Tune actor)
def run_trial(config: dict, *, base: dict, table, pairs, validation, init_state, storage: str) -> None:
    """Pretrain (per_trial) and joint-train one point of the space; every epoch goes to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.ray_train import fit

    params = trial_params(base, config)
    trial_id = tune.get_context().get_trial_id()
    offset = 0
    if params.tune.pretrain == "per_trial":
        state, _ = fit(params, phase="pretrain", name=f"{trial_id}-pretrain", table=table, pairs=pairs, run_id=None,
                       callbacks=[TuneReportCallback()], validation=validation, storage_path=storage)
        init_state, offset = state["model"], params.train.pretrain_epochs
    fit(params, phase="joint", name=f"{trial_id}-joint", table=table, pairs=pairs, run_id=None,
        init_state=init_state, callbacks=[TuneReportCallback()], validation=validation, epoch_offset=offset,
        storage_path=storage)


# ---------------------------------------------------------------------- the search (driver)
def search(params: Params, split_dir: Path, *, resume: bool = False) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from components.data import table as T
    from components.data.splits import training_rows
    from components.fsutil import write_json
    from pipelines import tracking
    from pipelines.cluster import connect, resolve_cpus, storage_root

    t = params.tune
    if params.train.model != "pri":
        raise StageError(f"train.model = {params.train.model!r}: the search tunes PRI (train.model: pri); its "
                         "validation metric is the adaptive rank-1")
    split = T.read_table(split_dir / "split.parquet", T.SPLIT_SCHEMA)
    if params.split.val_identities == 0:
        raise StageError("split.val_identities = 0: the search needs validation identities (its metric is "
                         "the validation rank-1); set split.val_identities, e.g. 50")
    pairs = T.read_table(split_dir / "pairs.parquet", T.PAIRS_SCHEMA)
    train_rows, train_pairs, validation = training_rows(split, pairs, n_val=params.split.val_identities,
                                                        seed=params.split.seed)
    storage_path = params.train.storage_path
    root = storage_root(storage_path)
    path = f"{root}/{t.name}"
    if resume and not tune.Tuner.can_restore(path):
        raise StageError(f"no search to resume at {path}; start one with `lrreid tune`")
    if not resume and tune.Tuner.can_restore(path):
        raise StageError(f"a search named {t.name!r} exists at {path}: continue it with `lrreid tune --resume`, "
                         "or set another tune.name (or delete that folder)")
    connect(params)
    params = resolve_cpus(params, groups=t.max_concurrent_trials)  # "auto": the CPUs shared among the trials
    check_concurrency(params)  # the workers of one trial must fit the cluster: fail now, not hang
    # the trials' base: joint epochs = tune.epochs; no tracked images (the search logs the metric only)
    base = merge(params.model_dump(mode="json"), {"train": {"epochs": t.epochs, "track_images": 0}})
    sections = params.model_dump(mode="json")
    parent = tracking.start_run("tune", sections, Path(".lrreid") / "runs" /
                                f"tune-{t.name}-{tracking.params_hash(sections)}.mlflow_run_id",
                                tags={"stage": "tune", "search_path": path})
    started = time.perf_counter()
    try:
        init_state = shared_pretrain(base, path, train_rows, train_pairs, validation, parent) \
            if t.pretrain == "shared" else None
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, table=train_rows, pairs=train_pairs, validation=validation,
                                 init_state=init_state, storage=f"{path}-train"),
            # the trial only drives its TorchTrainer (the workers bring their own CPUs / GPUs): it holds a
            # little of Ray's "memory" resource and no CPU, so a trial's workers may take every CPU of a node
            {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
        if resume:
            log.info("resuming the search at %s", path)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(t.space),
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode="max", num_samples=t.num_samples,
                    scheduler=ASHAScheduler(time_attr="epochs_done", max_t=max_epochs(params),
                                            grace_period=t.grace_period, reduction_factor=t.reduction_factor,
                                            stop_last_trials=False),
                    search_alg=BasicVariantGenerator(max_concurrent=t.max_concurrent_trials, random_state=t.seed)),
                run_config=tune.RunConfig(
                    name=t.name, storage_path=root, verbose=1,
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    callbacks=[make_tune_callback(parent, max_epochs(params))]),
            )
        # Ctrl-C: Tune's handler saves the search's state, stops the trials and returns from fit() as if the
        # search had ended (the stopped trials look finished in memory, not in the saved state). The handler puts
        # the previous SIGINT handler back when it fires, and only then: that is how an interruption shows.
        # (No handler off the main thread or with TUNE_DISABLE_SIGINT_HANDLER=1: Ctrl-C raises KeyboardInterrupt.)
        catches = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGINT)
        grid = tuner.fit()
        interrupted = catches and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")) and \
            signal.getsignal(signal.SIGINT) is before
        if catches:
            signal.signal(signal.SIGINT, before)
        if interrupted:
            log.warning("search interrupted; continue it with `lrreid tune --resume` (finished trials are kept)")
            raise KeyboardInterrupt
        report = summarize(grid, params, path, time.perf_counter() - started)
        write_json(REPORT, report)
        _log_search(parent, report, params)
    except BaseException as exc:
        tracking.end_unfinished_children(parent)  # `--resume` sets them RUNNING again
        tracking.end_run(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracking.end_run(parent)
    best = report["best"]
    log.info("best trial %s: %s = %.1f%% with %s; %d trial(s) failed, %d stopped early by ASHA (MLflow run %s). "
             "`lrreid tune --apply` writes it into params.yaml", best["trial_id"], METRIC, best[METRIC],
             best["config"], report["errors"], report["stopped_early"], parent)
    return report


def shared_pretrain(base: dict, path: str, table, pairs, validation, parent: str) -> dict:
    """tune.pretrain = shared: pretrain once with the base params on the identities left
    after the hold-out (epochs logged to the parent run); a resumed search reuses it."""
    from components.data import table as T
    from components.training import load_weights_file, save_weights_dict
    from pipelines.cluster import is_uri
    from pipelines.ray_train import fit
    from pipelines.tracking import params_hash

    # named after what it is trained from: another base or hold-out is another pretraining, never a stale one
    key = params_hash({"base": {k: base[k] for k in ("model", "loss", "train")},
                       "train_ids": sorted(set(table[T.PERSON_ID].to_pylist())), "rows": table.num_rows})
    name = f"shared-pretrain-{key}"
    cached = Path(f"{path}-train") / f"{name}.pt"
    if not is_uri(path) and cached.exists():
        log.info("shared pretraining: reusing %s", cached)
        return load_weights_file(cached)[0]
    state, _ = fit(validate_params(base), phase="pretrain", name=name, table=table, pairs=pairs,
                   run_id=parent, validation=validation, storage_path=f"{path}-train")
    if not is_uri(path):
        save_weights_dict(state["model"], cached, {"phase": "pretrain", "model": "pri"})
    return state["model"]


def make_tune_callback(parent_run_id: str, max_epochs: int):
    """A Ray Tune callback (runs in the search's driver): one MLflow child run per trial
    under ``parent_run_id`` (tag ``mlflow.parentRunId``) with the trial's params and its
    per-epoch metrics (step = epochs_done), tagged ``stopped_early`` / FAILED at the end.
    A resumed search finds each trial's run again (state, or its ``trial_id`` tag) and
    never logs an epoch twice."""
    from ray import tune

    from pipelines.tracking import logged_epochs, log_metrics, tag_run_info, tracking_uri

    uri = tracking_uri()

    class MLflowTrialRuns(tune.Callback):
        def __init__(self):
            self.parent, self.uri, self.max_epochs = parent_run_id, uri, max_epochs
            self.runs: dict[str, str] = {}  # trial_id -> run_id (saved with the search's state)
            self.seen: dict[str, set[int]] = {}

        def _client(self):
            from mlflow import MlflowClient

            return MlflowClient(tracking_uri=self.uri)

        def _run(self, trial) -> str:
            from mlflow.entities import Param
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

            tid = trial.trial_id
            if tid not in self.runs:
                c = self._client()
                exp_id = c.get_run(self.parent).info.experiment_id
                found = c.search_runs([exp_id], filter_string=f"tags.trial_id = '{tid}' and "
                                      f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent}'")
                if found:
                    self.runs[tid] = found[0].info.run_id
                else:
                    run = c.create_run(exp_id, run_name=f"trial-{tid}", tags={
                        MLFLOW_PARENT_RUN_ID: self.parent, "trial_id": tid, "stage": "tune-trial"})
                    c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(trial.config.items())])
                    self.runs[tid] = run.info.run_id
            return self.runs[tid]

        def on_trial_start(self, iteration, trials, trial, **info):
            self._client().update_run(self._run(trial), status="RUNNING")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            run_id = self._run(trial)
            os.environ["MLFLOW_TRACKING_URI"] = self.uri
            if run_id not in self.seen:
                self.seen[run_id] = logged_epochs(run_id, "epochs_done")
                tag_run_info(run_id, result)  # a trial's first report of this driver: precision and threads
            step = int(result.get("epochs_done", -1))
            if step in self.seen[run_id]:
                return
            keep = {k: v for k, v in result.items() if k in TRIAL_METRICS or k.startswith(("L", "val_"))}
            log_metrics(run_id, keep, step=step)
            self.seen[run_id].add(step)

        def on_trial_complete(self, iteration, trials, trial, **info):
            run_id = self._run(trial)
            done = int((trial.last_result or {}).get("epochs_done", 0))
            c = self._client()
            c.set_tag(run_id, "epochs_done", str(done))
            c.set_tag(run_id, "stopped_early", str(done < self.max_epochs).lower())
            c.set_terminated(run_id, status="FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            run_id = self._run(trial)
            c = self._client()
            c.set_tag(run_id, "error", str(getattr(trial, "error_file", "") or ""))
            c.set_terminated(run_id, status="FAILED")

        def get_state(self):
            return {"runs": dict(self.runs)}

        def set_state(self, state):
            self.runs = dict(state.get("runs", {}))

    return MLflowTrialRuns()


TRIAL_METRICS = ("epochs_done", "epoch", "samples_per_s", "epoch_seconds", "peak_rss_mb", "label_bank_entropy")


def summarize(grid, params: Params, path: str, seconds: float) -> dict:
    """reports/tune.json: every trial, the best one, ASHA's savings."""
    import math

    full = max_epochs(params)
    trials = []
    for r in grid:
        m = r.metrics or {}
        history = r.metrics_dataframe
        best_val = float(history[METRIC].max()) if history is not None and METRIC in history else None
        overhead = None  # trial start (Tune) -> its workers' first training step
        if history is not None and len(history) and {"timestamp", "time_total_s", "train_start_unix"} <= set(history):
            first = history.iloc[0]
            overhead = float(first["train_start_unix"] - (first["timestamp"] - first["time_total_s"]))
        trials.append({
            "trial_id": m.get("trial_id") or (r.path or "").rsplit("/", 1)[-1],
            "config": dict(r.config),
            METRIC: _finite(m.get(METRIC)), "val_mAP": _finite(m.get("val_mAP")),
            "best_" + METRIC: _finite(best_val),
            "epochs_done": int(m.get("epochs_done", 0)), "start_overhead_s": _finite(overhead),
            "status": "ERROR" if r.error is not None else "TERMINATED",
            "error": str(r.error).strip().splitlines()[-1][:300] if r.error is not None else None,
        })
    ok = [x for x in trials if x["status"] == "TERMINATED" and x[METRIC] is not None]
    if not ok:
        errors = "; ".join(f"{x['trial_id']}: {x['error']}" for x in trials if x["error"])
        raise StageError(f"no trial of the search at {path} finished with a {METRIC}: {errors}")
    best = max(ok, key=lambda x: x[METRIC])
    run = sum(x["epochs_done"] for x in trials)
    return {
        "name": params.tune.name, "path": path, "metric": METRIC, "space": params.tune.space,
        "num_trials": len(trials), "errors": sum(x["status"] == "ERROR" for x in trials),
        "stopped_early": sum(x["status"] == "TERMINATED" and x["epochs_done"] < full for x in trials),
        "trial_epochs": run, "trial_epochs_without_asha": full * len(trials),
        "asha_saved": 1 - run / (full * len(trials)) if trials else 0.0,
        "wall_seconds": seconds, "trials_per_hour": len(trials) / seconds * 3600 if seconds > 0 else math.nan,
        "median_start_overhead_s": _median([x["start_overhead_s"] for x in trials]),
        "best": {"trial_id": best["trial_id"], "config": best["config"], METRIC: best[METRIC],
                 "val_mAP": best["val_mAP"], "epochs_done": best["epochs_done"]},
        "trials": trials,
    }


def _median(values):
    import statistics

    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _finite(v):
    import math

    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def _log_search(parent: str, report: dict, params: Params) -> None:
    """The parent run: best config (tags best.<key>), its metric, the table and the picture."""
    from components import figures
    from pipelines import tracking

    keys = list(params.tune.space)
    log_keys = [k for k, spec in params.tune.space.items() if "loguniform" in spec]
    best_index = next(i for i, x in enumerate(report["trials"]) if x["trial_id"] == report["best"]["trial_id"])
    figures.search_scatter(report["trials"], keys, FIGURE, metric=METRIC, log_keys=log_keys, best=best_index,
                           title=f"lrreid tune {params.tune.name}")
    c = tracking.client()
    for key, value in report["best"]["config"].items():
        c.set_tag(parent, f"best.{key}", str(value))
    c.set_tag(parent, "best_trial", report["best"]["trial_id"])
    tracking.log_metrics(parent, {"best_" + METRIC: report["best"][METRIC], "trials": report["num_trials"],
                                  "errors": report["errors"], "stopped_early": report["stopped_early"],
                                  "asha_saved": report["asha_saved"]}, step=0)
    tracking.log_artifact(parent, REPORT)
    tracking.log_artifact(parent, FIGURE, "figures")


# ---------------------------------------------------------------------- --apply
def apply_best(params_file: Path, params: Params) -> dict:
    """Write the finished search's best values of the searched keys into ``params_file``
    (comments and the rest of the file are kept); returns {key: (old, new)}."""
    from ruamel.yaml import YAML

    from components.fsutil import atomic_path

    if not REPORT.exists():
        raise StageError(f"{REPORT} does not exist: run the search first (`lrreid tune`)")
    report = json.loads(REPORT.read_text())
    if report.get("space") != params.tune.space:
        raise StageError(f"{REPORT} is the result of another search space than tune.space in {params_file}; "
                         "run the search again (`lrreid tune`, with a new tune.name)")
    best = report["best"]["config"]
    yaml = YAML()  # round-trip: comments, order and quoting are kept
    yaml.preserve_quotes = True
    doc = yaml.load(params_file.read_text())
    changes = {}
    for key, value in sorted(best.items()):
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        new = float(f"{value:.4g}") if isinstance(value, float) else value
        changes[key] = (node.get(leaf), new)
        node[leaf] = new
    trial_params(params.model_dump(mode="json"), {k: v for k, (_, v) in changes.items()})  # still valid params
    with atomic_path(params_file) as tmp, open(tmp, "w") as f:
        yaml.dump(doc, f)
    for key, (old, new) in changes.items():
        log.info("%s: %s: %s -> %s", params_file, key, old, new)
    log.info("applied trial %s (%s = %.1f%%); `dvc repro` (or `dvc exp run`) trains and registers it",
             report["best"]["trial_id"], METRIC, report["best"][METRIC])
    return changes
