"""The MLflow model registry: a trained model as an MLflow 3 logged model, its versions and aliases.

Models are logged as LoggedModels (``name=``, signature, input example; MLflow's
"models from code", nothing pickled) and registered under ``registry.model_name``;
reviewers move aliases (challenger, champion), never stages. Runs and metrics:
pipelines/tracking.py, whose store this module uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.tracking import REPO, client, flatten, tracking_uri

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
