"""How stages and `lrreid query` fail and where they write (issue 12): one error line with the fix,
the way back after `dvc repro` removed a stage's outputs, no mlflow.db from a failed query, and
ingest / degrade reports next to a user's --out table instead of over the pipeline's reports/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import images
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys, stage: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"lrreid {stage}: error: "), err
    return err[-1]


# ---------------------------------------------------------------------- B: the way back under dvc repro
def test_a_failing_stage_under_dvc_says_how_to_get_its_outputs_back(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("# emptied by mistake\n")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert main(["split", "--no-progress"]) == 2
    assert "dvc checkout" not in _error_line(capsys, "split")  # run by hand: nothing was removed

    monkeypatch.setenv("DVC_STAGE", "train_variant@rife_pri")  # what DVC sets for a stage's command
    assert main(["train", "--variant", "rife_pri", "--no-progress"]) == 2
    assert "`dvc checkout train_variant@rife_pri` restores" in _error_line(capsys, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow
def test_dvc_repro_of_a_failing_stage_prints_the_hint(tmp_path):
    """Real DVC: it removes the stage's output, runs the command with DVC_STAGE set, the line says `dvc checkout`."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("DVC_STAGE", None)
    (tmp_path / "params.yaml").write_text("# emptied by mistake\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: lrreid ingest --no-progress\n"
                                       "    outs:\n      - data/canonical.parquet\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "canonical.parquet").write_text("the previous output")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    proc = subprocess.run(["dvc", "repro", "ingest"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    line = next(x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("lrreid ingest: error: "))
    assert "`dvc checkout ingest` restores" in line
    assert not (tmp_path / "data" / "canonical.parquet").exists()  # what the hint is about


# ---------------------------------------------------------------------- C: lrreid query's model
@pytest.fixture
def probe_and_gallery(tmp_path):
    x = np.zeros((32, 16, 3), np.uint8)
    (tmp_path / "gallery").mkdir()
    (tmp_path / "gallery" / "0001_c1s1_000001_01.png").write_bytes(images.encode_png(x))
    (tmp_path / "probe.png").write_bytes(images.encode_png(x[:8, :4]))
    return str(tmp_path / "probe.png"), str(tmp_path / "gallery")


def test_query_with_a_missing_model_path_says_so(tmp_path, monkeypatch, capsys, probe_and_gallery):
    probe, gallery = probe_and_gallery
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for model, what in ((str(tmp_path / "no-such-model"), "does not exist"),
                        (probe, "is not an MLflow model folder")):
        assert main(["query", "--model", model, "--gallery", gallery, probe]) == 2
        line = _error_line(capsys, "query")
        assert f"--model {model}: {what}" in line and "models:/" in line and "register" in line, line
        assert "sqlite" not in line and "mlflow.db" not in line
    assert not (tmp_path / "mlflow.db").exists()


def test_query_without_a_store_creates_no_mlflow_db(tmp_path, monkeypatch, capsys, probe_and_gallery):
    probe, gallery = probe_and_gallery
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["query", "--gallery", gallery, probe]) == 2  # the default: models:/lrreid-pri@champion
    line = _error_line(capsys, "query")
    assert "no MLflow store at" in line and "dvc repro" in line and "MLFLOW_TRACKING_URI" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery", "probe.png"]


# ---------------------------------------------------------------------- D: reports next to --out
def test_ingest_and_degrade_with_out_leave_the_pipeline_reports_alone(tmp_path, monkeypatch):
    from components.config import SyntheticParams
    from components.data import synthetic

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["degrade"].update(hr_height=32, hr_width=16, scales=[2, 4])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    synthetic.generate(tmp_path / "raw", SyntheticParams(identities=6, train_identities=4, images_per_camera=2,
                                                         height=32, width=16), progress=False)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "ingest.json").write_text("{}")  # the pipeline's: must stay as it is
    monkeypatch.chdir(tmp_path)

    assert main(["ingest", "--no-progress", "--input", "raw", "--out", "trial/canonical.parquet"]) == 0
    assert json.loads((tmp_path / "trial" / "canonical.json").read_text())["images"] == 24
    assert main(["degrade", "--no-progress", "--input", "trial/canonical.parquet", "--out", "trial/lr.parquet"]) == 0
    assert json.loads((tmp_path / "trial" / "lr.json").read_text())["protocol"] == "mlr"
    assert main(["degrade", "--no-progress", "--input", "trial/canonical.parquet", "--out", "trial/lr2.parquet",
                 "--report", "trial/mine.json"]) == 0
    assert (tmp_path / "trial" / "mine.json").is_file() and not (tmp_path / "trial" / "lr2.json").exists()
    params["degrade"]["lr_noise"] = [0, 16]  # the LR sensor noise: its levels counted in the report
    (tmp_path / "noisy.yaml").write_text(yaml.safe_dump(params))
    assert main(["degrade", "--no-progress", "--params", "noisy.yaml", "--input", "trial/canonical.parquet",
                 "--out", "trial/noisy.parquet"]) == 0
    noisy = json.loads((tmp_path / "trial" / "noisy.json").read_text())
    assert set(noisy["lr_images_per_noise_sigma"]) <= {"0", "16"}
    assert sum(noisy["lr_images_per_noise_sigma"].values()) == noisy["lr_images"] > 0
    assert "lr_images_per_noise_sigma" not in json.loads((tmp_path / "trial" / "lr.json").read_text())
    assert os.listdir(tmp_path / "reports") == ["ingest.json"]
    assert (tmp_path / "reports" / "ingest.json").read_text() == "{}"

    shutil.rmtree(tmp_path / "trial")
    (tmp_path / "data").mkdir()
    assert main(["ingest", "--no-progress", "--input", "raw"]) == 0  # the pipeline's --out: reports/ as before
    assert json.loads((tmp_path / "reports" / "ingest.json").read_text())["images"] == 24
