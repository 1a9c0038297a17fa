"""Is the scale predictor P predicting anything? Diagnostics of its choices on the test probes.

P gives every LR probe a softmax over the N alternative scales; the model recovers
the probe at r_p = the scale of the argmax. The evaluation's oracle ("Ideal")
knows, per gallery draw and probe, which scale ranked a true match best
(``components.stats.oracle_index``). Whether P has learnt anything shows in:

- agreement: how often r_p is the oracle's scale, against the *chance*
  agreement of a choice independent of the oracle's with the same frequencies
  as P's choices, sum_k p_pred(k) p_oracle(k) (a P that always picks the
  oracle's most frequent scale scores its frequency without predicting
  anything), and against 1/N (a uniform random choice);
- P's confidence: its mean entropy (nats) against ln N, the entropy of a
  uniform P, and its mean max probability against 1/N;
- the confusion of r_p with the probe's true down-sampling factor: a P that
  reads the probe's resolution picks larger scales for more degraded probes.

:func:`predictor_diagnostics` returns all of it; :func:`agreement_hits` the
per-record 0/1 agreement, for a bootstrap interval over identities
(``components.stats.paired_bootstrap``). NumPy only: no Ray, DVC or MLflow;
torch tensors are accepted as inputs.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# |sum of a probability row - 1| allowed: float32 softmax rows are off by ~1e-7.
PROB_SUM_TOLERANCE = 1e-3

__all__ = ["predictor_diagnostics", "agreement_hits", "PROB_SUM_TOLERANCE"]


def predictor_diagnostics(probs, true_scale, oracle_index, scales: Sequence[float]) -> dict:
    """P's agreement with the oracle, its confidence, and r_p per true down-sampling factor.

    - ``probs`` [Q, N]: P's softmax probabilities on the Q test probes (rows sum to 1);
      r_p is the scale of a row's argmax (the first one on ties).
    - ``true_scale`` [Q]: each probe's true down-sampling factor (e.g. 2, 3, 4).
    - ``oracle_index`` [Q] or [D, Q]: the oracle's best scale index (0..N-1) per
      probe, per gallery draw if 2-D.
    - ``scales`` [N]: the alternative scale factors, e.g. (1, 2, 3, 4).

    Returns a dict:

    - ``agreement``: fraction of the records (probes x draws) where argmax P == oracle;
    - ``chance_agreement``: sum_k p_pred(k) p_oracle(k), the expected agreement of a
      choice independent of the oracle's with P's frequencies ``predicted_distribution``
      (p_pred, over the probes) against ``oracle_distribution`` (p_oracle, over the records);
    - ``uniform_agreement``: 1 / N;
    - ``mean_entropy`` (nats) and ``max_entropy`` = ln N; ``mean_max_prob`` (>= 1/N);
    - ``confusion``: int64 [T, N], probes per true factor (rows, ``true_scales``: the
      T distinct factors ascending) and predicted scale index (columns); sums to Q;
    - ``true_scales``: the row labels (floats); ``scales``: the column labels (floats);
    - ``r_p_by_true_scale``: ``{"x2": {"x1": fraction, ...}, ...}``, the confusion's
      rows as fractions (each sums to 1);
    - ``num_probes`` (Q), ``num_draws`` (D, 1 for a 1-D ``oracle_index``).

    Raises ValueError naming the argument on a bad shape, a NaN, probabilities
    outside [0, 1] or rows not summing to 1, or an oracle index outside 0..N-1.
    """
    probs, true_scale, oracle, scales = _check(probs, true_scale, oracle_index, scales)
    num_q, num_scales = probs.shape
    predicted = probs.argmax(1)
    p_pred = np.bincount(predicted, minlength=num_scales) / num_q
    p_oracle = np.bincount(oracle.ravel(), minlength=num_scales) / oracle.size
    true_scales, row = np.unique(true_scale, return_inverse=True)
    confusion = np.zeros((len(true_scales), num_scales), dtype=np.int64)
    np.add.at(confusion, (row.ravel(), predicted), 1)
    return {
        "agreement": float(_hits(predicted, oracle).mean()),
        "chance_agreement": float(p_pred @ p_oracle),
        "uniform_agreement": 1.0 / num_scales,
        "mean_entropy": float(_entropy(probs).mean()),
        "max_entropy": math.log(num_scales),
        "mean_max_prob": float(probs.max(1).mean()),
        "predicted_distribution": p_pred.tolist(),
        "oracle_distribution": p_oracle.tolist(),
        "confusion": confusion,
        "true_scales": [float(t) for t in true_scales],
        "scales": [float(s) for s in scales],
        "r_p_by_true_scale": _row_fractions(confusion, true_scales, scales),
        "num_probes": num_q,
        "num_draws": 1 if oracle.ndim == 1 else oracle.shape[0],
    }


def agreement_hits(probs, oracle_index) -> np.ndarray:
    """1 where argmax P (a row of ``probs`` [Q, N]) is the oracle's scale index, else 0:
    int64, ``oracle_index``'s shape ([Q] or [D, Q]). Its mean is ``agreement``."""
    probs = _check_probs(probs)
    return _hits(probs.argmax(1), _check_oracle(oracle_index, *probs.shape))


# ---------------------------------------------------------------- helpers

def _hits(predicted: np.ndarray, oracle: np.ndarray) -> np.ndarray:
    return (oracle == predicted).astype(np.int64)  # [Q] broadcasts over the draws of [D, Q]


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row; 0 log 0 = 0."""
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return -(probs * logs).sum(1)


def _row_fractions(confusion: np.ndarray, true_scales, scales) -> dict[str, dict[str, float]]:
    fractions = confusion / confusion.sum(1, keepdims=True)  # every row holds >= 1 probe
    return {f"x{t:g}": {f"x{s:g}": float(f) for s, f in zip(scales, row)}
            for t, row in zip(true_scales, fractions)}


def _array(x, name: str, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch itself is not needed here
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected numbers ({exc})") from None


def _check(probs, true_scale, oracle_index, scales):
    probs = _check_probs(probs)
    num_q, num_scales = probs.shape
    scales = _array(scales, "scales", np.float64)
    if scales.shape != (num_scales,) or not np.all(np.isfinite(scales)):
        raise ValueError(f"scales has shape {scales.shape}: expected {num_scales} finite scale factors, "
                         "one per column of probs")
    true_scale = _array(true_scale, "true_scale", np.float64)
    if true_scale.shape != (num_q,):
        raise ValueError(f"true_scale has shape {true_scale.shape}: expected ({num_q},), one factor per "
                         "row of probs")
    if not np.all(np.isfinite(true_scale)):
        raise ValueError("true_scale has NaN or infinite values: expected each probe's down-sampling factor")
    return probs, true_scale, _check_oracle(oracle_index, num_q, num_scales), scales


def _check_probs(probs) -> np.ndarray:
    probs = _array(probs, "probs", np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs has shape {probs.shape}: expected [num_probes, num_scales], both >= 1")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs has NaN or infinite values: expected P's softmax probabilities")
    if probs.min() < 0 or probs.max() > 1:
        raise ValueError(f"probs has values in [{probs.min():.3g}, {probs.max():.3g}]: expected "
                         "probabilities in [0, 1] (a softmax, not logits)")
    off = np.abs(probs.sum(1) - 1)
    if off.max() > PROB_SUM_TOLERANCE:
        raise ValueError(f"probs row {int(off.argmax())} sums to {probs[off.argmax()].sum():.6g}: expected "
                         f"rows summing to 1 (within {PROB_SUM_TOLERANCE:g}), a softmax over the scales")
    return probs


def _check_oracle(oracle_index, num_q: int, num_scales: int) -> np.ndarray:
    oracle = _array(oracle_index, "oracle_index")
    if oracle.ndim not in (1, 2) or oracle.shape[-1] != num_q or oracle.size == 0:
        raise ValueError(f"oracle_index has shape {oracle.shape}: expected ({num_q},) or (draws, {num_q}), "
                         "one scale index per probe of probs (per gallery draw)")
    if oracle.dtype.kind not in "iub":
        if oracle.dtype.kind != "f" or not np.all(np.isfinite(oracle)) or np.any(oracle != np.round(oracle)):
            raise ValueError("oracle_index has non-integer values (NaN?): expected scale indices 0.."
                             f"{num_scales - 1}")
    oracle = oracle.astype(np.int64)
    if oracle.min() < 0 or oracle.max() >= num_scales:
        raise ValueError(f"oracle_index has values in [{oracle.min()}, {oracle.max()}]: expected scale "
                         f"indices 0..{num_scales - 1} (one per column of probs)")
    return oracle
