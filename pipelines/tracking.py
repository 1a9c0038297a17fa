"""MLflow runs: the store, a stage's run (params, tags, metrics, artifacts), the Ray Train callback.

The tracking store defaults to ``sqlite:///<repo>/mlflow.db`` (an absolute path,
so Ray's controller process writes to the same file); ``MLFLOW_TRACKING_URI``
overrides it (e.g. a tracking server on a cluster).

Only the driver side writes: the stage process (params, tags, final metrics,
artifacts) and :class:`MLflowTrainCallback`, a Ray Train ``UserCallback`` that
runs in the Train controller on the driver's node and logs each reported epoch;
in a search (`lrreid tune`), a Tune callback in the search's driver logs every
trial to a child run of the search's parent run (pipelines/tune.py). The model
registry (logged models, versions, aliases) is pipelines/registry.py.
Workers never touch the store, so a multi-node run needs no shared tracking
store. A stage that resumes after a crash re-opens the same MLflow run (its id
is kept next to the Ray checkpoints) and never logs an epoch twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "lrreid"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path.cwd(), capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd or Path.cwd(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_md5(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 that data.dvc records for data/raw ('' when there is none)."""
    try:
        return str(yaml.safe_load(Path(dvc_file).read_text())["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return ""


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: MLflow params are flat strings."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def params_hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def start_run(run_name: str, params: dict, run_id_file: Path, tags: dict | None = None) -> str:
    """Create the stage's MLflow run, or re-open the one recorded in ``run_id_file`` (resume)."""
    from mlflow.entities import Param, RunTag

    c = client()
    if run_id_file.exists():
        run_id = run_id_file.read_text().strip()
        try:
            c.get_run(run_id)
            c.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:  # the store was reset: start a new run
            pass
    exp = c.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else c.create_experiment(EXPERIMENT)
    all_tags = {"git_commit": git_commit(), "data_dvc_md5": data_md5(), **(tags or {})}
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    flat = flatten(params)
    items = [Param(k, v[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    c.log_batch(run.info.run_id, tags=[RunTag("params_hash", params_hash(params))])
    run_id_file.parent.mkdir(parents=True, exist_ok=True)
    run_id_file.write_text(run.info.run_id)
    return run.info.run_id


def logged_epochs(run_id: str, key: str = "epoch") -> set[int]:
    return {int(m.step) for m in client().get_metric_history(run_id, key)}


def log_metrics(run_id: str, metrics: dict, step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if items:
        client().log_batch(run_id, metrics=items)


RUN_INFO = ("precision", "precision_reason", "torch_threads")  # what a Train worker chose (pipelines/ray_train.py)


def tag_run_info(run_id: str, metrics: dict) -> bool:
    """Set a run's tags from the run information of a worker's report (precision, why, torch
    threads); False where the report has none."""
    from mlflow.entities import RunTag

    tags = [RunTag(k, str(metrics[k])[:5000]) for k in RUN_INFO if k in metrics]
    if tags:
        client().log_batch(run_id, tags=tags)
    return bool(tags)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def end_unfinished_children(parent_run_id: str, status: str = "KILLED") -> None:
    """End the child runs of ``parent_run_id`` still RUNNING (the trials of a search stopped mid-way)."""
    c = client()
    parent = c.get_run(parent_run_id)
    for run in c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        c.set_terminated(run.info.run_id, status=status)


def make_train_callback(run_id: str, uri: str):
    """A Ray Train UserCallback that logs rank 0's metrics of every reported epoch, once
    (and the largest peak RSS over the workers)."""
    import ray.train

    class MLflowTrainCallback(ray.train.UserCallback):
        def __init__(self):
            self.run_id, self.uri = run_id, uri
            self.seen: set[int] | None = None
            self.tagged = False

        def after_report(self, run_context, metrics, checkpoint):
            os.environ["MLFLOW_TRACKING_URI"] = self.uri
            if self.seen is None:  # epochs logged before a driver restart
                self.seen = logged_epochs(self.run_id)
            m = dict(metrics[0])
            if not self.tagged:  # precision, why, threads: the same in every report of the run
                self.tagged = tag_run_info(self.run_id, m)
            rss = [w["peak_rss_mb"] for w in metrics if "peak_rss_mb" in w]
            if rss:
                m["peak_rss_mb"] = max(rss)
            epoch = int(m.get("epoch", -1))
            if epoch in self.seen:  # a re-run epoch after a restart: never log it twice
                return
            log_metrics(self.run_id, m, step=epoch)
            self.seen.add(epoch)

    return MLflowTrainCallback()


def run_link(run_id: str) -> str:
    """Where a run is seen: the tracking server's page, or the MLflow UI's path (`mlflow ui`)."""
    try:
        exp = client().get_run(run_id).info.experiment_id
    except Exception:  # a run of another store, or deleted
        return ""
    path = f"#/experiments/{exp}/runs/{run_id}"
    uri = tracking_uri()
    return f"{uri.rstrip('/')}/{path}" if uri.startswith(("http://", "https://")) else path
