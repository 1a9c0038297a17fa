"""`lrreid register` and `lrreid query` against a real sqlite MLflow store (no mocks).

Tiny PRI weights saved like the train stage saves them, fake-but-valid
reports/evaluate.json + ablation.md: versions, aliases (challenger on every
version, champion only when rank-1 beats it on the same dataset + protocol),
tags, description, the pyfunc model loaded back from the registry, and the
query command through the console script's main().
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from components import images
from components.config import validate_params
from tests.conftest import tiny_model_params

pytestmark = pytest.mark.slow
NAME = "lrreid-tiny"
NUM_CLASSES = 5
ABLATION = """| predictor | rank-1 | mAP |
|---|---|---|
| adaptive | 40.0 | 35.0 |
| fixed x4 | 30.0 | 28.0 |
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    return tmp_path


def tiny_params():
    return validate_params({"model": tiny_model_params().model_dump(mode="json"),
                            "registry": {"model_name": NAME}})


def tiny_pri(seed: int):
    from components.models.pri import build_pri

    torch.manual_seed(seed)
    return build_pri(tiny_model_params(), NUM_CLASSES, with_predictor=True).eval()


def stage_run(name: str) -> str:
    from pipelines import tracking

    run_id = tracking.start_run(name, {}, Path(".lrreid") / f"{name}.id", tags={"stage": name})
    tracking.end_run(run_id)
    return run_id


@pytest.fixture
def runs(workdir):
    return {stage: stage_run(stage) for stage in ("pretrain", "joint", "evaluate")}


def write_inputs(d: Path, runs: dict, *, seed: int, rank1: float, dataset: str = "synthetic") -> dict:
    """models/{pretrain,model}.pt and reports/{evaluate.json,ablation.md} as the stages write them."""
    from components.training import save_weights_dict

    pri = tiny_pri(seed)
    meta = {"phase": "joint", "model": "pri", "num_classes": NUM_CLASSES, "epochs": 1,
            "mlflow_run_id": runs["joint"], "ray_run": "joint-x"}
    save_weights_dict(pri.state_dict(), d / "models" / "model.pt", meta)
    pre = {k: v for k, v in pri.state_dict().items() if not k.startswith("P.")}
    save_weights_dict(pre, d / "models" / "pretrain.pt", {**meta, "phase": "pretrain", "mlflow_run_id": runs["pretrain"]})
    ev = {"rank1": rank1, "rank5": rank1 + 10, "rank10": rank1 + 15, "mAP": rank1 - 5, "rank1_std": 1.5,
          "mAP_std": 0.5, "repeats": 10, "predictor": "adaptive", "dataset": dataset, "protocol": "mlr",
          "mlflow_run_id": runs["evaluate"]}
    (d / "reports").mkdir(exist_ok=True)
    (d / "reports" / "evaluate.json").write_text(json.dumps(ev))
    (d / "reports" / "ablation.md").write_text(ABLATION)
    return {"model": d / "models" / "model.pt", "pretrain": d / "models" / "pretrain.pt",
            "evaluate": d / "reports" / "evaluate.json", "ablation": d / "reports" / "ablation.md",
            "out": d / "reports" / "register.json"}


def do_register(d, runs, **kw) -> dict:
    from pipelines.register import register

    report = register(tiny_params(), **write_inputs(d, runs, **kw))
    assert json.loads((d / "reports" / "register.json").read_text()) == report
    return report


def aliases(name=NAME) -> dict:
    from pipelines.registry import current_alias_version

    return {a: str(getattr(current_alias_version(name, a), "version", None)) for a in ("challenger", "champion")}


def test_register_aliases_tags_description_and_pyfunc(workdir, runs, caplog):
    import mlflow

    from pipelines.registry import get_model_version

    caplog.set_level("INFO", logger="lrreid")
    r1 = do_register(workdir, runs, seed=1, rank1=40.0)
    assert (r1["version"], r1["champion_version"], r1["promoted"]) == (1, 1, True)
    assert r1["model_uri"] == f"models:/{NAME}/1" and r1["model_name"] == NAME
    assert aliases() == {"challenger": "1", "champion": "1"}
    assert "champion -> version 1 (no champion before)" in caplog.text
    assert "Failed to validate serving input" not in caplog.text  # MLflow ran the input example

    r2 = do_register(workdir, runs, seed=2, rank1=30.0)  # worse: challenger only
    assert (r2["version"], r2["champion_version"], r2["promoted"]) == (2, 1, False)
    assert aliases() == {"challenger": "2", "champion": "1"}
    assert "champion stays at version 1 (rank-1 40.00% >= 30.00%)" in caplog.text

    r3 = do_register(workdir, runs, seed=3, rank1=50.0)  # better: champion moves
    assert (r3["version"], r3["champion_version"], r3["promoted"]) == (3, 3, True)
    assert aliases() == {"challenger": "3", "champion": "3"}
    assert "champion -> version 3 (rank-1 50.00% > 40.00% of version 1)" in caplog.text

    r4 = do_register(workdir, runs, seed=4, rank1=90.0, dataset="market1501")  # not comparable
    assert (r4["version"], r4["champion_version"], r4["promoted"]) == (4, 3, False)
    assert aliases() == {"challenger": "4", "champion": "3"}
    assert "champion stays at version 3 (it was evaluated on synthetic/mlr, this version on market1501/mlr" \
        in caplog.text

    mv = get_model_version(NAME, 3)
    tags = mv.tags
    for key in ("git_commit", "data_dvc_md5", "params_hash", "dataset", "protocol", "rank1", "mAP",
                "pretrain_run_id", "train_run_id", "evaluate_run_id", "register_run_id"):
        assert key in tags, key
    assert (tags["dataset"], tags["protocol"], float(tags["rank1"]), float(tags["mAP"])) == ("synthetic", "mlr", 50.0, 45.0)
    assert (tags["pretrain_run_id"], tags["train_run_id"], tags["evaluate_run_id"]) == \
        (runs["pretrain"], runs["joint"], runs["evaluate"])
    desc = mv.description
    assert "| rank-1 | 50.00 ± 1.50 % |" in desc and "| mAP | 45.00 ± 0.50 % |" in desc
    assert "| fixed x4 | 30.0 | 28.0 |" in desc  # the ablation table
    for stage, run_id in runs.items():
        assert f"[`{run_id}`](#/experiments/" in desc, stage

    # the champion from the registry, loaded back through pyfunc
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    x = np.random.default_rng(0).random((2, 3, 8, 4), dtype=np.float32)  # LR probes (HR 32x16 / 4)
    out = model.predict(x, params={"role": "probe"})
    assert out["embedding"].shape == (2, 32) and out["embedding"].dtype == np.float32
    assert out["r_p"].shape == (2,) and set(out["r_p"].tolist()) <= {1.0, 2.0, 3.0, 4.0}
    assert out["scale_probs"].shape == (2, 4) and np.allclose(out["scale_probs"].sum(1), 1, atol=1e-5)
    feature, r_p, probs = tiny_pri(seed=3).embed_probe(torch.from_numpy(x))  # version 3's weights
    np.testing.assert_allclose(out["embedding"], feature.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["r_p"], r_p.numpy())
    np.testing.assert_allclose(out["scale_probs"], probs.numpy(), atol=1e-6)
    hr = np.random.default_rng(1).random((3, 3, 32, 16), dtype=np.float32)
    gal = model.predict(hr, params={"role": "gallery"})
    assert gal["embedding"].shape == (3, 32) and (gal["r_p"] == 1).all() and np.isnan(gal["scale_probs"]).all()
    np.testing.assert_allclose(gal["embedding"], tiny_pri(seed=3).embed_gallery(torch.from_numpy(hr)).numpy(),
                               atol=1e-5)
    assert model.predict(x).keys() == out.keys()  # role defaults to probe
    assert model.metadata.signature.params.to_dict()[0]["name"] == "role"
    with pytest.raises(Exception, match="role"):
        model.predict(x, params={"role": "nonsense"})


def test_query_command_and_errors(workdir, runs, capsys):
    from pipelines.cli import main

    do_register(workdir, runs, seed=1, rank1=40.0)
    rng = np.random.default_rng(0)
    gallery = workdir / "gallery"
    gallery.mkdir()
    for name in ("0001_c1s1_000001_01.png", "0002_c2s1_000002_01.png", "0003_c1s1_000003_01.jpg", "other.png"):
        (gallery / name).write_bytes(images.encode_png(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8))) \
            if name.endswith(".png") else _write_jpeg(gallery / name, rng)
    probe = workdir / "0002_c1s1_000009_01.png"  # person 2: the picture frames matches
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (8, 4, 4), dtype=np.uint8), "RGBA").save(probe)  # RGBA is converted

    # in-process: the console script's main() (its start-up, a fresh torch + MLflow import, costs ~10 s here)
    capsys.readouterr()
    assert main(["query", "--model", f"models:/{NAME}@champion", "--gallery", str(gallery), "--top-k", "3",
                 "--picture", str(workdir / "ranked.png"), str(probe)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any("person 2): r_p = x" in line and "P: x1" in line for line in lines), out
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    person = {"0001_c1s1_000001_01.png": "1", "0002_c2s1_000002_01.png": "2", "0003_c1s1_000003_01.jpg": "3",
              "other.png": "?"}
    assert all(person[r[1]] == r[2] for r in rows), out  # ids parsed from Market-style names
    distances = [float(r[3]) for r in rows]
    assert distances == sorted(distances)
    assert (workdir / "ranked.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # errors: one line, exit code 2 (in-process: the same main() as the console script)
    (workdir / "empty").mkdir()
    cases = [
        (["query", "--model", "models:/no-such-model@champion", "--gallery", str(gallery), str(probe)],
         "model models:/no-such-model@champion: cannot load it"),
        (["query", "--model", f"models:/{NAME}@champion", "--gallery", str(workdir / "empty"), str(probe)],
         "no readable images"),
        (["query", "--model", f"models:/{NAME}@champion", "--gallery", str(gallery), str(workdir / "nope.png")],
         "nope.png: no such probe image"),
        (["register", "--params", str(_params_file(workdir)), "--evaluate", str(workdir / "missing.json")],
         "missing.json: missing; run `lrreid evaluate`"),
    ]
    from pipelines.cli import main as cli_main

    assert cli_main(list(cases[-1][0])) == 2  # the same command in-process: the same exit code
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, err
        assert err.strip().splitlines()[-1].startswith(f"lrreid {argv[0]}: error: "), err


def test_register_rejects_bad_inputs(workdir, runs):
    from pipelines.common import StageError
    from pipelines.register import register

    paths = write_inputs(workdir, runs, seed=1, rank1=40.0)
    paths["ablation"].write_text("no table here\n")
    with pytest.raises(StageError, match=r"ablation.md: no Markdown table"):
        register(tiny_params(), **paths)
    paths = write_inputs(workdir, runs, seed=1, rank1=140.0)
    with pytest.raises(StageError, match=r"evaluate.json: 'rank1' = 140.0"):
        register(tiny_params(), **paths)
    paths = write_inputs(workdir, runs, seed=1, rank1=40.0)
    paths["model"].unlink()
    with pytest.raises(StageError, match=r"model.pt: no such weights file; run `lrreid train`"):
        register(tiny_params(), **paths)
    paths = write_inputs(workdir, runs, seed=1, rank1=40.0)
    other = validate_params({"model": tiny_model_params(feature_dim=16).model_dump(mode="json")})
    with pytest.raises(StageError, match=r"does not fit params.yaml model"):
        register(other, **paths)


def _write_jpeg(path: Path, rng) -> None:
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)).save(path, format="JPEG")


def _params_file(d: Path) -> Path:
    import yaml

    path = d / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params().model_dump(mode="json")))
    return path


def test_gallery_from_tables(tmp_path):
    """--gallery as a table: a split table gives its gallery rows once each, a canonical table all rows."""
    from components.config import DegradeParams
    from components.data import table as T
    from components.data.protocols import degrade
    from components.data.splits import split_identities
    from pipelines.common import StageError
    from pipelines.query import person_id, read_gallery
    from tests.conftest import make_canonical

    canonical = make_canonical(n_ids=6, per_cam=2, size=(32, 16))
    T.write_table(canonical, tmp_path / "canonical.parquet", T.CANONICAL_SCHEMA)
    g = read_gallery(tmp_path / "canonical.parquet")
    assert len(g.images) == canonical.num_rows and g.images[0].shape == (32, 16, 3)
    assert g.person_ids == canonical[T.PERSON_ID].to_pylist()

    deg = degrade(canonical, DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]), progress=False).table
    split = split_identities(deg, n_test=2, repeats=3, seed=0).table
    T.write_table(split, tmp_path / "split.parquet", T.SPLIT_SCHEMA)
    g = read_gallery(tmp_path / "split.parquet")
    rows = [(i, s) for i, s in zip(split[T.IMAGE_ID].to_pylist(), split[T.SPLIT].to_pylist()) if s == "gallery"]
    assert sorted(g.names) == sorted({i for i, _ in rows}) and len(g.names) == len(set(g.names))

    assert person_id("0002_c1s1_000451_03.jpg") == 2 and person_id("sub/-1_c3s1_0.jpg") == -1
    assert person_id("cam_a/001_045.bmp") is None
    with pytest.raises(StageError, match="no such folder or table"):
        read_gallery(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(StageError, match="neither a folder of images nor a .parquet table"):
        read_gallery(tmp_path / "notes.txt")
