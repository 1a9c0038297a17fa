"""PRI's training (Han et al.): the losses of one forward (Eq. 2-6) and one epoch, pretrain or joint.

Pre-training (Sec. 3.5) drops P and L_p and recovers x_l at a random scale; joint
training recovers x_l at r_p = argmax P(x_l) (Eq. 1) with soft labels from the label
bank (components/training/labels.py). With RIFE as F ("RIFE + PRI") the resolution
weighting loss (FFSR paper Eq. 7) is added.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from components.config import LossParams
from components.data.dataset import TripletBatch
from components.losses import id_loss, prediction_loss, sr_loss, total_loss, triplet_loss
from components.models import unwrap
from components.models.pri import PRIForward
from components.models.rife import resolution_loss
from components.optim import PHASES
from components.precision import autocast
from components.soft_label import LabelBank, label_entropy
from components.training.engine import _backward_step, _check_finite, _epoch_setup, _Meter
from components.training.labels import batch_labels


def pri_losses(fwd: PRIForward, batch: TripletBatch, labels: Tensor | None, loss: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """PRI's losses (fp32) for one training forward; returns (L, terms incl. "L").

    L_sr: Eq. 2 over the x_sl images (each group's mean weighted by its size, so every
    image counts once). L_id: mean of the identity losses of f_rp, f_sl, f_h. L_tri:
    Eq. 5 (batch-hard) on [f_rp | f_sl | f_h]. L_p: Eq. 4 when ``labels`` are given
    (joint). L = Eq. 6.

    F = RIFE ("RIFE + PRI", the outputs carry w_L / w_H): L += beta_r * L_r (FFSR paper
    Eq. 7) with r = 1 for x_h and r = width(x_l) / width(x_h) for G_{r_p}(x_l), likewise
    width(x_sl) / width(x_h) for G_{r_sl}(x_sl): enlarging an image (here by G) adds no
    resolution (FFSR paper Sec. 3), so a recovered image keeps the r of its input
    (clamped to 1).
    """
    y, B = batch.label, len(batch.label)
    n_sl = fwd.sr_sl.size
    L_sr = sum(sr_loss(g.images.float(), batch.x_h[g.index].float()) * len(g.index) for g in fwd.sr_sl) / n_sl  # Eq. 2
    outs = (fwd.out_rp, fwd.out_sl, fwd.out_h)
    terms = {
        "L_sr": L_sr,
        "L_id": sum(id_loss(o.logits.float(), y) for o in outs) / 3,
        "L_tri": triplet_loss(torch.cat([o.feature.float() for o in outs]), y.repeat(3), loss.margin),  # Eq. 5
    }
    if labels is not None:
        if fwd.p_logits is None:
            raise ValueError("labels were given but the forward has no P logits (pretrain mode?)")
        terms["L_p"] = prediction_loss(fwd.p_logits.float(), labels.to(fwd.p_logits.device).float())  # Eq. 4
    total = total_loss(terms, loss.alpha, loss.beta, loss.lambda_p)  # Eq. 6
    if "w_L" in fwd.out_h.extras:  # F is RIFE: resolution weighting loss (FFSR paper Eq. 7)
        W = float(batch.x_h.shape[-1])
        dev = batch.x_h.device
        r = torch.cat([batch.x_l.widths(dev) / W, batch.x_sl.widths(dev) / W,
                       torch.ones(B, device=dev)]).clamp(max=1.0)
        w_L = torch.cat([o.extras["w_L"].float() for o in outs])
        w_H = torch.cat([o.extras["w_H"].float() for o in outs])
        terms["L_r"] = resolution_loss(w_L, w_H, r)
        total = total + loss.beta_r * terms["L_r"]
    terms["L"] = total
    return total, terms


def run_pri_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, *, phase: str, epoch: int,
                  loss: LossParams, bank: LabelBank | None, naive_labels: bool, device, precision: str,
                  scaler=None, generator: torch.Generator | None = None,
                  progress: Callable[[int, int, float], None] | None = None) -> dict[str, float]:
    """One epoch of PRI training (pretrain: Sec. 3.5; joint: Eq. 1-6); returns the epoch's means.

    Joint labels: ``bank[batch.index]`` (refreshed every omega epochs by the caller with
    :func:`refresh_label_bank`), or with ``naive_labels`` recomputed for every batch by
    :func:`batch_labels` (the bank is then only used for its kind and gamma).
    fp16 uses ``scaler`` (a fresh GradScaler for this epoch if none is given).

    Returns "L", "L_sr", "L_id", "L_tri" (+ "L_p" joint, "L_r" with RIFE), "samples",
    "seconds", "samples_per_s", "lr_backbone", "lr_head"; joint also "r_p_x{r}" (fraction
    of samples recovered at each scale r) and "label_entropy" (mean entropy of the labels
    used). ``progress(steps_done, n_steps, running_mean_L)`` is called after every step.
    """
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: use one of {', '.join(PHASES)}")
    joint = phase == "joint"
    if joint and bank is None:
        raise ValueError("joint training needs a LabelBank (naive labels use its kind and gamma too)")
    device, precision, scaler = _epoch_setup(loader, epoch, device, precision, scaler)
    net = unwrap(model)
    model.train()
    scales = net.scales.tolist()
    r_counts = torch.zeros(len(scales), dtype=torch.long, device=device)
    meter = _Meter()
    n_steps = len(loader)
    for i, batch in enumerate(loader):
        batch = batch.to(device, non_blocking=True)
        labels = None
        if joint:
            if naive_labels:
                labels = batch_labels(model, batch, bank, device=device, precision=precision)
            else:
                labels = bank[batch.index].to(device)
        with autocast(device, precision):
            fwd = model(batch, mode=phase, generator=generator)
        total, terms = pri_losses(fwd, batch, labels, loss)  # fp32, outside autocast
        if joint:
            terms["label_entropy"] = label_entropy(labels)
            r_counts += torch.bincount(fwd.r_index, minlength=len(scales))
        values = _check_finite(terms, epoch, i, device)
        _backward_step(total, optimizer, scaler)
        meter.add(values, len(batch))
        if progress is not None:
            progress(i + 1, n_steps, meter.running())
    if joint:  # predicted-scale distribution: counts as sample-weighted sums of fractions
        counts = r_counts.cpu().tolist()
        for r, c in zip(scales, counts):
            meter.sums[f"r_p_x{r:g}"] = float(c)
    return meter.result(device, optimizer)
