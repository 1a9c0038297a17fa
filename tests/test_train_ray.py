"""Pretraining and joint training through real Ray Train (local Ray), tracked in a real sqlite MLflow.

Tiny data and models; checks the outputs, one MLflow record per epoch, recovery
from a killed worker, resuming a stage after the driver crashed, and the up-front
errors for workers that cannot be placed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from components.config import validate_params
from components.data import table as T
from pipelines.cluster import start_local_ray
from tests.conftest import tiny_model_params

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray whose workers have a simulated broken bf16 convolution (tests/faults.py): the tests
    train in fp32 except the one that checks what explicit bf16 does on such a CPU."""
    start_local_ray(num_cpus=2, runtime_env={"worker_process_setup_hook": "tests.faults.break_bf16",
                                             "env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


def tiny_params(storage: Path, **train):
    m = tiny_model_params().model_dump(mode="json")
    t = dict(identities_per_batch=4, images_per_identity=2, pretrain_epochs=1, epochs=2, precision="fp32",
             storage_path=str(storage), max_failures=1, lr_backbone=1e-3, lr_head=1e-3, cpus_per_worker=1)
    t.update(train)
    return validate_params({"model": m, "train": t, "split": {"val_identities": 2}})


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    return tmp_path


def _epochs_logged(run_id: str, key: str = "L") -> list[int]:
    from pipelines.tracking import client

    return sorted(int(m.step) for m in client().get_metric_history(run_id, key))


def _kill_a_worker_after_the_first_checkpoint(storage: Path, killed: list) -> threading.Thread:
    """A thread that kills this test's Ray Train worker once a checkpoint is in ``storage``."""
    def kill():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if list(storage.glob("*/checkpoint_*")):
                # only this test's Ray (started by this process): never another run's workers on the machine
                for proc in psutil.Process().children(recursive=True):
                    try:
                        cmd = " ".join(proc.cmdline())
                    except psutil.Error:
                        continue
                    if "RayTrainWorker" in cmd:
                        proc.kill()
                        killed.append(proc.pid)
                        return
            time.sleep(0.2)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def _pretrain_killed_once(params, split_dir: Path, workdir: Path) -> dict:
    """The pretrain stage, its Ray Train worker killed once after the first checkpoint (Train restarts it)."""
    from pipelines.training_stage import run_stage

    killed = []
    killer = _kill_a_worker_after_the_first_checkpoint(workdir / "ray", killed)
    pre = run_stage(params, phase="pretrain", split_dir=split_dir, out=workdir / "pre.pt",
                    report=workdir / "pre.json")
    killer.join(timeout=5)
    assert killed, "no Ray Train worker process was found to kill"
    return pre


def test_pretrain_then_joint_one_worker(local_ray, split_dir, workdir):
    """Pretraining (its worker killed after the first checkpoint: Train restarts it from there) then joint."""
    from pipelines.training_stage import run_stage
    from components.training import load_weights_file

    params = tiny_params(workdir / "ray", pretrain_epochs=3, max_failures=1)
    pre = _pretrain_killed_once(params, split_dir, workdir)
    assert "L_sr" in pre and "L_p" not in pre
    _, pre_meta = load_weights_file(workdir / "pre.pt")
    assert pre_meta["epochs"] == 3
    assert _epochs_logged(pre_meta["mlflow_run_id"]) == [0, 1, 2]  # no epoch counted twice after the restart
    params = params.model_copy(update={"train": params.train.model_copy(update={"cpus_per_worker": "auto"})})
    joint = run_stage(params, phase="joint", split_dir=split_dir, out=workdir / "model.pt",
                      report=workdir / "train.json", init=workdir / "pre.pt")
    for key in ("L", "L_sr", "L_id", "L_tri", "L_p", "label_entropy", "samples_per_s", "lr_backbone"):
        assert key in joint, key
    assert any(k.startswith("r_p_x") for k in joint)
    assert joint["lr_backbone"] == pytest.approx(1e-3 * params.train.lr_decay)
    state, meta = load_weights_file(workdir / "model.pt")
    assert meta["phase"] == "joint" and meta["epochs"] == 2
    assert any(k.startswith("P.") for k in state) and any(k.startswith("G.") for k in state)
    report = json.loads((workdir / "train.json").read_text())
    assert report["epoch"] == 1
    # PRI Fig. 3: r_p and the optimal scale of train.track_images images, every joint epoch
    rows = (workdir / "plots" / "r_p_history.csv").read_text().splitlines()
    assert rows[0] == "epoch,image,r_p,r_opt" and {r.split(",")[0] for r in rows[1:]} == {"0", "1"}
    assert len(rows) - 1 == 2 * params.train.track_images
    # MLflow: one record per epoch, written by the driver-side callback, with the tags
    from pipelines.tracking import client

    run = client().get_run(meta["mlflow_run_id"])
    assert _epochs_logged(meta["mlflow_run_id"]) == [0, 1]
    assert run.data.params["train.epochs"] == "2" and "git_commit" in run.data.tags
    assert "data_dvc_md5" in run.data.tags and run.info.status == "FINISHED"
    # what the worker ran and why: cpus_per_worker "auto" is the local Ray's 2 CPUs, 2 torch threads
    assert run.data.tags["precision"] == "fp32" == report["precision"] and report["torch_threads"] == 2
    assert run.data.tags["precision_reason"] == "train.precision: fp32 on cpu" and run.data.tags["torch_threads"] == "2"
    assert client().get_run(pre_meta["mlflow_run_id"]).data.tags["torch_threads"] == "1"  # cpus_per_worker: 1
    # the validation curve: split.val_identities (2) held out of training, scored after every epoch
    assert pre_meta["num_classes"] == meta["num_classes"] == 8  # the split's 10 training ids minus 2
    assert [m.step for m in client().get_metric_history(meta["mlflow_run_id"], "val_rank1")] == [0, 1]
    for phase, epochs in (("pretrain", 3), ("joint", 2)):
        curve = (workdir / "plots" / f"{phase}_curve.csv").read_text().splitlines()
        assert curve[0].startswith("epoch,L,") and len(curve) == 1 + epochs
        assert all(0 <= float(row.split(",")[6]) <= 100 for row in curve[1:])  # val_rank1 in %


def test_ffsr_rife_through_the_same_drivers(local_ray, split_dir, workdir):
    """train.model = ffsr_rife: pretrain = step 1 (FFSR) then step 2 (RIFE), train = step 3 (joint), each step
    with its own optimiser and schedule (ffsr_rife.*), validated after every epoch like PRI. (A worker
    restarted at the step boundary goes on with step 2's optimiser: tests/test_training.py, without
    Ray; Train's restart itself: test_pretrain_then_joint_one_worker.)"""
    from components.config import FFSRParams, RIFEParams
    from components.training import load_weights_file
    from pipelines.training_stage import run_stage
    from pipelines.tracking import client

    m = tiny_model_params(ffsr=FFSRParams(channels=8), rife=RIFEParams(feature_dim=16, weight_hidden=8))
    base = tiny_params(workdir / "ray", model="ffsr_rife").model_dump(mode="json")
    steps = {"ffsr": {"epochs": 1, "optimizer": "sgd", "lr": 0.01},
             "rife": {"epochs": 2, "optimizer": "adam", "lr": 0.002, "milestones": [1]},
             "joint": {"epochs": 1, "optimizer": "sgd", "lr": 0.0005}}
    params = validate_params({**base, "model": m.model_dump(mode="json"), "ffsr_rife": steps})
    pre = run_stage(params, phase="pretrain", split_dir=split_dir, out=workdir / "pre.pt", report=workdir / "pre.json")
    _, pre_meta = load_weights_file(workdir / "pre.pt")
    run = pre_meta["mlflow_run_id"]
    assert pre_meta["epochs"] == 3 and pre["epoch"] == 2  # FFSR epoch 0, RIFE epochs 1-2
    assert _epochs_logged(run) == [0, 1, 2]
    assert _epochs_logged(run, "L_ffsr") == [0]  # step 1 fits FFSR alone
    assert _epochs_logged(run, "L_rife") == [1, 2]  # step 2 fits RIFE alone
    lr = {int(x.step): x.value for x in client().get_metric_history(run, "lr_head")}
    assert lr == pytest.approx({0: 0.01, 1: 0.002, 2: 0.0002})  # step 2: its own rate, decayed at its milestone
    assert _epochs_logged(run, "val_rank1") == [0, 1, 2]  # the validation curve of FFSR + RIFE
    curve = (workdir / "plots" / "pretrain_curve.csv").read_text().splitlines()
    assert len(curve) == 4 and all(row.split(",")[6] for row in curve[1:])  # val_rank1 in every epoch's row
    joint = run_stage(params, phase="joint", split_dir=split_dir, out=workdir / "model.pt",
                      report=workdir / "train.json", init=workdir / "pre.pt")
    assert {"L_ffsr", "L_rife", "L_x", "L_r"} <= set(joint)  # step 3: Eq. 4, both parts
    assert joint["lr_head"] == pytest.approx(0.0005)
    state, meta = load_weights_file(workdir / "model.pt")
    assert meta["model"] == "ffsr_rife" and meta["epochs"] == 1
    assert any(k.startswith("ffsr.") for k in state) and any(k.startswith("rife.") for k in state)
    pre_state, _ = load_weights_file(workdir / "pre.pt")
    moved = [k for k in state if k.startswith("ffsr.") and state[k].is_floating_point()
             and not torch.equal(state[k], pre_state[k])]
    assert moved, "joint training started from the pretrained FFSR and changed it"


def test_stage_resumes_after_the_driver_crashed(local_ray, split_dir, tmp_path, mlflow_store):
    """Kill the `lrreid pretrain` driver (joined to this module's Ray, as on a cluster) after its
    first checkpoint, run it again: it resumes."""
    params = tiny_params(tmp_path / "ray", pretrain_epochs=3).model_dump(mode="json")
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_store,
               RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = ["lrreid", "pretrain", "--split", str(split_dir), "--out", str(tmp_path / "pre.pt")]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    for line in first.stdout:  # epoch 2's line: epoch 1's checkpoint is registered by now
        if "epoch 2/3" in line:
            break
    os.killpg(first.pid, signal.SIGKILL)  # the driver: Ray ends its job (controller, workers)
    first.wait()
    assert not (tmp_path / "pre.pt").exists()
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming after epoch" in second.stdout + second.stderr
    from components.training import load_weights_file

    _, meta = load_weights_file(tmp_path / "pre.pt")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        assert _epochs_logged(meta["mlflow_run_id"]) == [0, 1, 2]
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")


def test_workers_that_cannot_be_placed_fail_before_training(local_ray, tmp_path):
    from pipelines.common import StageError
    from pipelines.cluster import check_resources

    with pytest.raises(StageError, match="train.num_workers = 3"):
        check_resources(tiny_params(tmp_path, num_workers=3))
    with pytest.raises(StageError, match="train.use_gpu = true"):
        check_resources(tiny_params(tmp_path, use_gpu=True))
    assert check_resources(tiny_params(tmp_path, num_workers=2)) == 2  # fits: 2 workers of 1 CPU at once
    # more GPUs per worker (or per trial) than any node has: named, not a hang
    gpu_nodes = [{"Alive": True, "Resources": {"CPU": 16, "GPU": 1}}, {"Alive": True, "Resources": {"CPU": 16, "GPU": 1}}]
    with pytest.raises(StageError, match="no node has 2 GPUs \\(the most is 1\\)"):
        check_resources(tiny_params(tmp_path, use_gpu=True, gpus_per_worker=2), gpu_nodes)
    assert check_resources(tiny_params(tmp_path, use_gpu=True, num_workers=2, gpus_per_worker=1), gpu_nodes) == 2


@pytest.mark.parametrize("nodes, workers, groups, per", [
    ([2], 1, 1, 2),          # one laptop, one worker: all its cores
    ([16], 1, 1, 16),
    ([16], 2, 1, 8),         # two workers share the machine
    ([16], 1, 3, 5),         # tune: three concurrent trials of one worker
    ([16, 16], 2, 1, 16),    # a worker per node
    ([16, 4], 2, 1, 8),      # 16 + 4 CPUs shared by 2: 10 each places only one; 8 fits both on the larger node
    ([1], 4, 1, 1),          # never below one CPU (check_resources then names the shortage)
])
def test_auto_cpus_share_the_cluster_among_the_workers(tmp_path, nodes, workers, groups, per):
    from pipelines.cluster import resolve_cpus

    live = [{"Alive": True, "Resources": {"CPU": c}} for c in nodes] + [{"Alive": False, "Resources": {"CPU": 64}}]
    params = tiny_params(tmp_path, cpus_per_worker="auto", num_workers=workers)
    got = resolve_cpus(params, live, groups=groups).train.cpus_per_worker
    assert got == per and (sum(int(c // got) for c in nodes) >= workers * groups or got == 1)
    assert resolve_cpus(tiny_params(tmp_path, cpus_per_worker=3), live).train.cpus_per_worker == 3  # a number stays


def test_a_nan_stop_reaches_the_driver_with_its_precision(local_ray, split_dir, workdir):
    """A NaN loss stops training at once; the driver raises the worker's message (Train V2 keeps only
    checkpointed reports: before the fix it said 'finished without a checkpoint', or kept the last
    good epoch's model and said nothing). A re-run resumes after the last good epoch."""
    from pipelines.common import StageError
    from pipelines.training_stage import run_stage

    params = tiny_params(workdir / "ray", lr_backbone=1e30, lr_head=1e30, max_failures=1)
    with pytest.raises(StageError) as err:
        run_stage(params, phase="pretrain", split_dir=split_dir, out=workdir / "pre.pt", report=workdir / "pre.json")
    msg = str(err.value)
    assert msg.startswith("pretrain stopped: epoch 0, step 1: L_sr is nan (precision fp32); try lower train.lr_")
    assert "\n" not in msg and not (workdir / "pre.pt").exists()


def test_a_split_too_small_for_one_batch_fails_before_ray(split_dir, tmp_path):
    from pipelines.common import StageError
    from pipelines.ray_train import check_batch_fits

    pairs = T.read_table(split_dir / "pairs.parquet", T.PAIRS_SCHEMA)
    check_batch_fits(tiny_params(tmp_path, identities_per_batch=10), pairs)  # 10 training identities
    with pytest.raises(StageError, match=r"the split has 10 training identities .* train.identities_per_batch = 11"):
        check_batch_fits(tiny_params(tmp_path, identities_per_batch=11), pairs)
    with pytest.raises(StageError, match=r"on each of train.num_workers = 2"):
        check_batch_fits(tiny_params(tmp_path, identities_per_batch=6, num_workers=2), pairs)


def test_explicit_bf16_on_a_broken_cpu_stops_the_stage_before_training(local_ray, split_dir, workdir):
    from pipelines.common import StageError
    from pipelines.training_stage import run_stage
    from pipelines.tracking import client

    with pytest.raises(StageError) as err:
        run_stage(tiny_params(workdir / "ray", precision="bf16"), phase="pretrain", split_dir=split_dir,
                  out=workdir / "pre.pt", report=workdir / "pre.json")
    msg = str(err.value)
    assert msg.startswith("pretrain stopped: train.precision = 'bf16' is broken on this CPU (Conv2d")
    assert "use train.precision: fp32 or auto" in msg and "\n" not in msg
    assert not (workdir / "pre.pt").exists()
    runs = client().search_runs([e.experiment_id for e in client().search_experiments()])
    assert runs and all("L" not in r.data.metrics for r in runs)  # stopped before any training step
