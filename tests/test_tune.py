"""`lrreid tune`: a real Ray Tune search over the training driver (tiny data), killed and resumed.

One scenario, as a user meets it: a search of two trials is killed with its
driver after the first trial finished; `lrreid tune --resume` finishes it without
re-running that trial, and the second trial (it asks for fp16 on a CPU) crashes
and is reported while the search still ends with a result; the
report, the MLflow parent / child runs and the picture are there; `--apply`
writes the best values into params.yaml and keeps its comments. Bad search
spaces and unreachable clusters fail before any trial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_model_params

pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", RAY_ADDRESS="",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               TUNE_GLOBAL_CHECKPOINT_S="0")  # the search's state is saved at every step
    env.pop("RAY_ADDRESS")
    return env


def _params(tmp: Path, **tune) -> dict:
    t = dict(num_samples=1, epochs=2, grace_period=1, reduction_factor=2, val_identities=2, name="tiny",
             space={"train.precision": {"grid": ["fp32", "fp16"]},  # fp16 needs CUDA: that trial crashes
                    "model.gamma": {"choice": ["1/3", 3]}})
    t.update(tune)
    return {
        "degrade": {"hr_height": 32, "hr_width": 16, "scales": [2, 4]},
        "model": tiny_model_params().model_dump(mode="json"),
        "train": dict(identities_per_batch=4, images_per_identity=2, pretrain_epochs=1, epochs=1, precision="fp32",
                      storage_path=str(tmp / "ray"), max_failures=0, cpus_per_worker=2, lr_backbone=1e-3,
                      lr_head=1e-3),
        "tune": t,
    }


def _write(tmp: Path, params: dict) -> Path:
    path = tmp / "params.yaml"
    text = yaml.safe_dump(params, sort_keys=False)
    path.write_text("# a comment --apply must keep\n" + text.replace("train:\n", "train:  # the base of every trial\n"))
    return path


def _tune(tmp: Path, split_dir: Path, *extra: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = ["lrreid", "tune", "--split", str(split_dir), *extra]
    return subprocess.run(cmd, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600, **kw)


def _children(tmp: Path):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = c.get_experiment_by_name("lrreid")
    if exp is None:
        return c, []
    return c, [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "tune-trial"]


def test_search_killed_resumed_reported_and_applied(split_dir, tmp_path):
    _write(tmp_path, _params(tmp_path))
    cmd = ["lrreid", "tune", "--split", str(split_dir)]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    finished = []
    while time.time() < deadline and first.poll() is None:
        time.sleep(1)
        try:
            _, runs = _children(tmp_path)
        except Exception:  # the store is being created
            continue
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished:
            break
    assert finished, "no trial finished before the deadline"
    time.sleep(2)  # the experiment state of that step is written
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started: a hard crash
    first.wait()
    done_id = finished[0].data.tags["trial_id"]
    done_runs = {r.info.run_id: r.info.end_time for r in finished}

    second = _tune(tmp_path, split_dir, "--resume")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    report = json.loads((tmp_path / "reports" / "tune.json").read_text())
    assert report["num_trials"] == 2 and report["errors"] == 1
    failed = [t for t in report["trials"] if t["status"] == "ERROR"]
    assert failed[0]["config"]["train.precision"] == "fp16" and "fp16" in failed[0]["error"]
    best = report["best"]
    assert best["config"]["train.precision"] == "fp32" and 0 <= best["val_rank1"] <= 100
    assert best["trial_id"] == done_id
    assert report["trial_epochs"] <= report["trial_epochs_without_asha"] == 2 * 2
    assert (tmp_path / "reports" / "tune.png").stat().st_size > 0

    c, runs = _children(tmp_path)
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t["trial_id"] for t in report["trials"])  # once each
    for r in runs:
        if r.info.run_id in done_runs:  # the trial finished before the crash was not run again
            assert r.info.end_time == done_runs[r.info.run_id] and r.data.tags["trial_id"] == done_id
        steps = [int(m.step) for m in c.get_metric_history(r.info.run_id, "val_rank1")]
        assert steps == sorted(set(steps)), f"an epoch logged twice: {steps}"
    parent = c.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.data.tags["stage"] == "tune" and parent.info.status == "FINISHED"
    assert parent.data.tags["best.train.precision"] == best["config"]["train.precision"]
    assert parent.data.metrics["best_val_rank1"] == pytest.approx(best["val_rank1"])
    ok = [r for r in runs if r.info.status == "FINISHED"]
    assert len(ok) == 1 and c.get_metric_history(ok[0].info.run_id, "val_rank1")
    assert [r.data.tags["trial_id"] for r in runs if r.info.status == "FAILED"] == [failed[0]["trial_id"]]

    # --apply: only the searched keys change, the comments stay, and the file is valid params
    before = yaml.safe_load((tmp_path / "params.yaml").read_text())
    applied = _tune(tmp_path, split_dir, "--apply")
    assert applied.returncode == 0, applied.stderr
    text = (tmp_path / "params.yaml").read_text()
    assert "# a comment --apply must keep" in text and "# the base of every trial" in text
    after = yaml.safe_load(text)
    assert after["train"]["precision"] == best["config"]["train.precision"]
    assert str(after["model"]["gamma"]) == str(best["config"]["model.gamma"])
    after["train"]["precision"], after["model"]["gamma"] = before["train"]["precision"], before["model"]["gamma"]
    assert after == before


def test_bad_space_or_cluster_fails_before_any_trial(split_dir, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["tune", "--split", str(split_dir)]
    _write(tmp_path, _params(tmp_path, space={"model.gamma": {"choice": [1, 2]}}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tune.space.model.gamma = 2 is not allowed" in err and "odd integer" in err
    _write(tmp_path, _params(tmp_path, space={"train.lr_head": {"loguniform": [-0.1, 0.1]}}))
    assert main(argv) == 2 and "0 < lo < hi" in capsys.readouterr().err
    _write(tmp_path, _params(tmp_path, val_identities=9))  # 10 training identities: at most 8 held out
    assert main(argv) == 2 and "tune.val_identities = 9" in capsys.readouterr().err
    assert not (tmp_path / "ray").exists()  # nothing started

    _write(tmp_path, _params(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there
    start = time.time()
    assert main(argv) == 2
    assert "Ray cluster at 127.0.0.1:1" in capsys.readouterr().err and time.time() - start < 30
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(argv + ["--resume"]) == 2 and "no search to resume" in capsys.readouterr().err
    assert main(argv + ["--apply"]) == 2 and "run the search first" in capsys.readouterr().err
