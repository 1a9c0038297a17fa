"""Benchmark: do the paper preset's recipes train without diverging? A CPU sanity check (issue 15).

For each paper's model, the ``paper`` preset as it is (networks, input and HR sizes,
optimisers, learning rates, loss weights), on ``--identities`` identities of the working
tree's canonical table (data/canonical.parquet, its images brought to the preset's HR
size, or ``--hr``, by the degrade stage's own code, MLR protocol), with a P x K = ``--P`` x ``--K``
batch (the presets' 16 and 32 would take hours here) for ``--epochs`` epochs of every
training step: PRI pretraining and joint training (Adam 0.01 / 0.1, x0.1 after T1);
FFSR + RIFE steps 1-3 (SGD 0.01 / 0.01 / 0.001, momentum 0.9). The networks start from
random weights (no ImageNet file is downloaded). One JSON line per optimiser step
(its loss), then one per training step: mean loss of the first and the last third of
its steps, whether every loss was finite, seconds per step.

    PYTHONPATH=. .venv/bin/python bench/bench_paper_preset.py [--identities 4 --P 2 --K 2 --epochs 3 --hr 64x32]

At the preset's 256x128 one PRI step of 2 x 2 items takes minutes and ~18 GB here (G, an RDN
16 / 8 / 64 on 128x64 LR images): ``--hr 64x32`` keeps every network, input size and rate
of the preset and only shrinks the images G and FFSR work on.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import pyarrow.compute as pc
import torch

from bench.bench_learning import override
from components.config import load_params
from components.data import table as T
from components.data.dataset import make_train_loader
from components.data.protocols import degrade
from components.data.splits import split_identities
from components.models.ffsr_rife import FFSRRIFE
from components.models.pri import build_pri
from components.optim import make_optimizer, set_epoch_lr, step_spec
from components.soft_label import LabelBank
from components.optim import build_optimizer
from components.training import (FFSR_RIFE_STEPS, NonFiniteLossError, refresh_label_bank, run_ffsr_rife_epoch,
                                 run_pri_epoch)


class StepLosses:
    """Each optimiser step's loss, from the epoch loops' running means (equal batch sizes)."""

    def __init__(self, model: str, step: str):
        self.model, self.step, self.losses, self.start = model, step, [], time.perf_counter()
        self._previous = 0.0

    def __call__(self, done: int, n_steps: int, running: float) -> None:
        loss = done * running - self._previous
        self._previous = done * running if done < n_steps else 0.0
        self.losses.append(loss)
        print(json.dumps({"model": self.model, "step": self.step, "i": len(self.losses), "L": round(loss, 5)}),
              flush=True)

    def summary(self, diverged: str = "") -> dict:
        n, third = len(self.losses), max(1, len(self.losses) // 3)
        return {"model": self.model, "step": self.step, "steps": n, "diverged": diverged,
                "first_third": float(f"{sum(self.losses[:third]) / third:.4g}"),
                "last_third": float(f"{sum(self.losses[-third:]) / third:.4g}"),
                "finite": all(math.isfinite(v) for v in self.losses),
                "seconds_per_step": round((time.perf_counter() - self.start) / max(n, 1), 2)}


def guarded(log: StepLosses, train) -> dict:
    """Run ``train``; its summary, with the NaN / inf stop's message if the loss diverged."""
    try:
        train()
    except NonFiniteLossError as exc:
        return log.summary(diverged=str(exc))
    return log.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canonical", default="data/canonical.parquet")
    ap.add_argument("--identities", type=int, default=6)
    ap.add_argument("--P", type=int, default=2)
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4, help="epochs of every training step")
    ap.add_argument("--models", nargs="+", default=["pri", "ffsr_rife"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides on top of the preset")
    ap.add_argument("--hr", default=None, metavar="HxW",
                    help="HR size instead of the preset's 256x128 (G's and FFSR's cost grows with it; P, F and "
                         "RIFE resize to the preset's 384x128 inputs either way)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = load_params("params.yaml", preset="paper")
    if args.set:
        params = override(params.model_dump(mode="json"), args.set, "paper preset + --set")
    if args.hr:
        h, w = (int(v) for v in args.hr.split("x"))
        params = params.model_copy(update={"degrade": params.degrade.model_copy(update={"hr_height": h,
                                                                                         "hr_width": w})})
    canonical = T.read_table(args.canonical, T.CANONICAL_SCHEMA)
    ids = sorted(set(canonical[T.PERSON_ID].to_pylist()))[: args.identities + 1]
    canonical = canonical.filter(pc.is_in(canonical[T.PERSON_ID], value_set=__import__("pyarrow").array(ids)))
    table = degrade(canonical, params.degrade, progress=False).table  # HR at the preset's 256 x 128
    split = split_identities(table, n_test=1, repeats=1, seed=0)
    loader = make_train_loader(split.table, split.pairs, scales=params.model.scales, P=args.P, K=args.K,
                               flip_p=0.5, seed=0)
    n_cls, summaries = loader.dataset.num_classes, []
    torch.manual_seed(0)
    if "pri" in args.models:
        m, t = params.model, params.train
        pri = build_pri(m, n_cls, with_predictor=False)
        opt, log = build_optimizer(pri, t, "pretrain"), StepLosses("pri", "pretrain")
        summaries.append(guarded(log, lambda: [
            run_pri_epoch(pri, loader, opt, phase="pretrain", epoch=epoch, loss=params.loss, bank=None,
                          naive_labels=False, device="cpu", precision="fp32", progress=log,
                          generator=torch.Generator().manual_seed(epoch)) for epoch in range(args.epochs)]))
        if not summaries[-1]["diverged"]:
            joint = build_pri(m, n_cls, with_predictor=True)
            joint.load_state_dict(pri.state_dict(), strict=False)
            opt, log = build_optimizer(joint, t, "joint"), StepLosses("pri", "joint")
            bank = LabelBank(len(loader.dataset), len(m.scales), m.omega, kind=m.label, gamma=m.gamma, seed=0)

            def joint_epochs():
                for epoch in range(args.epochs):
                    if bank.should_refresh(epoch):
                        refresh_label_bank(joint, loader.dataset, bank, epoch, device="cpu", precision="fp32")
                    run_pri_epoch(joint, loader, opt, phase="joint", epoch=epoch, loss=params.loss, bank=bank,
                                  naive_labels=False, device="cpu", precision="fp32", progress=log)

            summaries.append(guarded(log, joint_epochs))
    if "ffsr_rife" in args.models:
        p = params.for_variant("ffsr_rife")
        model = FFSRRIFE(p.model, n_cls)
        for step in FFSR_RIFE_STEPS:
            spec = step_spec(getattr(p.ffsr_rife, step))
            opt = make_optimizer(model if step == "joint" else getattr(model, step), spec)
            log = StepLosses("ffsr_rife", step)

            def epochs():
                for epoch in range(args.epochs):
                    set_epoch_lr(opt, spec, epoch)
                    run_ffsr_rife_epoch(model.ffsr, model.rife, loader, opt, step=step, epoch=epoch, loss=p.loss,
                                        device="cpu", precision="fp32", hr_width=p.degrade.hr_width,
                                        sigma=p.model.ffsr.sigma, progress=log)

            summaries.append(guarded(log, epochs))
            if summaries[-1]["diverged"]:
                break
    for s in summaries:
        print(json.dumps({"summary": s}), flush=True)


if __name__ == "__main__":
    main()
