"""Benchmark: training samples/s of the default model in each precision, and the bf16 check (issue 12).

On the default params and data/split, in this process with ``train.cpus_per_worker`` torch threads
(as one Ray Train worker has):

- ``check``: the start-up check a Train worker runs before bf16 on a CPU
  (``components.precision.bf16_fault`` on the model's own layers at one real batch's shapes):
  its time, and with ``--check-repeats`` calls per layer, every layer whose bf16 forward or
  backward is not finite or is off fp32, with the number of failing calls;
- ``speed``: samples/s of ``--steps`` pretraining steps and of ``--steps`` joint steps in fp32 and
  in bf16 (after two warm-up steps each), from the same initial weights;
- what ``train.precision: auto`` chooses here (after the check).

    PYTHONPATH=. .venv/bin/python bench/bench_precision.py [--steps 20] [--check-repeats 10]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from components.config import load_params
from components.models.pri import build_pri
from components.precision import bf16_fault, checked_precision, guard_onednn, layer_inputs
from components.soft_label import LabelBank
from components.optim import build_optimizer
from components.training import run_pri_epoch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--split", default="data/split")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--check-repeats", type=int, default=10)
    args = ap.parse_args()
    print(guard_onednn() or "oneDNN not capped (no AMX, or ONEDNN_MAX_CPU_ISA set)")
    from bench.bench_train import loader_for, training_data

    params = load_params(args.params)
    torch.set_num_threads(int(params.train.cpus_per_worker))
    table, pairs = training_data(__import__("pathlib").Path(args.split), 0)
    loader = loader_for(params, table, pairs)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, ISA {torch.backends.cpu.get_cpu_capability()}")
    batch = next(iter(loader))
    for phase in ("pretrain", "joint"):
        torch.manual_seed(0)
        model = build_pri(params.model, loader.dataset.num_classes, with_predictor=phase == "joint")
        layers = layer_inputs(model, lambda: model(batch, mode=phase))
        start = time.perf_counter()
        fault = bf16_fault(layers, CPU)
        seconds = time.perf_counter() - start
        print(f"\n{phase}: check of {len(layers)} (layer, shape) pairs x 3 calls: {seconds:.1f} s -> {fault or 'sound'}")
        for row in faults(model, batch, phase, args.check_repeats):
            print("  fault:", row)
        auto = checked_precision(CPU, "auto", lambda: bf16_fault(layers, CPU))
        print(f"  auto chooses: {auto}")
    print("\n| phase | precision | samples/s |\n|---|---|---:|")
    for phase in ("pretrain", "joint"):
        for precision in ("fp32", "bf16"):
            print(f"| {phase} | {precision} | {speed(params, loader, phase, precision, args.steps):.1f} |", flush=True)


if __name__ == "__main__":
    main()
