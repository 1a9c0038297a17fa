"""`lrreid tune`: a real Ray Tune search over the training driver (tiny data), interrupted and resumed.

One scenario, as a user meets it on a cluster (a Ray head the test starts, which
the searches join through RAY_ADDRESS): a search of two trials gets Ctrl-C during
its first trial (exit 130, parent run KILLED); `lrreid tune --resume` continues
that trial from its own checkpoint and is killed (SIGKILL) once it finished; a
second `--resume` finishes the search without re-running it, and the second
trial (it asks for fp16 on a CPU) crashes and is reported while the search still
ends with a result; the report, the MLflow parent / child runs and the picture
are there; `--apply` writes the best values into params.yaml and keeps its
comments. Bad search spaces and unreachable clusters fail before any trial.
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

from tests.conftest import ray_node, tiny_model_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster (2 CPUs, `ray start --head`): the searches join it, so killing a
    search's driver leaves Ray up, as on a real cluster (and the module pays one Ray start)."""
    with ray_node(tmp_path_factory.mktemp("ray") / "head.log", num_cpus=2) as address:
        yield address


def _env(tmp: Path, address: str) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", RAY_ADDRESS=address,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_AUTH_MODE="token",  # the cluster's nodes use token authentication
               TUNE_GLOBAL_CHECKPOINT_S="0")  # the search's state is saved at every step
    return env


def _params(tmp: Path, **tune) -> dict:
    t = dict(num_samples=1, epochs=2, grace_period=1, reduction_factor=2, name="tiny",
             space={"train.precision": {"grid": ["fp32", "fp16"]},  # fp16 needs CUDA: that trial crashes
                    "model.gamma": {"choice": ["1/3", 3]}})
    t.update(tune)
    return {
        "degrade": {"hr_height": 32, "hr_width": 16, "scales": [2, 4]},
        "split": {"val_identities": 2},
        "model": tiny_model_params().model_dump(mode="json"),
        "train": dict(identities_per_batch=4, images_per_identity=2, pretrain_epochs=1, epochs=1, precision="fp32",
                      storage_path=str(tmp / "ray"), max_failures=0, cpus_per_worker=2, lr_backbone=1e-3,
                      lr_head=1e-3),
        "tune": t,
    }


def _write(tmp: Path, params: dict) -> Path:
    """params.yaml: the shipped defaults with ``params`` on top (every section, as load_params wants)."""
    from components.config import Params, merge

    path = tmp / "params.yaml"
    full = merge(Params().model_dump(mode="json"), params)
    full["tune"]["space"] = params.get("tune", {}).get("space", full["tune"]["space"])  # the space is replaced
    text = yaml.safe_dump(full, sort_keys=False)
    path.write_text("# a comment --apply must keep\n" + text.replace("train:\n", "train:  # the base of every trial\n"))
    return path


def _children(tmp: Path):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = c.get_experiment_by_name("lrreid")
    if exp is None:
        return c, []
    return c, [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "tune-trial"]


def _start(tmp: Path, split_dir: Path, address: str, *extra: str) -> subprocess.Popen:
    """`lrreid tune` in its own session (a terminal's Ctrl-C goes to that process group), output to a file."""
    log = tmp / f"tune{len(list(tmp.glob('tune*.log')))}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["lrreid", "tune", "--split", str(split_dir), *extra], cwd=tmp,
                                env=_env(tmp, address), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def _wait_for(tmp: Path, proc: subprocess.Popen, done, what: str, seconds: float = 400):
    """Poll the MLflow store until ``done(client, child_runs)`` gives something."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.25)
        try:
            found = done(*_children(tmp))
        except Exception:  # the store is being created
            continue
        if found:
            return found
    pytest.fail(f"{what} before the deadline (exit {proc.poll()}):\n" + proc.log.read_text()[-3000:])


def test_search_interrupted_resumed_reported_and_applied(ray_head, split_dir, tmp_path, mlflow_store, monkeypatch):
    _write(tmp_path, _params(tmp_path))

    # 1. Ctrl-C once the first trial has reported an epoch: Tune saves the search, the driver says how to resume
    first = _start(tmp_path, split_dir, ray_head)
    epoch1 = _wait_for(tmp_path, first, lambda c, runs: [r for r in runs if c.get_metric_history(r.info.run_id, "val_rank1")],
                       "no trial reported an epoch")
    interrupted_id = epoch1[0].data.tags["trial_id"]
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(timeout=180) == 130
    log1 = first.log.read_text()
    assert "lrreid tune --resume" in log1, log1[-3000:]
    c, runs = _children(tmp_path)
    parent_id = runs[0].data.tags["mlflow.parentRunId"]
    assert c.get_run(parent_id).info.status == "KILLED"
    assert [r.info.status for r in runs if r.data.tags["trial_id"] == interrupted_id] == ["KILLED"]

    # 2. resume: the interrupted trial continues from its checkpoint; the driver is killed once it finished
    second = _start(tmp_path, split_dir, ray_head, "--resume")
    finished = _wait_for(tmp_path, second, lambda c, runs: [
        r for r in runs if r.info.status == "FINISHED" and r.data.tags["trial_id"] == interrupted_id
        and 2 in {int(m.step) for m in c.get_metric_history(r.info.run_id, "val_rank1")}], "the interrupted trial did not finish")
    time.sleep(2)  # the experiment state of that step is written
    os.killpg(second.pid, signal.SIGKILL)  # a hard crash of the driver; the cluster stays up
    second.wait()
    assert "[joint] resuming after epoch" in second.log.read_text()  # from the trial's own checkpoint
    done_id = interrupted_id
    done_runs = {r.info.run_id: r.info.end_time for r in finished}

    # 3. resume again: the finished trial is not run again, the fp16 trial crashes and is reported
    third = _start(tmp_path, split_dir, ray_head, "--resume")
    assert third.wait(timeout=600) == 0, third.log.read_text()[-3000:]
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
    parent = c.get_run(parent_id)
    assert parent.data.tags["stage"] == "tune" and parent.info.status == "FINISHED"
    assert parent.data.tags["best.train.precision"] == best["config"]["train.precision"]
    assert parent.data.metrics["best_val_rank1"] == pytest.approx(best["val_rank1"])
    ok = [r for r in runs if r.info.status == "FINISHED"]
    assert len(ok) == 1 and c.get_metric_history(ok[0].info.run_id, "val_rank1")
    assert [r.data.tags["trial_id"] for r in runs if r.info.status == "FAILED"] == [failed[0]["trial_id"]]

    # --apply: only the searched keys change, the comments stay, and the file is valid params
    before = yaml.safe_load((tmp_path / "params.yaml").read_text())
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)  # in-process: the same main() as the console script, without its start-up
    assert main(["tune", "--split", str(split_dir), "--apply"]) == 0
    text = (tmp_path / "params.yaml").read_text()
    assert "# a comment --apply must keep" in text and "# the base of every trial" in text
    after = yaml.safe_load(text)
    assert after["train"]["precision"] == best["config"]["train.precision"]
    assert str(after["model"]["gamma"]) == str(best["config"]["model.gamma"])
    after["train"]["precision"], after["model"]["gamma"] = before["train"]["precision"], before["model"]["gamma"]
    assert after == before


def test_a_driver_without_the_clusters_token_is_told_how_to_join(ray_head, split_dir, tmp_path):
    _write(tmp_path, _params(tmp_path))
    env = dict(_env(tmp_path, ray_head), RAY_AUTH_MODE="disabled",  # a shell without the cluster's setting
               RAY_gcs_server_port_wait_time_s="2")  # ray.init's retries of the refused GCS: 2 s, not its 20
    done = subprocess.run(["lrreid", "tune", "--split", str(split_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"Ray cluster at {ray_head} refused this driver" in done.stderr and "RAY_AUTH_MODE=token" in done.stderr
    assert not (tmp_path / "ray").exists()  # no search started


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
    _write(tmp_path, {**_params(tmp_path), "split": {"val_identities": 9}})  # 10 training ids: at most 8 held out
    assert main(argv) == 2 and "split.val_identities = 9" in capsys.readouterr().err
    _write(tmp_path, {**_params(tmp_path), "split": {"val_identities": 0}})  # the search's metric needs some
    assert main(argv) == 2 and "split.val_identities = 0" in capsys.readouterr().err
    assert not (tmp_path / "ray").exists()  # nothing started

    _write(tmp_path, _params(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there
    start = time.time()
    assert main(argv) == 2
    assert "Ray cluster at 127.0.0.1:1" in capsys.readouterr().err and time.time() - start < 30
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(argv + ["--resume"]) == 2 and "no search to resume" in capsys.readouterr().err
    assert main(argv + ["--apply"]) == 2 and "run the search first" in capsys.readouterr().err


def test_more_concurrent_trials_than_the_cluster_holds_is_said(tmp_path, caplog):
    from components.config import validate_params
    from pipelines.tune import check_concurrency

    nodes = [{"Alive": True, "Resources": {"CPU": 16, "GPU": 2}}, {"Alive": True, "Resources": {"CPU": 16, "GPU": 2}}]
    raw = _params(tmp_path, max_concurrent_trials=2)
    raw["train"].update(use_gpu=True, gpus_per_worker=1, num_workers=2, cpus_per_worker=4)
    assert check_concurrency(validate_params(raw), nodes) == 2 and not caplog.records  # 2 trials x 2 GPUs: fit
    raw["tune"]["max_concurrent_trials"] = 3
    assert check_concurrency(validate_params(raw), nodes) == 2
    assert "tune.max_concurrent_trials = 3, but the cluster holds the workers of 2 trial(s) at once" in caplog.text
