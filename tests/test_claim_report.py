"""bench/claim_report.py: the claim run's goals from hand-built seed records whose answers are known."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from bench import claim_report
from components import comparisons as C
from components.config import load_params
from components.data.protocols import noise_sigma
from components.data.table import write_table
from components.rows import ADAPTIVE

ROOT = Path(__file__).resolve().parents[1]

SCALES = [1.0, 2.0, 3.0, 4.0]
IDS = [f"query/{p:04d}_c1s1_{i:06d}_00" for p in range(1, 5) for i in range(1, 4)]  # 4 people x 3 probes
PIDS = [int(i[6:10]) for i in IDS]


def seed_records(folder: Path, best: np.ndarray, r_p: np.ndarray) -> None:
    """A seed's per_probe.parquet: 2 draws; Fixed x<s> ranks a true match first exactly where s is
    ``best`` [Q] (elsewhere rank 3); the adaptive row recovers at ``r_p`` [Q] (scale indices)."""
    D, Q = 2, len(IDS)
    rows = {}
    for n, s in enumerate(SCALES):
        rank = np.where(best == n, 0, 3)[None].repeat(D, 0)
        rows[f"Fixed x{s:g}"] = {"first_rank": rank, "ap": np.where(rank == 0, 1.0, 0.25), "scale": None}
    chosen = np.array([rows[f"Fixed x{SCALES[i]:g}"]["first_rank"][0, q] for q, i in enumerate(r_p)])
    rows[ADAPTIVE] = {"first_rank": chosen[None].repeat(D, 0), "ap": np.where(chosen == 0, 1.0, 0.25)[None].repeat(D, 0),
                      "scale": np.array(SCALES)[r_p][None].repeat(D, 0)}
    folder.mkdir(parents=True)
    table = C.per_probe_table(rows, IDS, PIDS, [2.0] * Q, {"split": folder.name, "model": "m"})
    write_table(table, folder / "per_probe.parquet", table.schema)
    (folder / "train.json").write_text(json.dumps({"L_p": 1.2, "label_entropy": 1.1, "L_p_uniform": float(np.log(4)), "L_p_marginal": 1.3,
                                                   "samples_per_s": 20.0, "precision": "fp32"}))
    (folder / "time.json").write_text(json.dumps({"seed": 0, "wall_seconds": 600.0}))
    (folder / "joint_curve.csv").write_text("epoch,L,val_rank1\n0,5.0,40.0\n1,4.0,41.5\n")


def test_goals_from_known_records(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "claim"
    best = np.arange(len(IDS)) % 4
    seed_records(out / "seed0", best, best)  # P picks the oracle's scale: agreement 1
    seed_records(out / "seed1", best, (best + 1) % 4)  # never: agreement 0
    seed_records(out / "seed0-64x32", best, best)  # an exploratory folder: not a seed of the preset
    (out / "resplits.json").write_text(json.dumps({"paired": [
        {"label": "Adaptive - best fixed", "rank1": {"mean": 1.0, "low": 0.2, "high": 1.8, "p_value": 0.01}},
        {"label": "Ideal - Adaptive", "rank1": {"mean": 2.0, "low": -0.5, "high": 4.0, "p_value": 0.2}},
        {"label": "Adaptive - PRI's F, bicubic probes", "rank1": {"mean": 0.5, "low": -0.1, "high": 1.1, "p_value": 0.1}}]}))

    claim_report.main(["--out", str(out)])

    report = json.loads((out / "goals.json").read_text())
    assert report["seeds"] == [0, 1]
    p = report["predictor"]
    assert [s["agreement"] for s in p["per_seed"]] == [1.0, 0.0]
    assert p["pooled"]["agreement"] == 0.5
    assert p["pooled"]["chance"] == 0.25  # both distributions uniform over the 4 scales
    assert p["per_seed"][0]["low"] > 0 > p["per_seed"][1]["high"]
    noise = load_params("params.yaml", preset="claim").degrade
    sigmas = {s: [noise_sigma(noise.model_copy(update={"seed": s}), i) for i in IDS] for s in (0, 1)}
    n = report["by_noise"]
    assert n["levels"] == sorted({float(v) for v in sigmas[0] + sigmas[1]})
    assert sum(map(sum, n["r_p"])) == 2 * len(IDS) and sum(map(sum, n["oracle"])) == 2 * 2 * len(IDS)
    level0 = [q for q, v in enumerate(sigmas[0]) if v == n["levels"][0]]
    level1 = [q for q, v in enumerate(sigmas[1]) if v == n["levels"][0]]
    assert n["r_p"][0] == (np.bincount(best[level0], minlength=4) + np.bincount((best[level1] + 1) % 4, minlength=4)).tolist()
    assert n["ties"] == [0] * len(n["levels"])  # one scale ranks first, the others third: never a tie
    assert [g["label"] for g in report["paired"]] == ["Adaptive - best fixed", "Ideal - Adaptive",
                                                      "Adaptive - PRI's F, bicubic probes"]
    assert report["plateau"][0]["PRI"]["joint"] == [40.0, 41.5]
    assert report["timing"][1]["wall_min"] == 10.0
    text = (out / "goals.md").read_text()
    assert "| 1 | Adaptive - best fixed | +1.0 [+0.2, +1.8] | 0.01 | yes |" in text
    assert "| 4 | Ideal - Adaptive | +2.0 [-0.5, +4.0] | 0.2 | no |" in text
    assert "| G | Adaptive - PRI's F, bicubic probes | +0.5 [-0.1, +1.1] | 0.1 | no |" in text
    assert "| 0 | 100.0 | 25.0 |" in text and "| 1.2000 | 1.3000 | 1.1000 | 1.3863 |" in text
    assert (out / "r_p_by_noise.png").stat().st_size > 0 and (out / "oracle_by_noise.png").stat().st_size > 0
