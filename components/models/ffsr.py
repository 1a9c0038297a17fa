"""FFSR: Foreground-Focus Super-Resolution (Mao et al., FFSR + RIFE paper, Sec. 4.1, 5.2).

A light 12-layer fully convolutional autoencoder: the LR image is bicubic-upsampled
to the target size, two stride-2 convs go down, stride-1 3x3 convs extract
features, two transposed convs come back up, symmetric skips (RED-net / U-Net,
added) join matching levels, and a global residual adds the net's output to the
bicubic image. It is trained with the foreground-focus loss of Eq. 5, an MSE
weighted by a 2-D Gaussian mask M centred on the image (where the person is).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from components.config import FFSRParams
from components.models.weights import load_state_dict_file


class FFSR(nn.Module):
    """SR = bicubic(x, size) + net(bicubic(x, size)).

    The 12 conv layers (nn.Conv2d + nn.ConvTranspose2d), with c = channels:
      1      conv_in    3  -> c    3x3, stride 1   (full size; skip to up2)
      2      down1      c  -> 2c   3x3, stride 2   (1/2;       skip to up1)
      3      down2      2c -> 4c   3x3, stride 2   (1/4)
      4-9    body       4c -> 4c   3x3, stride 1   x 6
      10     up1        4c -> 2c   4x4 transposed, stride 2   (+ down1)
      11     up2        2c -> c    4x4 transposed, stride 2   (+ conv_in)
      12     conv_out   c  -> 3    3x3, stride 1   (+ bicubic: global residual)
    conv_out starts at zero, so an untrained FFSR is exactly bicubic upsampling.
    Odd sizes: a stride-2 conv gives ceil(n / 2), a transposed conv doubles it, so
    each up output is cropped to its skip's size (at most one row / column).
    The output is not clamped (bicubic itself over- and under-shoots [0, 1]).
    """

    def __init__(self, channels: int = 32, body: int = 6):
        super().__init__()
        c = channels
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.down1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(4 * c, 4 * c, 3, padding=1) for _ in range(body))
        self.up1 = nn.ConvTranspose2d(4 * c, 2 * c, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def residual(self, up: Tensor) -> Tensor:
        """The net branch on the bicubic-upsampled image: forward = up + residual(up)."""
        s0 = F.relu(self.conv_in(up))
        s1 = F.relu(self.down1(s0))
        h = F.relu(self.down2(s1))
        for conv in self.body:
            h = F.relu(conv(h))
        h = F.relu(self.up1(h)[..., : s1.shape[-2], : s1.shape[-1]] + s1)  # symmetric skip
        h = F.relu(self.up2(h)[..., : s0.shape[-2], : s0.shape[-1]] + s0)  # symmetric skip
        return self.conv_out(h)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: [B, 3, h, w] float in [0, 1] -> SR image [B, 3, *size]."""
        up = enlarge(x, size)
        return up + self.residual(up)  # global residual


def enlarge(x: Tensor, size: tuple[int, int]) -> Tensor:
    """FFSR's first step: bicubic enlargement to ``size`` (also RIFE's input without FFSR)."""
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)


def foreground_mask(height: int, width: int, sigma: float, device=None, dtype=torch.float32) -> Tensor:
    """M of Eq. 5: a 2-D Gaussian centred on the image, [1, 1, H, W], max 1.

    sigma is relative to the image size: the standard deviations are sigma * H
    rows and sigma * W columns. The map is divided by its largest value, so it is
    1 at the centre pixel(s) even when H or W is even.
    """
    y = torch.arange(height, device=device, dtype=torch.float64) - (height - 1) / 2
    x = torch.arange(width, device=device, dtype=torch.float64) - (width - 1) / 2
    g = torch.exp(-(y[:, None] ** 2) / (2 * (sigma * height) ** 2) - x[None, :] ** 2 / (2 * (sigma * width) ** 2))
    return (g / g.max()).to(dtype)[None, None]


def ffsr_loss(sr: Tensor, hr: Tensor, mask: Tensor) -> Tensor:
    """Eq. 5: ||M * (SR - HR)||_2^2, averaged over the batch.

    Normalisation: the squared norm of each image is divided by its number of
    elements (3 * H * W), i.e. the loss is the mean over batch, channels and
    pixels of (M * (SR - HR))^2, so its scale does not depend on the image size.
    mask broadcasts against sr: [1, 1, H, W] (foreground_mask) or [B, 1, H, W].
    """
    if sr.shape != hr.shape:
        raise ValueError(f"ffsr_loss: SR {tuple(sr.shape)} and HR {tuple(hr.shape)} differ in shape")
    if mask.shape[-2:] != sr.shape[-2:]:
        raise ValueError(f"ffsr_loss: mask {tuple(mask.shape)} does not match the image size {tuple(sr.shape[-2:])}")
    return (mask * (sr - hr)).pow(2).mean()


def build_ffsr(cfg: FFSRParams) -> FFSR:
    """FFSR(cfg.channels), with the state dict at cfg.weights loaded if set."""
    model = FFSR(channels=cfg.channels)
    if cfg.weights:
        load_state_dict_file(model, cfg.weights, "model.ffsr.weights", f"FFSR(channels={cfg.channels})",
                             check="model.ffsr.channels")
    return model
