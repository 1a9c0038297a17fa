"""The one loader of local weight files (backbones, G, FFSR): nothing is downloaded at run time.

``load_state_dict_file(module, path, what, architecture)`` reads a state dict with
``torch.load(weights_only=True)`` (a plain dict, or one under "state_dict" /
"model"; "module." prefixes from DDP dropped) and loads it strictly. Errors name
the param (``what``), the path, and what does not fit:

- missing file -> FileNotFoundError saying how to get the file or to set it to null;
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


def read_state_dict(path: str | Path, what: str, hint: str = "") -> dict:
    """The state dict stored at ``path`` (checked, unwrapped, "module." prefixes dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} = {str(path)!r}: no such file. Nothing is downloaded at run time: "
            f"{hint or 'put the state dict there'}, or set {what}: null for a random init"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = str(exc).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0]
        raise ValueError(f"{what} = {str(path)!r}: not a plain state dict of tensors; "
                         f"torch.load(weights_only=True) refused it ({why or 'unreadable'})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{what} = {str(path)!r}: not readable by torch.load: {first}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{what} = {str(path)!r}: holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_file(module: nn.Module, path: str | Path, what: str, architecture: str,
                         hint: str = "", check: str = "") -> None:
    """Load the state dict at ``path`` into ``module`` strictly, with errors naming ``what``."""
    state = read_state_dict(path, what, hint)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} file {_shape(state[k])} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in state and (not torch.is_tensor(state[k]) or state[k].shape != v.shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label} {len(keys)}: {', '.join(keys[:5])}{more}")
        raise ValueError(f"{what} = {str(path)!r} does not fit {architecture}: " + "; ".join(parts)
                         + f". Check {check or 'the architecture params next to ' + what}")
    module.load_state_dict(state, strict=True)
