"""Trainers: one phase of one model family's training on one process, epoch by epoch.

A trainer owns what a phase needs between epochs: the model (built by the one factory,
wrapped for data parallelism by the caller's ``wrap``), the schedule (which training
step an epoch belongs to, that step's optimiser and rates: components/optim.py), PRI's
label bank and its refresh, the tracked scales of PRI Fig. 3, and the checkpoint
state. A driver (the Ray Train worker, a bench) only loops::

    trainer = make_trainer(params, phase, loader, device=device)
    trainer.resume(path)                                   # optional: a checkpoint
    choice = trainer.choose_precision("auto")              # bf16 only where native, sound and faster
    for epoch in range(trainer.next_epoch, trainer.epochs):
        metrics = trainer.train_epoch(epoch, choice.precision)
        metrics.update(trainer.validate(validation))       # optional
        trainer.end_epoch(epoch, metrics)
        trainer.state.save(path)

PRI (:class:`PRITrainer`): one step per phase, pretrain (Sec. 3.5) and joint (Eq. 1-6),
Adam with two groups. FFSR + RIFE (:class:`FFSRRIFETrainer`, FFSR paper Sec. 5.2):
pretrain = step 1 "ffsr" then step 2 "rife", joint = step 3; each step a fresh optimiser
over what its loss trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from components.config import Params
from components.models import build_model, unwrap
from components.optim import OptimSpec, make_optimizer, pri_spec, set_epoch_lr, step_spec
from components.precision import PrecisionChoice, bf16_fault, choose_precision, layer_inputs, step_rate
from components.soft_label import LabelBank
from components.training.ffsr_rife import run_ffsr_rife_epoch
from components.training.labels import refresh_label_bank, tracked_scales
from components.training.pri import run_pri_epoch
from components.training.state import TrainingState


def epoch_step(params: Params, phase: str, epoch: int) -> tuple[str, int]:
    """The training step an epoch of ``phase`` belongs to, and the epoch's position in it.

    PRI: the step is the phase. FFSR + RIFE (Sec. 5.2): pretrain = step 1 "ffsr"
    (ffsr_rife.ffsr.epochs) then step 2 "rife" (ffsr_rife.rife.epochs); joint = step 3 "joint".
    """
    if params.train.model == "pri" or phase == "joint":
        return phase, epoch
    n_ffsr = params.ffsr_rife.ffsr.epochs
    return ("ffsr", epoch) if epoch < n_ffsr else ("rife", epoch - n_ffsr)


def step_optim(params: Params, step: str) -> OptimSpec:
    """The optimiser and schedule of a training step."""
    if params.train.model == "pri":
        return pri_spec(params.train, step)
    return step_spec(getattr(params.ffsr_rife, step))


def phase_epochs(params: Params, phase: str) -> int:
    """How many epochs ``phase`` has (FFSR + RIFE's pretraining: steps 1 and 2 together)."""
    t, s = params.train, params.ffsr_rife
    if t.model == "ffsr_rife":
        return s.joint.epochs if phase == "joint" else s.ffsr.epochs + s.rife.epochs
    return t.epochs if phase == "joint" else t.pretrain_epochs


class Trainer:
    """What both families share: model, schedule, optimiser of the current step, state, resume."""

    def __init__(self, params: Params, phase: str, loader, *, device, rank: int = 0,
                 init_state: dict | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None):
        self.params, self.phase, self.loader = params, phase, loader
        self.device, self.rank = torch.device(device), rank
        model = build_model(params.train.model, params.model, loader.dataset.num_classes,
                            with_predictor=phase == "joint")
        if init_state is not None:  # joint training starts from the pretrained weights
            missing, unexpected = model.load_state_dict(init_state, strict=False)
            bad = [k for k in missing if not k.startswith("P.")] + list(unexpected)
            if bad:
                raise ValueError(f"pretrained weights do not fit the model: {bad[:5]}")
        self.model = self._wrap(model, wrap or (lambda m: m))
        self.epochs = phase_epochs(params, phase)
        self.step = epoch_step(params, phase, 0)[0]
        self.state = TrainingState(unwrap(self.model), self._optimizer(self.step), self._bank(), phase=phase)
        self.generator = torch.Generator().manual_seed(params.train.seed + rank)  # pretrain: x_l's random scale
        self.precision = "fp32"  # the last epoch's (train_epoch sets it)

    # ---------------------------------------------------------------- what a family defines
    def _wrap(self, model: nn.Module, wrap) -> nn.Module:
        return wrap(model.to(self.device))

    def _trained(self, step: str) -> nn.Module:
        """The part a step's loss trains (its optimiser's parameters)."""
        return unwrap(self.model)

    def _bank(self) -> LabelBank | None:
        return None

    def _run_epoch(self, epoch: int, precision: str) -> dict[str, float]:
        raise NotImplementedError

    def _sample_forward(self, net: nn.Module, batch) -> object:
        """One training forward of ``net`` (the model, or a copy) on a batch: the bf16 check's layer
        shapes and the timed step."""
        raise NotImplementedError

    def validate(self, validation) -> dict[str, float]:
        """Rank-1 and mAP (%) on a validation set (components/evaluation.py)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the loop's calls
    @property
    def next_epoch(self) -> int:
        return self.state.epoch + 1

    @property
    def history(self) -> list[dict]:
        """Every finished epoch's numeric metrics (kept in the checkpoint for MLflow's backfill)."""
        return list(self.state.extra.get("history", []))

    def _optimizer(self, step: str) -> torch.optim.Optimizer:
        return make_optimizer(self._trained(step), step_optim(self.params, step))

    def choose_precision(self, requested: str) -> PrecisionChoice:
        """train.precision on this trainer's device, and why (components/precision.py): on a CPU,
        bf16 only where oneDNN runs it natively, it matches fp32 on the model's own layers at one
        real batch's shapes, and a timed forward + backward of that batch is faster than in fp32
        (raises PrecisionError where bf16 was asked for and is broken). The batch is drawn only if
        a check runs."""
        net = unwrap(self.model)
        batch = []

        def sample():
            if not batch:
                batch.append(next(iter(self.loader)).to(self.device))
            return batch[0]

        def fault():
            return bf16_fault(layer_inputs(net, lambda: self._sample_forward(net, sample())), self.device)

        def rate(precision: str) -> float:
            return step_rate(net, lambda m: self._sample_forward(m, sample()), len(sample()), self.device, precision)

        return choose_precision(self.device, requested, fault=fault, rate=rate)

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint: its step's optimiser, then model, optimiser, bank, RNG, generator."""
        step = epoch_step(self.params, self.phase, max(TrainingState.peek(path)["epoch"], 0))[0]
        if step != self.step:
            self.step, self.state.optimizer = step, self._optimizer(step)
        self.state.load(path)
        if "generator" in self.state.extra:
            self.generator.set_state(self.state.extra["generator"])

    def train_epoch(self, epoch: int, precision: str) -> dict[str, float]:
        """One epoch at its step's rates (a new step starts its own optimiser); returns its metrics."""
        step, epoch_in_step = epoch_step(self.params, self.phase, epoch)
        if step != self.step:
            self.step, self.state.optimizer = step, self._optimizer(step)
        set_epoch_lr(self.state.optimizer, step_optim(self.params, step), epoch_in_step)
        self.precision = precision
        return self._run_epoch(epoch, precision)

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        """Record a finished epoch in the state (the next checkpoint holds it)."""
        self.state.epoch = epoch
        self.state.extra["generator"] = self.generator.get_state()
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.state.extra["history"] = self.history + [numeric]


class PRITrainer(Trainer):
    """PRI: pretraining or joint training, with the label bank refreshed every omega epochs
    (``naive_labels``: recomputed every step instead)."""

    def __init__(self, params: Params, phase: str, loader, *, naive_labels: bool = False, **kw):
        self.naive_labels = naive_labels
        super().__init__(params, phase, loader, **kw)

    def _bank(self) -> LabelBank | None:
        if self.phase != "joint":
            return None
        m, t = self.params.model, self.params.train
        return LabelBank(len(self.loader.dataset), len(m.scales), m.omega, kind=m.label, gamma=m.gamma, seed=t.seed)

    def _run_epoch(self, epoch: int, precision: str) -> dict[str, float]:
        bank, extra = self.state.bank, {}
        if bank is not None and not self.naive_labels and bank.should_refresh(epoch):
            extra["refresh_seconds"] = refresh_label_bank(unwrap(self.model), self.loader.dataset, bank, epoch,
                                                          device=self.device, precision=precision)
        metrics = run_pri_epoch(self.model, self.loader, self.state.optimizer, phase=self.phase, epoch=epoch,
                                loss=self.params.loss, bank=bank, naive_labels=self.naive_labels,
                                device=self.device, precision=precision, generator=self.generator)
        return {**metrics, **extra}

    def _sample_forward(self, net: nn.Module, batch) -> object:
        return net(batch, mode=self.phase, generator=torch.Generator().manual_seed(0))

    def validate(self, validation) -> dict[str, float]:
        from components.evaluation import validate

        return validate(unwrap(self.model), validation, hr_height=self.params.degrade.hr_height, device=self.device)

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        """Also the label bank's entropy and PRI Fig. 3's tracked scales (joint training)."""
        bank = self.state.bank
        if bank is not None:
            metrics["label_bank_entropy"] = bank.entropy()  # L_p of a P that reproduces every label
            metrics["L_p_marginal"] = bank.marginal_cross_entropy()  # L_p of a P that learned the frequencies only
            # what a predictor that learned nothing scores: L_p of the uniform P, the flattest labels
            metrics["L_p_uniform"] = metrics["label_bank_entropy_max"] = math.log(len(self.params.model.scales))
            metrics.update(tracked_scales(self.model, self.loader.dataset, bank, self.params.train.track_images,
                                          device=self.device, precision=self.precision))
        super().end_epoch(epoch, metrics)


class FFSRRIFETrainer(Trainer):
    """FFSR + RIFE: FFSR and RIFE are called separately, so each gets its own ``wrap`` (DDP)."""

    def _wrap(self, model: nn.Module, wrap) -> nn.Module:
        model = model.to(self.device)
        self.ffsr, self.rife = wrap(model.ffsr), wrap(model.rife)
        return model

    def _trained(self, step: str) -> nn.Module:  # steps 1-2 train one part each, step 3 both
        return unwrap(self.model) if step == "joint" else getattr(unwrap(self.model), step)

    def _run_epoch(self, epoch: int, precision: str) -> dict[str, float]:
        p = self.params
        return run_ffsr_rife_epoch(self.ffsr, self.rife, self.loader, self.state.optimizer, step=self.step,
                                   epoch=epoch, loss=p.loss, device=self.device, precision=precision,
                                   hr_width=p.degrade.hr_width, sigma=p.model.ffsr.sigma)

    def _sample_forward(self, net: nn.Module, batch) -> object:
        x = torch.cat([batch.x_h, batch.x_h])  # FFSR and RIFE see 2B HR-size images
        return net.ffsr(x, tuple(batch.x_h.shape[-2:])), net.rife(x)

    def validate(self, validation) -> dict[str, float]:
        from components.evaluation import validate_ffsr_rife

        d = self.params.degrade
        return validate_ffsr_rife(unwrap(self.model), validation, device=self.device,
                                  hr_size=(d.hr_height, d.hr_width))


def make_trainer(params: Params, phase: str, loader, **kw) -> Trainer:
    """The trainer of train.model (``naive_labels`` only for PRI)."""
    if params.train.model == "pri":
        return PRITrainer(params, phase, loader, **kw)
    kw.pop("naive_labels", None)
    return FFSRRIFETrainer(params, phase, loader, **kw)
