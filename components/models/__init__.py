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


def build_model(kind: str, cfg, num_classes: int, *, with_predictor: bool = True) -> nn.Module:
    """The one model factory (train.model ``kind``): PRI, with P only when ``with_predictor``
    (joint training and inference), or FFSR + RIFE; ``cfg`` is params' ``model`` section."""
    if kind == "pri":
        from components.models.pri import build_pri

        return build_pri(cfg, num_classes, with_predictor=with_predictor)
    if kind == "ffsr_rife":
        from components.models.ffsr_rife import FFSRRIFE

        return FFSRRIFE(cfg, num_classes)
    from components.config import MODELS

    raise ValueError(f"train.model {kind!r}: use one of {', '.join(MODELS)}")
