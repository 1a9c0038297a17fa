"""RIFE: Resolution-Invariant Feature Extractor (Mao et al., FFSR + RIFE paper, Sec. 4.2, 5.2).

A ResNet whose four stages are Dual-Stream Blocks (DSB): each stage is duplicated
into an L stream (for low-resolution inputs) and an H stream (high resolution),
and the two maps are fused with weights predicted from the maps themselves,
m_t = w_L m_L + w_H m_H (Eq. 6). The weights are supervised by the resolution r
of the input (Eq. 7), so w_L -> 1 - r and w_H -> r. GAP + FC give the feature f
(256-d in the paper) and an FC on f the identity logits of the cross entropy L_X
(Eq. 8): no layer between f and the classifier, so the feature that is ranked is the
one L_X trains. RIFE returns the same ReIDOutput as PRI's F, so it can replace F.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from components.config import ModelParams
from components.models.backbones import resnet_stages
from components.models.reid import ImageInput, ReIDOutput


class WeightPredictor(nn.Module):
    """w = sigmoid(FC(ReLU(FC(GAP(m))))): one fusion weight per image, [B] (paper: C -> 64 -> 1)."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled: GAP(m) [B, C] -> w [B]."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled)))).squeeze(1)


class DualStreamBlock(nn.Module):
    """One ResNet stage as two streams DSB^L, DSB^H (the H stream a deep copy of the stage).

    r_grad: where the gradient of L^R (Eq. 7) goes, which the paper leaves open.
    "streams": the weights L^R sees are the fused ones, so L^R also trains the streams
    through GAP(m_L), GAP(m_H). "predictors": L^R sees weights predicted from the detached
    pooled maps (the same values), so it trains only the predictors' FCs; L_X reaches
    the streams through the fusion either way.
    """

    def __init__(self, stage: nn.Module, channels: int, weight_hidden: int = 64, r_grad: str = "streams"):
        super().__init__()
        if r_grad not in ("streams", "predictors"):
            raise ValueError(f"r_grad {r_grad!r}: use streams or predictors")
        self.stage_L = stage
        self.stage_H = copy.deepcopy(stage)  # same start (e.g. ImageNet), own parameters
        self.weight_L = WeightPredictor(channels, weight_hidden)
        self.weight_H = WeightPredictor(channels, weight_hidden)
        self.r_grad = r_grad

    def forward(self, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """m -> (m_t, w_L [B], w_H [B]); w_L, w_H are the weights L^R is computed on."""
        m_L, m_H = self.stage_L(m), self.stage_H(m)
        p_L, p_H = m_L.mean(dim=(2, 3)), m_H.mean(dim=(2, 3))  # GAP
        w_L, w_H = self.weight_L(p_L), self.weight_H(p_H)
        m_t = w_L[:, None, None, None] * m_L + w_H[:, None, None, None] * m_H  # Eq. 6
        if self.r_grad == "predictors" and self.training:
            w_L, w_H = self.weight_L(p_L.detach()), self.weight_H(p_H.detach())
        return m_t, w_L, w_H


class RIFE(nn.Module):
    """Shared stem -> 4 DSBs -> GAP -> FC (feature f) -> FC (identity logits).

    feature_bn: f = BN(FC(GAP(m))), a BatchNorm as the last layer of the feature itself
    (not between f and the classifier: the ranked feature stays the one L_X trains).
    The paper has none (its ResNet-50 starts from ImageNet); a network trained from
    scratch with L_X alone does not leave chance in the default's epochs without it
    (BENCHMARKS.md, "FFSR + RIFE as the paper trains it").

    Input: float images in [0, 1], [B, 3, H, W] of any size; they are resized to
    input_size (bilinear, antialiased when shrinking, as F does) and
    ImageNet-normalised here. Output: ReIDOutput with
    feature f [B, feature_dim], logits [B, num_classes] (None if num_classes = 0)
    and extras {"w_L": [B, 4], "w_H": [B, 4]}, the fusion weights of the 4 DSBs.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 0,
        feature_dim: int = 256,
        weight_hidden: int = 64,
        input_size: tuple[int, int] = (128, 64),
        weights=None,
        last_stride: int = 1,
        width: int = 64,
        r_grad: str = "streams",
        feature_bn: bool = False,
    ):
        super().__init__()
        self.prep = ImageInput(input_size)
        stem, stages, channels = resnet_stages(backbone, weights=weights, last_stride=last_stride, width=width)
        self.stem = stem  # shared by both streams
        self.blocks = nn.ModuleList(DualStreamBlock(s, c, weight_hidden, r_grad) for s, c in zip(stages, channels))
        self.fc = nn.Linear(channels[-1], feature_dim)  # f = FC(GAP(m))
        self.feature_bn = nn.BatchNorm1d(feature_dim) if feature_bn else None  # f = BN(FC(GAP(m))): see the class doc
        self.classifier = nn.Linear(feature_dim, num_classes) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.prep.size

    def forward(self, x: Tensor) -> ReIDOutput:
        m = self.stem(self.prep(x))
        w_L, w_H = [], []
        for block in self.blocks:
            m, wl, wh = block(m)
            w_L.append(wl)
            w_H.append(wh)
        f = self.fc(m.mean(dim=(2, 3)))  # GAP + FC: the feature f
        if self.feature_bn is not None:
            f = self.feature_bn(f)
        logits = self.classifier(f) if self.classifier is not None else None  # Eq. 8: FC(f_i)
        return ReIDOutput(feature=f, logits=logits, extras={"w_L": torch.stack(w_L, 1), "w_H": torch.stack(w_H, 1)})

    def trunks(self) -> list[nn.Module]:
        """The ResNet parts: the stem and both streams of every DSB. The weight predictors, FC and
        classifier are added layers (components/optim.py)."""
        return [self.stem, *(s for b in self.blocks for s in (b.stage_L, b.stage_H))]


def resolution(widths, max_width) -> Tensor:
    """r = width / width_max in [0, 1], the resolution of an image (FFSR paper Sec. 3).

    width_max is the largest image width of the dataset (e.g. 64: a 16-pixel-wide
    LR image has r = 16 / 64 = 0.25). Enlarging an image by interpolation or by
    super-resolution adds no resolution: an SR image (FFSR or G output) keeps the
    r of the LR image it came from, so pass the LR widths, not the SR widths.
    """
    w = torch.as_tensor(widths, dtype=torch.float32)
    if max_width <= 0 or bool((w <= 0).any()) or bool((w > max_width).any()):
        raise ValueError(
            f"resolution: widths must lie in (0, max_width = {max_width}]; got min {w.min().item():g}, "
            f"max {w.max().item():g} (is max_width the dataset's largest width?)"
        )
    return w / max_width


def resolution_loss(w_L: Tensor, w_H: Tensor, r: Tensor) -> Tensor:
    """sum_t L_t^R, L_t^R = (w_t^L - (1 - r))^2 + (w_t^H - r)^2 (Eq. 7), mean over the batch.

    w_L, w_H: [B, T] (RIFE's extras, T = 4 DSBs); r: [B], see :func:`resolution`.
    """
    if w_L.shape != w_H.shape or w_L.dim() != 2 or r.shape != w_L.shape[:1]:
        raise ValueError(
            f"resolution_loss: w_L {tuple(w_L.shape)} and w_H {tuple(w_H.shape)} must be [B, T], "
            f"r {tuple(r.shape)} [B]"
        )
    r = r.to(w_L)[:, None]
    return ((w_L - (1 - r)) ** 2 + (w_H - r) ** 2).sum(1).mean()  # Eq. 7, summed over the T DSBs


def rife_loss(out: ReIDOutput, labels: Tensor, r: Tensor, beta: float) -> tuple[Tensor, dict]:
    """L^RIFE = L_X + beta * sum_t L_t^R (Eq. 9). Returns (total, {"L_x", "L_r"} detached)."""
    if out.logits is None:
        raise ValueError("rife_loss needs identity logits: build RIFE with num_classes > 0")
    L_x = F.cross_entropy(out.logits, labels)  # Eq. 8
    L_r = resolution_loss(out.extras["w_L"], out.extras["w_H"], r)  # Eq. 7
    total = L_x + beta * L_r  # Eq. 9
    return total, {"L_x": L_x.detach(), "L_r": L_r.detach()}


def build_rife(cfg: ModelParams, num_classes: int) -> RIFE:
    """RIFE from params: model.rife.*, model.input_height / input_width, model.backbone_weights (both streams)."""
    return RIFE(
        backbone=cfg.rife.backbone,
        num_classes=num_classes,
        feature_dim=cfg.rife.feature_dim,
        weight_hidden=cfg.rife.weight_hidden,
        input_size=(cfg.input_height, cfg.input_width),
        weights=cfg.backbone_weights,
        last_stride=cfg.last_stride,
        width=cfg.width,
        r_grad=cfg.rife.r_grad,
        feature_bn=cfg.rife.feature_bn,
    )
