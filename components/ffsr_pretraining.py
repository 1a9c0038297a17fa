"""FFSR's generic pretraining (FFSR paper Sec. 5.2, step 1): plain MSE on images of any kind.

"We initialize and pre-train the FFSR model on ImageNet with the MSE loss. Then it
is finetuned on person ReID training datasets with L^FFSR." This module does the
first half on a local folder of images (ImageNet, DIV2K, ... nothing is
downloaded): random HR patches, each down-sampled by a factor drawn from
``scales`` (the project's one bicubic down-sampler), super-resolved back to the
patch size and compared pixel by pixel (Eq. 5 with M = 1). The weights it writes
are what ``model.ffsr.weights`` loads before step 1 fine-tunes them with L^FFSR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from components.data.dataset import to_tensor
from components.images import IMAGE_SUFFIXES, downsample, read_image, resize
from components.models.ffsr import FFSR, ffsr_loss


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted), or a clear error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; give a local folder of images (e.g. ImageNet's train)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)}); point at a folder of them")
    return files


def random_patch(image: np.ndarray, patch: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random ``patch`` (height, width) crop; an image smaller than it is first enlarged to cover it."""
    h, w = image.shape[:2]
    scale = max(patch[0] / h, patch[1] / w, 1.0)
    if scale > 1:
        image = resize(image, int(np.ceil(h * scale)), int(np.ceil(w * scale)))
        h, w = image.shape[:2]
    y, x = int(rng.integers(h - patch[0] + 1)), int(rng.integers(w - patch[1] + 1))
    return image[y:y + patch[0], x:x + patch[1]]


def sr_batch(files: list[Path], patch: tuple[int, int], r: float, n: int,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (x_l, x_h) pairs: HR patches of random files and their down-sampled versions (factor r)."""
    x_h = [random_patch(read_image(files[int(i)]), patch, rng) for i in rng.integers(len(files), size=n)]
    x_l = [downsample(p, r) for p in x_h]
    return torch.stack([to_tensor(p) for p in x_l]), torch.stack([to_tensor(p) for p in x_h])


def pretrain_ffsr(ffsr: FFSR, files: list[Path], *, steps: int, batch_size: int, patch: tuple[int, int],
                  scales: list[float], lr: float, seed: int = 0, device="cpu",
                  progress: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """Fit ``ffsr`` with MSE (Eq. 5, M = 1) for ``steps`` Adam steps; one factor r per batch.

    Returns the MSE of a fixed held-out batch (one per scale, drawn before training) before
    and after ("mse_before", "mse_after") and the mean training loss of the last 10% of steps.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps = {steps}, batch_size = {batch_size}: both must be >= 1")
    rng = np.random.default_rng(seed)
    held_out = [sr_batch(files, patch, r, batch_size, rng) for r in scales]
    ones = torch.ones(1, 1, *patch, device=device)
    ffsr = ffsr.to(device)

    @torch.no_grad()
    def held_out_mse() -> float:
        ffsr.eval()
        return float(np.mean([ffsr_loss(ffsr(x_l.to(device), patch), x_h.to(device), ones).item()
                              for x_l, x_h in held_out]))

    before = held_out_mse()
    optimizer = torch.optim.Adam(ffsr.parameters(), lr=lr)
    ffsr.train()
    losses = []
    for step in range(steps):
        x_l, x_h = sr_batch(files, patch, scales[int(rng.integers(len(scales)))], batch_size, rng)
        loss = ffsr_loss(ffsr(x_l.to(device), patch), x_h.to(device), ones)  # Eq. 5, M = 1: MSE
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the MSE is {loss.item()}; lower the learning rate ({lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, loss.item())
    tail = losses[-max(1, steps // 10):]
    return {"mse_before": before, "mse_after": held_out_mse(), "train_mse_last": float(np.mean(tail))}
