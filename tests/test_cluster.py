"""The multi-node code path on one machine: a two-node Ray cluster (two `ray start`).

A tiny pretraining joins the cluster through train.ray_address like a user on a
real cluster would; its two workers (one CPU each, one CPU per node) must land
on different nodes, the checkpoints go to the configured storage path, and the
MLflow record of every epoch is written once (by the driver side, not per worker).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from components.config import validate_params
from tests.conftest import join_with_token, ray_node, tiny_model_params

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """A head and a worker node (`ray start`, one CPU each); yields the address and the two node ids."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    join_with_token(monkeypatch)
    with ray_node(tmp_path / "head.log", num_cpus=1) as address, \
            ray_node(tmp_path / "worker.log", num_cpus=1, head=address):
        ray.init(address=address)  # wait until the worker node has registered
        deadline = time.time() + 60
        while len(nodes := [n["NodeID"] for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(0.2)
        ray.shutdown()
        assert len(nodes) == 2, f"the worker node did not join: {tmp_path / 'worker.log'}"
        monkeypatch.setenv("RAY_ADDRESS", address)  # what a user exports; removed again after the test
        yield address, set(nodes)
        ray.shutdown()


def test_two_workers_on_two_nodes_checkpoint_to_storage_and_log_once(two_nodes, split_dir, tmp_path, monkeypatch,
                                                                    mlflow_store):
    from ray.util.state import list_actors

    from components.training import load_weights_file
    from pipelines.training_stage import run_stage
    from pipelines.tracking import client

    address, node_ids = two_nodes
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    storage = tmp_path / "shared"  # on a real cluster: NFS or s3://...
    params = validate_params({"model": tiny_model_params().model_dump(mode="json"), "train": dict(
        identities_per_batch=4, images_per_identity=2, pretrain_epochs=2, precision="fp32", num_workers=2,
        cpus_per_worker=1, storage_path=str(storage), ray_address=address, max_failures=0),
        "split": {"val_identities": 0}})
    summary = run_stage(params, phase="pretrain", split_dir=split_dir, out=tmp_path / "pre.pt",
                        report=tmp_path / "pretrain.json")
    assert summary["epoch"] == 1 and summary["samples"] > 0  # DDP over gloo across the two nodes

    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    nodes = {a.node_id for a in workers}
    assert nodes == node_ids, f"workers ran on {nodes}"

    _, meta = load_weights_file(tmp_path / "pre.pt")
    run_dir = storage / meta["ray_run"]
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")), f"no checkpoint in {run_dir}"
    steps = [int(m.step) for m in client().get_metric_history(meta["mlflow_run_id"], "L")]
    assert steps == [0, 1]  # one record per epoch, not one per worker
    assert Path(tmp_path / "pre.pt").stat().st_size > 0
