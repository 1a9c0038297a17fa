"""Optimisers and step-decay schedules from params (components/optim.py), and the papers' recipes in the preset."""

from __future__ import annotations

import pytest
import torch

from components.config import StepParams, TrainParams, load_params
from components.models.ffsr import FFSR
from components.optim import lr_factor, make_optimizer, pri_spec, set_epoch_lr, step_spec


def test_schedule_steps_at_the_configured_epochs():
    spec = step_spec(StepParams(epochs=6, optimizer="sgd", lr=0.01, milestones=[2, 4], lr_decay=0.1))
    opt = make_optimizer(FFSR(channels=4), spec)
    rates = []
    for epoch in range(6):
        set_epoch_lr(opt, spec, epoch)
        rates.append([g["lr"] for g in opt.param_groups])
    expected = [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]
    for got, want in zip(rates, expected):
        assert got == pytest.approx([want, want])
    set_epoch_lr(opt, spec, 1)  # a resumed run gets an epoch's rate from the epoch alone
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert lr_factor(step_spec(StepParams(milestones=[])), 100) == 1.0


def test_optimizer_kind_and_settings_come_from_params():
    model = FFSR(channels=4)
    sgd = make_optimizer(model, step_spec(StepParams(optimizer="sgd", lr=0.01, momentum=0.8, weight_decay=5e-4)))
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["momentum"] == 0.8 and g["weight_decay"] == 5e-4 for g in sgd.param_groups)
    adam = make_optimizer(model, pri_spec(TrainParams(lr_backbone=0.01, lr_head=0.1, lr_decay=0.1), "joint"))
    assert isinstance(adam, torch.optim.Adam)
    assert [g["lr"] for g in adam.param_groups] == pytest.approx([0.001, 0.01])  # PRI: x lr_decay after T1
    with pytest.raises(ValueError, match="milestones"):
        StepParams(milestones=[3, 2])


def test_paper_preset_carries_both_papers_recipes():
    p = load_params("params.yaml", preset="paper")
    t = p.train
    assert (t.optimizer, t.lr_backbone, t.lr_head, t.lr_decay) == ("adam", 0.01, 0.1, 0.1)  # PRI Sec. 4.1
    assert (t.pretrain_epochs, t.epochs, t.identities_per_batch * t.images_per_identity) == (20, 60, 16)
    s = p.ffsr_rife  # FFSR paper Sec. 5.2
    for step, lr in (("ffsr", 0.01), ("rife", 0.01), ("joint", 0.001)):
        cfg = getattr(s, step)
        assert (cfg.optimizer, cfg.lr, cfg.epochs, cfg.milestones, cfg.lr_decay) == ("sgd", lr, 60, [30], 0.1)
    ffsr = p.for_variant("ffsr_rife")
    assert ffsr.batch_identities()[0] * ffsr.train.images_per_identity == 32
    assert p.batch_identities()[0] * t.images_per_identity == 16  # PRI keeps its own batch


def test_epochs_map_to_their_training_step():
    """The Ray worker's plan: which step (and optimiser) an epoch of a phase belongs to, and its place in it;
    a resumed run restores the optimiser of its checkpoint's step and starts the next step's fresh."""
    from components.config import validate_params
    from components.training.trainers import epoch_step, phase_epochs, step_optim

    p = validate_params({"train": {"model": "ffsr_rife", "pretrain_epochs": 9, "epochs": 9},
                         "ffsr_rife": {"ffsr": {"epochs": 2}, "rife": {"epochs": 3, "optimizer": "adam", "lr": 0.002},
                                       "joint": {"epochs": 4}}})
    assert phase_epochs(p, "pretrain") == 5 and phase_epochs(p, "joint") == 4  # train.*_epochs are PRI's
    assert [epoch_step(p, "pretrain", e) for e in range(5)] == [("ffsr", 0), ("ffsr", 1), ("rife", 0), ("rife", 1),
                                                                ("rife", 2)]
    assert epoch_step(p, "joint", 3) == ("joint", 3)
    assert step_optim(p, "rife").kind == "adam" and step_optim(p, "rife").lr_head == 0.002
    assert step_optim(p, "joint").kind == "sgd"
    pri = validate_params({"train": {"pretrain_epochs": 3, "epochs": 2, "lr_backbone": 0.01, "lr_decay": 0.5}})
    assert phase_epochs(pri, "pretrain") == 3 and epoch_step(pri, "pretrain", 2) == ("pretrain", 2)
    assert step_optim(pri, "joint").lr_backbone == 0.005
