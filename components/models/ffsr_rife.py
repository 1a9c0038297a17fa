"""The FFSR paper's whole model: FFSR (super-resolution) then RIFE (re-id), one state dict.

Every image, probe or gallery, low or high resolution, goes through both (Eq. 3):
I' = FFSR(I) at the HR size, f = RIFE(I'). FFSR is meant to enhance LR images and to
keep the details of HR ones (Sec. 4.1). Trained in three steps through the same Ray
driver as PRI (pipelines/ray_train.py, components/training/ffsr_rife.py) and
scored by components/evaluation.embed_ffsr_rife.
"""

from __future__ import annotations

from torch import Tensor, nn

from components.config import ModelParams
from components.models.ffsr import build_ffsr
from components.models.reid import ReIDOutput
from components.models.rife import build_rife


class FFSRRIFE(nn.Module):
    """``ffsr`` and ``rife`` side by side; training calls them separately (each its own DDP wrapper)."""

    def __init__(self, cfg: ModelParams, num_classes: int):
        super().__init__()
        self.ffsr = build_ffsr(cfg.ffsr)
        self.rife = build_rife(cfg, num_classes)

    def forward(self, x: Tensor, size: tuple[int, int]) -> ReIDOutput:
        """Eq. 3: RIFE(FFSR(x)), x [B, 3, h, w] super-resolved to ``size`` (the HR size) first."""
        return self.rife(self.ffsr(x, size))
