"""Per-probe results of the evaluation and what is computed from them: paired differences with
identity-bootstrap intervals, per-scale slices, the oracle's selection-bias baselines.

The per-probe table (``PER_PROBE_SCHEMA``, one record per table row x gallery draw x probe) is
the evaluate stage's raw result: every number of the ablation table can be recomputed from it.

- ``row``: the ablation table's row ("Fixed x2", "Adaptive (PRI)", "Bicubic + F", ...)
- ``draw``: the gallery draw (0..D-1); ``image_id``, ``person_id``: the probe
- ``true_scale``: its down-sampling factor; ``scale``: the scale it was recovered at in this row
  (null where the row has none: Bicubic + F, bicubic probes, HR probes, FFSR + RIFE)
- ``first_rank``: 0-based rank of its first true match (-1: none in this draw); ``ap``: its AP (0..1)

The schema metadata name the split and the models the records come from (:func:`provenance`),
so that records of another split or model are refused (:func:`check_per_probe`).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.rows import (ADAPTIVE, BICUBIC, BICUBIC_PROBES, HR_PROBES, IDEAL, NOISE_ORACLE, RIFE_BICUBIC, RIFE_PRI,
                            RIFE_PRI_BICUBIC, SIZE_BASED)
from components.stats import PairedDiff, bootstrap_means, group_sums, oracle_baselines, paired_bootstrap, record_diffs

PER_PROBE_SCHEMA = pa.schema([
    ("row", pa.string()), ("draw", pa.int32()), ("image_id", pa.string()), ("person_id", pa.int64()),
    ("true_scale", pa.float32()), ("scale", pa.float32()), ("first_rank", pa.int32()), ("ap", pa.float64()),
])


class PerProbeError(ValueError):
    """A per-probe table that does not hold what the caller needs; the message names it."""


# ---------------------------------------------------------------------- the table
def per_probe_table(rows: dict[str, dict], image_ids, person_ids, true_scales, provenance: dict) -> pa.Table:
    """The long table of ``rows`` (name -> {"first_rank" [D, Q], "ap" [D, Q], "scale" [D, Q] or None})
    for the probes ``image_ids`` / ``person_ids`` / ``true_scales`` [Q]; ``provenance`` goes into
    the schema metadata."""
    parts = []
    for name, r in rows.items():
        rank = np.asarray(r["first_rank"])
        D, Q = rank.shape
        scale = r.get("scale")
        parts.append(pa.table({
            "row": pa.array([name] * (D * Q), pa.string()),
            "draw": pa.array(np.repeat(np.arange(D), Q).astype(np.int32)),
            "image_id": pa.array(np.tile(np.asarray(image_ids, dtype=object), D), pa.string()),
            "person_id": pa.array(np.tile(np.asarray(person_ids, dtype=np.int64), D)),
            "true_scale": pa.array(np.tile(np.asarray(true_scales, dtype=np.float32), D)),
            "scale": pa.nulls(D * Q, pa.float32()) if scale is None else
            pa.array(np.asarray(scale, dtype=np.float32).ravel()),
            "first_rank": pa.array(rank.ravel().astype(np.int32)),
            "ap": pa.array(np.asarray(r["ap"], dtype=np.float64).ravel()),
        }, schema=PER_PROBE_SCHEMA))
    meta = {b"lrreid": json.dumps(provenance, sort_keys=True).encode()}
    return pa.concat_tables(parts).replace_schema_metadata(meta)


def provenance(table: pa.Table) -> dict:
    """The provenance a per-probe table was written with ({} if none)."""
    raw = (table.schema.metadata or {}).get(b"lrreid")
    return json.loads(raw) if raw else {}


def check_per_probe(table: pa.Table, source: str, rows: list[str], expect: dict | None = None) -> None:
    """Raise PerProbeError (naming ``source``) when a row of ``rows`` is missing, a row lacks probes
    or draws the others have, or the provenance differs from ``expect`` (e.g. another split)."""
    missing = [r for r in rows if r not in set(table["row"].to_pylist())]
    if missing:
        raise PerProbeError(f"{source}: no records of the row(s) {missing}; re-run the evaluate stage "
                            "(`dvc repro evaluate`), or train the missing variant")
    counts = {}
    for r in rows:
        part = table.filter(pc.equal(table["row"], r))
        counts[r] = (len(pc.unique(part["image_id"])), len(pc.unique(part["draw"])), part.num_rows)
    first = counts[rows[0]]
    for r, c in counts.items():
        if c != first or c[0] * c[1] != c[2]:
            raise PerProbeError(f"{source}: row {r!r} has {c[0]} probes x {c[1]} draws in {c[2]} records, row "
                                f"{rows[0]!r} {first[0]} x {first[1]} in {first[2]}: records are missing; "
                                "re-run the evaluate stage")
    if expect:
        have = provenance(table)
        wrong = {k: (have.get(k), v) for k, v in expect.items() if have.get(k) != v}
        if wrong:
            what = ", ".join(f"{k} {a!r} (expected {b!r})" for k, (a, b) in wrong.items())
            raise PerProbeError(f"{source}: written for another split or model: {what}; re-run the evaluate "
                                "stage on this one")


def arrays(table: pa.Table, row: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first_rank [D, Q], ap [D, Q], person_id [Q]) of one row, probes in image_id order
    (a table of one split: every draw holds the same probes)."""
    keys, rank, ap, pids = records(table, row)
    D = len({draw for draw, _ in keys})
    Q = len(keys) // D
    return rank.reshape(D, Q), ap.reshape(D, Q), pids[:Q]


def records(table: pa.Table, row: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """One row's records in (draw, image_id) order: (keys, first_rank [n], ap [n], person_id [n])."""
    part = table.filter(pc.equal(table["row"], row)).sort_by([("draw", "ascending"), ("image_id", "ascending")])
    keys = list(zip(part["draw"].to_pylist(), part["image_id"].to_pylist()))
    return (keys, part["first_rank"].to_numpy(), part["ap"].to_numpy(zero_copy_only=False),
            part["person_id"].to_numpy())


def rank1_map(table: pa.Table, row: str) -> dict[str, float]:
    """Rank-1 and mAP (%) of one row: the mean over draws of the per-draw values (as the table)."""
    rank, ap, _ = arrays(table, row)
    valid = rank >= 0
    r1 = [(rank[d][valid[d]] == 0).mean() * 100 for d in range(len(rank))]
    mAP = [ap[d][valid[d]].mean() * 100 for d in range(len(rank))]
    return {"rank1": float(np.mean(r1)), "mAP": float(np.mean(mAP))}


# ---------------------------------------------------------------------- comparisons
def claims(rows: list[str]) -> list[tuple[str, str | list[str], str]]:
    """The comparisons that carry the papers' claims, among ``rows``: (label, a, b); b may be a list
    (the best of them, chosen again in every bootstrap resample)."""
    fixed = [r for r in rows if r.startswith("Fixed x")]
    out = []
    if ADAPTIVE in rows:
        out += [(f"Adaptive - {f}", ADAPTIVE, f) for f in fixed]
        if fixed:
            out.append(("Adaptive - best fixed", ADAPTIVE, fixed))
        out += [(f"Adaptive - {b}", ADAPTIVE, b) for b in (SIZE_BASED, BICUBIC, BICUBIC_PROBES) if b in rows]
        if IDEAL in rows:
            out.append(("Ideal - Adaptive", IDEAL, ADAPTIVE))
    if IDEAL in rows and NOISE_ORACLE in rows:
        out.append(("Ideal - Noise oracle", IDEAL, NOISE_ORACLE))
    if HR_PROBES in rows and BICUBIC_PROBES in rows:  # what full resolution is worth to PRI's F
        out.append((f"{HR_PROBES} - {BICUBIC_PROBES}", HR_PROBES, BICUBIC_PROBES))
    known = set(fixed) | {ADAPTIVE, SIZE_BASED, IDEAL, NOISE_ORACLE, BICUBIC, BICUBIC_PROBES, HR_PROBES, RIFE_PRI_BICUBIC}
    if BICUBIC in rows:  # the other models against the baseline model
        out += [(f"{v} - {BICUBIC}", v, BICUBIC) for v in rows if v not in known]
    for alone in (RIFE_PRI_BICUBIC, RIFE_BICUBIC):  # what PRI's recovery adds to its own RIFE, to FFSR + RIFE's
        if RIFE_PRI in rows and alone in rows:
            out.append((f"{RIFE_PRI} - {alone}", RIFE_PRI, alone))
    return out


def compare(table: pa.Table, pairs, *, n_resamples: int = 10000, seed: int = 0) -> list[dict]:
    """Each pair's mean difference of rank-1 and of mAP (points) with a 95% identity-bootstrap
    interval and p-value; one dict per pair: label, a, b, rank1: PairedDiff, mAP: PairedDiff."""
    rows: dict[str, tuple] = {}  # each row's records, read once

    def rec(row: str) -> tuple:
        if row not in rows:
            rows[row] = records(table, row)
        return rows[row]

    out = []
    for label, a, b in pairs:
        keys, rank_a, ap_a, pids = rec(a)
        bs = b if isinstance(b, list) else [b]
        diffs = []
        for x in bs:
            keys_b, rank_b, ap_b, _ = rec(x)
            if keys_b != keys:
                raise PerProbeError(f"rows {a!r} and {x!r} do not hold the same probes and draws: they cannot be "
                                    "compared record by record; re-run the evaluate stage")
            diffs.append(record_diffs(rank_a[None], ap_a[None], rank_b[None], ap_b[None], pids))
        groups = diffs[0][1]
        if len(bs) == 1:
            r1, mAP = paired_bootstrap(diffs[0][0], groups, n_resamples=n_resamples, seed=seed)
        else:
            r1, mAP = (_minus_best([d[0][m] for d in diffs], groups, n_resamples, seed) for m in (0, 1))
        out.append({"label": label, "a": a, "b": b, "rank1": r1, "mAP": mAP})
    return out


def _minus_best(diffs: list[np.ndarray], groups, n_resamples: int, seed: int) -> PairedDiff:
    """a minus the best of several rows b_k: min_k mean(a - b_k), the best re-chosen in every resample
    (so the interval accounts for picking the best on the same records). A minimum of noisy means is
    biased low, in the data and again in every resample: the basic bootstrap interval
    [2 d - q_97.5, 2 d - q_2.5] corrects that, where the percentile interval would double it; the
    p-value (centred, as paired_bootstrap's) agrees with it."""
    stacked = np.stack(diffs)  # [K, n]
    _, sums, counts = group_sums(stacked, groups)
    boot = bootstrap_means(sums, counts, n_resamples, seed).min(1)  # [R]
    mean = float(stacked.mean(1).min())
    q_low, q_high = np.quantile(boot, [0.025, 0.975])
    low, high = 2 * mean - q_high, 2 * mean - q_low
    p = (1 + int((np.abs(boot - mean) >= abs(mean)).sum())) / (n_resamples + 1)
    return PairedDiff(mean=mean, low=float(low), high=float(high), p_value=float(p),
                      n_groups=len(counts), n_rows=stacked.shape[1])


# ---------------------------------------------------------------------- slices and the oracle
def per_scale(table: pa.Table) -> dict[str, dict[str, dict[str, float]]]:
    """Rank-1 and mAP (%) of every row for the probes of each true down-sampling factor:
    {row: {"x2": {"rank1", "mAP", "probes"}, ...}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in table["row"].unique().to_pylist():
        part = table.filter(pc.and_(pc.equal(table["row"], row), pc.greater_equal(table["first_rank"], 0)))
        true = part["true_scale"].to_numpy()
        rank, ap = part["first_rank"].to_numpy(), part["ap"].to_numpy(zero_copy_only=False)
        probes = part.filter(pc.equal(part["draw"], 0))["true_scale"].to_numpy()
        out[row] = {f"x{s:g}": {"rank1": float((rank[true == s] == 0).mean() * 100),
                                "mAP": float(ap[true == s].mean() * 100), "probes": int((probes == s).sum())}
                    for s in np.unique(true)}
    return out


def oracle_headroom(table: pa.Table) -> dict[str, dict[str, float]]:
    """components.stats.oracle_baselines on the Fixed x_r rows (the oracle picks among them), and
    the Noise oracle row where the table has it."""
    fixed = sorted((r for r in table["row"].unique().to_pylist() if r.startswith("Fixed x")),
                   key=lambda r: float(r.removeprefix("Fixed x")))
    ranks, aps = zip(*(arrays(table, r)[:2] for r in fixed))
    out = oracle_baselines(np.stack(ranks, axis=2), np.stack(aps, axis=2))
    if NOISE_ORACLE in set(table["row"].to_pylist()):
        out["noise_oracle"] = rank1_map(table, NOISE_ORACLE)
    return out


# ---------------------------------------------------------------------- markdown
def paired_markdown(results: list[dict], resamples: int) -> str:
    """The second table of reports/ablation.md: each claim's paired differences with intervals."""
    lines = ["| comparison | rank-1 diff (points) [95% CI] | p | mAP diff (points) [95% CI] | p |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        cells = [f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}] | {d.p_value:.3g}" for d in (r["rank1"], r["mAP"])]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    n = results[0]["rank1"] if results else None
    if n is not None:
        lines.append(f"\nPaired over the same {n.n_rows} probe-draws; 95% intervals and two-sided p-values from "
                     f"{resamples} bootstrap resamples of the {n.n_groups} test identities. \"best fixed\": the "
                     "fixed scale with the best mean, chosen again in every resample.")
    return "\n".join(lines) + "\n"


def per_scale_markdown(slices: dict) -> str:
    """Rank-1 / mAP of every row per true down-sampling factor."""
    factors = sorted({f for row in slices.values() for f in row}, key=lambda f: float(f[1:]))
    head = " | ".join(f"{f} rank-1 / mAP" for f in factors)
    lines = [f"| method | {head} |", "|---|" + "---:|" * len(factors)]
    for name, row in slices.items():
        cells = " | ".join(f"{row[f]['rank1']:.1f} / {row[f]['mAP']:.1f}" if f in row else "-" for f in factors)
        lines.append(f"| {name} | {cells} |")
    probes = next(iter(slices.values()))
    lines.append("\nProbes per factor: " + ", ".join(f"{f}: {probes[f]['probes']}" for f in factors if f in probes)
                 + " (means over the gallery draws).")
    return "\n".join(lines) + "\n"
