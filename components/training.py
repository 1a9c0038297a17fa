"""The training engine: one epoch of PRI or FFSR + RIFE, label refresh, checkpoints.

Framework-free (no Ray, MLflow or DVC); precision (autocast, the bf16 check) is
components/precision.py. The Ray Train worker (pipelines/ray_train.py) builds the model,
loader and optimiser and calls one function per epoch::

    optimizer = build_optimizer(model, params.train, phase)        # components/optim.py
    for epoch in range(start, epochs):
        if phase == "joint" and bank.should_refresh(epoch):        # every omega epochs (PRI Sec. 3.4)
            refresh_label_bank(unwrap(model), loader.dataset, bank, epoch, device=device, precision=precision)
        metrics = run_pri_epoch(model, loader, optimizer, phase=phase, epoch=epoch, loss=params.loss,
                                bank=bank, naive_labels=False, device=device, precision=precision)
        TrainingState(unwrap(model), optimizer, bank, phase, epoch).save(path)

Where the papers' equations are:

- PRI (Han et al.), :func:`pri_losses`: L_sr (Eq. 2), L_id, L_tri (Eq. 5), L_p (Eq. 4)
  with the soft labels of Eq. 3, total L (Eq. 6). Pre-training (Sec. 3.5) drops P and L_p
  and recovers x_l at a random scale; joint training recovers x_l at r_p = argmax P(x_l)
  (Eq. 1). Optimisers and learning-rate schedules of every step: components/optim.py.
  With RIFE as F ("RIFE + PRI") the resolution weighting loss (FFSR paper Eq. 7) is added.
- FFSR + RIFE (Mao et al.), :func:`run_ffsr_rife_epoch`: the three training steps of
  Sec. 5.2: L^FFSR (Eq. 5, each SR image against its own HR image), L^RIFE = L^X +
  beta sum_t L^R_t (Eq. 7-9) on FFSR's outputs (Eq. 3), jointly L^FFSR + alpha L^RIFE
  (Eq. 4). Resolution r = width / width_max (Sec. 3).

Losses are computed in fp32 outside autocast; every term is checked each step and a
NaN / inf stops training with :class:`NonFiniteLossError` naming epoch, step and term.
Under torch.distributed every rank stops at the same step, and the epoch metrics
returned are over all ranks.

Checkpoints (:class:`TrainingState`) and final weights (:func:`save_weights`) hold plain
tensors and python values only: they are written atomically and read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from components.config import LossParams
from components.data.dataset import SizeGroup, TripletBatch, TripletDataset, collate_triplets, group_by_size, ungroup
from components.fsutil import atomic_path
from components.losses import id_loss, prediction_loss, sr_loss, total_loss, triplet_loss
from components.models import unwrap  # noqa: F401 (re-exported)
from components.models.ffsr import ffsr_loss, foreground_mask
from components.models.reid import ReIDOutput
from components.models.rife import resolution_loss, rife_loss
from components.models.weights import torch_load
from components.optim import PHASES, build_optimizer, param_groups  # noqa: F401 (re-exported)
from components.precision import autocast, resolve_precision
from components.soft_label import LabelBank, label_entropy

FFSR_RIFE_STEPS = ("ffsr", "rife", "joint")
STATE_FORMAT = "lrreid-training-state/1"
WEIGHTS_FORMAT = "lrreid-weights/1"


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the epoch, the step and the term."""


# ----------------------------------------------------------------------------- PRI losses
def _widths(groups: list[SizeGroup], B: int, device) -> Tensor:
    """Image width of every batch position, from size groups -> float [B]."""
    w = torch.empty(B, device=device)
    for g in groups:
        w[g.index] = float(g.images.shape[-1])
    return w


def pri_losses(step, batch: TripletBatch, labels: Tensor | None, loss: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
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
    n_sl = sum(len(i) for i, _ in step.sr_sl)
    L_sr = sum(sr_loss(sr.float(), batch.x_h[i].float()) * len(i) for i, sr in step.sr_sl) / n_sl  # Eq. 2
    outs = (step.out_rp, step.out_sl, step.out_h)
    terms = {
        "L_sr": L_sr,
        "L_id": sum(id_loss(o.logits.float(), y) for o in outs) / 3,
        "L_tri": triplet_loss(torch.cat([o.feature.float() for o in outs]), y.repeat(3), loss.margin),  # Eq. 5
    }
    if labels is not None:
        if step.p_logits is None:
            raise ValueError("labels were given but the step has no P logits (pretrain mode?)")
        terms["L_p"] = prediction_loss(step.p_logits.float(), labels.to(step.p_logits.device).float())  # Eq. 4
    total = total_loss(terms, loss.alpha, loss.beta, loss.lambda_p)  # Eq. 6
    if "w_L" in step.out_h.extras:  # F is RIFE: resolution weighting loss (FFSR paper Eq. 7)
        W = float(batch.x_h.shape[-1])
        dev = batch.x_h.device
        r = torch.cat([_widths(batch.x_l, B, dev) / W, _widths(batch.x_sl, B, dev) / W,
                       torch.ones(B, device=dev)]).clamp(max=1.0)
        w_L = torch.cat([o.extras["w_L"].float() for o in outs])
        w_H = torch.cat([o.extras["w_H"].float() for o in outs])
        terms["L_r"] = resolution_loss(w_L, w_H, r)
        total = total + loss.beta_r * terms["L_r"]
    terms["L"] = total
    return total, terms


# ----------------------------------------------------------------------------- soft labels
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(device: torch.device) -> torch.device:
    """Where collective tensors live: the GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def batch_labels(model: nn.Module, batch: TripletBatch, bank: LabelBank, *, device, precision: str) -> Tensor:
    """The labels of one batch computed now (the "naive" way, every step): Eq. 3 on
    d_i = ||F(G_{r_i}(x_l)) - F(x_h)||, in eval mode like :func:`refresh_label_bank`
    (so BatchNorm uses its running statistics and they are not updated), through the
    bank's own ``labels_from_distances``: both ways give the same labels on the same weights."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        with autocast(device, precision):
            d = net.scale_distances(batch.x_l, batch.x_h)
    finally:
        net.train(was_training)
    return bank.labels_from_distances(d.float()).to(batch.x_h.device)


@torch.no_grad()
def refresh_label_bank(pri: nn.Module, dataset: TripletDataset, bank: LabelBank, epoch: int, *,
                       batch_size: int = 64, device, precision: str, progress: bool = False,
                       num_workers: int = 0) -> float:
    """Recompute every LR item's label (Eq. 3) into ``bank``; returns the seconds spent.

    One pass over the dataset's items at ``epoch`` in index order (x_h partner and flip
    of that epoch, x_sl unused): d = pri.scale_distances(x_l, x_h) -> bank.update. The
    model is in eval mode during the pass and restored afterwards; the dataset's epoch
    is restored too. Under torch.distributed with W ranks, rank k computes items
    k, k + W, ...; the distances and a mask are summed over ranks (each row comes from
    exactly one rank, so the sum is exact) and every rank updates its bank from the
    full table: all ranks end with the same bank.
    """
    start = time.perf_counter()
    device = torch.device(device)
    net = unwrap(pri)
    if len(bank) != len(dataset):
        raise ValueError(f"the label bank has {len(bank)} rows but the dataset {len(dataset)} LR items; "
                         "was the bank built for another dataset?")
    rank, world = _world()
    mine = list(range(rank, len(dataset), world))
    N = len(net.scales)
    d_all = torch.zeros(len(dataset), N)
    mask = torch.zeros(len(dataset))
    old_epoch, was_training = dataset.epoch, net.training
    dataset.set_epoch(epoch)
    net.eval()
    try:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                             collate_fn=collate_triplets, num_workers=num_workers)
        for batch in tqdm(loader, desc=f"soft labels (epoch {epoch})", unit="batch",
                          disable=None if progress else True):
            batch = batch.to(device)
            with autocast(device, precision):
                d = net.scale_distances(batch.x_l, batch.x_h)
            index = batch.index.cpu()
            d_all[index] = d.float().cpu()
            mask[index] = 1.0
    finally:
        dataset.set_epoch(old_epoch)
        net.train(was_training)
    if world > 1:
        comm = _comm_device(device)
        d_all, mask = d_all.to(comm), mask.to(comm)
        dist.all_reduce(d_all)
        dist.all_reduce(mask)
        d_all, mask = d_all.cpu(), mask.cpu()
    if not bool((mask == 1).all()):
        raise RuntimeError(f"label refresh at epoch {epoch}: {int((mask != 1).sum())} of {len(mask)} items were "
                           "computed by no rank or by several")
    bank.update(torch.arange(len(dataset)), d_all, epoch)
    return time.perf_counter() - start


@torch.no_grad()
def tracked_scales(pri: nn.Module, dataset: TripletDataset, bank: LabelBank, n: int, *, device,
                   precision: str) -> dict[str, float]:
    """PRI Fig. 3: for ``n`` training images spread over the dataset, the scale P picks now
    (r_p = argmax P(x_l)) and the optimal one of the current soft label (argmax of Eq. 3).

    Returns {"r_p/<image_id>": r_p, "r_opt/<image_id>": r*}, logged every joint epoch.
    """
    net = unwrap(pri)
    if n <= 0 or net.P is None:
        return {}
    device = torch.device(device)
    index = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().long().unique().tolist()
    was_training = net.training
    net.eval()
    try:
        with autocast(device, precision):
            logits = net.predict(group_by_size([dataset[i]["x_l"].to(device) for i in index]))
    finally:
        net.train(was_training)
    scales = net.scales.cpu()
    r_p = scales[logits.float().argmax(1).cpu()]
    r_opt = scales[bank.labels[index].argmax(1)]
    out = {}
    for i, p, o in zip(index, r_p.tolist(), r_opt.tolist()):
        out[f"r_p/{dataset.lr_image_id(i)}"] = p
        out[f"r_opt/{dataset.lr_image_id(i)}"] = o
    return out


# ----------------------------------------------------------------------------- epoch loops
def _check_finite(terms: dict[str, Tensor], epoch: int, step: int, device: torch.device) -> dict[str, float]:
    """The terms' values as floats; NonFiniteLossError naming the first NaN / inf term
    (checked on every rank together, so all ranks stop at the same step)."""
    names = [k for k in terms if k != "L"] + ["L"]  # name a component before the total
    values = torch.stack([terms[k].detach().float() for k in names])
    bad = ~torch.isfinite(values)
    rank, world = _world()
    if world > 1:
        flags = bad.to(_comm_device(device), torch.float32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = flags.cpu() > 0
    values = values.cpu().tolist()
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        v = values[k]
        what = f"is {v}" if not math.isfinite(v) else "is not finite on another rank"
        raise NonFiniteLossError(f"epoch {epoch}, step {step}: {names[k]} {what}")
    return dict(zip(names, values))


def _backward_step(total: Tensor, optimizer, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16: scaled loss, skipped steps on inf gradients
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()


def _lr(optimizer: torch.optim.Optimizer, name: str, position: int) -> float:
    for g in optimizer.param_groups:
        if g.get("name") == name:
            return float(g["lr"])
    groups = optimizer.param_groups
    return float(groups[min(position, len(groups) - 1)]["lr"])


class _Meter:
    """Sample-weighted sums of the epoch's terms; combined over ranks at the end."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, values: dict[str, float], n: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.samples += n

    def running(self, key: str = "L") -> float:
        return self.sums.get(key, float("nan")) / max(self.samples, 1)

    def result(self, device: torch.device, optimizer) -> dict[str, float]:
        keys = sorted(self.sums)
        seconds = time.perf_counter() - self.start
        sums = [self.sums[k] for k in keys]
        samples = float(self.samples)
        if _world()[1] > 1:
            comm = _comm_device(device)
            t = torch.tensor(sums + [samples], dtype=torch.float64, device=comm)
            dist.all_reduce(t)
            s = torch.tensor([seconds], dtype=torch.float64, device=comm)
            dist.all_reduce(s, op=dist.ReduceOp.MAX)
            *sums, samples = t.cpu().tolist()
            seconds = float(s.item())
        out = {k: v / max(samples, 1.0) for k, v in zip(keys, sums)}
        out.update(samples=samples, seconds=seconds, samples_per_s=samples / max(seconds, 1e-9),
                   lr_backbone=_lr(optimizer, "backbone", 0), lr_head=_lr(optimizer, "head", 1))
        return out


def _epoch_setup(loader, epoch: int, device, precision: str, scaler):
    """Device, concrete precision and (fp16) grad scaler of an epoch; tells the loader the epoch."""
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if precision == "fp16" and scaler is None:
        scaler = torch.amp.GradScaler(device.type)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return device, precision, scaler


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
            step = model(batch, mode=phase, generator=generator)
        total, terms = pri_losses(step, batch, labels, loss)  # fp32, outside autocast
        if joint:
            terms["label_entropy"] = label_entropy(labels)
            r_counts += torch.bincount(step.r_index, minlength=len(scales))
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

        def up(groups):  # bicubic to the HR size, back in batch order [B, 3, H, W]
            return ungroup(groups, [F.interpolate(g.images, size=(H, W), mode="bicubic", align_corners=False)
                                    for g in groups], B)

        x = {"h": batch.x_h}  # FFSR's own bicubic step is the identity on these (already the HR size)
        if fit_ffsr:
            x["sl"] = up(batch.x_sl)
        if use_rife:
            x["l"] = up(batch.x_l)
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
            r_l = (_widths(batch.x_l, B, device) / float(hr_width)).clamp(max=1.0)
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


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, numpy and torch (and CUDA) RNG states as tensors / plain values (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [int(version), [int(x) for x in internal], gauss],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- files
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value, where: str) -> None:
    """Only values torch.load(weights_only=True) reads back: tensors, scalars, lists, dicts."""
    if isinstance(value, _PLAIN) or torch.is_tensor(value):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where} is a {type(value).__name__}; only tensors, str, int, float, bool, None, "
                     "lists and dicts of them can be saved")


def _save(obj, path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load(path, what: str):
    """torch.load(weights_only=True) with clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    return torch_load(path, str(path), f"delete it or point at a {what} file that `lrreid train` wrote")


def _state_dict_cpu(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def _fit_problems(saved: dict, own: dict) -> str:
    """'' if the saved state dict fits ``own`` (keys and shapes), else what does not."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    wrong = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in saved and (not torch.is_tensor(saved[k]) or saved[k].shape != v.shape)]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{label} {len(keys)}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


class TrainingState:
    """Everything a checkpoint holds: model (unwrapped state dict), optimiser, label bank,
    the last finished epoch, phase, RNG states (python, numpy, torch, CUDA) and ``extra``.

    The file is a dict of plain tensors / python values: "format", "model_class",
    "model", "optimizer", "bank" (None if none), "epoch", "phase", "rng", "extra".
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, bank: LabelBank | None = None,
                 phase: str = "pretrain", epoch: int = -1, extra: dict | None = None):
        self.model, self.optimizer, self.bank = unwrap(model), optimizer, bank
        self.phase, self.epoch = phase, int(epoch)
        self.extra = dict(extra or {})

    def state_dict(self) -> dict:
        state = {
            "format": STATE_FORMAT,
            "model_class": type(self.model).__name__,
            "model": _state_dict_cpu(self.model),
            "optimizer": self.optimizer.state_dict(),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "epoch": int(self.epoch),
            "phase": str(self.phase),
            "rng": rng_state(),
            "extra": self.extra,
        }
        _check_plain(state["extra"], "TrainingState.extra")
        return state

    def save(self, path) -> None:
        """Write the checkpoint atomically (a temporary file renamed into place)."""
        _save(self.state_dict(), path)

    @staticmethod
    def peek(path) -> dict:
        """The phase, epoch, model class and extra of a checkpoint, without restoring anything."""
        state = TrainingState._read(path)
        return {k: state[k] for k in ("phase", "epoch", "model_class", "extra")}

    @staticmethod
    def _read(path) -> dict:
        state = _load(path, "training state")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not a training state written by TrainingState.save "
                             f"(format {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
        return state

    def load(self, path) -> None:
        """Restore model, optimiser, bank, epoch, extra and RNG from ``path``.

        Everything is checked before anything is changed: a file saved for another
        model (class, keys, shapes), optimiser layout, phase or bank size raises a
        ValueError naming the file, and leaves this state untouched.
        """
        state = self._read(path)
        if state["phase"] != self.phase:
            raise ValueError(f"{path}: saved in phase {state['phase']!r}, but this run is in phase "
                             f"{self.phase!r}; use the checkpoint of this phase (or another storage path)")
        name = type(self.model).__name__
        if state["model_class"] != name:
            raise ValueError(f"{path}: saved for a {state['model_class']}, not this {name}")
        problems = _fit_problems(state["model"], self.model.state_dict())
        if problems:
            raise ValueError(f"{path}: saved for another model ({problems}); check model params "
                             "(backbone, feature_dim, scales...) or use another checkpoint")
        saved_groups = state["optimizer"]["param_groups"]
        own_groups = self.optimizer.param_groups
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in own_groups]:
            raise ValueError(f"{path}: the optimiser state has parameter groups of sizes "
                             f"{[len(g['params']) for g in saved_groups]}, this optimiser "
                             f"{[len(g['params']) for g in own_groups]}: saved for another model")
        if self.bank is not None and state["bank"] is not None:
            shape = tuple(state["bank"]["labels"].shape)
            if shape != tuple(self.bank.labels.shape):
                raise ValueError(f"{path}: label bank of shape {shape} does not fit {tuple(self.bank.labels.shape)} "
                                 "(items x scales): saved for another dataset or scale set")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.bank is not None and state["bank"] is not None:
            self.bank.load_state_dict(state["bank"])
        self.epoch = int(state["epoch"])
        self.extra = dict(state["extra"])
        set_rng_state(state["rng"])


def save_weights_dict(state_dict: dict, path, meta: dict) -> None:
    """Final weights for the DVC out: {"format", "state_dict", "meta"}, written atomically."""
    _check_plain(meta, "meta")
    bad = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"state dict entries {bad[:3]} are not tensors")
    _save({"format": WEIGHTS_FORMAT, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
           "meta": dict(meta)}, path)


def save_weights(model: nn.Module, path, meta: dict) -> None:
    """:func:`save_weights_dict` of the unwrapped model's state dict."""
    save_weights_dict(unwrap(model).state_dict(), path, meta)


def load_weights_file(path) -> tuple[dict, dict]:
    """(state_dict, meta) from :func:`save_weights` (weights_only=True); a TrainingState
    checkpoint also works (its model; meta = phase, epoch, model_class, extra)."""
    obj = _load(path, "weights")
    if isinstance(obj, dict) and obj.get("format") == STATE_FORMAT:
        return obj["model"], {k: obj[k] for k in ("phase", "epoch", "model_class", "extra")}
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise ValueError(f"{path}: not a weights file written by save_weights (expected a dict with "
                         "'state_dict' and 'meta')")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its 'meta' is a {type(meta).__name__}, not a dict")
    return obj["state_dict"], meta
