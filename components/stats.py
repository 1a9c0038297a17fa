"""Paired comparisons of evaluation rows: identity (cluster) bootstrap and oracle baselines.

The evaluate stage scores every row of the ablation table (fixed x1..xN,
size-based, adaptive, ideal, bicubic + F, model variants) on the same records:
one record per probe (an LR query image) and gallery draw, holding the rank of
the probe's first true match (0-based, -1 when the draw holds no valid match for
it) and its AP. Two rows are compared record by record (paired): the per-record
difference a - b of a metric (rank-1 hit x 100, AP x 100), whose mean over the
records is the difference of the two rows' rank-1 / mAP (pooled over the
draws: the table's mean of per-draw values differs from it only when the
number of valid probes varies between draws). :func:`record_diffs` builds
these differences from two rows' [D, Q] arrays.

Records are not independent: the probes and draws of one person share its
appearance and its gallery images, so their results go up and down together.
Resampling records as if independent gives intervals several times too narrow.
:func:`paired_bootstrap` resamples test identities instead (a cluster
bootstrap): a resample draws the I identities with replacement, each with all
its records, and its statistic is the mean over the records drawn. With
W [R, I] the multinomial counts of R resamples, S [K, I] the per-identity sums
of the K differences (:func:`group_sums`) and n [I] the identities' record
counts, the R x K statistics are (W @ S.T) / (W @ n): two matrix products, the
same resamples for every comparison. The interval is the bootstrap's percentile
interval; the two-sided p-value of "no difference" is
(1 + #{|d* - d| >= |d|}) / (R + 1), the bootstrap distribution centred on the
observed mean d standing in for the distribution under no difference.

The "Ideal" row picks, per draw and probe, the scale whose recovery ranks a
true match best, after seeing that draw's result: it gains from noise even
where no scale is better than another. :func:`oracle_baselines` measures how
much, from per-scale results first_rank / ap [D draws, Q probes, N scales]:

- oracle: the in-sample choice (lowest first rank; ties: higher AP, then lower
  scale index), :func:`oracle_index`;
- held-out oracle: each draw's choice made from the other draws (lowest mean
  first rank over them, ties as above), :func:`held_out_index`: the lead that
  survives when the choice cannot see the draw's noise;
- mean of scales: rank-1 / mAP averaged over the N scales.

:func:`take` gives any choice's per-record ranks / APs [D, Q], e.g. the held-out
oracle's, for :func:`record_diffs` and :func:`paired_bootstrap`. Records with
rank -1 (no valid match) are left out of every number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Weights (resamples x identities) of one block of bootstrap resamples: 32 MB in float64.
_BLOCK_ELEMENTS = 2**22


@dataclass(frozen=True)
class PairedDiff:
    """One comparison a - b: the observed mean difference over the records, its
    bootstrap percentile interval [low, high] and two-sided p-value."""

    mean: float
    low: float
    high: float
    p_value: float
    n_groups: int  # identities
    n_rows: int  # records


# ---------------------------------------------------------------------- bootstrap
def paired_bootstrap(diffs, groups, *, n_resamples: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> list[PairedDiff]:
    """Identity (cluster) bootstrap of K paired comparisons at once.

    ``diffs`` [K, n] (or [n] for one comparison): per record, the difference a - b
    of a metric; ``groups`` [n]: the test identity (person id) of each record.
    Every comparison uses the same resamples of identities. Returns one
    :class:`PairedDiff` per comparison. Identical rows (all differences 0) give
    exactly mean 0, interval [0, 0] and p-value 1.

    Raises ValueError on a shape mismatch, a NaN or infinite difference, fewer
    than 2 identities, ``n_resamples < 1`` or ``confidence`` outside (0, 1).
    """
    diffs, groups = _check_diffs(diffs, groups)
    _check_options(n_resamples, confidence)
    _, sums, counts = group_sums(diffs, groups)
    if len(counts) < 2:
        raise ValueError(f"the records belong to {len(counts)} identity: the identity bootstrap needs "
                         "at least 2 (pass the person id of each record as groups)")
    boot = bootstrap_means(sums, counts, n_resamples, seed)  # [R, K]
    mean = diffs.mean(1)
    low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    extreme = (np.abs(boot - mean) >= np.abs(mean)).sum(0)
    p_value = (1 + extreme) / (n_resamples + 1)
    return [PairedDiff(mean=float(mean[k]), low=float(low[k]), high=float(high[k]), p_value=float(p_value[k]),
                       n_groups=len(counts), n_rows=diffs.shape[1]) for k in range(len(mean))]


def group_sums(values, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group sums of ``values`` [K, n] (or [n]) over records with groups [n].

    Returns (labels [I]: the distinct groups, sorted; sums [K, I] (or [I]);
    counts [I]: records per group). One ``np.bincount`` over all K rows.
    """
    values = np.asarray(values, dtype=np.float64)
    labels, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.reshape(-1)
    rows = np.atleast_2d(values)
    I = len(labels)
    index = (np.arange(len(rows))[:, None] * I + codes).ravel()
    sums = np.bincount(index, weights=rows.ravel(), minlength=len(rows) * I).reshape(len(rows), I)
    counts = np.bincount(codes, minlength=I)
    return labels, (sums if values.ndim == 2 else sums[0]), counts


def bootstrap_means(sums: np.ndarray, counts: np.ndarray, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Means over the records of ``n_resamples`` resamples of the groups: [R, K].

    ``sums`` [K, I] per-group sums, ``counts`` [I] records per group. Resample r
    draws the I groups with replacement (multinomial counts W[r]) and its mean is
    (W[r] @ sums.T) / (W[r] @ counts). Weights are drawn block by block
    (``_BLOCK_ELEMENTS``), so memory does not grow with R.
    """
    sums = np.atleast_2d(np.asarray(sums, dtype=np.float64))
    counts = np.asarray(counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    I = len(counts)
    p = np.full(I, 1.0 / I)
    block = max(1, _BLOCK_ELEMENTS // I)
    out = np.empty((n_resamples, len(sums)))
    for start in range(0, n_resamples, block):
        w = rng.multinomial(I, p, size=min(block, n_resamples - start)).astype(np.float64)
        out[start:start + len(w)] = (w @ sums.T) / (w @ counts)[:, None]
    return out


def record_diffs(rank_a, ap_a, rank_b, ap_b, q_pids) -> tuple[np.ndarray, np.ndarray]:
    """Per-record differences of two rows, ready for :func:`paired_bootstrap`.

    ``rank_*`` [D, Q] first-match ranks (0-based, -1: no valid match) and ``ap_*``
    [D, Q] APs (0..1) of rows a and b on the same draws and probes; ``q_pids`` [Q]
    the probes' person ids. Returns (diffs [2, n]: rank-1 hit x 100 and AP x 100 of
    a minus b over the n valid records, groups [n]: their person ids). Raises
    ValueError on a shape mismatch or a record valid in one row only.
    """
    rank_a, ap_a = _check_records(rank_a, ap_a, "rank_a", "ap_a")
    rank_b, ap_b = _check_records(rank_b, ap_b, "rank_b", "ap_b")
    q_pids = np.asarray(q_pids)
    if rank_a.ndim != 2 or rank_b.shape != rank_a.shape or q_pids.shape != rank_a.shape[1:]:
        raise ValueError(f"rank_a {rank_a.shape}, rank_b {rank_b.shape} and q_pids {q_pids.shape}: expected "
                         "[D, Q], [D, Q] and [Q] (draws x probes, one person id per probe)")
    valid = rank_a >= 0
    if (valid != (rank_b >= 0)).any():
        d, q = np.argwhere(valid != (rank_b >= 0))[0]
        raise ValueError(f"draw {d}, probe {q} has a valid match in one row and not the other: "
                         "the rows must be scored on the same probes and gallery draws")
    hit = 100.0 * ((rank_a == 0).astype(np.float64) - (rank_b == 0))
    diffs = np.stack([hit[valid], 100.0 * (ap_a - ap_b)[valid]])
    return diffs, np.broadcast_to(q_pids, valid.shape)[valid]


# ---------------------------------------------------------------------- oracles
def oracle_baselines(first_rank, ap) -> dict[str, dict[str, float]]:
    """The "Ideal" row's selection bias, as rank-1 and mAP (%) over the valid probe-draws.

    ``first_rank`` [D, Q, N] (int, 0-based, -1: no valid match in that draw, at
    every scale) and ``ap`` [D, Q, N] (0..1) per draw, probe and scale. Returns
    ``{"oracle", "held_out_oracle", "mean_of_scales"}``, each
    ``{"rank1": float, "mAP": float}`` (see the module docstring). A noise baseline
    needs the features (a probe's scales share one draw's gallery, so their results
    are not exchangeable records): ``components.evaluation.noise_oracle``.
    """
    rank, ap = _check_scales(first_rank, ap)
    if rank.shape[0] < 2:
        raise ValueError(f"first_rank has {rank.shape[0]} gallery draw: the held-out oracle needs at least 2")
    return {"oracle": rank1_map(*take(rank, ap, _best(rank, ap))),
            "held_out_oracle": rank1_map(*take(rank, ap, _held_out(rank, ap))),
            "mean_of_scales": rank1_map(rank, ap)}


def oracle_index(first_rank, ap) -> np.ndarray:
    """The in-sample oracle's scale index [D, Q]: per draw and probe the lowest first
    rank; ties: the higher AP, then the lower index. Inputs as :func:`oracle_baselines`."""
    return _best(*_check_scales(first_rank, ap))


def held_out_index(first_rank, ap) -> np.ndarray:
    """The held-out oracle's scale index [D, Q]: for draw d, the lowest mean first rank
    over the probe's valid draws other than d (ties: the higher mean AP, then the lower
    index). A probe valid in no other draw gets index 0 (every scale ties)."""
    rank, ap = _check_scales(first_rank, ap)
    if rank.shape[0] < 2:
        raise ValueError(f"first_rank has {rank.shape[0]} gallery draw: the held-out oracle needs at least 2")
    return _held_out(rank, ap)


def take(first_rank, ap, index) -> tuple[np.ndarray, np.ndarray]:
    """(first rank [D, Q], AP [D, Q]) of ``first_rank`` / ``ap`` [D, Q, N] at the scale ``index`` [D, Q]."""
    index = np.asarray(index)[..., None]
    return (np.take_along_axis(np.asarray(first_rank), index, -1)[..., 0],
            np.take_along_axis(np.asarray(ap), index, -1)[..., 0])


def rank1_map(first_rank, ap) -> dict[str, float]:
    """Rank-1 (% of records with first rank 0) and mAP (%) over the records with a
    valid match (rank >= 0), arrays of any (equal) shape."""
    rank, ap = _check_records(first_rank, ap, "first_rank", "ap")
    valid = rank >= 0
    return {"rank1": float(100 * np.mean(rank[valid] == 0)), "mAP": float(100 * np.mean(ap[valid]))}


def _best(rank: np.ndarray, ap: np.ndarray) -> np.ndarray:
    """Index along the last axis of the lowest rank; ties: the higher AP, then the lower index."""
    best = rank == rank.min(-1, keepdims=True)
    ap = np.where(best, ap, -np.inf)
    best &= ap == ap.max(-1, keepdims=True)
    return best.argmax(-1)  # the first True


def _held_out(rank: np.ndarray, ap: np.ndarray) -> np.ndarray:
    """:func:`held_out_index` on checked inputs. Sums over the other draws replace their
    means: a probe's scales share the number of valid other draws."""
    valid = rank >= 0
    rank = np.where(valid, rank, 0)
    ap = np.where(valid, ap, 0.0)
    return _best(rank.sum(0) - rank, ap.sum(0) - ap)


# ---------------------------------------------------------------------- inputs
def _check_diffs(diffs, groups) -> tuple[np.ndarray, np.ndarray]:
    diffs = np.asarray(diffs, dtype=np.float64)
    groups = np.asarray(groups)
    if diffs.ndim == 1:
        diffs = diffs[None]
    if diffs.ndim != 2 or diffs.shape[0] == 0 or diffs.shape[1] == 0:
        raise ValueError(f"diffs has shape {diffs.shape}: expected [K, n] (K >= 1 comparisons x n >= 1 records)")
    if groups.shape != (diffs.shape[1],):
        raise ValueError(f"groups has shape {groups.shape}: expected ({diffs.shape[1]},), "
                         "one identity per record (column of diffs)")
    if not np.isfinite(diffs).all():
        k, i = np.argwhere(~np.isfinite(diffs))[0]
        raise ValueError(f"diffs has a NaN or infinite value (comparison {k}, record {i}): "
                         "leave out the records without a valid match before comparing")
    return diffs, groups


def _check_options(n_resamples, confidence) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples = {n_resamples!r}: expected an integer >= 1 (e.g. 10000)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence!r}: expected a level in (0, 1), e.g. 0.95")


def _check_records(first_rank, ap, rank_name: str, ap_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Ranks as int64 (>= -1) and APs as float64 in [0, 1] where rank >= 0 (0 elsewhere)."""
    rank, ap = np.asarray(first_rank), np.asarray(ap, dtype=np.float64)
    if rank.shape != ap.shape:
        raise ValueError(f"{rank_name} has shape {rank.shape} and {ap_name} {ap.shape}: expected the same")
    if not np.issubdtype(rank.dtype, np.integer):
        if not (np.issubdtype(rank.dtype, np.floating) and np.isfinite(rank).all() and (rank == np.round(rank)).all()):
            raise ValueError(f"{rank_name} has non-integer values: expected 0-based ranks, -1 for no match")
    rank = rank.astype(np.int64)
    if (rank < -1).any():
        raise ValueError(f"{rank_name} has values below -1: expected 0-based ranks, -1 for no match")
    valid = rank >= 0
    if not valid.any():
        raise ValueError(f"{rank_name} has no record with a valid match (every rank is -1)")
    if not ((ap[valid] >= 0) & (ap[valid] <= 1)).all():  # NaN fails too
        raise ValueError(f"{ap_name} has values outside [0, 1] (or NaN) where {rank_name} >= 0")
    return rank, np.where(valid, ap, 0.0)


def _check_scales(first_rank, ap) -> tuple[np.ndarray, np.ndarray]:
    """_check_records on [D, Q, N] arrays whose -1 (no match) covers all scales of a record."""
    rank, ap = _check_records(first_rank, ap, "first_rank", "ap")
    if rank.ndim != 3:
        raise ValueError(f"first_rank has shape {rank.shape}: expected [D, Q, N] (draws x probes x scales)")
    valid = rank >= 0
    mixed = valid.any(-1) & ~valid.all(-1)
    if mixed.any():
        d, q = np.argwhere(mixed)[0]
        raise ValueError(f"draw {d}, probe {q} has rank -1 at some scales only: whether a probe has a valid "
                         "match depends on the gallery draw, not on the scale")
    return rank, ap
