"""Optimisers and step-decay learning-rate schedules from params, one per training step.

PRI (Sec. 4.1): Adam, backbones at lr_backbone and the added layers at lr_head, both
times lr_decay after T1 (:func:`pri_spec`). FFSR + RIFE (Sec. 5.2): SGD, one rate per
step (0.01, 0.01, 0.001), divided by 10 after 30 of each step's 60 epochs
(:func:`step_spec` of params' ``ffsr_rife.<step>``). :func:`make_optimizer` builds
either from an :class:`OptimSpec`; :func:`set_epoch_lr` sets the rates of an epoch
from its position in the step, so a resumed run gets the same rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from components.config import StepParams, TrainParams
from components.models import unwrap

PHASES = ("pretrain", "joint")


@dataclass(frozen=True)
class OptimSpec:
    """One step's optimiser: kind, the two groups' rates, and when they drop (epochs of the step)."""

    kind: str  # adam | sgd
    lr_backbone: float
    lr_head: float
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1


def pri_spec(train: TrainParams, phase: str) -> OptimSpec:
    """PRI's optimiser of a phase: train.* rates, times lr_decay in the joint phase (after T1)."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: use one of {', '.join(PHASES)}")
    decay = 1.0 if phase == "pretrain" else train.lr_decay
    return OptimSpec(train.optimizer, train.lr_backbone * decay, train.lr_head * decay, train.momentum,
                     train.weight_decay)


def step_spec(step: StepParams) -> OptimSpec:
    """An FFSR + RIFE step's optimiser (ffsr_rife.<step>): one rate for every parameter."""
    return OptimSpec(step.optimizer, step.lr, step.lr, step.momentum, step.weight_decay, tuple(step.milestones),
                     step.lr_decay)


def _trunks(model: nn.Module):
    """The trunks that the models inside ``model`` name (their ``trunks()``: P's and F's backbones,
    RIFE's stem and DSB streams)."""
    for m in model.modules():
        if hasattr(m, "trunks"):
            yield from m.trunks()


def param_groups(model: nn.Module, lr_backbone: float, lr_head: float) -> list[dict]:
    """Two groups: torchvision trunks at lr_backbone, everything else (1x1 convs, FCs,
    classifiers, G, FFSR...) at lr_head (PRI Sec. 4.1). Every parameter is in exactly one.
    Each group keeps its rate before any decay as ``base_lr``."""
    model = unwrap(model)
    trunk = {id(p) for t in _trunks(model) for p in t.parameters()}
    backbone, head = [], []
    for p in model.parameters():  # de-duplicated: shared parameters appear once
        (backbone if id(p) in trunk else head).append(p)
    return [{"params": backbone, "lr": float(lr_backbone), "base_lr": float(lr_backbone), "name": "backbone"},
            {"params": head, "lr": float(lr_head), "base_lr": float(lr_head), "name": "head"}]


def make_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.Optimizer:
    """Adam (0.9, 0.999) or SGD with momentum on :func:`param_groups` of ``model``."""
    groups = param_groups(model, spec.lr_backbone, spec.lr_head)
    if spec.kind == "adam":
        return torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=spec.weight_decay)
    if spec.kind == "sgd":
        return torch.optim.SGD(groups, momentum=spec.momentum, weight_decay=spec.weight_decay)
    raise ValueError(f"optimizer {spec.kind!r}: use adam or sgd")


def build_optimizer(model: nn.Module, train: TrainParams, phase: str) -> torch.optim.Optimizer:
    """PRI's optimiser of ``phase`` (:func:`pri_spec`)."""
    return make_optimizer(model, pri_spec(train, phase))


def lr_factor(spec: OptimSpec, epoch_in_step: int) -> float:
    """Step decay: lr_decay to the power of the milestones reached by this epoch of the step."""
    return spec.lr_decay ** sum(epoch_in_step >= m for m in spec.milestones)


def set_epoch_lr(optimizer: torch.optim.Optimizer, spec: OptimSpec, epoch_in_step: int) -> None:
    """Set every group's rate for this epoch of the step: base_lr x :func:`lr_factor`."""
    factor = lr_factor(spec, epoch_in_step)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
