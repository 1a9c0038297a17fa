"""The one place that talks to MLflow.

The tracking store defaults to ``sqlite:///<repo>/mlflow.db`` (an absolute path,
so Ray's controller process writes to the same file); ``MLFLOW_TRACKING_URI``
overrides it (e.g. a tracking server on a cluster).

Only the driver side writes: the stage process (params, tags, final metrics,
artifacts) and :class:`MLflowTrainCallback`, a Ray Train ``UserCallback`` that
runs in the Train controller on the driver's node and logs each reported epoch;
in a search (`lrreid tune`), a Tune callback in the search's driver logs every
trial to a child run of the search's parent run.
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

        def after_report(self, run_context, metrics, checkpoint):
            os.environ["MLFLOW_TRACKING_URI"] = self.uri
            if self.seen is None:  # epochs logged before a driver restart
                self.seen = logged_epochs(self.run_id)
            m = dict(metrics[0])
            rss = [w["peak_rss_mb"] for w in metrics if "peak_rss_mb" in w]
            if rss:
                m["peak_rss_mb"] = max(rss)
            epoch = int(m.get("epoch", -1))
            if epoch in self.seen:  # a re-run epoch after a restart: never log it twice
                return
            log_metrics(self.run_id, m, step=epoch)
            self.seen.add(epoch)

    return MLflowTrainCallback()


def make_tune_callback(parent_run_id: str, max_epochs: int):
    """A Ray Tune callback (runs in the search's driver): one MLflow child run per trial
    under ``parent_run_id`` (tag ``mlflow.parentRunId``) with the trial's params and its
    per-epoch metrics (step = epochs_done), tagged ``stopped_early`` / FAILED at the end.
    A resumed search finds each trial's run again (state, or its ``trial_id`` tag) and
    never logs an epoch twice."""
    from ray import tune

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


# ---------------------------------------------------------------------- the model registry
# Models are logged as MLflow 3 LoggedModels (`name=`, signature, input example) and
# registered under params.registry.model_name; aliases (challenger, champion), never stages.
MODEL_PACKAGES = ("components", "pipelines")  # the code a logged model carries (code_paths)
MODEL_REQUIREMENTS = ("torch", "torchvision", "numpy", "pydantic", "pillow", "pyyaml", "mlflow")
DESCRIPTION_LIMIT = 5000  # characters of a model version description (the SQL stores' column)
MODEL_ENTRY = """\
# The logged model's code (MLflow "models from code"): pipelines/ and components/ come with it.
import mlflow

from pipelines.pyfunc_model import LRReIDModel

mlflow.models.set_model(LRReIDModel())
"""


def _use_store():
    """Point MLflow's fluent API (log_model, register_model, pyfunc.load_model) at our store."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in MODEL_REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _copy_packages(dest: Path) -> list[str]:
    """A clean copy of the repository's packages (no __pycache__) for ``code_paths``."""
    import shutil

    paths = []
    for name in MODEL_PACKAGES:
        target = dest / name
        shutil.copytree(REPO / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        paths.append(str(target))
    return paths


def log_reid_model(run_id: str, weights_path: str | Path, model_params: dict, name: str = "model") -> str:
    """Log PRI as a pyfunc model (pipelines/pyfunc_model.py) in the run ``run_id``; returns its model URI.

    Artifacts: the weights file and the ``model:`` params section as JSON; code (MLflow's
    "models from code", nothing pickled): a three-line entry file that sets
    ``pipelines.pyfunc_model.LRReIDModel``, and the repository's ``components`` and
    ``pipelines`` packages (``code_paths``), so the model loads in a fresh process; signature (tensor [-1, 3, -1, -1] float32 in, embedding / r_p / scale_probs
    out, param ``role``) and an LR input example. The URI is ``models:/<model_id>``.
    """
    import tempfile

    from components.config import ModelParams
    from pipelines import pyfunc_model

    mlflow = _use_store()
    cfg = ModelParams.model_validate(model_params)
    with tempfile.TemporaryDirectory(prefix="lrreid-model-") as tmp:
        params_json = Path(tmp) / "model_params.json"
        params_json.write_text(json.dumps(model_params, indent=2, sort_keys=True))
        code_paths = _copy_packages(Path(tmp) / "code")
        entry = Path(tmp) / "lrreid_model.py"  # "models from code": no pickled object in the model
        entry.write_text(MODEL_ENTRY)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(entry),
                artifacts={pyfunc_model.WEIGHTS_ARTIFACT: str(weights_path),
                           pyfunc_model.PARAMS_ARTIFACT: str(params_json)},
                code_paths=code_paths,
                signature=pyfunc_model.signature(cfg),
                input_example=pyfunc_model.input_example(cfg),
                pip_requirements=_pip_requirements(),
                metadata=pyfunc_model.metadata(cfg),
                params=flatten(model_params),
            )
    return info.model_uri


def register_version(model_uri: str, name: str, tags: dict, description: str) -> str:
    """A new version of the registered model ``name`` (created if new) from ``model_uri``,
    with ``tags`` (values as strings) and a Markdown ``description``; returns the version."""
    mlflow = _use_store()
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if len(description) > DESCRIPTION_LIMIT:
        note = "\n\n(truncated: the full reports are artifacts of the register run)"
        description = description[: DESCRIPTION_LIMIT - len(note)] + note
    client().update_model_version(name, mv.version, description=description)
    return str(mv.version)


def current_alias_version(name: str, alias: str):
    """The ModelVersion that ``name@alias`` points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def set_alias(name: str, alias: str, version: str | int) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def get_model_version(name: str, version: str | int):
    return client().get_model_version(name, str(version))


def run_link(run_id: str) -> str:
    """Where a run is seen: the tracking server's page, or the MLflow UI's path (`mlflow ui`)."""
    try:
        exp = client().get_run(run_id).info.experiment_id
    except Exception:  # a run of another store, or deleted
        return ""
    path = f"#/experiments/{exp}/runs/{run_id}"
    uri = tracking_uri()
    return f"{uri.rstrip('/')}/{path}" if uri.startswith(("http://", "https://")) else path


def load_pyfunc(model_uri: str):
    """``mlflow.pyfunc.load_model`` from our store; a URI that names nothing is a StageError."""
    from mlflow.exceptions import MlflowException

    from pipelines.common import StageError

    mlflow = _use_store()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        first = str(exc.message).splitlines()[0] if getattr(exc, "message", None) else type(exc).__name__
        raise StageError(f"model {model_uri}: cannot load it from {tracking_uri()} ({first}); "
                         "list the registered models with `mlflow ui`, or run `lrreid register`") from None
    except OSError as exc:
        raise StageError(f"model {model_uri}: its files cannot be read ({exc})") from None
