"""components.stats: the identity bootstrap's coverage and p-values, and the oracle baselines,
on data constructed with a known truth (no thresholds taken from observed results)."""

import math

import numpy as np
import pytest

from components import stats
from components.stats import (group_sums, held_out_index, oracle_baselines, oracle_index, paired_bootstrap,
                              rank1_map, record_diffs, take)

# The simulated evaluation of the coverage tests: identities x probes x draws records, with
# identity- and probe-level random effects (records of one identity are correlated).
IDS, PROBES, DRAWS = 50, 4, 10
SD_ID, SD_PROBE, SD_RECORD = 1.0, 0.5, 1.0
DATASETS = 200

# Oracle checks: standard errors allowed. A test makes several checks; at 4 a chance failure is
# below 1e-4 per check, while the bugs they catch move a number by tens of standard errors.
SE_TOL = 4


def clustered(rng, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-record differences with true mean ``delta`` and their identities."""
    u = rng.normal(0, SD_ID, (IDS, 1, 1))
    v = rng.normal(0, SD_PROBE, (IDS, PROBES, 1))
    e = rng.normal(0, SD_RECORD, (IDS, PROBES, DRAWS))
    return (delta + u + v + e).ravel(), np.repeat(np.arange(IDS), PROBES * DRAWS)


def naive_interval(rng, diffs, n_resamples: int, confidence: float = 0.95) -> tuple[float, float]:
    """The record-level bootstrap: records resampled as if independent (what not to do)."""
    means = diffs[rng.integers(0, len(diffs), (n_resamples, len(diffs)))].mean(1)
    return tuple(np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2]))


def binomial_tolerance(p: float, n: int) -> float:
    return 3 * math.sqrt(p * (1 - p) / n)


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


# ---------------------------------------------------------------------- bootstrap
def test_identical_rows_give_exact_zero():
    groups = np.repeat(np.arange(7), 5)
    for result in paired_bootstrap(np.zeros((3, 35)), groups, n_resamples=500):
        assert (result.mean, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert (result.n_groups, result.n_rows) == (7, 35)


def test_mean_is_over_records_and_groups_any_labels():
    # identity "a" has 1 record, "b" 9: the mean is over records, not over identity means
    diffs = np.array([10.0] + [0.0] * 9)
    (result,) = paired_bootstrap(diffs, np.array(["a"] + ["b"] * 9), n_resamples=200)
    assert result.mean == pytest.approx(1.0)
    assert result.low <= result.mean <= result.high


def test_group_sums_against_a_loop():
    rng = np.random.default_rng(0)
    values, groups = rng.normal(size=(3, 200)), rng.choice([7, 3, 11, 42], 200)
    labels, sums, counts = group_sums(values, groups)
    assert labels.tolist() == [3, 7, 11, 42]
    for i, g in enumerate(labels):
        assert counts[i] == (groups == g).sum()
        np.testing.assert_allclose(sums[:, i], values[:, groups == g].sum(1))
    np.testing.assert_allclose(group_sums(values[1], groups)[1], sums[1])  # 1-D values: 1-D sums


def test_comparisons_share_the_resamples():
    rng = np.random.default_rng(1)
    diffs, groups = clustered(rng, 0.3)
    both = paired_bootstrap(np.stack([diffs, -2 * diffs]), groups, n_resamples=300, seed=5)
    alone = paired_bootstrap(-2 * diffs, groups, n_resamples=300, seed=5)[0]
    assert both[1].low == pytest.approx(alone.low) and both[1].high == pytest.approx(alone.high)
    assert both[1].p_value == alone.p_value == both[0].p_value  # the same resamples, mirrored and scaled
    assert both[1].low == pytest.approx(-2 * both[0].high)
    assert paired_bootstrap(-2 * diffs, groups, n_resamples=300, seed=5)[0] == alone  # reproducible


def test_identity_bootstrap_covers_and_record_bootstrap_does_not():
    """95% intervals over DATASETS independent datasets with true difference 0.7: the identity
    bootstrap covers it at a rate compatible with 0.95, resampling records under-covers at the
    rate its too-small spread predicts."""
    rng, delta = np.random.default_rng(2), 0.7
    covered = naive_covered = 0
    for i in range(DATASETS):
        diffs, groups = clustered(rng, delta)
        (result,) = paired_bootstrap(diffs, groups, n_resamples=1000, seed=i)
        covered += result.low <= delta <= result.high
        low, high = naive_interval(rng, diffs, n_resamples=200)
        naive_covered += low <= delta <= high
    assert abs(covered / DATASETS - 0.95) <= binomial_tolerance(0.95, DATASETS)

    # The record bootstrap's spread is the records' total sd / sqrt(n); the mean's true sd is
    # that of the identity, probe and record effects averaged over their own counts.
    n = IDS * PROBES * DRAWS
    naive_sd = math.sqrt((SD_ID**2 + SD_PROBE**2 + SD_RECORD**2) / n)
    true_sd = math.sqrt(SD_ID**2 / IDS + SD_PROBE**2 / (IDS * PROBES) + SD_RECORD**2 / n)
    expected = 2 * normal_cdf(1.96 * naive_sd / true_sd) - 1  # ~0.34
    assert naive_covered / DATASETS < 0.95 - binomial_tolerance(0.95, DATASETS)
    assert abs(naive_covered / DATASETS - expected) <= binomial_tolerance(expected, DATASETS)


def test_p_value_under_the_null_and_for_a_real_effect():
    rng = np.random.default_rng(3)
    p = np.array([paired_bootstrap(*clustered(rng, 0.0), n_resamples=1000, seed=i)[0].p_value
                  for i in range(DATASETS)])
    assert abs((p < 0.05).mean() - 0.05) <= binomial_tolerance(0.05, DATASETS)
    assert abs(p.mean() - 0.5) <= 3 * math.sqrt(1 / 12 / DATASETS)  # uniform on (0, 1)

    # a difference of 1.0 is ~7 standard deviations of the mean (sd ~0.15, as above)
    (result,) = paired_bootstrap(*clustered(rng, 1.0), n_resamples=1000)
    assert result.p_value < 0.01 and result.low > 0


def test_record_diffs():
    rank_a = np.array([[0, 3, -1], [2, 0, 0]])
    ap_a = np.array([[1.0, 0.25, np.nan], [1 / 3, 1.0, 1.0]])
    rank_b = np.array([[1, 0, -1], [2, 0, 4]])
    ap_b = np.array([[0.5, 1.0, 0.0], [1 / 3, 1.0, 0.2]])
    diffs, groups = record_diffs(rank_a, ap_a, rank_b, ap_b, q_pids=np.array([5, 6, 5]))
    np.testing.assert_allclose(diffs, [[100, -100, 0, 0, 100], [50, -75, 0, 0, 80]])
    assert groups.tolist() == [5, 6, 5, 6, 5]
    with pytest.raises(ValueError, match="valid match in one row"):
        record_diffs(rank_a, ap_a, np.where(rank_b < 0, 0, rank_b), ap_b, q_pids=[5, 6, 5])


# ---------------------------------------------------------------------- oracles
def noisy_scales(rng, draws=10, probes=2000, scales=4, invalid=0.1):
    """Exchangeable scales: every rank i.i.d. geometric with the probe's success rate s_q
    (AP = 1 / (rank + 1): one gallery image per identity); ``invalid`` of the records -1."""
    s = rng.uniform(0.2, 0.8, probes)
    rank = rng.geometric(s[None, :, None], size=(draws, probes, scales)) - 1
    rank[rng.random((draws, probes)) < invalid] = -1
    return rank, np.where(rank >= 0, 1.0 / np.maximum(rank + 1, 1), np.nan), s


def test_oracle_on_exchangeable_scales():
    rng = np.random.default_rng(4)
    rank, ap, s = noisy_scales(rng)
    D, Q, N = rank.shape
    valid = rank[..., 0] >= 0
    n = int(valid.sum())
    se = 100 * math.sqrt(0.25 / n)  # bound on a mean of n independent values in [0, 100]
    # The held-out choices of one probe's draws see each other's data: its records are
    # correlated, so the bound for the held-out oracle takes each probe's mean as one value.
    se_probe = 100 * math.sqrt(0.25 / Q)
    out = oracle_baselines(rank, ap)
    s_rec = np.broadcast_to(s, valid.shape)[valid]  # each valid record's success rate

    # Expected values given the s_q: a scale (fixed, or chosen without seeing the draw) hits
    # with probability s_q, the oracle with 1 - (1 - s_q)^N.
    expected_mean = 100 * s_rec.mean()
    expected_oracle = 100 * (1 - (1 - s_rec) ** N).mean()
    assert abs(out["mean_of_scales"]["rank1"] - expected_mean) <= SE_TOL * se
    assert abs(out["held_out_oracle"]["rank1"] - expected_mean) <= SE_TOL * se_probe
    assert abs(out["oracle"]["rank1"] - expected_oracle) <= SE_TOL * se
    assert out["oracle"]["rank1"] > out["mean_of_scales"]["rank1"] + 10 * se  # expected lead ~39 points
    assert out["oracle"]["mAP"] > out["mean_of_scales"]["mAP"] + 10 * se
    assert abs(out["held_out_oracle"]["mAP"] - out["mean_of_scales"]["mAP"]) <= SE_TOL * (se + se_probe)


def test_held_out_oracle_finds_a_systematically_best_scale():
    rng = np.random.default_rng(5)
    D, Q, N, s_best, s_other = 10, 2000, 4, 0.9, 0.01
    best = rng.integers(0, N, Q)
    s = np.where(np.arange(N) == best[:, None], s_best, s_other)  # [Q, N]
    rank = rng.geometric(s, size=(D, Q, N)) - 1
    rank[rng.random((D, Q)) < 0.1] = -1
    ap = np.where(rank >= 0, 1.0 / np.maximum(rank + 1, 1), 0.0)
    valid = rank[..., 0] >= 0
    n = int(valid.sum())
    se, se_probe = 100 * math.sqrt(0.25 / n), 100 * math.sqrt(0.25 / Q)  # as in the test above
    out = oracle_baselines(rank, ap)

    assert (held_out_index(rank, ap) == best)[valid].mean() >= 0.99
    # Per record the oracle's rank is the lowest, so it hits whenever the held-out choice does;
    # it hits alone when the best scale misses and another scale hits by chance.
    gap = (1 - s_best) * (1 - (1 - s_other) ** (N - 1))
    lead = out["oracle"]["rank1"] - out["held_out_oracle"]["rank1"]
    assert 0 <= lead <= 100 * (gap + SE_TOL * math.sqrt(gap / n))
    assert abs(out["held_out_oracle"]["rank1"] - 100 * s_best) <= SE_TOL * se_probe
    expected_mean = 100 * (s_best + (N - 1) * s_other) / N
    assert abs(out["mean_of_scales"]["rank1"] - expected_mean) <= SE_TOL * se


def reference_choice(rank, ap, held_out: bool) -> np.ndarray:
    """The oracle's choice per (draw, probe), one record at a time (-1 where invalid)."""
    D, Q, N = rank.shape
    out = np.full((D, Q), -1)
    for d in range(D):
        for q in range(Q):
            if rank[d, q, 0] < 0:
                continue
            seen = [e for e in range(D) if e != d and rank[e, q, 0] >= 0] if held_out else [d]
            if not seen:
                out[d, q] = 0
                continue
            key = [(sum(rank[e, q, k] for e in seen), -sum(ap[e, q, k] for e in seen), k) for k in range(N)]
            out[d, q] = min(key)[2]
    return out


def test_tie_rules_and_excluded_probes_against_a_loop():
    rng = np.random.default_rng(6)
    D, Q, N = 4, 60, 3
    rank = rng.integers(0, 3, (D, Q, N))  # many ties
    ap = rng.integers(0, 9, (D, Q, N)) / 8  # exact sums: ties in AP too
    rank[rng.random((D, Q)) < 0.15] = -1
    rank[:, 0] = -1  # a probe with no match in any draw
    rank[1:, 1] = -1  # a probe valid in one draw only: nothing held out, index 0
    ap[rank < 0] = np.nan
    valid = rank[..., 0] >= 0
    for held_out, choose in [(False, oracle_index), (True, held_out_index)]:
        expected = reference_choice(rank, np.nan_to_num(ap), held_out)
        np.testing.assert_array_equal(choose(rank, ap)[valid], expected[valid])

    out = oracle_baselines(rank, ap)
    chosen = take(rank, ap, reference_choice(rank, np.nan_to_num(ap), held_out=False).clip(0))
    assert out["oracle"]["rank1"] == pytest.approx(100 * (chosen[0][valid] == 0).mean())
    assert out["oracle"]["mAP"] == pytest.approx(100 * chosen[1][valid].mean())
    assert out["mean_of_scales"] == pytest.approx({"rank1": 100 * (rank[valid] == 0).mean(),
                                                   "mAP": 100 * ap[valid].mean()})
    # what invalid records hold, and a probe without any match, change nothing
    garbage = np.where(rank < 0, 5.0, ap)
    assert oracle_baselines(rank, garbage) == out
    assert oracle_baselines(rank[:, 1:], ap[:, 1:]) == out


def test_rank1_map_excludes_invalid_records():
    assert rank1_map([0, 2, -1, 0], [1.0, 1 / 3, np.nan, 0.5]) == pytest.approx(
        {"rank1": 200 / 3, "mAP": 100 * (1 + 1 / 3 + 0.5) / 3})


# ---------------------------------------------------------------------- inputs
@pytest.mark.parametrize("diffs, groups, kwargs, message", [
    (np.zeros((2, 5)), np.arange(4), {}, "groups has shape"),
    (np.zeros((2, 3, 4)), np.arange(4), {}, "expected \\[K, n\\]"),
    (np.zeros((0, 4)), np.arange(4), {}, "expected \\[K, n\\]"),
    (np.array([0.0, np.nan, 1.0]), np.arange(3), {}, "NaN"),
    (np.array([0.0, np.inf, 1.0]), np.arange(3), {}, "infinite"),
    (np.ones(6), np.zeros(6), {}, "at least 2"),
    (np.ones(6), np.arange(6), {"n_resamples": 0}, "n_resamples"),
    (np.ones(6), np.arange(6), {"confidence": 95}, "confidence"),
])
def test_bootstrap_input_errors(diffs, groups, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(diffs, groups, **kwargs)


def test_oracle_input_errors():
    rank, ap = np.zeros((3, 5, 2), dtype=int), np.full((3, 5, 2), 0.5)
    mixed = rank.copy()
    mixed[1, 2, 0] = -1
    cases = [
        ((rank, ap[:, :4]), "same"),
        ((rank[0], ap[0]), "\\[D, Q, N\\]"),
        ((rank - 2, ap), "below -1"),
        ((rank + 0.5, ap), "non-integer"),
        ((rank, ap + 1), "outside \\[0, 1\\]"),
        ((mixed, ap), "some scales only"),
        ((rank - 1, ap), "no record with a valid match"),
        ((rank[:1], ap[:1]), "at least 2"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            oracle_baselines(*args)
    assert stats.oracle_baselines(rank.astype(float), ap)["oracle"] == {"rank1": 100.0, "mAP": 50.0}
