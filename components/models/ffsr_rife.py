"""The FFSR paper's whole model: FFSR (super-resolution) then RIFE (re-id), one state dict.

Trained in three steps through the same Ray driver as PRI (pipelines/ray_train.py)
and scored by components/evaluation.embed_ffsr_rife: probes FFSR(x_l) up to the
HR size, then RIFE; gallery images RIFE(x_h).
"""

from __future__ import annotations

from torch import nn

from components.config import ModelParams
from components.models.ffsr import build_ffsr
from components.models.rife import build_rife


class FFSRRIFE(nn.Module):
    """``ffsr`` and ``rife`` side by side; they are called separately (each its own DDP wrapper)."""

    def __init__(self, cfg: ModelParams, num_classes: int):
        super().__init__()
        self.ffsr = build_ffsr(cfg.ffsr)
        self.rife = build_rife(cfg, num_classes)
