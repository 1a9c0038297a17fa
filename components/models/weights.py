"""The one loader of local weight files (backbones, G, FFSR): nothing is downloaded at run time.

``load_state_dict_file(module, path, what, architecture)`` reads a state dict with
``torch.load(weights_only=True)`` (a plain dict, or one under "state_dict" /
"model"; "module." prefixes from DDP dropped) and loads it strictly. Errors name
the param (``what``), the path, and what does not fit:

- missing file -> FileNotFoundError saying how to get the file or to set it to null;
- a file torch.save did not write (text, an image...) or a damaged one -> ValueError;
- not a plain tensor state dict (pickled objects are refused) -> ValueError;
- missing / unexpected keys or wrong shapes -> ValueError listing a few of them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn


def _shape(v) -> str:
    return str(tuple(v.shape)) if torch.is_tensor(v) else type(v).__name__


# how every file torch.save writes starts: a zip archive (torch >= 1.6), or the legacy pickle's magic number
TORCH_SAVE_HEADS = (b"PK\x03\x04", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19")


def _looks_like(head: bytes) -> str:
    """A few words on what a file starting with ``head`` is, for an error message."""
    if not head:
        return "an empty file"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"a text file starting {head[:20].decode()!r}"
    return f"a binary file starting {head[:8]!r}"


def torch_load(path: str | Path, name: str, fix: str):
    """``torch.load(path, weights_only=True)`` on the CPU; a file it cannot read raises one
    ValueError line: ``name``, what is wrong with the file, then ``fix``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises all kinds of errors (IndexError, KeyError...) on foreign bytes
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError as err:
            raise ValueError(f"{name}: cannot read ({err.strerror or err}); {fix}") from None
        if not head.startswith(TORCH_SAVE_HEADS):
            raise ValueError(f"{name}: not a file torch.save wrote ({_looks_like(head)}); {fix}") from None
        first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            why = str(exc).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0]
            raise ValueError(f"{name}: not a plain state dict of tensors; torch.load(weights_only=True) "
                             f"refused it ({why or first}); {fix}") from None
        raise ValueError(f"{name}: a damaged torch.save file ({first}); {fix}") from None


def read_state_dict(path: str | Path, what: str, hint: str = "") -> dict:
    """The state dict stored at ``path`` (checked, unwrapped, "module." prefixes dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} = {str(path)!r}: no such file. Nothing is downloaded at run time: "
            f"{hint or 'put the state dict there'}, or set {what}: null for a random init"
        )
    state = torch_load(path, f"{what} = {str(path)!r}", hint or "give a state dict saved with torch.save")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{what} = {str(path)!r}: holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def fit_problems(saved: dict, own: dict, most: int = 5) -> str:
    """'' if the state dict ``saved`` fits ``own`` (keys and shapes), else what does not (``most`` keys each)."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    wrong = [f"{k} file {_shape(saved[k])} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in saved and (not torch.is_tensor(saved[k]) or saved[k].shape != v.shape)]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if keys:
            more = f" (+{len(keys) - most} more)" if len(keys) > most else ""
            parts.append(f"{label} {len(keys)}: {', '.join(keys[:most])}{more}")
    return "; ".join(parts)


def load_state_dict_file(module: nn.Module, path: str | Path, what: str, architecture: str,
                         hint: str = "", check: str = "") -> None:
    """Load the state dict at ``path`` into ``module`` strictly, with errors naming ``what``."""
    state = read_state_dict(path, what, hint)
    problems = fit_problems(state, module.state_dict())
    if problems:
        raise ValueError(f"{what} = {str(path)!r} does not fit {architecture}: {problems}"
                         f". Check {check or 'the architecture params next to ' + what}")
    module.load_state_dict(state, strict=True)
