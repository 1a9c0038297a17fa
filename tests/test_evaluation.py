"""The evaluation protocol (components/evaluation.py) and the evaluate stage on a tiny split and model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from components.config import validate_params
from components.data import table as T
from tests.conftest import tiny_model_params


@pytest.fixture(scope="module")
def split_table():
    from components.config import DegradeParams
    from components.data.protocols import degrade
    from components.data.splits import split_identities
    from tests.conftest import make_canonical

    canonical = make_canonical(n_ids=10, per_cam=3, size=(32, 16))
    deg = degrade(canonical, DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]), progress=False).table
    return split_identities(deg, n_test=5, repeats=3, seed=0).table


@pytest.fixture(scope="module")
def canonical_table():
    from tests.conftest import make_canonical

    return make_canonical(n_ids=10, per_cam=3, size=(32, 16))  # split_table's source


def _write_data(tmp_path, split_table, canonical_table):
    (tmp_path / "data" / "split").mkdir(parents=True)
    T.write_table(split_table, tmp_path / "data" / "split" / "split.parquet", T.SPLIT_SCHEMA)
    T.write_table(canonical_table, tmp_path / "data" / "canonical.parquet", T.CANONICAL_SCHEMA)


@pytest.fixture(scope="module")
def pri():
    from components.models.pri import build_pri

    torch.manual_seed(0)
    return build_pri(tiny_model_params(scales=[1, 2, 4]), num_classes=5).eval()


def test_test_set_draws(split_table):
    from components.evaluation import load_test_set

    test = load_test_set(split_table)
    assert test.draw_ids == [0, 1, 2] and all(len(d) == 5 for d in test.draws)
    assert len(set(test.gallery[T.IMAGE_ID].to_pylist())) == test.gallery.num_rows  # distinct images
    for k, draw in enumerate(test.draws):  # each draw: one HR image per test identity
        assert sorted(test.g_pids[draw]) == sorted(set(test.q_pids))
    assert len(load_test_set(split_table, repeats=2).draws) == 2
    with pytest.raises(ValueError, match="evaluate.repeats = 4"):
        load_test_set(split_table, repeats=4)
    with pytest.raises(ValueError, match="query"):
        load_test_set(split_table.filter(np.array(split_table[T.SPLIT].to_pylist()) == "train"))


def test_rows_of_table_2_from_one_pass(split_table, pri):
    from components.evaluation import embed_test_set, load_test_set, score

    test = load_test_set(split_table)
    emb = embed_test_set(pri, test, batch_size=4, progress=False)
    Q = test.query.num_rows
    assert emb.all_scales.shape == (Q, 3, 32) and emb.probs.shape == (Q, 3)
    assert emb.gallery.shape[0] == test.gallery.num_rows <= 15  # distinct images of the 3 draws
    # the stored features are F(G_r(x_l)) of the model, probe by probe
    one = pri.embed_all_scales(torch.stack([emb_input for emb_input in _probe_images(test)[:1]]))
    assert torch.allclose(one[0], emb.all_scales[0], atol=1e-5)
    rows = score(pri, emb, test, hr_height=32, max_rank=5)
    assert list(rows) == ["Fixed x1", "Fixed x2", "Fixed x4", "Size-based", "Adaptive (PRI)", "Ideal", "Noise oracle",
                          "PRI's F, bicubic probes"]
    for name, r in rows.items():
        assert 0 <= r["rank1"] <= r["rank5"] <= 100 and 0 < r["mAP"] <= 100, name
        assert r["repeats"] == 3 and r["cmc"].shape == (5,)
    # the oracle is at least as good as every fixed choice, draw by draw and so on average
    assert rows["Ideal"]["rank1"] >= max(rows[f"Fixed x{r}"]["rank1"] for r in (1, 2, 4)) - 1e-9
    # size-based: x2 probes (16 px high) -> scale 2, x4 probes (8 px) -> scale 4
    assert set(zip(test.q_scales.tolist(), rows["Size-based"]["scales"].tolist())) == {(2.0, 2.0), (4.0, 4.0)}
    # adaptive = argmax of P
    assert np.array_equal(rows["Adaptive (PRI)"]["scales"], pri.scales[emb.probs.argmax(1)].numpy())


def _probe_images(test):
    from components.evaluation import decode_images

    return decode_images(test.query)


def test_evaluate_stage_writes_reports_figures_and_mlflow(split_table, canonical_table, pri, tmp_path, monkeypatch,
                                                          mlflow_store):
    from components.training import save_weights_dict
    from pipelines.cli import main
    from pipelines.tracking import client

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    params = validate_params({"model": tiny_model_params(scales=[1, 2, 4]).model_dump(mode="json"),
                              "degrade": {"hr_height": 32, "hr_width": 16, "scales": [2, 4]},
                              "evaluate": {"repeats": 2, "max_rank": 5, "figure_probes": 2},
                              "ablation": {"variants": []}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    _write_data(tmp_path, split_table, canonical_table)
    save_weights_dict(pri.state_dict(), tmp_path / "models" / "model.pt",
                      {"phase": "joint", "model": "pri", "num_classes": 5, "mlflow_run_id": "x"})
    assert main(["evaluate", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "reports" / "evaluate.json").read_text())
    assert metrics["predictor"] == "adaptive" and metrics["repeats"] == 2 and 0 <= metrics["rank1"] <= 100
    assert "| Ideal |" in (tmp_path / "reports" / "ablation.md").read_text()
    # HR probes: the probes' originals at the HR size through F, as a gallery image would be embedded
    from components.evaluation import decode_images, embed_images, hr_probe_images, load_test_set, score_features

    test = load_test_set(split_table, 2)
    xs = hr_probe_images(test, canonical_table, (32, 16))
    assert len(xs) == test.query.num_rows and all(x.shape == (3, 32, 16) for x in xs)
    rows = json.loads((tmp_path / "reports" / "ablation.json").read_text())["rows"]
    gallery = embed_images(pri, decode_images(test.gallery))
    expected = score_features(embed_images(pri, xs), gallery, test, max_rank=5)
    assert rows["HR probes"]["rank1"] == pytest.approx(expected["rank1"])
    md = (tmp_path / "reports" / "ablation.md").read_text()
    lead = next(c["rank1"] for c in json.loads((tmp_path / "reports" / "ablation.json").read_text())["paired"]
                if c["label"] == "HR probes - PRI's F, bicubic probes")
    assert ("of the gap (%)" in md) == (lead["low"] > 0)  # the column only for a gap above noise
    assert ("gains nothing measurable" in md) == (lead["low"] <= 0)
    with pytest.raises(ValueError, match="not in the canonical table"):
        hr_probe_images(test, canonical_table.slice(0, 3), (32, 16))
    for name in ("cmc.png", "ranked_list.png", "recovered.png", "scale_histogram.png"):
        assert (tmp_path / "reports" / "figures" / name).stat().st_size > 0
    assert (tmp_path / "reports" / "plots" / "cmc.csv").read_text().startswith("method,rank,matching_rate")
    run = client().get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["rank1"] == pytest.approx(metrics["rank1"])
    assert "ideal.rank1" in run.data.metrics and run.info.status == "FINISHED"
    logged = {a.path for a in client().list_artifacts(run.info.run_id, "figures")}
    assert {"figures/ranked_list.png", "figures/paired_rank1.png", "figures/predictor_confusion.png"} <= logged
    # the statistics: per-probe records that reproduce the table, paired differences, slices, P's diagnostics
    from components import comparisons as C
    from components.data.table import read_table

    per_probe = read_table(tmp_path / "reports" / "eval" / "per_probe.parquet")
    table = json.loads((tmp_path / "reports" / "ablation.json").read_text())
    for name, row in table["rows"].items():
        assert C.rank1_map(per_probe, name)["rank1"] == pytest.approx(row["rank1"], abs=1e-9)
    labels = [p["label"] for p in table["paired"]]
    assert "Adaptive - best fixed" in labels and "Ideal - Adaptive" in labels
    assert metrics["adaptive_best_fixed.rank1_low"] <= metrics["adaptive_best_fixed.rank1"]
    assert metrics["adaptive_best_fixed.rank1"] <= metrics["adaptive_best_fixed.rank1_high"]
    assert "adaptive_best_fixed.rank1" in run.data.metrics
    assert sum(map(sum, table["predictor"]["confusion"])) == per_probe.num_rows // (len(table["rows"]) * 2)
    md = (tmp_path / "reports" / "ablation.md").read_text()
    for section in ("## Paired differences", "## Per true down-sampling factor", "## The oracle's headroom",
                    "## Is P predicting anything?"):
        assert section in md


def test_evaluate_stage_errors(tmp_path, monkeypatch):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(validate_params({}).model_dump(mode="json")))
    assert main(["evaluate", "--no-progress"]) == 2  # no model: a one-line error, exit 2


def test_evaluate_stage_adds_the_variants_rows(split_table, canonical_table, pri, tmp_path, monkeypatch, capsys,
                                              mlflow_store):
    """ablation.variants: Bicubic + F, FFSR + RIFE, RIFE as F + PRI scored from models/ablation/<variant>/model.pt."""
    from components.models.ffsr_rife import FFSRRIFE
    from components.models.pri import build_pri
    from components.training import save_weights_dict
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    model = tiny_model_params(scales=[1, 2, 4], rife={"backbone": "resnet18", "feature_dim": 16, "weight_hidden": 4},
                              ffsr={"channels": 4})
    params = validate_params({"model": model.model_dump(mode="json"),
                              "degrade": {"hr_height": 32, "hr_width": 16, "scales": [2, 4]},
                              "evaluate": {"repeats": 2, "max_rank": 5, "figure_probes": 0}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    _write_data(tmp_path, split_table, canonical_table)
    meta = {"phase": "joint", "model": "pri", "num_classes": 5, "mlflow_run_id": "x"}
    save_weights_dict(pri.state_dict(), tmp_path / "models" / "model.pt", meta)
    torch.manual_seed(1)
    bicubic = build_pri(params.for_variant("bicubic").model, 5)
    assert not list(bicubic.G.parameters())  # no G to train: F on bicubic-enlarged x_l
    save_weights_dict(bicubic.state_dict(), tmp_path / "models" / "ablation" / "bicubic" / "model.pt", meta)
    save_weights_dict(FFSRRIFE(params.for_variant("ffsr_rife").model, 5).state_dict(),
                      tmp_path / "models" / "ablation" / "ffsr_rife" / "model.pt", {**meta, "model": "ffsr_rife"})
    assert main(["evaluate", "--no-progress"]) == 2  # rife_pri not trained yet: named, with the fix
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "models/ablation/rife_pri/model.pt does not exist" in err and "train_variant@rife_pri" in err
    assert not (tmp_path / "reports" / "ablation.md").exists()
    save_weights_dict(build_pri(params.for_variant("rife_pri").model, 5).state_dict(),
                      tmp_path / "models" / "ablation" / "rife_pri" / "model.pt", meta)
    assert main(["evaluate", "--no-progress"]) == 0
    table = json.loads((tmp_path / "reports" / "ablation.json").read_text())["rows"]
    assert {"FFSR + RIFE", "RIFE, bicubic probes", "RIFE as F + PRI", "RIFE as F, bicubic probes", "Adaptive (PRI)",
            "Bicubic + F", "PRI's F, bicubic probes"} <= set(table)
    for name in ("Bicubic + F", "FFSR + RIFE", "RIFE as F + PRI"):
        assert table[name]["repeats"] == 2 and 0 <= table[name]["rank1"] <= 100
    assert table["RIFE as F + PRI"]["rank1"] != table["Adaptive (PRI)"]["rank1"] or \
        table["RIFE as F + PRI"]["mAP"] != table["Adaptive (PRI)"]["mAP"]  # another F, other features
    # Bicubic + F is its own model's F on bicubic probes, the same protocol as PRI's F on them
    from components.evaluation import embed_test_set, load_test_set, score

    test = load_test_set(split_table, 2)
    own = score(bicubic, embed_test_set(bicubic, test, progress=False), test, hr_height=32, max_rank=5)
    assert table["Bicubic + F"]["rank1"] == pytest.approx(own["PRI's F, bicubic probes"]["rank1"])
    assert table["Bicubic + F"]["mAP"] == pytest.approx(own["PRI's F, bicubic probes"]["mAP"])
    assert table["Bicubic + F"]["mAP"] != table["PRI's F, bicubic probes"]["mAP"]  # another F
    md = (tmp_path / "reports" / "ablation.md").read_text()
    assert md.index("| Bicubic + F |") < md.index("| FFSR + RIFE |") < md.index("| RIFE as F + PRI |")
    assert "| Adaptive - Bicubic + F |" in md and "| RIFE as F + PRI - RIFE, bicubic probes |" in md
    assert "| RIFE as F + PRI - RIFE as F, bicubic probes |" in md
    # a variant file holding the wrong kind of model is named
    save_weights_dict(pri.state_dict(), tmp_path / "models" / "ablation" / "ffsr_rife" / "model.pt", meta)
    assert main(["evaluate", "--no-progress"]) == 2
    assert "holds a 'pri' model, expected 'ffsr_rife'" in capsys.readouterr().err


def test_ffsr_rife_rows_use_the_same_protocol(split_table):
    """FFSR + RIFE (Eq. 3): every image, probe or gallery, through FFSR at the HR size, then RIFE;
    RIFE alone: bicubic-enlarged probes and the gallery as it is."""
    from components.evaluation import decode_images, embed_ffsr_rife, load_test_set, score_features
    from components.models.ffsr_rife import FFSRRIFE

    torch.manual_seed(0)
    cfg = tiny_model_params(rife={"backbone": "resnet18", "feature_dim": 8, "weight_hidden": 4}, ffsr={"channels": 4})
    model = FFSRRIFE(cfg, 0).eval()
    torch.nn.init.normal_(model.ffsr.conv_out.weight, std=0.05)  # FFSR is no longer bicubic: it changes x_h too
    test = load_test_set(split_table)
    f = embed_ffsr_rife(model, test, hr_size=(32, 16), batch_size=3, progress=False)
    assert f["probe"].shape == f["probe_bicubic"].shape == (test.query.num_rows, 8)
    assert f["gallery"].shape == f["gallery_plain"].shape == (test.gallery.num_rows, 8)
    x, g = _probe_images(test)[1], decode_images(test.gallery)[0]
    with torch.no_grad():
        torch.testing.assert_close(f["probe"][1], model.rife(model.ffsr(x[None], (32, 16))).feature[0],
                                   atol=1e-5, rtol=1e-5)  # batch order kept across size groups
        torch.testing.assert_close(f["gallery"][0], model.rife(model.ffsr(g[None], (32, 16))).feature[0],
                                   atol=1e-5, rtol=1e-5)
        up = torch.nn.functional.interpolate(x[None], size=(32, 16), mode="bicubic", align_corners=False)
        torch.testing.assert_close(f["probe_bicubic"][1], model.rife(up).feature[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f["gallery_plain"][0], model.rife(g[None]).feature[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(f["gallery"], f["gallery_plain"], atol=1e-4)  # the gallery did go through FFSR
    row = score_features(f["probe"], f["gallery"], test, max_rank=5)
    assert row["repeats"] == 3 and 0 <= row["rank1"] <= row["rank5"] <= 100 and row["cmc"].shape == (5,)
    assert set(embed_ffsr_rife(model, test, hr_size=(32, 16), progress=False, bicubic=False)) == {"probe", "gallery"}


def test_the_gap_column_only_for_a_gap_above_noise():
    from pipelines.evaluate import ablation_markdown

    def row(r1):
        return {"rank1": r1, "rank1_std": 1.0, "mAP": r1, "mAP_std": 1.0, "repeats": 10}

    rows = {"Fixed x2": row(50.0), "PRI's F, bicubic probes": row(40.0), "HR probes": row(60.0)}
    real = [{"label": "HR probes - PRI's F, bicubic probes", "rank1": {"mean": 20.0, "low": 15.0, "high": 25.0}}]
    md = ablation_markdown(rows, real)
    assert "| Fixed x2 | 50.0 +- 1.0 |" in md and md.split("| Fixed x2 |")[1].split("\n")[0].endswith(" 50 |")
    noise = [{"label": "HR probes - PRI's F, bicubic probes", "rank1": {"mean": 1.2, "low": -1.9, "high": 4.1}}]
    md = ablation_markdown(rows, noise)
    assert "of the gap" not in md.splitlines()[0] and "+1.2 rank-1 points [-1.9, +4.1]" in md
    assert "of the gap" not in ablation_markdown(rows)  # no statistics: no column
