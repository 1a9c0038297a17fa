"""Simulated bf16 convolution kernels, so that the tests of the precision check, its fall-back and
its errors do not depend on the CPU they run on.

The real ones are not reliable: torch 2.14.1's oneDNN returns non-finite bf16 convolution results
for finite inputs at random, in the forward on AMX CPUs (issue 12) and in the weight gradient of
small maps on AVX-512 bf16 CPUs too (measured here on an AMD EPYC: Conv2d(256, 512, 3, stride 2)
on [24, 256, 2, 1], 2 of 30 calls).

- ``break_bf16()``: every second bf16 convolution puts a NaN into its output. Also a Ray
  ``worker_process_setup_hook`` ("tests.faults.break_bf16") for Train workers.
- ``sound_bf16()``: bf16 convolutions are computed in fp32 and rounded to bf16 (always sound).
- ``slow_conv(precision, seconds)``: sound convolutions of which those at ``precision``
  ("bf16" or "fp32") also wait ``seconds`` each: a CPU on which that precision is the slow one,
  by a margin no machine's own speed can turn around.
- ``restore()``: the real kernels again.
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.nn as nn

_original = nn.Conv2d.forward


def _bf16_active(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def break_bf16() -> None:
    """Make every second bf16 convolution of this process put a NaN into its output."""
    calls = itertools.count()

    def forward(self, x):
        y = _original(self, x)
        if _bf16_active(x) and next(calls) % 2 == 1:
            y = y.clone()
            y.view(-1)[0] = float("nan")
        return y

    nn.Conv2d.forward = forward


def sound_bf16() -> None:
    """Make every bf16 convolution of this process an fp32 one rounded to bf16."""

    def forward(self, x):
        if not _bf16_active(x):
            return _original(self, x)
        with torch.autocast("cpu", enabled=False):
            return _original(self, x.float()).to(torch.bfloat16)

    nn.Conv2d.forward = forward


def slow_conv(precision: str, seconds: float = 0.02) -> None:
    """Make every convolution at ``precision`` ("bf16" | "fp32") wait ``seconds`` (bf16 ones sound)."""
    sound_bf16()
    sound = nn.Conv2d.forward

    def forward(self, x):
        if _bf16_active(x) == (precision == "bf16"):
            time.sleep(seconds)
        return sound(self, x)

    nn.Conv2d.forward = forward


def restore() -> None:
    nn.Conv2d.forward = _original
