"""The per-probe table of the evaluation and what comes from it: it reproduces the ablation table,
identical rows differ by exactly 0, the claims' pairs, selection-accounted "best fixed", slices,
and the errors for records of another split or with probes missing."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from components import comparisons as C
from components.data import table as T
from tests.conftest import tiny_model_params


@pytest.fixture(scope="module")
def scored():
    """A tiny PRI scored on a tiny split (5 test identities, 3 draws): (rows, test, table)."""
    from components.config import DegradeParams
    from components.data.protocols import degrade
    from components.data.splits import split_identities
    from components.evaluation import embed_test_set, load_test_set, score
    from components.models.pri import build_pri
    from tests.conftest import make_canonical

    canonical = make_canonical(n_ids=10, per_cam=3, size=(32, 16))
    deg = degrade(canonical, DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]), progress=False).table
    test = load_test_set(split_identities(deg, n_test=5, repeats=3, seed=0).table)
    torch.manual_seed(0)
    pri = build_pri(tiny_model_params(scales=[1, 2, 4]), num_classes=5).eval()
    rows = score(pri, embed_test_set(pri, test, batch_size=4, progress=False), test, hr_height=32, max_rank=5)
    table = C.per_probe_table(rows, test.query["image_id"].to_pylist(), test.q_pids, test.q_scales,
                              {"split": "abc", "model": "def"})
    return rows, test, table


def test_the_per_probe_table_reproduces_the_ablation_table(scored):
    rows, test, table = scored
    assert table.num_rows == len(rows) * 3 * test.query.num_rows
    for name, r in rows.items():
        again = C.rank1_map(table, name)
        assert again["rank1"] == pytest.approx(r["rank1"], abs=1e-9), name
        assert again["mAP"] == pytest.approx(r["mAP"], abs=1e-9), name
    # the scale each row used: fixed rows their own, bicubic none
    fixed2 = table.filter(pc.equal(table["row"], "Fixed x2"))
    assert set(fixed2["scale"].to_pylist()) == {2.0}
    assert table.filter(pc.equal(table["row"], C.BICUBIC_PROBES))["scale"].null_count == 3 * test.query.num_rows
    assert C.provenance(table) == {"split": "abc", "model": "def"}


def test_identical_rows_differ_by_exactly_zero(scored):
    rows, test, table = scored
    twin = C.per_probe_table({"A": rows["Fixed x2"], "B": rows["Fixed x2"]}, test.query["image_id"].to_pylist(),
                             test.q_pids, test.q_scales, {})
    (res,) = C.compare(twin, [("A - B", "A", "B")], n_resamples=500)
    for m in ("rank1", "mAP"):
        d = res[m]
        assert (d.mean, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_the_claims_and_the_best_fixed_scale(scored):
    rows, _, table = scored
    assert [p[0] for p in C.claims(list(rows) + ["FFSR + RIFE"])] == [
        "Adaptive - Fixed x1", "Adaptive - Fixed x2", "Adaptive - Fixed x4", "Adaptive - best fixed",
        "Adaptive - Size-based", "Adaptive - PRI's F, bicubic probes", "Ideal - Adaptive",
        "Ideal - Noise oracle"]  # no trained Bicubic + F: the variants have no baseline to differ from
    pairs = C.claims(list(rows) + ["HR probes", "Bicubic + F", "FFSR + RIFE"])
    assert [p[0] for p in pairs] == [
        "Adaptive - Fixed x1", "Adaptive - Fixed x2", "Adaptive - Fixed x4", "Adaptive - best fixed",
        "Adaptive - Size-based", "Adaptive - Bicubic + F", "Adaptive - PRI's F, bicubic probes", "Ideal - Adaptive",
        "Ideal - Noise oracle", "HR probes - PRI's F, bicubic probes", "FFSR + RIFE - Bicubic + F"]
    rife = [p[0] for p in C.claims(list(rows) + ["Bicubic + F", "FFSR + RIFE", "RIFE, bicubic probes",
                                                 "RIFE as F + PRI", "RIFE as F, bicubic probes"])]
    assert rife[-5:] == ["FFSR + RIFE - Bicubic + F", "RIFE, bicubic probes - Bicubic + F",
                         "RIFE as F + PRI - Bicubic + F", "RIFE as F + PRI - RIFE as F, bicubic probes",
                         "RIFE as F + PRI - RIFE, bicubic probes"]  # PRI's recovery against no recovery, twice
    scored_here = [p for p in pairs if p[1] in rows and (isinstance(p[2], list) or p[2] in rows)]
    res = {r["label"]: r for r in C.compare(table, scored_here, n_resamples=500)}
    best = res["Adaptive - best fixed"]["rank1"]
    singles = [res[f"Adaptive - Fixed x{r}"]["rank1"].mean for r in (1, 2, 4)]
    assert best.mean == pytest.approx(min(singles))  # the best fixed row is the one adaptive trails most
    assert best.low <= best.mean <= best.high
    ideal = res["Ideal - Adaptive"]["rank1"]
    assert ideal.mean >= 0  # the oracle never ranks worse than any choice


def test_per_scale_slices_count_every_probe_once(scored):
    rows, test, table = scored
    slices = C.per_scale(table)
    assert set(slices) == set(rows)
    for name, s in slices.items():
        assert set(s) == {"x2", "x4"}
        assert sum(v["probes"] for v in s.values()) == test.query.num_rows
    # the x2 slice of Fixed x2 by hand
    part = table.filter(pc.and_(pc.equal(table["row"], "Fixed x2"), pc.equal(table["true_scale"], 2.0)))
    assert slices["Fixed x2"]["x2"]["rank1"] == pytest.approx(100 * np.mean(part["first_rank"].to_numpy() == 0))


def test_oracle_headroom_from_the_fixed_rows(scored):
    rows, _, table = scored
    h = C.oracle_headroom(table)
    assert set(h) >= {"oracle", "noise_oracle", "held_out_oracle", "mean_of_scales"}
    assert h["oracle"]["rank1"] >= max(C.rank1_map(table, f"Fixed x{r}")["rank1"] for r in (1, 2, 4)) - 1e-9


def test_records_of_another_split_or_with_probes_missing_are_refused(scored):
    rows, _, table = scored
    with pytest.raises(C.PerProbeError, match=r"per_probe.parquet: no records of the row\(s\) \['FFSR \+ RIFE'\]"):
        C.check_per_probe(table, "per_probe.parquet", ["Adaptive (PRI)", "FFSR + RIFE"])
    short = table.filter(pc.invert(pc.and_(pc.equal(table["row"], "Ideal"), pc.equal(table["draw"], 1))))
    short = short.slice(0, short.num_rows - 1)
    with pytest.raises(C.PerProbeError, match="records are missing"):
        C.check_per_probe(short, "p.parquet", list(rows))
    with pytest.raises(C.PerProbeError, match=r"another split or model: split 'abc' \(expected 'xyz'\)"):
        C.check_per_probe(table, "p.parquet", list(rows), {"split": "xyz", "model": "def"})
    C.check_per_probe(table, "p.parquet", list(rows), {"split": "abc", "model": "def"})


def test_compare_aggregates_splits_and_refuses_bad_files(scored, tmp_path, monkeypatch, capsys):
    import json

    import pyarrow.compute as pc
    import yaml

    from components.config import Params
    from components.data.table import write_table
    from pipelines.cli import main

    rows, test, table = scored
    monkeypatch.chdir(tmp_path)
    params = Params().model_dump(mode="json")
    params["evaluate"]["bootstrap"] = 200
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    files = []
    for k in range(2):  # two "splits": the same records with another split md5 (and, for split 1, fewer probes)
        t = table.replace_schema_metadata({b"lrreid": json.dumps({"split": f"s{k}", "model": "m"}).encode()})
        if k == 1:
            keep = sorted(set(t["image_id"].to_pylist()))[:-2]
            t = t.filter(pc.is_in(t["image_id"], value_set=__import__("pyarrow").array(keep)))
        files.append(tmp_path / f"split{k}.parquet")
        write_table(t, files[-1], t.schema)
    assert main(["compare", *map(str, files), "--out", "out"]) == 0
    summary = json.loads((tmp_path / "out" / "resplits.json").read_text())
    assert set(summary["rows"]) == set(rows) and len(summary["per_split"]["Ideal"]) == 2
    assert summary["rows"]["Fixed x2"]["rank1"]["mean"] == pytest.approx(
        np.mean([C.rank1_map(table, "Fixed x2")["rank1"], summary["per_split"]["Fixed x2"][1]["rank1"]]))
    assert "Adaptive - best fixed" in (tmp_path / "out" / "resplits.md").read_text()
    # a person id is one identity across re-splits of one dataset, another one in each of distinct datasets
    people = [set(T.read_table(f, C.PER_PROBE_SCHEMA)["person_id"].to_pylist()) for f in files]
    assert f"of the {len(people[0] | people[1])} test identities" in (tmp_path / "out" / "resplits.md").read_text()
    assert main(["compare", *map(str, files), "--out", "distinct", "--distinct-datasets"]) == 0
    assert f"of the {len(people[0]) + len(people[1])} test identities" in (tmp_path / "distinct" / "resplits.md").read_text()
    assert (tmp_path / "out" / "paired_rank1.png").stat().st_size > 0
    # the same split twice, and a file without a row the others have
    assert main(["compare", str(files[0]), str(files[0]), "--out", "out2"]) == 2
    assert "come from the same split" in capsys.readouterr().err
    lacking = table.filter(pc.not_equal(table["row"], "Ideal")).replace_schema_metadata(
        {b"lrreid": json.dumps({"split": "s9"}).encode()})
    write_table(lacking, tmp_path / "lacking.parquet", lacking.schema)
    assert main(["compare", str(files[0]), str(tmp_path / "lacking.parquet"), "--out", "out3"]) == 2
    err = capsys.readouterr().err
    assert "lacking.parquet: no records of the row(s) ['Ideal']" in err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()  # nothing written


def test_noise_copies_have_the_real_per_probe_spread_and_no_structure():
    from components.evaluation import noisy_scales

    g = torch.Generator().manual_seed(1)
    real = torch.randn(50, 4, 1, generator=g) * 3 + torch.randn(50, 1, 512, generator=g)  # a probe-level scale
    noisy = noisy_scales(real, seed=0)
    assert noisy.shape == real.shape
    rms = lambda f: (f - f.mean(1, keepdim=True)).pow(2).mean((1, 2)).sqrt()  # noqa: E731
    assert torch.allclose(rms(noisy), rms(real), rtol=1e-5)  # the same per-probe spread
    assert torch.allclose(noisy.mean(1), real.mean(1), atol=1e-5)  # around the same mean
    # no structure: the real copies differ along one direction, the noise ones in all 512
    corr = lambda f: torch.nn.functional.cosine_similarity(*(f - f.mean(1, keepdim=True))[:, :2].unbind(1), dim=1)  # noqa
    # (centred noise copies: -1 / (N - 1) on average, +- 1 / sqrt(512) per probe)
    assert corr(real).abs().min() > 0.99 and abs(float(corr(noisy).mean()) + 1 / 3) < 0.05
    assert not torch.equal(noisy_scales(real, seed=1), noisy) and torch.equal(noisy_scales(real, seed=0), noisy)
