"""Shared fixtures: small canonical tables built in memory (no files, no downloads)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

# Ray Train's controller polls its workers every 2 s by default: tiny test epochs would spend
# most of their time waiting for that poll. Set before any Ray starts (subprocesses inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

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
