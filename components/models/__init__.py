"""Models of both papers: G (recovery), P, F, FFSR, RIFE, and PRI composed."""

import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel (/ torch.compile)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
