"""The claim run's goals (issue 24) from its seeds' records: one table, the figures, pass or not.

Reads what ``bench/claim_run.py`` leaves in reports/claim/: every seed<k>/ (per-probe records,
train.json / pretrain.json, the curves, time.json, the variants' curves) and resplits.json
(``lrreid compare``'s paired differences over the pooled test identities). Writes:

- reports/claim/goals.md and goals.json: goals 1, 2 and 4 (paired rank-1 differences, 95%
  identity-bootstrap intervals), goal 3 (P's agreement with the oracle's best scale against
  chance, pooled and per seed; the last joint epoch's L_p against the labels' marginal (the L_p
  of a P that learned nothing of the image; from train.json, or seed<k>/label_bank.json for seeds
  trained before train.json logged it), the label entropy and ln N;
  r_p and the oracle's best scale per noise level), the validation curves' last epochs
  (the plateau), goal 5 (wall time and samples/s per seed);
- reports/claim/rp_by_noise.png: P's r_p against the probe's LR sensor noise (test probes,
  every seed), and oracle_by_noise.png: the oracle's best scale against it;
- reports/claim/seed<k>/<variant>_curves.png: each variant's training curves (PRI's are the
  seed's training_curves.png).

A probe's noise level is recomputed from (degrade.seed = k, its image id), as the degrade stage
drew it (``components.data.protocols.noise_sigma``). The bootstrap groups records by seed and
person: the seeds' data are different people.

    PYTHONPATH=. .venv/bin/python bench/claim_report.py [--preset claim]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from components import comparisons as C
from components import figures
from components.config import load_params
from components.data.protocols import noise_sigma
from components.data.table import read_table
from components.diagnostics import agreement_hits, predictor_diagnostics
from components.rows import ADAPTIVE
from components.stats import oracle_index, paired_bootstrap
from pipelines.training_stage import read_curve

OUT = Path("reports/claim")
GOALS = [  # (goal, paired comparison of resplits.json): met when the interval is above 0
    ("1", "Adaptive - best fixed"), ("1", "Adaptive - Size-based"), ("2", "Adaptive - Bicubic + F"),
    ("4", "Ideal - Adaptive"), ("4", "HR probes - PRI's F, bicubic probes"),
    ("G", "Adaptive - PRI's F, bicubic probes")]  # a diagnostic: what G's recovery wins over bicubic


def seed_dirs(out: Path) -> list[Path]:
    """The preset's seeds' folders seed<k>/ (not exploratory ones such as seed0-64x32), by k."""
    return sorted((p for p in out.glob("seed*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))


def probe_arrays(seed_dir: Path, degrade) -> dict:
    """One seed's test probes, in image id order: oracle index [D, Q], r_p index [Q], person ids,
    noise sigma [Q], the fixed rows' first ranks [D, Q, N]."""
    table = read_table(seed_dir / "per_probe.parquet", C.PER_PROBE_SCHEMA)
    fixed = sorted(r for r in set(table["row"].to_pylist()) if r.startswith("Fixed x"))
    ranks, aps, pids = zip(*(C.arrays(table, r) for r in fixed))
    scales = [float(r.removeprefix("Fixed x")) for r in fixed]
    adaptive = table.filter(pc.and_(pc.equal(table["row"], ADAPTIVE), pc.equal(table["draw"], 0)))
    adaptive = adaptive.sort_by([("image_id", "ascending")])
    r_p = np.array([scales.index(s) for s in adaptive["scale"].to_pylist()])
    ids = adaptive["image_id"].to_pylist()
    rank, ap = np.stack(ranks, 2), np.stack(aps, 2)  # [D, Q, N]
    tie = (rank == rank[..., :1]).all(2) & (ap == ap[..., :1]).all(2)  # [D, Q]: every scale the same result
    return {"oracle": oracle_index(rank, ap), "r_p": r_p, "pids": pids[0], "tie": tie,
            "sigma": np.array([noise_sigma(degrade, i) for i in ids]), "rank": rank, "scales": scales}


def predictor_goal(per_seed: list[dict], resamples: int) -> dict:
    """Goal 3's agreement - chance, pooled over seeds (groups: seed and person) and per seed."""
    out = {"per_seed": []}
    hits_all, groups_all, onehot_all, oracle_all = [], [], [], []
    for k, s in enumerate(per_seed):
        probs = np.eye(len(s["scales"]))[s["r_p"]]  # r_p as one-hot rows: the diagnostics' input
        d = predictor_diagnostics(probs, np.zeros(len(s["r_p"])), s["oracle"], s["scales"])
        hits = agreement_hits(probs, s["oracle"]).astype(float)  # [D, Q]
        groups = np.tile([f"{k}/{p}" for p in s["pids"]], len(hits))
        diff = paired_bootstrap(100 * (hits.ravel() - d["chance_agreement"]), groups, n_resamples=resamples)[0]
        out["per_seed"].append({"agreement": d["agreement"], "chance": d["chance_agreement"], **_ci(diff)})
        hits_all.append(hits.ravel()), groups_all.append(groups), onehot_all.append(probs)
        oracle_all.append(s["oracle"].ravel())
    p_pred = np.concatenate(onehot_all).mean(0)
    p_oracle = np.bincount(np.concatenate(oracle_all), minlength=len(p_pred)) / sum(map(len, oracle_all))
    chance = float(p_pred @ p_oracle)
    hits = np.concatenate(hits_all)
    diff = paired_bootstrap(100 * (hits - chance), np.concatenate(groups_all), n_resamples=resamples)[0]
    out["pooled"] = {"agreement": float(hits.mean()), "chance": chance, **_ci(diff)}
    return out


def _ci(d) -> dict:
    return {"minus_chance": d.mean, "low": d.low, "high": d.high, "p": d.p_value}


def by_noise(per_seed: list[dict]) -> dict:
    """Counts of r_p and of the oracle's best scale per noise level, rank-1 per fixed scale per level."""
    levels = sorted({float(v) for s in per_seed for v in s["sigma"]})
    n = len(per_seed[0]["scales"])
    r_p, oracle, hits, probes = (np.zeros((len(levels), n), int), np.zeros((len(levels), n), int),
                                 np.zeros((len(levels), n)), np.zeros(len(levels)))
    ties = np.zeros(len(levels), int)
    for s in per_seed:
        for i, level in enumerate(levels):
            m = s["sigma"] == level
            r_p[i] += np.bincount(s["r_p"][m], minlength=n)
            oracle[i] += np.bincount(s["oracle"][:, m].ravel(), minlength=n)
            ties[i] += s["tie"][:, m].sum()
            valid = s["rank"][:, m, 0] >= 0
            hits[i] += ((s["rank"][:, m] == 0) & valid[..., None]).sum((0, 1))
            probes[i] += valid.sum()
    return {"levels": levels, "scales": per_seed[0]["scales"], "r_p": r_p.tolist(), "oracle": oracle.tolist(),
            "ties": ties.tolist(),
            "rank1": (100 * hits / probes[:, None]).tolist()}


def plateau(seed_dir: Path) -> dict:
    """Validation rank-1 per epoch of each model's phases (PRI, then each variant)."""
    models = {"PRI": seed_dir}
    models.update({v.name: v for v in sorted((seed_dir / "ablation").glob("*/"))})
    out = {}
    for name, d in models.items():
        phases = {p: read_curve(d / f"{p}_curve.csv") if (d / f"{p}_curve.csv").exists() else []
                  for p in ("pretrain", "joint")}
        out[name] = {p: [e.get("val_rank1") for e in c] for p, c in phases.items()}
        if name != "PRI" and any(phases.values()):
            figures.training_curves(phases, seed_dir / f"{name}_curves.png",
                                    title=f"{name}, {seed_dir.name}: training curves")
    return out


def timing(seed_dir: Path) -> dict:
    def load(name):
        p = seed_dir / name
        return json.loads(p.read_text()) if p.exists() else {}
    pre, joint, wall = load("pretrain.json"), load("train.json"), load("time.json")
    bank = load("label_bank.json")  # for seeds trained before train.json logged L_p_marginal
    return {"wall_min": wall.get("wall_seconds", float("nan")) / 60,
            "pretrain_samples_s": pre.get("samples_per_s"), "joint_samples_s": joint.get("samples_per_s"),
            "precision": joint.get("precision"), "L_p": joint.get("L_p"), "label_entropy": joint.get("label_entropy"),
            "L_p_uniform": joint.get("L_p_uniform"),
            "L_p_marginal": joint.get("L_p_marginal", bank.get("L_p_marginal"))}


def markdown(report: dict) -> str:
    seeds = report["seeds"]
    lines = [f"# The claim run: issue 24's goals over seeds {', '.join(map(str, seeds))}\n",
             "Written by `PYTHONPATH=. .venv/bin/python bench/claim_report.py` from reports/claim/seed<k>/ "
             "(data seed = degrade seed = split seed = k; preset claim).\n",
             "## Goals 1, 2, 4 (and G): paired rank-1 differences, all seeds' test identities pooled\n",
             "| goal | comparison | rank-1 diff (points) [95% CI] | p | met (interval above 0) |", "|---|---|---:|---:|---|"]
    for g in report["paired"]:
        lines.append(f"| {g['goal']} | {g['label']} | {g['mean']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}] | "
                     f"{g['p']:.3g} | {'yes' if g['low'] > 0 else 'no'} |")
    lines.append("\nG: a diagnostic, not a goal: what G's recovery (at P's scale) wins over up-sampling the probe "
                 "bicubically into the same F. Set beside goal 4's HR-probes gap, it says how much of what "
                 "resolution costs recovery wins back; a scale choice can only matter where recovery does.")
    p = report["predictor"]
    lines += ["\n## Goal 3: is P predicting the oracle's best scale?\n",
              "| seed | agreement (%) | chance (%) | agreement - chance (points) [95% CI] | last joint L_p | "
              "labels' marginal | label entropy | ln N |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, s, t in zip(seeds, p["per_seed"], report["timing"]):
        lines.append(f"| {k} | {100 * s['agreement']:.1f} | {100 * s['chance']:.1f} | {s['minus_chance']:+.1f} "
                     f"[{s['low']:+.1f}, {s['high']:+.1f}] | {_f(t['L_p'])} | {_f(t['L_p_marginal'])} | "
                     f"{_f(t['label_entropy'])} | "
                     f"{_f(t['L_p_uniform'])} |")
    q = p["pooled"]
    lines.append(f"| pooled | {100 * q['agreement']:.1f} | {100 * q['chance']:.1f} | {q['minus_chance']:+.1f} "
                 f"[{q['low']:+.1f}, {q['high']:+.1f}] | | | | |")
    lines += ["\nChance: sum_k p_pred(k) p_oracle(k), the agreement of a choice with P's frequencies made "
              "independently of the oracle. L_p is the last joint epoch's mean over its steps; the labels' "
              "marginal is the L_p of a P that predicts every image the labels' mean (it learned the frequencies, "
              "nothing of the image), the label entropy that of a P that reproduces every label, ln N that of "
              "a uniform P. P learned something of the image where its L_p is below the marginal.\n",
              "Per LR sensor-noise level (test probes, all seeds; figures rp_by_noise.png, oracle_by_noise.png):\n",
              "| noise sigma | probes | r_p counts | oracle's best-scale counts (probe-draws) | of them, every scale "
              "ties | rank-1 (%) per fixed scale |", "|---:|---:|---|---|---:|---|"]
    n = report["by_noise"]
    for level, rp, orc, tie, r1 in zip(n["levels"], n["r_p"], n["oracle"], n["ties"], n["rank1"]):
        lines.append(f"| {level:g} | {sum(rp)} | {rp} | {orc} | {tie} | {[round(x, 1) for x in r1]} |")
    lines += [f"\nScales (columns of the counts): {', '.join(f'x{s:g}' for s in n['scales'])}. Where every scale "
              "gives the same first rank and AP the oracle's pick is the lowest scale (its tie rule).\n",
              "## The plateau: validation rank-1 per epoch (held-out training identities)\n",
              "| seed | model | pretraining | joint |", "|---|---|---|---|"]
    for k, models in zip(seeds, report["plateau"]):
        for name, phases in models.items():
            lines.append(f"| {k} | {name} | {_curve(phases['pretrain'])} | {_curve(phases['joint'])} |")
    lines += ["\n## Goal 5: time per seed\n", "| seed | wall (min) | pretraining samples/s | joint samples/s | "
              "precision |", "|---|---:|---:|---:|---|"]
    for k, t in zip(seeds, report["timing"]):
        lines.append(f"| {k} | {t['wall_min']:.1f} | {_f(t['pretrain_samples_s'], 1)} | "
                     f"{_f(t['joint_samples_s'], 1)} | {t['precision']} |")
    return "\n".join(lines) + "\n"


def _f(x, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _curve(values: list) -> str:
    return ", ".join("" if v is None else f"{v:.1f}" for v in values)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="claim")
    ap.add_argument("--out", type=Path, default=OUT, help="the claim run's folder (default %(default)s)")
    args = ap.parse_args(argv)
    out = args.out
    dirs = seed_dirs(out)
    if not dirs:
        raise SystemExit(f"{out}: no seed<k>/ folder; run bench/claim_run.py first")
    params = load_params("params.yaml", preset=args.preset)
    per_seed = [probe_arrays(d, params.degrade.model_copy(update={"seed": int(d.name[4:])})) for d in dirs]
    pooled = json.loads((out / "resplits.json").read_text())["paired"] if (out / "resplits.json").exists() else []
    labels = {p["label"]: p["rank1"] for p in pooled}
    report = {
        "seeds": [int(d.name[4:]) for d in dirs],
        "paired": [{"goal": g, "label": lab, "mean": labels[lab]["mean"], "low": labels[lab]["low"],
                    "high": labels[lab]["high"], "p": labels[lab]["p_value"]} for g, lab in GOALS if lab in labels],
        "predictor": predictor_goal(per_seed, params.evaluate.bootstrap),
        "by_noise": by_noise(per_seed),
        "plateau": [plateau(d) for d in dirs],
        "timing": [timing(d) for d in dirs],
    }
    n = report["by_noise"]
    for key, what in (("r_p", "P's r_p"), ("oracle", "the oracle's best scale")):
        figures.predictor_confusion(np.array(n[key]), n["levels"], n["scales"], out / f"{key}_by_noise.png",
                                    title=f"{what} per LR sensor-noise level (test probes, seeds {report['seeds']})",
                                    row_name="LR sensor noise sigma", row_format="{:g}")
    (out / "goals.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "goals.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
