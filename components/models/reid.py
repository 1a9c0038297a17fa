"""P (adaptive scale factor predictor) and F (re-id module) of PRI, Sec. 3.2 / 3.4.

Both take float images in [0, 1], NCHW, of any size (recovered images come at
many sizes), resize them to ``input_size`` (bilinear, antialiased when
shrinking), normalise with the ImageNet mean / std (buffers, so they follow
``.to(device)``), then run a torchvision backbone and global average pooling.

P: GAP -> 1x1 conv to feature_dim -> ReLU -> FC -> N logits (softmax left to the
   caller / loss, Eq. 1).
F: GAP -> 1x1 conv to feature_dim = ``feature`` -> BatchNorm1d -> FC (no bias)
   -> identity logits (BNNeck). ``feature`` is the reduced feature *before* the
   BN: PRI computes L_tri on it with margin 10 and ranks by Euclidean distance on
   it at test time, so it must keep its scale.

Batch size 1 works in eval mode; BatchNorm needs batches >= 2 in train mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from components.config import ModelParams
from components.models.backbones import build_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ReIDOutput:
    feature: Tensor  # [B, feature_dim] pre-BN reduced feature: Euclidean distances, L_tri
    logits: Tensor | None  # [B, num_classes] identity logits; None when num_classes == 0
    extras: dict = field(default_factory=dict)  # model-specific (RIFE: fusion weights); {} here


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of [B,C,H,W] to ``size`` (H, W); antialiased if any side shrinks."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    shrink = h > size[0] or w > size[1]
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


class ImageInput(nn.Module):
    """The input of every backbone model (P, F, RIFE): check, resize to ``size``, ImageNet-normalise."""

    def __init__(self, size):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
        return (resize_to(x, self.size) - self.mean) / self.std


class _Pooled(nn.Module):
    """Shared front of P and F: ImageInput -> backbone -> GAP."""

    def __init__(self, backbone: str, input_size, weights, last_stride: int = 1, width: int = 64):
        super().__init__()
        self.prep = ImageInput(input_size)
        self.backbone, self.out_channels = build_backbone(backbone, weights, last_stride, width)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.prep.size

    def pooled(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> globally average-pooled maps [B, C, 1, 1]."""
        return F.adaptive_avg_pool2d(self.backbone(self.prep(x)), 1)

    def trunks(self) -> list[nn.Module]:
        """The torchvision trunk (PRI: lr 0.01); the rest are added layers (lr 0.1): components/optim.py."""
        return [self.backbone]


class Predictor(_Pooled):
    """P: image -> N scale-factor logits (PRI Eq. 1)."""

    def __init__(self, backbone: str, num_scales: int, feature_dim: int = 512,
                 input_size=(128, 64), weights: str | Path | None = None, last_stride: int = 1,
                 width: int = 64):
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        super().__init__(backbone, input_size, weights, last_stride, width)
        self.reduce = nn.Conv2d(self.out_channels, feature_dim, 1)
        self.fc = nn.Linear(feature_dim, num_scales)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.reduce(self.pooled(x))).flatten(1)
        return self.fc(h)


class ReIDNet(_Pooled):
    """F: image -> ReIDOutput(feature = pre-BN reduced feature, logits = FC(BN(feature)))."""

    def __init__(self, backbone: str, num_classes: int, feature_dim: int = 512,
                 input_size=(128, 64), weights: str | Path | None = None, last_stride: int = 1,
                 width: int = 64):
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        super().__init__(backbone, input_size, weights, last_stride, width)
        self.reduce = nn.Conv2d(self.out_channels, feature_dim, 1)
        self.bn = nn.BatchNorm1d(feature_dim)
        self.classifier = nn.Linear(feature_dim, num_classes, bias=False) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: Tensor) -> ReIDOutput:
        feature = self.reduce(self.pooled(x)).flatten(1)
        logits = self.classifier(self.bn(feature)) if self.classifier is not None else None
        return ReIDOutput(feature=feature, logits=logits, extras={})


def _input_size(cfg: ModelParams) -> tuple[int, int]:
    return (cfg.input_height, cfg.input_width)


def build_predictor(cfg: ModelParams) -> Predictor:
    size = (cfg.predictor_height, cfg.predictor_width)  # P sees x_l only: no need for F's input size
    return Predictor(cfg.backbone, len(cfg.scales), cfg.feature_dim, size, cfg.backbone_weights, cfg.last_stride,
                     cfg.width)


def build_reid(cfg: ModelParams, num_classes: int) -> ReIDNet:
    if cfg.reid != "resnet":
        raise NotImplementedError(
            f"model.reid = {cfg.reid!r} is built by components/models/rife.py, not build_reid "
            f"(the PRI composer dispatches on model.reid)"
        )
    return ReIDNet(cfg.backbone, num_classes, cfg.feature_dim, _input_size(cfg), cfg.backbone_weights,
                   cfg.last_stride, cfg.width)
