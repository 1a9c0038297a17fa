"""`lrreid pretrain-ffsr`: FFSR's generic MSE pretraining on a local image folder (FFSR paper Sec. 5.2)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from components.config import FFSRParams, validate_params
from components.images import encode_png
from components.models.ffsr import build_ffsr
from components.training import load_weights_file
from pipelines.cli import main


def _images(folder, n=6, seed=0):
    """Smooth colour images with edges (sizes differ; one smaller than the patch, one a JPEG-named PNG)."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        h, w = (20, 12) if i == 0 else (48 + 4 * i, 32 + 2 * i)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(yy * rng.uniform(2, 6) + xx * rng.uniform(2, 6)) % 255,
                        ((yy // 6 + xx // 5) % 2) * 200 + 30, np.full((h, w), rng.uniform(0, 255))], -1)
        (folder / ("sub" if i % 2 else "") / f"im{i}.png").write_bytes(encode_png(img.astype(np.uint8)))
    (folder / "notes.txt").write_text("not an image")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(validate_params({"model": {"ffsr": {"channels": 8}}})
                                                         .model_dump(mode="json")))
    _images(tmp_path / "generic")
    return tmp_path


def test_pretrain_ffsr_fits_mse_and_writes_weights_model_ffsr_weights_loads(project):
    out = project / "models" / "ffsr_generic.pt"
    assert main(["pretrain-ffsr", "--images", "generic", "--out", str(out), "--steps", "40", "--batch-size", "4",
                 "--patch", "32x16", "--lr", "0.002", "--no-progress"]) == 0
    state, meta = load_weights_file(out)
    assert meta["num_images"] == 6 and meta["steps"] == 40 and meta["scales"] == [2, 3, 4]
    assert meta["mse_after"] < meta["mse_before"]  # it learned something past bicubic on held-out patches
    model = build_ffsr(FFSRParams(channels=8, weights=str(out)))  # what step 1 then starts from
    assert model.conv_out.weight.abs().sum() > 0  # no longer the zero-initialised (bicubic) FFSR


@pytest.mark.parametrize("folder, message", [("missing", "no such folder"), ("empty", "holds no images")])
def test_pretrain_ffsr_names_a_bad_folder_and_writes_nothing(project, capsys, folder, message):
    (project / "empty").mkdir()
    out = project / "ffsr.pt"
    assert main(["pretrain-ffsr", "--images", folder, "--out", str(out), "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert folder in err and message in err
    assert not out.exists()
