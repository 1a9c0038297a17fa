"""Checkpoints and final weights: what a run writes, and reads back with weights_only=True.

:class:`TrainingState` (model, optimiser, label bank, epoch, phase, RNG states, extra)
is a Ray Train checkpoint's content; :func:`save_weights` / :func:`load_weights_file`
are the DVC outs (state dict + meta). Both hold plain tensors and python values only,
are written atomically, and are read through components/models/weights.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from components.fsutil import atomic_path
from components.models import unwrap
from components.models.weights import fit_problems, torch_load
from components.soft_label import LabelBank

STATE_FORMAT = "lrreid-training-state/1"
WEIGHTS_FORMAT = "lrreid-weights/1"


def rng_state() -> dict:
    """Python, numpy and torch (and CUDA) RNG states as tensors / plain values (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [int(version), [int(x) for x in internal], gauss],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value, where: str) -> None:
    """Only values torch.load(weights_only=True) reads back: tensors, scalars, lists, dicts."""
    if isinstance(value, _PLAIN) or torch.is_tensor(value):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where} is a {type(value).__name__}; only tensors, str, int, float, bool, None, "
                     "lists and dicts of them can be saved")


def _save(obj, path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load(path, what: str):
    """torch.load(weights_only=True) with clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    return torch_load(path, str(path), f"delete it or point at a {what} file that `lrreid train` wrote")


def _state_dict_cpu(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


class TrainingState:
    """Everything a checkpoint holds: model (unwrapped state dict), optimiser, label bank,
    the last finished epoch, phase, RNG states (python, numpy, torch, CUDA) and ``extra``.

    The file is a dict of plain tensors / python values: "format", "model_class",
    "model", "optimizer", "bank" (None if none), "epoch", "phase", "rng", "extra".
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, bank: LabelBank | None = None,
                 phase: str = "pretrain", epoch: int = -1, extra: dict | None = None):
        self.model, self.optimizer, self.bank = unwrap(model), optimizer, bank
        self.phase, self.epoch = phase, int(epoch)
        self.extra = dict(extra or {})

    def state_dict(self) -> dict:
        state = {
            "format": STATE_FORMAT,
            "model_class": type(self.model).__name__,
            "model": _state_dict_cpu(self.model),
            "optimizer": self.optimizer.state_dict(),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "epoch": int(self.epoch),
            "phase": str(self.phase),
            "rng": rng_state(),
            "extra": self.extra,
        }
        _check_plain(state["extra"], "TrainingState.extra")
        return state

    def save(self, path) -> None:
        """Write the checkpoint atomically (a temporary file renamed into place)."""
        _save(self.state_dict(), path)

    @staticmethod
    def peek(path) -> dict:
        """The phase, epoch, model class and extra of a checkpoint, without restoring anything."""
        state = TrainingState._read(path)
        return {k: state[k] for k in ("phase", "epoch", "model_class", "extra")}

    @staticmethod
    def _read(path) -> dict:
        state = _load(path, "training state")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not a training state written by TrainingState.save "
                             f"(format {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
        return state

    def load(self, path) -> None:
        """Restore model, optimiser, bank, epoch, extra and RNG from ``path``.

        Everything is checked before anything is changed: a file saved for another
        model (class, keys, shapes), optimiser layout, phase or bank size raises a
        ValueError naming the file, and leaves this state untouched.
        """
        state = self._read(path)
        if state["phase"] != self.phase:
            raise ValueError(f"{path}: saved in phase {state['phase']!r}, but this run is in phase "
                             f"{self.phase!r}; use the checkpoint of this phase (or another storage path)")
        name = type(self.model).__name__
        if state["model_class"] != name:
            raise ValueError(f"{path}: saved for a {state['model_class']}, not this {name}")
        problems = fit_problems(state["model"], self.model.state_dict(), most=3)
        if problems:
            raise ValueError(f"{path}: saved for another model ({problems}); check model params "
                             "(backbone, feature_dim, scales...) or use another checkpoint")
        saved_groups = state["optimizer"]["param_groups"]
        own_groups = self.optimizer.param_groups
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in own_groups]:
            raise ValueError(f"{path}: the optimiser state has parameter groups of sizes "
                             f"{[len(g['params']) for g in saved_groups]}, this optimiser "
                             f"{[len(g['params']) for g in own_groups]}: saved for another model")
        if self.bank is not None and state["bank"] is not None:
            shape = tuple(state["bank"]["labels"].shape)
            if shape != tuple(self.bank.labels.shape):
                raise ValueError(f"{path}: label bank of shape {shape} does not fit {tuple(self.bank.labels.shape)} "
                                 "(items x scales): saved for another dataset or scale set")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.bank is not None and state["bank"] is not None:
            self.bank.load_state_dict(state["bank"])
        self.epoch = int(state["epoch"])
        self.extra = dict(state["extra"])
        set_rng_state(state["rng"])


def save_weights_dict(state_dict: dict, path, meta: dict) -> None:
    """Final weights for the DVC out: {"format", "state_dict", "meta"}, written atomically."""
    _check_plain(meta, "meta")
    bad = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"state dict entries {bad[:3]} are not tensors")
    _save({"format": WEIGHTS_FORMAT, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
           "meta": dict(meta)}, path)


def save_weights(model: nn.Module, path, meta: dict) -> None:
    """:func:`save_weights_dict` of the unwrapped model's state dict."""
    save_weights_dict(unwrap(model).state_dict(), path, meta)


def load_weights_file(path) -> tuple[dict, dict]:
    """(state_dict, meta) from :func:`save_weights` (weights_only=True); a TrainingState
    checkpoint also works (its model; meta = phase, epoch, model_class, extra)."""
    obj = _load(path, "weights")
    if isinstance(obj, dict) and obj.get("format") == STATE_FORMAT:
        return obj["model"], {k: obj[k] for k in ("phase", "epoch", "model_class", "extra")}
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise ValueError(f"{path}: not a weights file written by save_weights (expected a dict with "
                         "'state_dict' and 'meta')")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its 'meta' is a {type(meta).__name__}, not a dict")
    return obj["state_dict"], meta
