"""Shared fixtures: small canonical tables built in memory (no files, no downloads)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

# Ray Train's controller polls its workers every 2 s by default: tiny test epochs would spend
# most of their time waiting for that poll. Set before any Ray starts (subprocesses inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

from components.precision import guard_onednn  # noqa: E402

guard_onednn()  # as every entry point does, before the first convolution (AMX CPUs: oneDNN below AMX)

from components import images
from components.data import table as T


def make_canonical(n_ids=6, cams=(1, 2), per_cam=3, size=(32, 16), seed=0, source_split=None) -> pa.Table:
    """A canonical table of random-noise images: n_ids identities x cams x per_cam."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in T.CANONICAL_SCHEMA.names}
    for pid in range(1, n_ids + 1):
        for cam in cams:
            for k in range(per_cam):
                x = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                image_id = f"{pid:04d}_c{cam}_{k:02d}"
                rows[T.IMAGE_ID].append(image_id)
                rows[T.PERSON_ID].append(pid)
                rows[T.CAMERA_ID].append(cam)
                rows[T.SOURCE_PATH].append(image_id + ".png")
                rows[T.SOURCE_SPLIT].append(source_split(pid, cam, k) if source_split else "")
                rows[T.HEIGHT].append(size[0])
                rows[T.WIDTH].append(size[1])
                rows[T.IMAGE].append(images.encode_png(x))
    return pa.table(rows, schema=T.CANONICAL_SCHEMA)


@pytest.fixture
def canonical() -> pa.Table:
    return make_canonical()


def tiny_model_params(**overrides):
    """A PRI small enough for unit tests on a CPU (32x16 images)."""
    from components.config import ModelParams, SRParams

    sr = SRParams(blocks=1, convs_per_block=2, growth=8, channels=8, meta_hidden=16)
    base = dict(backbone="resnet18", input_height=32, input_width=16, feature_dim=32, sr=sr)
    return ModelParams(**{**base, **overrides})


def tiny_triplet_batch(n_ids=4, per_cam=2, P=4, K=2, seed=0):
    """One real TripletBatch: canonical table -> MLR degrade -> split -> TripletDataset -> loader."""
    from components.config import DegradeParams
    from components.data.dataset import make_train_loader
    from components.data.protocols import degrade
    from components.data.splits import split_identities

    canonical = make_canonical(n_ids=n_ids + 1, per_cam=per_cam, size=(32, 16), seed=seed)
    deg = degrade(canonical, DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]), progress=False).table
    res = split_identities(deg, n_test=1, repeats=1, seed=seed)
    loader = make_train_loader(res.table, res.pairs, scales=[1, 2, 3, 4], P=P, K=K, flip_p=0.5, seed=seed)
    return next(iter(loader)), loader.dataset.num_classes


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    """A tiny MLR split written like the split stage writes it (12 identities, 2 of them test)."""
    from components.config import DegradeParams
    from components.data import table as T
    from components.data.protocols import degrade
    from components.data.splits import split_identities

    d = tmp_path_factory.mktemp("split")
    canonical = make_canonical(n_ids=12, per_cam=3, size=(32, 16))
    deg = degrade(canonical, DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]), progress=False).table
    res = split_identities(deg, n_test=2, repeats=1, seed=0)
    T.write_table(res.table, d / "split.parquet", T.SPLIT_SCHEMA)
    T.write_table(res.pairs, d / "pairs.parquet", T.PAIRS_SCHEMA)
    return d


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory):
    """An empty sqlite MLflow store, created once: creating one runs MLflow's schema
    migrations (~3 s on 2 cores), copying it takes milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, empty_mlflow_db) -> str:
    """A real, empty sqlite MLflow store at ``tmp_path / "mlflow.db"``; returns its tracking URI."""
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@contextlib.contextmanager
def ray_node(log: Path, num_cpus: int, head: str | None = None):
    """A Ray node started the way a cluster's nodes are (`ray start --block`), in its own process group.

    Yields the cluster's address (the head's GCS); ``head``: the address to join as a worker node
    (None: start a head). Token authentication is on, as Ray's docs set a cluster up
    (RAY_AUTH_MODE=token on every node, the token in ~/.ray/auth_token, made if missing): its drivers
    need RAY_AUTH_MODE=token too. The node lives outside pytest: a killed driver leaves it up, as on
    a cluster, and pytest holds no client of it (ray.cluster_utils.Cluster keeps its head's GCS
    client until interpreter exit, where CI's test run once ended in a segmentation fault).
    Stopped with SIGTERM (`ray start --block` then stops its node's processes), SIGKILL if it hangs.
    """
    from pipelines.cluster import free_port

    ray_bin = str(Path(sys.executable).parent / "ray")
    if not ({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ) or (Path.home() / ".ray/auth_token").exists()):
        subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True, capture_output=True)
    args = [ray_bin, "start", "--block", f"--num-cpus={num_cpus}", "--disable-usage-stats",  # ports: 2 nodes, 1 host
            "--min-worker-port=0", "--max-worker-port=0", f"--dashboard-agent-listen-port={free_port()}"]
    port = None if head else free_port()  # the head's GCS
    args += [f"--address={head}"] if head else ["--head", f"--port={port}", f"--dashboard-port={free_port()}"]
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # a node never joins whatever this process uses
        env.pop(key, None)
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"`{' '.join(args)}` did not start (exit {proc.poll()}):\n{log.read_text()}")
            time.sleep(0.2)
        yield head or f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the node is still in its group
        proc.wait()


def join_with_token(monkeypatch) -> None:
    """This process (an in-process driver) sends the token of the clusters `ray_node` starts.
    Ray reads RAY_AUTH_MODE once; ray.init refreshes it the same way when it turns tokens on."""
    from ray._raylet import Config

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    Config.initialize("")
