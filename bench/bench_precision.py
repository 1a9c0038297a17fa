"""Benchmark: training samples/s of the default model in each precision, and what `auto` chooses.

On the default params and data/split, in this process with ``train.cpus_per_worker`` torch threads
("auto": all the CPUs this process may use, as one Ray Train worker gets):

- ``decision``: what ``train.precision: auto`` chooses for each phase (the trainer's
  ``choose_precision``: the CPU-feature rule, the bf16 check on the model's layers, the timed
  step of each precision), why, and how long deciding took;
- ``check``: with ``--check-repeats`` calls per layer, every layer whose bf16 forward or backward
  is not finite or is off fp32, with the number of failing calls (skipped with 0);
- ``speed``: samples/s of ``--steps`` pretraining steps and of ``--steps`` joint steps in fp32 and
  in bf16 (after two warm-up steps each), from the same initial weights.

    PYTHONPATH=. .venv/bin/python bench/bench_precision.py [--steps 20] [--check-repeats 10] [--threads N]

On another CPU class: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` (an AVX2-only CPU, close).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from components.config import load_params
from components.models.pri import build_pri
from components.optim import build_optimizer
from components.precision import bf16_emulated, bf16_fault, cpu_flags, guard_onednn, layer_inputs
from components.soft_label import LabelBank
from components.training import run_pri_epoch
from components.training.trainers import make_trainer

CPU = torch.device("cpu")


def batches(loader, n: int) -> list:
    out = []
    while len(out) < n:
        out += [b for _, b in zip(range(n - len(out)), loader)]
    return out


def faults(model, batch, phase: str, repeats: int) -> list[str]:
    """Every layer whose bf16 check fails in ``repeats`` calls, with its failing count."""
    rows = []
    for module, shape in layer_inputs(model, lambda: model(batch, mode=phase)):
        bad = sum(bf16_fault([(module, shape)], CPU, repeats=1) is not None for _ in range(repeats))
        if bad:
            rows.append(f"{module} on {list(shape)}: {bad} of {repeats} calls")
    return rows


def speed(params, loader, phase: str, precision: str, steps: int) -> float:
    m, t = params.model, params.train
    torch.manual_seed(0)
    model = build_pri(m, loader.dataset.num_classes, with_predictor=phase == "joint")
    opt = build_optimizer(model, t, phase)
    bank = LabelBank(len(loader.dataset), len(m.scales), m.omega, kind=m.label, gamma=m.gamma, seed=t.seed)
    data = batches(loader, steps + 2)
    kw = dict(phase=phase, loss=params.loss, bank=bank, naive_labels=False, device=CPU, precision=precision,
              generator=torch.Generator().manual_seed(0))
    run_pri_epoch(model, data[:2], opt, epoch=0, **kw)  # warm-up: first kernel calls, allocator growth
    start = time.perf_counter()
    out = run_pri_epoch(model, data[2:], opt, epoch=1, **kw)
    return out["samples"] / (time.perf_counter() - start)


def cpu_line() -> str:
    flags = cpu_flags()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "?") if os.path.exists("/proc/cpuinfo") else "?"
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx_ne_convert") if f in flags]
    return (f"{model}; flags {' '.join(isa)}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}, "
            f"ATen {torch.backends.cpu.get_cpu_capability()}; {torch.get_num_threads()} threads; "
            f"rule: {bf16_emulated() or 'bf16 native'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--split", default="data/split")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--check-repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: train.cpus_per_worker)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()
    print(guard_onednn() or "oneDNN not capped (no AMX, or ONEDNN_MAX_CPU_ISA set)")
    from bench.bench_train import loader_for, training_data

    params = load_params(args.params)
    torch.set_num_threads(args.threads or params.train.local_cpus())
    table, pairs = training_data(__import__("pathlib").Path(args.split), 0)
    loader = loader_for(params, table, pairs)
    print(f"machine: {cpu_line()}, torch {torch.__version__}")
    batch = next(iter(loader))
    for phase in ("pretrain", "joint"):
        trainer = make_trainer(params, phase, loader, device=CPU)
        start = time.perf_counter()
        choice = trainer.choose_precision("auto")
        print(f"\n{phase}: auto chooses {choice} in {time.perf_counter() - start:.1f} s")
        if args.check_repeats:
            for row in faults(trainer.model, batch, phase, args.check_repeats):
                print("  fault:", row)
    print("\n| phase | precision | samples/s |\n|---|---|---:|")
    for phase in ("pretrain", "joint"):
        for precision in args.precisions:
            print(f"| {phase} | {precision} | {speed(params, loader, phase, precision, args.steps):.1f} |", flush=True)


if __name__ == "__main__":
    main()
