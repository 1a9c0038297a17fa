"""Benchmark: forward+backward ms/image of P, G, F and RIFE, and the backbone's achieved GFLOP/s.

For the CPU default (params.yaml) and the `paper` preset: each model runs a
training step (forward, sum of outputs, backward) on a batch, in fp32 or under
bf16 autocast (``--precision``); the FLOPs are counted with torch's FlopCounterMode
and divided by the measured time, and compared with this machine's matmul GFLOP/s
in the same dtype, measured in the same run.

    .venv/bin/python bench/bench_models.py [--presets cpu paper] [--precision fp32 bf16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from components.config import load_params
from components.models.recovery import build_recovery
from components.models.reid import build_predictor, build_reid
from components.models.rife import build_rife


def timed_step(fn, repeats: int) -> float:
    """Median seconds of fn() (a forward + backward) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(sizes=(1024, 2048, 4096), repeats: int = 5, dtype=torch.float32) -> float:
    """The machine's matmul GFLOP/s in ``dtype``: the best of several sizes and runs."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def training_step(model, x, call, bf16: bool = False):
    def fn():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = call(model, x)
        out.float().sum().backward()
    return fn


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_preset(name: str, batch: int, repeats: int, bf16: bool = False) -> list[dict]:
    cfg = load_params("params.yaml", preset=None if name == "cpu" else name)
    m, d = cfg.model, cfg.degrade
    hr = (d.hr_height, d.hr_width)
    lr = (hr[0] // 4, hr[1] // 4)
    inp = (m.input_height, m.input_width)
    torch.manual_seed(0)
    rows = []
    cases = [
        ("P (predictor)", build_predictor(m), torch.rand(batch, 3, *lr), lambda net, x: net(x)),
        ("G (RDN + meta-upscale, x4)", build_recovery(m.sr), torch.rand(batch, 3, *lr), lambda net, x: net(x, 4.0)),
        ("F (re-id)", build_reid(m, num_classes=100), torch.rand(batch, 3, *inp), lambda net, x: net(x).feature),
        ("RIFE", build_rife(m, num_classes=100), torch.rand(batch, 3, *inp), lambda net, x: net(x).feature),
    ]
    for label, net, x, call in cases:
        net.train()
        fn = training_step(net, x, call, bf16)
        t = timed_step(fn, repeats)
        flops = count_flops(fn)
        rows.append(dict(preset=name, precision="bf16" if bf16 else "fp32", model=label, batch=batch, input="x".join(map(str, x.shape[-2:])),
                         ms_per_image=1000 * t / batch, gflops=flops / t / 1e9, gflop_per_image=flops / batch / 1e9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    peaks = {p: matmul_gflops(dtype=torch.bfloat16 if p == "bf16" else torch.float32) for p in args.precision}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; matmul (best of 1024^2..4096^2): "
          + ", ".join(f"{p} {v:.1f} GFLOP/s" for p, v in peaks.items()) + "\n")
    print("| preset | precision | model | batch | input | fwd+bwd ms/image | GFLOP/image | achieved GFLOP/s | "
          "of matmul peak |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|")
    for preset in args.presets:
        batch = 8 if preset == "cpu" else 2
        for precision in args.precision:
            for r in bench_preset(preset, batch, args.repeats, bf16=precision == "bf16"):
                print(f"| {r['preset']} | {precision} | {r['model']} | {r['batch']} | {r['input']} | "
                      f"{r['ms_per_image']:.1f} | {r['gflop_per_image']:.2f} | {r['gflops']:.1f} | "
                      f"{100 * r['gflops'] / peaks[precision]:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
