"""Training precision: what train.precision means on a device, and whether bf16 is sound there.

- :func:`resolve_precision` turns "auto" | "bf16" | "fp16" | "fp32" into the precision a
  device runs ("auto": bf16 on GPUs that have it, else fp16; bf16 on a CPU that runs it,
  else fp32); :func:`autocast` is the matching context manager.
- On CPUs with AMX (Intel Sapphire Rapids and later), the oneDNN of torch 2.14 returns
  non-finite bf16 convolution outputs for finite inputs, at random (uxlfoundation/oneDNN
  issue 5717). :func:`guard_onednn`, called by every entry point before its first
  convolution, caps oneDNN below AMX there (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``: bf16
  still runs on AVX-512, fp32 is not affected). A ``ONEDNN_MAX_CPU_ISA`` the user set is
  kept, and a CPU without AMX is not touched.
- :func:`bf16_fault` checks bf16 against fp32 on the model's own layers and input shapes;
  :func:`checked_precision` uses it: "auto" falls back to fp32 with one line saying why,
  an explicit "bf16" is a :class:`PrecisionError` naming the fault and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
    """CUDA: torch.cuda.is_bf16_supported(). CPU: a tiny bf16 autocast forward / backward runs."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_runs_bf16()


def resolve_precision(device, precision: str) -> str:
    """The concrete precision ("bf16" | "fp16" | "fp32") that train.precision means on ``device``."""
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
        return "bf16" if device.type == "cpu" and bf16_supported(device) else "fp32"
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


def checked_precision(device, precision: str, probe: Callable[[], str | None]) -> str:
    """:func:`resolve_precision`, and where that is bf16 on a CPU, ``probe()`` (e.g. :func:`bf16_fault`
    on the model's layers) must find no fault: "auto" then falls back to fp32 (one log line),
    an explicit "bf16" raises PrecisionError naming the fault and the fix."""
    device = torch.device(device)
    resolved = resolve_precision(device, precision)
    if resolved != "bf16" or device.type != "cpu":
        return resolved
    fault = probe()
    if fault is None:
        return resolved
    if precision == "auto":
        log.warning("precision: auto chose fp32, not bf16: bf16 is broken on this CPU (%s)", fault)
        return "fp32"
    raise PrecisionError(f"train.precision = 'bf16' is broken on this CPU ({fault}); use train.precision: fp32 "
                         "or auto (auto falls back to fp32 here)")
