"""Benchmark: G's meta-upscale, per-phase (components) against naive per-pixel Meta-SR.

The naive layer below is the straightforward Meta-SR implementation: the weight MLP
runs for every output pixel (floor(rH) x floor(rW) rows), the k x k neighbourhood of
floor(i/r), floor(j/r) is gathered for every output pixel and contracted with that
pixel's filter (vectorised torch, per-pixel weights). The efficient layer
(components.models.recovery.MetaUpscale) runs the MLP once per sub-pixel phase (r*r
rows) and applies all phases as one conv + pixel shuffle. Both share one MLP, so the
outputs must agree; the script times forward + backward on CPU (2 threads) and prints a
Markdown table for BENCHMARKS.md.

    .venv/bin/python bench/bench_meta_upscale.py [--repeats 3] [--fast-repeats 20] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.models.recovery import MetaUpscale, out_size  # noqa: E402


def naive_meta_upscale(up: MetaUpscale, feat: torch.Tensor, r: float) -> torch.Tensor:
    """Meta-SR as written: one MLP row and one k x k filter per output pixel."""
    B, C, H, W = feat.shape
    k = up.kernel
    Ho, Wo = out_size(H, W, r)
    qi = torch.arange(Ho, dtype=torch.float64) / r
    qj = torch.arange(Wo, dtype=torch.float64) / r
    si, sj = torch.floor(qi + 1e-9), torch.floor(qj + 1e-9)
    fi, fj = (qi - si).clamp(min=0), (qj - sj).clamp(min=0)
    # position vector v_ij = (1/r, i/r - floor(i/r), j/r - floor(j/r)) for all Ho*Wo pixels
    pos = torch.stack([
        torch.full((Ho, Wo), 1.0 / r, dtype=torch.float64),
        fi[:, None].expand(Ho, Wo),
        fj[None, :].expand(Ho, Wo),
    ], dim=-1).view(-1, 3).to(feat)
    w = up.mlp(pos).view(Ho, Wo, 3, C * k * k)  # per-pixel filters
    u = F.unfold(feat, k, padding=k // 2).view(B, C * k * k, H, W)
    u = u[:, :, si.long().clamp(max=H - 1)][:, :, :, sj.long().clamp(max=W - 1)]  # [B, C*k*k, Ho, Wo]
    return torch.einsum("bkij,ijck->bcij", u, w)


def time_fwd_bwd(fn, feat: torch.Tensor, up: MetaUpscale, repeats: int) -> float:
    """Median ms of forward + backward (after one warm-up run)."""
    times = []
    for n in range(repeats + 1):
        feat.grad = None
        up.zero_grad(set_to_none=True)
        start = time.perf_counter()
        fn(feat).square().mean().backward()
        if n:  # the first run is the warm-up
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the (slow) naive layer")
    ap.add_argument("--fast-repeats", type=int, default=20, help="timed runs of the efficient layer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at start; batch {args.batch}, "
          f"k = 3, MLP hidden 256; forward + backward, median of {args.repeats} (naive) / "
          f"{args.fast_repeats} (efficient) runs after 1 warm-up\n")
    print("| LR features (C x H x W) | r | naive ms | efficient ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for C, H, W in [(32, 32, 16), (64, 64, 32)]:
        up = MetaUpscale(C, kernel=3, hidden=256)
        for r in (2, 3, 4):
            feat = torch.randn(args.batch, C, H, W, requires_grad=True)
            with torch.no_grad():
                diff = (naive_meta_upscale(up, feat, r) - up(feat, r)).abs().max().item()
            assert diff < 1e-5, f"naive and efficient disagree by {diff} at r = {r}"
            t_naive = time_fwd_bwd(lambda f: naive_meta_upscale(up, f, r), feat, up, args.repeats)
            t_fast = time_fwd_bwd(lambda f: up(f, r), feat, up, args.fast_repeats)
            print(f"| {C} x {H} x {W} | {r} | {t_naive:.1f} | {t_fast:.1f} | "
                  f"{t_naive / t_fast:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
