"""G, PRI's recovery module (PRI Sec. 3.3): an RDN feature extractor + a Meta-SR meta-upscale.

G super-resolves one LR image by any scale factor r (integer or not, r = 1 included)
into a floor(r*H) x floor(r*W) image:

- RDN (Zhang et al. 2018): shallow feature extraction (two 3x3 convs), D residual
  dense blocks (C densely connected 3x3 conv+ReLU layers of growth G, local feature
  fusion 1x1 + local residual), global feature fusion (1x1 then 3x3) + global residual.
- Meta-upscale (Hu et al. 2019, Meta-SR): output pixel (i, j) reads the feature-map
  location (floor(i/r), floor(j/r)) (location projection); an MLP
  FC -> ReLU -> FC maps v_ij = (1/r, i/r - floor(i/r), j/r - floor(j/r)) to the
  weights of a k x k filter from the G0 feature channels to RGB (weight prediction);
  the output is that filter applied to the k x k neighbourhood (feature mapping).

For integer r the weights only depend on the sub-pixel phase (i mod r, j mod r): the
MLP runs once per phase (r*r rows) and all phases are applied as ONE conv to 3*r*r
channels followed by a pixel shuffle. Non-integer r takes a general path (unfold,
gather, contract) that runs the MLP only on the unique (row, column) fractions.

`BicubicRecovery` is the parameter-free baseline with the same call signature, and
`load_weights` loads a local state dict into any module (nothing is downloaded).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.config import SRParams
from components.models.weights import load_state_dict_file


def out_size(h: int, w: int, r: float) -> tuple[int, int]:
    """floor(r*H) x floor(r*W), robust to float error (3.3 * 10 is 32.999...)."""
    return math.floor(r * h + 1e-9), math.floor(r * w + 1e-9)


def _check_scale(r: float) -> float:
    r = float(r)
    if not math.isfinite(r) or r <= 0:
        raise ValueError(f"scale factor r must be a positive number, got {r}")
    return r


# -----------------------------------------------------------------------------
# RDN feature extractor (Zhang et al. 2018)


class ResidualDenseBlock(nn.Module):
    def __init__(self, channels: int, growth: int, convs: int):
        super().__init__()
        # layer c sees the block input and the c previous layers' outputs (contiguous memory)
        self.convs = nn.ModuleList(
            nn.Conv2d(channels + c * growth, growth, 3, padding=1) for c in range(convs)
        )
        self.lff = nn.Conv2d(channels + convs * growth, channels, 1)  # local feature fusion

    def forward(self, x):
        h = x
        for conv in self.convs:
            h = torch.cat([h, F.relu(conv(h))], dim=1)
        return x + self.lff(h)  # local residual learning


class RDN(nn.Module):
    """LR image [B, 3, H, W] -> features [B, channels, H, W] (no upscaling)."""

    def __init__(self, blocks: int, convs_per_block: int, growth: int, channels: int):
        super().__init__()
        self.sfe1 = nn.Conv2d(3, channels, 3, padding=1)  # shallow feature extraction
        self.sfe2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.rdbs = nn.ModuleList(
            ResidualDenseBlock(channels, growth, convs_per_block) for _ in range(blocks)
        )
        self.gff = nn.Sequential(  # global feature fusion: 1x1 over all block outputs, then 3x3
            nn.Conv2d(blocks * channels, channels, 1),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        f_1 = self.sfe1(x)  # F_{-1}
        h = self.sfe2(f_1)  # F_0
        outs = []
        for rdb in self.rdbs:
            h = rdb(h)
            outs.append(h)
        return f_1 + self.gff(torch.cat(outs, dim=1))  # global residual learning


# -----------------------------------------------------------------------------
# Meta-upscale (Hu et al. 2019)


def _frac(x: torch.Tensor) -> torch.Tensor:
    # round the float64 fractions to 1e-9 so equal phases (0.4 and 2.4 - 2) deduplicate
    return torch.round(x * 1e9) / 1e9


def _project(n_out: int, n_in: int, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Location projection along one axis: source index floor(i/r) and fraction i/r - floor(i/r)."""
    q = torch.arange(n_out, dtype=torch.float64) / r
    src = torch.floor(q + 1e-9)  # 33 / 3.3 is 9.999...: it means 10
    frac = _frac((q - src).clamp(min=0.0))
    return src.long().clamp(max=n_in - 1), frac


class MetaUpscale(nn.Module):
    """features [B, C, H, W], r -> image [B, 3, floor(r*H), floor(r*W)] with predicted k x k filters."""

    def __init__(self, channels: int, kernel: int = 3, hidden: int = 256):
        super().__init__()
        self.channels, self.kernel = channels, kernel
        # weight prediction: v_ij (3) -> FC -> ReLU -> FC -> k*k*C*3 filter weights
        self.mlp = nn.Sequential(
            nn.Linear(3, hidden),
            nn.ReLU(),
            nn.Linear(hidden, kernel * kernel * channels * 3),
        )
        # small predicted filters at init: with MetaRDN's bicubic residual an untrained
        # G starts close to bicubic up-sampling (gradients still reach every parameter)
        with torch.no_grad():
            self.mlp[2].weight.mul_(0.1)
            self.mlp[2].bias.zero_()

    def weights(self, pos: torch.Tensor) -> torch.Tensor:
        """Position vectors [N, 3] -> filters [N, 3, C*k*k] (C*k*k in F.unfold / conv order)."""
        return self.mlp(pos).view(-1, 3, self.channels * self.kernel * self.kernel)

    def forward(self, features: torch.Tensor, r: float) -> torch.Tensor:
        r = _check_scale(r)
        if abs(r - round(r)) < 1e-9:
            return self.forward_integer(features, round(r))
        return self.forward_general(features, r)

    def forward_integer(self, features: torch.Tensor, r: int) -> torch.Tensor:
        """Integer r: one MLP row per sub-pixel phase (p, q), one conv to 3*r*r channels, pixel shuffle."""
        C, k = self.channels, self.kernel
        frac = _frac(torch.arange(r, dtype=torch.float64) / r)  # phase p -> p/r
        pos = torch.stack([
            torch.full((r * r,), 1.0 / r, dtype=torch.float64),
            frac.repeat_interleave(r),  # row phase p (slow)
            frac.repeat(r),  # column phase q (fast)
        ], dim=1).to(features)
        w = self.weights(pos).view(r * r, 3, C, k, k)
        # pixel_shuffle reads channel c*r*r + p*r + q into output (h*r + p, w*r + q)
        w = w.transpose(0, 1).reshape(3 * r * r, C, k, k)
        return F.pixel_shuffle(F.conv2d(features, w, padding=k // 2), r)

    def forward_general(self, features: torch.Tensor, r: float) -> torch.Tensor:
        """Any r: unfold k x k, gather rows floor(i/r) / cols floor(j/r), contract with per-(i, j) filters."""
        B, C, H, W = features.shape
        k = self.kernel
        Ho, Wo = out_size(H, W, r)
        si, fi = _project(Ho, H, r)
        sj, fj = _project(Wo, W, r)
        # the MLP runs on the grid of unique row fractions x unique column fractions only
        ui, ii = torch.unique(fi, return_inverse=True)
        uj, ij = torch.unique(fj, return_inverse=True)
        pos = torch.stack([
            torch.full((len(ui), len(uj)), 1.0 / r, dtype=torch.float64),
            ui[:, None].expand(-1, len(uj)),
            uj[None, :].expand(len(ui), -1),
        ], dim=-1).view(-1, 3).to(features)
        w = self.weights(pos).view(len(ui), len(uj), 3, C * k * k)
        w = w[ii.to(features.device)][:, ij.to(features.device)]  # [Ho, Wo, 3, C*k*k]
        u = F.unfold(features, k, padding=k // 2).view(B, C * k * k, H, W)
        u = u[:, :, si.to(features.device)][:, :, :, sj.to(features.device)]  # [B, C*k*k, Ho, Wo]
        return torch.einsum("bkij,ijck->bcij", u, w)  # feature mapping


# -----------------------------------------------------------------------------
# G and the baseline


class MetaRDN(nn.Module):
    """G: LR image in [0, 1] [B, 3, H, W], r -> recovered image [B, 3, floor(r*H), floor(r*W)].

    The output is not clamped (clamping would stop L_sr's gradients at saturated pixels).
    """

    def __init__(self, blocks: int, convs_per_block: int, growth: int, channels: int,
                 kernel: int = 3, meta_hidden: int = 256):
        super().__init__()
        self.arch = dict(blocks=blocks, convs_per_block=convs_per_block, growth=growth,
                         channels=channels, kernel=kernel, meta_hidden=meta_hidden)
        self.rdn = RDN(blocks, convs_per_block, growth, channels)
        self.upscale = MetaUpscale(channels, kernel, meta_hidden)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.arch.items())

    def forward(self, x: torch.Tensor, r: float) -> torch.Tensor:
        return self.upscale_features(self.features(x), x, r)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The RDN's scale-independent feature maps (Meta-SR: extracted once, up-scaled by any r)."""
        return self.rdn(x - 0.5)  # centred input (Meta-SR subtracts the RGB mean)

    def upscale_features(self, features: torch.Tensor, x: torch.Tensor, r: float) -> torch.Tensor:
        """G_r(x) from ``features(x)``: the meta-upscale by r."""
        y = self.upscale(features, r)
        # Not in Meta-SR: a residual of the bicubic-upsampled input, so an untrained G starts
        # near bicubic and G trains from scratch on CPU in few steps.
        return y + F.interpolate(x, size=y.shape[-2:], mode="bicubic", align_corners=False)


class BicubicRecovery(nn.Module):
    """The no-parameter baseline: bicubic up-sampling to floor(r*H) x floor(r*W)."""

    def forward(self, x: torch.Tensor, r: float) -> torch.Tensor:
        size = out_size(x.shape[-2], x.shape[-1], _check_scale(r))
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x  # no features: the same interface as MetaRDN

    def upscale_features(self, features: torch.Tensor, x: torch.Tensor, r: float) -> torch.Tensor:
        return self(x, r)


def build_recovery(cfg: SRParams) -> nn.Module:
    """model.sr -> G: MetaRDN (with cfg.weights loaded if set) or BicubicRecovery."""
    if cfg.kind == "bicubic":
        return BicubicRecovery()
    g = MetaRDN(cfg.blocks, cfg.convs_per_block, cfg.growth, cfg.channels, cfg.kernel, cfg.meta_hidden)
    if cfg.weights:
        load_weights(g, cfg.weights, "model.sr.weights")
    return g


# -----------------------------------------------------------------------------
# local state dicts


def load_weights(module: nn.Module, path: str | Path, what: str) -> None:
    """Load a local state dict into ``module``; ``what`` names the param (e.g. "model.sr.weights")."""
    load_state_dict_file(module, path, what, f"{type(module).__name__}({module.extra_repr()})")
