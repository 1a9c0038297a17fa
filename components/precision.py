"""Training precision: what train.precision means on a device, whether bf16 is sound there, and
whether it is worth it.

- :func:`resolve_precision` turns "auto" | "bf16" | "fp16" | "fp32" into the precision a
  device runs without looking at a model ("auto": bf16 on GPUs that have it, else fp16;
  bf16 on a CPU whose oneDNN runs it natively, else fp32); :func:`autocast` is the matching
  context manager.
- :func:`bf16_emulated` is the CPU-feature rule: oneDNN has bf16 convolution kernels only on
  AVX-512 bf16 (``avx512_bf16``), AMX (``amx_bf16``) and AVX2-VNNI-2 (``avx_ne_convert``)
  CPUs, and only when ``ONEDNN_MAX_CPU_ISA`` does not cap it below them. Elsewhere (an
  AVX2-only CPU) bf16 is emulated: 1.5 against fp32's 33.5 samples/s on the default model
  (BENCHMARKS.md, "Precision on every CPU").
- On CPUs with AMX (Intel Sapphire Rapids and later), the oneDNN of torch 2.14 returns
  non-finite bf16 convolution outputs for finite inputs, at random (uxlfoundation/oneDNN
  issue 5717). :func:`guard_onednn`, called by every entry point before its first
  convolution, caps oneDNN below AMX there (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``: bf16
  still runs on AVX-512, fp32 is not affected). A ``ONEDNN_MAX_CPU_ISA`` the user set is
  kept, and a CPU without AMX is not touched.
- :func:`bf16_fault` checks bf16 against fp32 on the model's own layers and input shapes;
  :func:`step_rate` times a forward + backward of the model's own training batch.
- :func:`choose_precision` puts them together into a :class:`PrecisionChoice` (the precision
  and one line saying why): "auto" on a CPU is bf16 only where it is native, sound and
  measured faster than fp32; an explicit "bf16" that is broken is a :class:`PrecisionError`
  naming the fault and the fix. Under torch.distributed, the ranks agree on it
  (components/training/engine.py: ``agree_on_precision``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch
import torch.nn as nn

log = logging.getLogger("lrreid")

AMX_SAFE_ISA = "AVX512_CORE_BF16"  # the highest oneDNN ISA below AMX


class PrecisionError(ValueError):
    """The requested precision cannot run soundly on this device; the message says what to use."""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def guard_onednn(flags: frozenset[str] | None = None) -> str | None:
    """Cap oneDNN below AMX on an AMX CPU (before the process's first convolution: oneDNN reads
    the cap once). Returns the line to log when it capped, else None."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" not in flags or "ONEDNN_MAX_CPU_ISA" in os.environ:
        return None
    os.environ["ONEDNN_MAX_CPU_ISA"] = AMX_SAFE_ISA
    return (f"precision: this CPU has AMX, whose bf16 convolutions in torch {torch.__version__} return NaN at "
            f"random; oneDNN capped at {AMX_SAFE_ISA} (bf16 on AVX-512). Set ONEDNN_MAX_CPU_ISA yourself "
            "to override")


# oneDNN's CPU ISAs from low to high (ONEDNN_MAX_CPU_ISA's values; "ALL": no cap)
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
               "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL")
# the CPU flag of each ISA with native bf16 convolutions, and the lowest oneDNN cap that still uses it
BF16_ISAS = (("avx512_bf16", "AVX512_CORE_BF16"), ("amx_bf16", "AVX512_CORE_BF16"),
             ("avx_ne_convert", "AVX2_VNNI_2"))


def bf16_emulated(flags: frozenset[str] | None = None, cap: str | None = None) -> str | None:
    """Why bf16 is emulated on this CPU (no native bf16 convolution in oneDNN), or None where it is
    native. ``flags``: the CPU's (default: /proc/cpuinfo); ``cap``: ONEDNN_MAX_CPU_ISA (default: the
    environment's). A CPU whose flags cannot be read (not Linux) counts as native: the timed step decides."""
    flags = cpu_flags() if flags is None else flags
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL") if cap is None else cap).upper()
    if not flags:
        return None
    native = [(flag, isa) for flag, isa in BF16_ISAS if flag in flags]
    if not native:
        return "bf16 is emulated on this CPU (no avx512_bf16, amx_bf16 or avx_ne_convert)"
    rank = ONEDNN_ISAS.index(cap) if cap in ONEDNN_ISAS else len(ONEDNN_ISAS) - 1
    if all(rank < ONEDNN_ISAS.index(isa) for _, isa in native):
        return f"bf16 is emulated: ONEDNN_MAX_CPU_ISA={cap} caps oneDNN below this CPU's {native[0][0]}"
    return None


@lru_cache(maxsize=None)
def _cpu_runs_bf16() -> bool:
    """A tiny bf16 autocast conv + linear forward / backward runs on this CPU (global RNG untouched)."""
    try:
        with torch.random.fork_rng(devices=[]):
            conv, fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = fc(conv(torch.rand(2, 3, 8, 8)).mean((2, 3)))
            y.float().sum().backward()
        return y.dtype == torch.bfloat16 and bool(torch.isfinite(conv.weight.grad).all())
    except Exception:  # any failure: no bf16 here
        return False


def bf16_supported(device) -> bool:
    """CUDA: torch.cuda.is_bf16_supported(). CPU: a tiny bf16 autocast forward / backward runs (natively
    or emulated: see :func:`bf16_emulated`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_runs_bf16()


def resolve_precision(device, precision: str) -> str:
    """The concrete precision ("bf16" | "fp16" | "fp32") that train.precision means on ``device``,
    without a model: "auto" on a CPU is bf16 where it runs natively (:func:`choose_precision` also
    checks and times it on the model)."""
    device = torch.device(device)
    if precision == "fp32":
        return "fp32"
    if precision == "bf16":
        if device.type == "cuda" and not bf16_supported(device):
            raise PrecisionError("train.precision = 'bf16': this GPU has no bf16 support; use 'auto', 'fp16' or 'fp32'")
        return "bf16"
    if precision == "fp16":
        if device.type != "cuda":
            raise PrecisionError(f"train.precision = 'fp16' needs a CUDA GPU (device is {device.type}); "
                                 "use 'auto', 'bf16' or 'fp32'")
        return "fp16"
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if bf16_supported(device) else "fp16"
        native = device.type == "cpu" and bf16_emulated() is None
        return "bf16" if native and bf16_supported(device) else "fp32"
    raise PrecisionError(f"train.precision = {precision!r}: use 'auto', 'bf16', 'fp16' or 'fp32'")


def autocast(device, precision: str):
    """A context manager running the forward pass at ``precision`` (see :func:`resolve_precision`)."""
    device = torch.device(device)
    p = resolve_precision(device, precision)
    if p == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)


def layer_inputs(model: nn.Module, forward: Callable[[], object]) -> list[tuple[nn.Module, torch.Size]]:
    """One (conv / linear layer, input shape) per distinct kernel call that ``forward()`` (an fp32
    forward of ``model`` on a real batch) makes, in order: layers of the same configuration
    (``repr``: channels, kernel, stride, padding, bias) at the same input shape run the same
    kernel, whatever their weights, so one of them stands for all."""
    seen: dict[tuple[str, torch.Size], tuple[nn.Module, torch.Size]] = {}

    def hook(module, args):
        if args and torch.is_tensor(args[0]):
            seen.setdefault((repr(module), args[0].shape), (module, args[0].shape))

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.eval()  # no BatchNorm statistics change
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            forward()
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return list(seen.values())


def bf16_fault(layers: list[tuple[nn.Module, torch.Size]], device, repeats: int = 3,
               tolerance: float = 0.1) -> str | None:
    """Run each layer at its input shape ``repeats`` times under bf16 autocast, forward and
    backward; a description of the first fault (a non-finite output or gradient in any call, or
    in the first call an output further than ``tolerance`` x max|fp32 output| from fp32), else None.
    The layers' parameters and .grad, and the global RNG, are left as they were."""
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for module, shape in layers:
        params = [p for p in module.parameters() if p.requires_grad]
        for k in range(repeats):
            x = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
            if k == 0:  # the fp32 reference once; the faults seen are random, so repeat the bf16 calls
                with torch.no_grad():
                    ref = module(x).float()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = module(x)
            grads = torch.autograd.grad(y.float().square().mean(), [x, *params], allow_unused=True)
            what = f"{module} on input {list(shape)}, call {k + 1} of {repeats}"
            if not bool(torch.isfinite(y).all()):
                return f"{what}: non-finite bf16 output"
            if any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
                return f"{what}: non-finite bf16 gradient"
            err = float((y.detach().float() - ref).abs().max()) / max(float(ref.abs().max()), 1e-6) if k == 0 else 0
            if err > tolerance:
                return f"{what}: bf16 output off fp32 by {err:.2g} of its range"
    return None


def _scalar(out, seen: set | None = None) -> torch.Tensor | None:
    """The sum of the means of every floating tensor in a forward's output (dataclasses, tuples,
    lists, dicts and plain objects are walked): something to call backward on."""
    seen = set() if seen is None else seen
    if id(out) in seen:
        return None
    seen.add(id(out))
    if torch.is_tensor(out):
        return out.float().mean() if out.is_floating_point() and out.requires_grad else None
    if isinstance(out, dict):
        items = list(out.values())
    elif isinstance(out, (list, tuple)):
        items = list(out)
    elif hasattr(out, "__dict__"):
        items = list(vars(out).values())
    else:
        return None
    parts = [t for t in (_scalar(x, seen) for x in items) if t is not None]
    return torch.stack(parts).sum() if parts else None


def step_rate(model: nn.Module, forward: Callable[[nn.Module], object], samples: int, device, precision: str,
              repeats: int = 2) -> float:
    """Samples/s of one training forward + backward, ``forward(net)``, at ``precision``: the best of
    ``repeats`` timed calls after one warm-up (oneDNN builds its kernels in the first), on a copy of
    ``model`` in train mode, so its weights, .grad, BatchNorm statistics and the global RNG stay as
    they were."""
    device = torch.device(device)
    net = copy.deepcopy(model).train()
    best = float("inf")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for k in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            with autocast(device, precision):
                out = forward(net)
            total = _scalar(out)
            if total is not None:
                total.backward()
            _sync(device)
            if k:
                best = min(best, time.perf_counter() - start)
            net.zero_grad(set_to_none=True)
    return samples / max(best, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a training stage runs, and why (one line, for its log and its MLflow run)."""

    precision: str  # "bf16" | "fp16" | "fp32"
    reason: str
    rates: dict[str, float] = field(default_factory=dict)  # samples/s per precision, where they were timed

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


MIN_SPEEDUP = 1.1  # bf16 must beat fp32 by this factor on the timed step (below it: run-to-run noise)


def choose_precision(device, requested: str, *, fault: Callable[[], str | None] | None = None,
                     rate: Callable[[str], float] | None = None) -> PrecisionChoice:
    """The precision ``requested`` (train.precision) runs on ``device``, and why.

    On a CPU, bf16 is native (:func:`bf16_emulated`), ``fault()`` (e.g. :func:`bf16_fault` on the
    model's layers) finds nothing, and ``rate(p)`` (e.g. :func:`step_rate` of the model's step, in
    samples/s) is measured: "auto" takes bf16 only where all three agree (emulated bf16 is not timed:
    20x slower there); an explicit "bf16" that is broken raises PrecisionError naming the fault and
    the fix, and one that is emulated or slower runs with a line that says so."""
    device = torch.device(device)
    resolved = resolve_precision(device, requested)
    if device.type != "cpu" or requested == "fp32":
        how = "auto: " if requested == "auto" else "train.precision: "
        return PrecisionChoice(resolved, how + ("this GPU supports bf16" if resolved == "bf16" and requested == "auto"
                                                else f"{resolved} on {device.type}"))
    if requested == "auto" and not bf16_supported(device):
        return PrecisionChoice("fp32", "auto: fp32, bf16 does not run on this CPU")
    emulated = bf16_emulated()
    if requested == "auto" and emulated:
        return PrecisionChoice("fp32", f"auto: fp32, {emulated}")
    problem = fault() if fault is not None else None
    if problem is not None:
        if requested == "auto":
            log.warning("precision: auto chose fp32, not bf16: bf16 is broken on this CPU (%s)", problem)
            return PrecisionChoice("fp32", f"auto: fp32, bf16 is broken on this CPU ({problem})")
        raise PrecisionError(f"train.precision = 'bf16' is broken on this CPU ({problem}); use train.precision: fp32 "
                             "or auto (auto falls back to fp32 here)")
    if requested == "bf16" and emulated:
        return PrecisionChoice("bf16", f"train.precision: bf16 as asked, but {emulated}: fp32 is much faster here")
    if rate is None:
        return PrecisionChoice("bf16", f"{'auto' if requested == 'auto' else 'train.precision'}: bf16, sound here")
    rates = {p: rate(p) for p in ("fp32", "bf16")}
    speed = f"bf16 {rates['bf16']:.1f} vs fp32 {rates['fp32']:.1f} samples/s on this model's step"
    if requested == "bf16":
        return PrecisionChoice("bf16", f"train.precision: bf16 as asked ({speed})", rates)
    if rates["bf16"] >= MIN_SPEEDUP * rates["fp32"]:
        return PrecisionChoice("bf16", f"auto: bf16, sound and faster ({speed})", rates)
    return PrecisionChoice("fp32", f"auto: fp32, bf16 is not {MIN_SPEEDUP:g}x faster on this CPU ({speed})", rates)
