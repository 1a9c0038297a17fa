"""PRI's losses: L_sr (Eq. 2), L_id, L_tri (Eq. 5), L_p (Eq. 4) and their total (Eq. 6).

    L = L_sr + alpha L_id + beta L_tri + lambda L_p                        (Eq. 6)

L_p is a soft cross-entropy whose labels are detached, so its gradient reaches
only the predictor P (PRI Sec. 3.4). The FFSR / RIFE losses live with those
models (components/models/ffsr.py, rife.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sr_loss(sr: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean absolute error between G_{r_sl}(x_sl) and x_h.

    G's output is floor(r * floor(H / r)) pixels high, which can miss H by up to
    r - 1 rows (e.g. 126 for H = 128, r = 3); then x_h is resized to it first.
    """
    if sr.shape[-2:] != x_h.shape[-2:]:
        x_h = F.interpolate(x_h, size=sr.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
    return (sr - x_h).abs().mean()


def id_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_id: identity cross-entropy (PRI applies it to f_rp, f_sl and f_h)."""
    return F.cross_entropy(logits, labels)


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of a [n, D] and b [m, D] -> [n, m]."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * a @ b.t()
    return d2.clamp_min(1e-12).sqrt()


def triplet_loss(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 5 with batch-hard mining: max(0, phi + d_p - d_n) per anchor, averaged.

    d_p is the anchor's farthest positive, d_n its nearest negative, on the
    unnormalised features (PRI: phi = 10). Anchors without a positive or a
    negative in the batch are skipped.
    """
    d = pairwise_distances(features, features)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return features.sum() * 0.0
    d_p = d.masked_fill(~pos, float("-inf")).amax(1)
    d_n = d.masked_fill(~neg, float("inf")).amin(1)
    return F.relu(margin + d_p - d_n)[valid].mean()


def prediction_loss(p_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 4: L_p = -sum_i l_{r_i} log p_{r_i}; the labels carry no gradient."""
    return -(labels.detach() * F.log_softmax(p_logits, dim=1)).sum(1).mean()


def total_loss(terms: dict[str, torch.Tensor], alpha: float, beta: float, lambda_p: float) -> torch.Tensor:
    """Eq. 6 from the terms L_sr, L_id, L_tri and (in joint training) L_p."""
    total = terms["L_sr"] + alpha * terms["L_id"] + beta * terms["L_tri"]
    if "L_p" in terms:
        total = total + lambda_p * terms["L_p"]
    return total
