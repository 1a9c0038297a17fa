"""components.diagnostics: P's agreement with the oracle, chance, entropy and confusion, on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.diagnostics import agreement_hits, predictor_diagnostics

SCALES = [1, 2, 3, 4]


def one_hot(index, n=4, sharp=0.97):
    """Probabilities with ``sharp`` on ``index`` and the rest spread evenly."""
    index = np.asarray(index)
    probs = np.full((len(index), n), (1 - sharp) / (n - 1))
    probs[np.arange(len(index)), index] = sharp
    return probs


def random_case(num_q=60, draws=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((num_q, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    true_scale = rng.choice([2, 3, 4], num_q)
    oracle = rng.choice(4, (draws, num_q), p=[0.1, 0.4, 0.3, 0.2])
    return probs, true_scale, oracle


def test_perfect_predictor_agrees_always():
    _, true_scale, _ = random_case()
    oracle = np.random.default_rng(1).integers(0, 4, 60)
    result = predictor_diagnostics(one_hot(oracle), true_scale, oracle, SCALES)
    assert result["agreement"] == 1.0
    np.testing.assert_array_equal(agreement_hits(one_hot(oracle), oracle), np.ones(60))
    assert result["num_probes"] == 60 and result["num_draws"] == 1


@pytest.mark.parametrize("k", [0, 2])
def test_constant_predictor_agrees_at_the_oracles_frequency(k):
    probs, true_scale, oracle = random_case()
    constant = one_hot(np.full(60, k))
    result = predictor_diagnostics(constant, true_scale, oracle, SCALES)
    assert result["agreement"] == pytest.approx(np.mean(oracle == k), rel=1e-12)
    # a constant choice is independent of the oracle's: its agreement is its chance agreement
    assert result["chance_agreement"] == pytest.approx(result["agreement"], rel=1e-12)
    assert result["predicted_distribution"] == [float(j == k) for j in range(4)]
    assert result["num_draws"] == 5


def test_chance_agreement_on_a_constructed_example():
    # P picks scale 0 for 1 probe, 1 for 2 and 2 for 1: p_pred = (1/4, 1/2, 1/4, 0)
    probs = one_hot([0, 1, 1, 2])
    # oracle over 2 draws x 4 probes: index 1 five times, 3 three times: p_oracle = (0, 5/8, 0, 3/8)
    oracle = np.array([[1, 1, 3, 3],
                       [1, 1, 1, 3]])
    result = predictor_diagnostics(probs, [2, 2, 3, 4], oracle, SCALES)
    np.testing.assert_allclose(result["predicted_distribution"], [0.25, 0.5, 0.25, 0])
    np.testing.assert_allclose(result["oracle_distribution"], [0, 5 / 8, 0, 3 / 8])
    assert result["chance_agreement"] == pytest.approx(0.5 * 5 / 8)
    # r_p indices (0, 1, 1, 2) against draw 0 (1, 1, 3, 3) and draw 1 (1, 1, 1, 3)
    hits = agreement_hits(probs, oracle)
    np.testing.assert_array_equal(hits, [[0, 1, 0, 0], [0, 1, 1, 0]])
    assert hits.shape == oracle.shape and hits.dtype == np.int64
    assert result["agreement"] == pytest.approx(3 / 8)
    assert result["uniform_agreement"] == 0.25


def test_entropy_and_max_probability():
    uniform = np.full((7, 4), 0.25)
    result = predictor_diagnostics(uniform, np.full(7, 3), np.zeros(7, int), SCALES)
    assert result["mean_entropy"] == pytest.approx(math.log(4), rel=1e-12)
    assert result["max_entropy"] == pytest.approx(math.log(4), rel=1e-15)
    assert result["mean_max_prob"] == pytest.approx(0.25)
    certain = one_hot([0, 1, 2], sharp=1.0)  # zeros: 0 log 0 = 0
    result = predictor_diagnostics(certain, [2, 3, 4], [0, 1, 2], SCALES)
    assert result["mean_entropy"] == 0.0 and result["mean_max_prob"] == 1.0
    two = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    result = predictor_diagnostics(two, [2, 4], [0, 0], [1, 2, 3])
    assert result["mean_entropy"] == pytest.approx(math.log(2) / 2)
    assert result["max_entropy"] == pytest.approx(math.log(3))


def test_confusion_rows_are_true_factors_and_sum_to_the_probes():
    probs, true_scale, oracle = random_case(num_q=90, seed=3)
    result = predictor_diagnostics(probs, true_scale, oracle, SCALES)
    confusion = result["confusion"]
    assert confusion.dtype == np.int64 and confusion.shape == (3, 4)
    assert confusion.sum() == 90
    assert result["true_scales"] == [2.0, 3.0, 4.0] and result["scales"] == [1.0, 2.0, 3.0, 4.0]
    predicted = probs.argmax(1)
    for i, t in enumerate([2, 3, 4]):
        np.testing.assert_array_equal(confusion[i], np.bincount(predicted[true_scale == t], minlength=4))
        fractions = result["r_p_by_true_scale"][f"x{t}"]
        assert list(fractions) == ["x1", "x2", "x3", "x4"]
        assert sum(fractions.values()) == pytest.approx(1.0)
        assert fractions["x2"] == pytest.approx(confusion[i, 1] / confusion[i].sum())


def test_hand_made_confusion_and_torch_inputs():
    probs = torch.tensor(one_hot([3, 3, 2, 1, 1]), dtype=torch.float32)  # float32 softmax-like rows
    result = predictor_diagnostics(probs, torch.tensor([4, 4, 3, 2, 2]), torch.tensor([3, 2, 2, 1, 0]),
                                   torch.tensor([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(result["confusion"], [[0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 2]])
    assert result["agreement"] == pytest.approx(3 / 5)
    assert result["r_p_by_true_scale"]["x4"] == {"x1": 0.0, "x2": 0.0, "x3": 0.0, "x4": 1.0}


def test_ties_pick_the_first_scale():
    probs = np.array([[0.4, 0.4, 0.1, 0.1]])
    np.testing.assert_array_equal(agreement_hits(probs, [0]), [1])


GOOD = (one_hot([0, 1, 2]), [2, 3, 4], [[0, 1, 2], [1, 1, 2]], SCALES)


@pytest.mark.parametrize("index, bad, name", [
    (0, one_hot([0, 1]), "true_scale"),                # 2 probes in probs, 3 in the rest
    (0, np.full((3, 4), 0.3), "probs"),                # rows sum to 1.2
    (0, np.full(4, 0.25), "probs"),                    # 1-D
    (0, np.where(np.eye(3, 4) > 0, np.nan, 0.25), "probs"),
    (0, np.array([[1.5, -0.5, 0, 0]] * 3), "probs"),   # sums to 1, not probabilities
    (1, [2, 3], "true_scale"),
    (1, [2, np.nan, 4], "true_scale"),
    (2, [0, 1], "oracle_index"),
    (2, [[[0, 1, 2]]], "oracle_index"),
    (2, [0, 1, 4], "oracle_index"),                    # no scale index 4
    (2, [0, -1, 2], "oracle_index"),
    (2, [0.0, np.nan, 1.0], "oracle_index"),
    (2, [0.5, 1, 2], "oracle_index"),
    (3, [1, 2, 3], "scales"),
    (3, [1, 2, 3, np.nan], "scales"),
])
def test_bad_input_names_the_argument(index, bad, name):
    args = list(GOOD)
    args[index] = bad
    with pytest.raises(ValueError, match=name):
        predictor_diagnostics(*args)


def test_agreement_hits_bad_input():
    with pytest.raises(ValueError, match="oracle_index"):
        agreement_hits(one_hot([0, 1, 2]), [0, 1])
    with pytest.raises(ValueError, match="probs"):
        agreement_hits(np.full((3, 4), 0.2), [0, 1, 2])


def test_float32_softmax_rows_are_accepted():
    logits = torch.randn(500, 4, generator=torch.Generator().manual_seed(0)) * 10
    probs = torch.softmax(logits, 1)  # float32: rows off 1 by ~1e-7
    result = predictor_diagnostics(probs, np.full(500, 2), probs.argmax(1), SCALES)
    assert result["agreement"] == 1.0
    assert 0 <= result["mean_entropy"] <= result["max_entropy"]
