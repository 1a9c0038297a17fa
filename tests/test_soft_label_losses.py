"""Eq. 3 soft labels against hand-computed values, the label bank, and PRI's losses."""

import math

import pytest
import torch

from components.losses import (id_loss, pairwise_distances, prediction_loss, sr_loss, total_loss,
                               triplet_loss)
from components.soft_label import LabelBank, label_entropy, onehot_labels, soft_labels

D = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3 -> mean(d) - d = [2, 1, 0, -3]


def _softmax(values):
    e = [math.exp(v) for v in values]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize(
    "gamma, g_values",
    [
        (1, [2, 1, 0, -3]),
        (3, [8, 1, 0, -27]),
        (1 / 3, [2 ** (1 / 3), 1, 0, -(3 ** (1 / 3))]),
    ],
)
def test_soft_labels_match_hand_computation(gamma, g_values):
    expected = torch.tensor([_softmax(g_values)])
    torch.testing.assert_close(soft_labels(D, gamma), expected, rtol=1e-5, atol=1e-7)


def test_soft_labels_gamma_zero_is_uniform_and_rows_sum_to_one():
    torch.testing.assert_close(soft_labels(D, 0), torch.full((1, 4), 0.25))
    d = torch.rand(16, 4) * 5
    for gamma in (1, 3, 1 / 3):
        labels = soft_labels(d, gamma)
        torch.testing.assert_close(labels.sum(1), torch.ones(16))
        assert (labels.argmax(1) == d.argmin(1)).all()  # the closest scale is the most likely


def test_soft_labels_carry_no_gradient():
    d = torch.rand(3, 4, requires_grad=True)
    assert not soft_labels(d, 1).requires_grad


def test_onehot_and_entropy():
    torch.testing.assert_close(onehot_labels(D), torch.tensor([[1.0, 0, 0, 0]]))
    assert float(label_entropy(torch.full((2, 4), 0.25))) == pytest.approx(math.log(4))
    assert float(label_entropy(onehot_labels(D))) == pytest.approx(0.0, abs=1e-6)


def test_the_marginal_cross_entropy_lies_between_the_labels_entropy_and_ln_n():
    bank = LabelBank(num_items=4, num_scales=4, omega=1)
    assert bank.marginal_cross_entropy() == pytest.approx(math.log(4))  # uniform labels
    bank.labels = onehot_labels(-torch.eye(4))  # each item its own scale
    assert bank.entropy() == pytest.approx(0.0, abs=1e-6)
    assert bank.marginal_cross_entropy() == pytest.approx(math.log(4))  # the mean says nothing of the item
    bank.labels = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(4, 1)  # every item the same label
    assert bank.marginal_cross_entropy() == pytest.approx(bank.entropy())
    bank.labels = soft_labels(torch.rand(4, 4), 1.0)
    assert bank.entropy() <= bank.marginal_cross_entropy() <= math.log(4) + 1e-6


def test_label_bank_refresh_schedule_and_state():
    bank = LabelBank(num_items=5, num_scales=4, omega=2, gamma=1.0)
    assert bank.should_refresh(0)  # never computed
    bank.update(torch.arange(5), torch.rand(5, 4), epoch=0)
    assert [bank.should_refresh(e) for e in range(1, 6)] == [False, True, False, True, False]
    torch.testing.assert_close(bank[torch.tensor([0, 1])].sum(1), torch.ones(2))
    restored = LabelBank(num_items=5, num_scales=4, omega=2)
    restored.load_state_dict(bank.state_dict())
    torch.testing.assert_close(restored.labels, bank.labels)
    assert restored.should_refresh(2) and not restored.should_refresh(3)
    with pytest.raises(ValueError, match="another dataset"):
        LabelBank(num_items=6, num_scales=4, omega=2).load_state_dict(bank.state_dict())


def test_label_bank_omega_zero_is_random_but_seeded():
    bank = LabelBank(num_items=2, num_scales=4, omega=0, seed=3)
    bank.update(torch.arange(2), torch.rand(2, 4), epoch=0)
    decisions = [bank.should_refresh(e) for e in range(1, 41)]
    assert 5 < sum(decisions) < 35  # both outcomes occur
    assert decisions == [bank.should_refresh(e) for e in range(1, 41)]  # reproducible


def test_label_bank_onehot_kind():
    bank = LabelBank(num_items=1, num_scales=4, omega=1, kind="onehot")
    bank.update(torch.tensor([0]), D, epoch=0)
    torch.testing.assert_close(bank.labels, torch.tensor([[1.0, 0, 0, 0]]))


def _brute_force_triplet(f, labels, margin):
    losses = []
    for a in range(len(f)):
        pos = [torch.dist(f[a], f[p]) for p in range(len(f)) if p != a and labels[p] == labels[a]]
        neg = [torch.dist(f[a], f[n]) for n in range(len(f)) if labels[n] != labels[a]]
        if pos and neg:
            losses.append(max(0.0, margin + max(pos).item() - min(neg).item()))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("margin", [0.3, 10.0])
def test_triplet_loss_matches_brute_force(margin):
    torch.manual_seed(0)
    f = torch.randn(12, 8) * 3
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 5])  # 4 and 5 have no positive
    assert float(triplet_loss(f, labels, margin)) == pytest.approx(_brute_force_triplet(f, labels, margin), rel=1e-5)


def test_pairwise_distances():
    a, b = torch.randn(5, 3), torch.randn(4, 3)
    torch.testing.assert_close(pairwise_distances(a, b), torch.cdist(a, b), rtol=1e-4, atol=1e-4)


def test_prediction_loss_gradient_reaches_logits_not_labels():
    logits = torch.randn(4, 4, requires_grad=True)
    raw = torch.randn(4, 4, requires_grad=True)
    loss = prediction_loss(logits, torch.softmax(raw, 1))
    loss.backward()
    assert logits.grad is not None and raw.grad is None  # the labels are cut off (Sec. 3.4)
    # soft cross-entropy: equals CE when the labels are one-hot
    target = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert float(prediction_loss(logits, torch.eye(4))) == pytest.approx(float(id_loss(logits, target)))


def test_sr_loss_is_mae_and_handles_floor_sizes():
    x_h = torch.rand(2, 3, 12, 6)
    assert float(sr_loss(x_h + 0.1, x_h)) == pytest.approx(0.1, rel=1e-4)
    assert sr_loss(torch.rand(2, 3, 9, 6), x_h).shape == ()  # floor(3 * floor(12 / 3.5)) rows


def test_total_loss_weights():
    terms = {"L_sr": torch.tensor(1.0), "L_id": torch.tensor(2.0), "L_tri": torch.tensor(3.0)}
    assert float(total_loss(terms, alpha=1, beta=0.01, lambda_p=1)) == pytest.approx(3.03)
    terms["L_p"] = torch.tensor(4.0)
    assert float(total_loss(terms, alpha=1, beta=0.01, lambda_p=0.5)) == pytest.approx(5.03)


def test_gamma_1_labels_give_back_their_centred_distances():
    """bench/bench_label_gamma.py re-labels a trained bank at another gamma from its gamma-1 labels."""
    from bench.bench_label_gamma import centred_terms

    d = torch.rand(6, 4, dtype=torch.float64) * 3
    torch.testing.assert_close(centred_terms(soft_labels(d, 1.0).double()), d.mean(1, keepdim=True) - d,
                               atol=1e-5, rtol=0)
