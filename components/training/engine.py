"""What every epoch loop shares: the NaN / inf check, the backward step, the epoch's meter, setup.

Losses are computed in fp32 outside autocast; every term is checked each step and a
NaN / inf stops training with :class:`NonFiniteLossError` naming epoch, step and term.
Under torch.distributed every rank stops at the same step, and the epoch metrics
returned are over all ranks.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import Tensor

from components.precision import PrecisionChoice, resolve_precision


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the epoch, the step and the term."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(device: torch.device) -> torch.device:
    """Where collective tensors live: the GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_finite(terms: dict[str, Tensor], epoch: int, batch_index: int, device: torch.device) -> dict[str, float]:
    """The terms' values as floats; NonFiniteLossError naming the first NaN / inf term
    (checked on every rank together, so all ranks stop at the same step)."""
    names = [k for k in terms if k != "L"] + ["L"]  # name a component before the total
    values = torch.stack([terms[k].detach().float() for k in names])
    bad = ~torch.isfinite(values)
    rank, world = _world()
    if world > 1:
        flags = bad.to(_comm_device(device), torch.float32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = flags.cpu() > 0
    values = values.cpu().tolist()
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        v = values[k]
        what = f"is {v}" if not math.isfinite(v) else "is not finite on another rank"
        raise NonFiniteLossError(f"epoch {epoch}, step {batch_index}: {names[k]} {what}")
    return dict(zip(names, values))


_CODES = {"fp32": 0, "bf16": 1, "fp16": 1}  # lower wins: fp32 where any rank chose it


def agree_on_precision(choice: PrecisionChoice | None, error: str | None,
                       device) -> tuple[PrecisionChoice | None, str | None]:
    """Under torch.distributed, make every rank train in the same precision: fp32 where any rank
    chose it (its timed step or check said so), and a stop on every rank where any rank's explicit
    bf16 was broken (``error``). Every rank must call it, error or not; one process: unchanged."""
    if _world()[1] == 1:
        return choice, error
    code = torch.tensor([-1 if error is not None else _CODES[choice.precision]], device=_comm_device(torch.device(device)))
    dist.all_reduce(code, op=dist.ReduceOp.MIN)
    lowest = int(code.item())
    if lowest < 0 and error is None:
        return None, ("train.precision = 'bf16' is broken on another worker's CPU (its check found a fault); "
                      "use train.precision: fp32 or auto")
    if lowest == 0 and choice is not None and choice.precision != "fp32":
        return PrecisionChoice("fp32", f"another worker chose fp32; this one: {choice.reason}", choice.rates), error
    return choice, error


def _backward_step(total: Tensor, optimizer, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16: scaled loss, skipped steps on inf gradients
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()


def _lr(optimizer: torch.optim.Optimizer, name: str, position: int) -> float:
    for g in optimizer.param_groups:
        if g.get("name") == name:
            return float(g["lr"])
    groups = optimizer.param_groups
    return float(groups[min(position, len(groups) - 1)]["lr"])


class _Meter:
    """Sample-weighted sums of the epoch's terms; combined over ranks at the end."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, values: dict[str, float], n: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.samples += n

    def running(self, key: str = "L") -> float:
        return self.sums.get(key, float("nan")) / max(self.samples, 1)

    def result(self, device: torch.device, optimizer) -> dict[str, float]:
        keys = sorted(self.sums)
        seconds = time.perf_counter() - self.start
        sums = [self.sums[k] for k in keys]
        samples = float(self.samples)
        if _world()[1] > 1:
            comm = _comm_device(device)
            t = torch.tensor(sums + [samples], dtype=torch.float64, device=comm)
            dist.all_reduce(t)
            s = torch.tensor([seconds], dtype=torch.float64, device=comm)
            dist.all_reduce(s, op=dist.ReduceOp.MAX)
            *sums, samples = t.cpu().tolist()
            seconds = float(s.item())
        out = {k: v / max(samples, 1.0) for k, v in zip(keys, sums)}
        out.update(samples=samples, seconds=seconds, samples_per_s=samples / max(seconds, 1e-9),
                   lr_backbone=_lr(optimizer, "backbone", 0), lr_head=_lr(optimizer, "head", 1))
        return out


def _epoch_setup(loader, epoch: int, device, precision: str, scaler):
    """Device, concrete precision and (fp16) grad scaler of an epoch; tells the loader the epoch."""
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if precision == "fp16" and scaler is None:
        scaler = torch.amp.GradScaler(device.type)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return device, precision, scaler
