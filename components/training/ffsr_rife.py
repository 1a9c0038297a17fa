"""FFSR + RIFE's training (Mao et al. Sec. 5.2): one epoch of one of its three steps.

L^FFSR (Eq. 5, each SR image against its own HR image), L^RIFE = L^X + beta sum_t L^R_t
(Eq. 7-9) on FFSR's outputs (Eq. 3), jointly L^FFSR + alpha L^RIFE (Eq. 4).
Resolution r = width / width_max (Sec. 3).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from components.config import LossParams
from components.models.ffsr import enlarge, ffsr_loss, foreground_mask
from components.models.reid import ReIDOutput
from components.models.rife import rife_loss
from components.precision import autocast
from components.training.engine import _backward_step, _check_finite, _epoch_setup, _Meter

FFSR_RIFE_STEPS = ("ffsr", "rife", "joint")


def run_ffsr_rife_epoch(ffsr: nn.Module, rife: nn.Module, loader, optimizer: torch.optim.Optimizer, *,
                        step: str, epoch: int, loss: LossParams, device, precision: str, hr_width: int,
                        sigma: float, scaler=None,
                        progress: Callable[[int, int, float], None] | None = None) -> dict[str, float]:
    """One epoch of one of the FFSR paper's three training steps (Sec. 5.2), same loader as PRI.

    Every image reaches RIFE through FFSR at the HR size (Eq. 3): x_h (r = 1), x_sl (x_h
    down-sampled by r_sl: its HR ground truth is x_h) and x_l (the person's LR image from
    another camera: its own HR version is not known). r = width / hr_width (Sec. 3).

    - "ffsr":  L^FFSR (Eq. 5, Gaussian mask of ``sigma``) of FFSR(x_h) and FFSR(x_sl), each
               against its own HR image x_h; only FFSR is trained.
    - "rife":  FFSR fixed (eval, no gradient); L^RIFE (Eq. 9, beta = loss.beta_r) of RIFE on
               FFSR(x_h) and FFSR(x_l).
    - "joint": L^FFSR + loss.alpha_rife * L^RIFE (Eq. 4), both trained.

    Each of ``ffsr`` / ``rife`` is called at most once per step (all images in one
    batch), so each may be wrapped in its own DistributedDataParallel.
    Returns "L", "L_ffsr" and / or "L_rife", "L_x", "L_r", "samples", "seconds",
    "samples_per_s", "lr_backbone", "lr_head".
    """
    if step not in FFSR_RIFE_STEPS:
        raise ValueError(f"step {step!r}: use one of {', '.join(FFSR_RIFE_STEPS)}")
    device, precision, scaler = _epoch_setup(loader, epoch, device, precision, scaler)
    fit_ffsr, use_rife = step in ("ffsr", "joint"), step in ("rife", "joint")
    ffsr.train(fit_ffsr)
    rife.train(use_rife)
    meter = _Meter()
    n_steps = len(loader)
    for i, batch in enumerate(loader):
        batch = batch.to(device, non_blocking=True)
        B, (H, W) = len(batch), batch.x_h.shape[-2:]

        x = {"h": batch.x_h}  # FFSR's own bicubic step is the identity on these (already the HR size)
        if fit_ffsr:
            x["sl"] = batch.x_sl.map(lambda x_sl: enlarge(x_sl, (H, W)))  # in batch order [B, 3, H, W]
        if use_rife:
            x["l"] = batch.x_l.map(lambda x_l: enlarge(x_l, (H, W)))
        with autocast(device, precision):
            with torch.set_grad_enabled(fit_ffsr):
                sr = dict(zip(x, ffsr(torch.cat(list(x.values())), (H, W)).split(B)))  # Eq. 3, first half
            if use_rife:
                out = rife(torch.cat([sr["h"], sr["l"]]))  # Eq. 3, second half
        terms = {}
        if fit_ffsr:
            mask = foreground_mask(H, W, sigma, device=device)
            own_hr = torch.cat([batch.x_h, batch.x_h]).float()  # the HR ground truth of x_h and of x_sl
            terms["L_ffsr"] = ffsr_loss(torch.cat([sr["h"], sr["sl"]]).float(), own_hr, mask)  # Eq. 5
        if use_rife:
            r_l = (batch.x_l.widths(device) / float(hr_width)).clamp(max=1.0)
            r = torch.cat([torch.ones(B, device=device), r_l])
            out = ReIDOutput(out.feature.float(), out.logits.float(), {k: v.float() for k, v in out.extras.items()})
            L_rife, parts = rife_loss(out, batch.label.repeat(2), r, loss.beta_r)  # Eq. 9
            terms.update(L_rife=L_rife, L_x=parts["L_x"], L_r=parts["L_r"])
        if step == "ffsr":
            total = terms["L_ffsr"]
        elif step == "rife":
            total = terms["L_rife"]
        else:
            total = terms["L_ffsr"] + loss.alpha_rife * terms["L_rife"]  # Eq. 4
        terms["L"] = total
        values = _check_finite(terms, epoch, i, device)
        _backward_step(total, optimizer, scaler)
        meter.add(values, B)
        if progress is not None:
            progress(i + 1, n_steps, meter.running())
    return meter.result(device, optimizer)
