"""PRI: Prediction, Recovery and Identification (PRI Sec. 3), composed of P, G and F.

Training forward (one call per batch of triplets {x_h, x_l, x_sl}):

- joint: p = P(x_l) (Eq. 1), r_p = argmax p; x_l recovered at r_p, x_sl at r_sl;
  F embeds G_{r_p}(x_l), G_{r_sl}(x_sl) and x_h in ONE batch (so BatchNorm sees
  all three); returns every term the losses need.
- pretrain (Sec. 3.5): no P; x_l and x_sl both recovered at one randomly chosen
  scale each.

Soft labels (Eq. 3) need F(G_{r_i}(x_l)) for every alternative r_i:
:meth:`PRI.scale_distances` computes d_i = ||f_{r_i} - f_{x_h}|| without
gradients (the label bank calls it once per omega epochs; the naive way calls it
every step).

Inference: ``embed_probe(x_l, choose)`` -> (feature, r_p, probabilities) with a
pluggable scale choice: :class:`Adaptive` (P), :class:`Fixed`, :class:`SizeBased`,
or the oracle :func:`ideal_scale` (PRI Table 2); ``embed_gallery(x_h)``.

F may be the paper's ResNet module or RIFE ("standard re-id model + PRI").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.config import ModelParams
from components.data.dataset import SizeGroup, SizeGroups, TripletBatch
from components.losses import pairwise_distances
from components.models.reid import ReIDOutput

def as_groups(x: torch.Tensor | SizeGroups) -> SizeGroups:
    """Accept one same-size batch or size groups."""
    return SizeGroups.stacked(x) if isinstance(x, torch.Tensor) else x


def _split_output(out: ReIDOutput, sizes: list[int]) -> list[ReIDOutput]:
    feats = out.feature.split(sizes)
    logits = out.logits.split(sizes) if out.logits is not None else [None] * len(sizes)
    extras = [{} for _ in sizes]
    for key, value in out.extras.items():
        for part, chunk in zip(extras, value.split(sizes)):
            part[key] = chunk
    return [ReIDOutput(f, lg, ex) for f, lg, ex in zip(feats, logits, extras)]


@dataclass
class PRIForward:
    """What one training forward gives the losses (all in batch order)."""

    r_index: torch.Tensor  # [B] index into scales used to recover x_l (r_p, or random in pretrain)
    out_rp: ReIDOutput  # F(G_{r_p}(x_l))
    out_sl: ReIDOutput  # F(G_{r_sl}(x_sl))
    out_h: ReIDOutput  # F(x_h)
    sr_sl: SizeGroups | None = None  # G_{r_sl}(x_sl), grouped by size
    p_logits: torch.Tensor | None = None  # [B, N] P(x_l), joint training only


class PRI(nn.Module):
    def __init__(self, P: nn.Module | None, G: nn.Module, F_: nn.Module, scales, input_size: tuple[int, int]):
        super().__init__()
        self.P, self.G, self.F = P, G, F_
        self.register_buffer("scales", torch.tensor([float(s) for s in scales]), persistent=False)
        self.input_size = tuple(input_size)

    # ------------------------------------------------------------------ parts
    def _to_input(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        size = tuple(size or self.input_size)
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    def predict(self, x_l: torch.Tensor | SizeGroups) -> torch.Tensor:
        """P's logits [B, N] for x_l of mixed sizes: one P call on the resized batch (Eq. 1)."""
        groups = as_groups(x_l)
        size = getattr(self.P, "input_size", None)
        return groups.in_batch_order(self.P(groups.cat(lambda x: self._to_input(x, size))))

    def recover(self, groups: SizeGroups, r_index: torch.Tensor) -> SizeGroups:
        """G_{r}(x) per sample, r = scales[r_index]: G's features once per size group, its
        meta-upscale once per (size, scale) group."""
        out = []
        for g in groups:
            idx_of = r_index[g.index]
            features = self.G.features(g.images)
            for k in idx_of.unique().tolist():
                sel = (idx_of == k).nonzero().squeeze(1)
                out.append(SizeGroup(g.index[sel], self.G.upscale_features(features[sel], g.images[sel],
                                                                           float(self.scales[k]))))
        return SizeGroups(out, groups.size)

    def recover_all(self, groups: SizeGroups) -> list[SizeGroups]:
        """G_{r_i}(x) for every alternative r_i (one :class:`SizeGroups` per scale), G's
        features computed once per size group."""
        out = [[] for _ in range(len(self.scales))]
        for g in groups:
            features = self.G.features(g.images)
            for k in range(len(self.scales)):
                out[k].append(SizeGroup(g.index, self.G.upscale_features(features, g.images, float(self.scales[k]))))
        return [SizeGroups(parts, groups.size) for parts in out]

    def embed(self, images: SizeGroups) -> ReIDOutput:
        """F on images of any sizes (resized to F's input, one F call), back in batch order."""
        out = self.F(images.cat(self._to_input))
        return ReIDOutput(images.in_batch_order(out.feature),
                          None if out.logits is None else images.in_batch_order(out.logits),
                          {k: images.in_batch_order(v) for k, v in out.extras.items()})

    # ------------------------------------------------------------------ training
    def forward(self, batch: TripletBatch, mode: str = "joint", generator: torch.Generator | None = None) -> PRIForward:
        B = len(batch.x_h)
        p_logits = None
        if mode == "joint":
            p_logits = self.predict(batch.x_l)
            r_index = p_logits.detach().argmax(1)  # r_p = argmax_r P(x_l); no gradient reaches P from here
        elif mode == "pretrain":
            r_index = torch.randint(len(self.scales), (B,), generator=generator).to(batch.x_h.device)
        else:
            raise ValueError(f"mode {mode!r}: use 'joint' or 'pretrain'")
        x_rp = self.recover(batch.x_l, r_index)
        sl_index = torch.bucketize(batch.r_sl.to(self.scales), self.scales)  # r_sl -> index in scales
        sr_sl = self.recover(batch.x_sl, sl_index)
        # F embeds the three kinds of images in one batch: [x_rp | x_sl | x_h]
        out = _split_output(self.embed(SizeGroups.concat([x_rp, sr_sl, SizeGroups.stacked(batch.x_h)])), [B, B, B])
        return PRIForward(r_index, out[0], out[1], out[2], sr_sl, p_logits)

    @torch.no_grad()
    def scale_distances(self, x_l: torch.Tensor | SizeGroups, x_h: torch.Tensor) -> torch.Tensor:
        """d_i = ||F(G_{r_i}(x_l)) - F(x_h)|| for every alternative r_i -> [B, N] (input of Eq. 3)."""
        f_h = self.F(self._to_input(x_h)).feature
        d = [(self.embed(parts).feature - f_h).norm(dim=1) for parts in self.recover_all(as_groups(x_l))]
        return torch.stack(d, dim=1)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def embed_gallery(self, x_h: torch.Tensor) -> torch.Tensor:
        return self.F(self._to_input(x_h)).feature

    @torch.no_grad()
    def embed_probe(self, x_l: torch.Tensor | SizeGroups, choose=None):
        """(feature [B, D], r_p [B] scale values, P's probabilities [B, N]) for LR probes."""
        groups = as_groups(x_l)
        probs = self.predict(groups).softmax(1) if self.P is not None else None
        choose = choose or Adaptive()
        r_index = choose(self, groups, probs)
        feature = self.embed(self.recover(groups, r_index)).feature
        return feature, self.scales[r_index], probs

    @torch.no_grad()
    def embed_all_scales(self, x_l: torch.Tensor | SizeGroups) -> torch.Tensor:
        """Features of x_l recovered at every alternative scale -> [B, N, D] (for the ideal predictor)."""
        return torch.stack([self.embed(parts).feature for parts in self.recover_all(as_groups(x_l))], dim=1)


# ---------------------------------------------------------------------- scale choice (PRI Table 2)
class Adaptive:
    """r_p = argmax P(x_l): PRI's adaptive scale factor predictor."""

    def __call__(self, pri: PRI, groups: SizeGroups, probs: torch.Tensor | None) -> torch.Tensor:
        if probs is None:
            raise ValueError("the adaptive choice needs the predictor P; this model has none")
        return probs.argmax(1)


class Fixed:
    """The same scale factor r for every probe ("Fixed x1".."Fixed x4")."""

    def __init__(self, r: float):
        self.r = float(r)

    def __call__(self, pri: PRI, groups: SizeGroups, probs) -> torch.Tensor:
        hits = (pri.scales == self.r).nonzero()
        if len(hits) == 0:
            raise ValueError(f"fixed scale {self.r:g} is not one of model.scales {pri.scales.tolist()}")
        return torch.full((groups.size,), int(hits[0]), dtype=torch.long, device=pri.scales.device)


class SizeBased:
    """The alternative nearest to (mean HR training height / probe height).

    PRI (after CSR-GAN) words it as a ratio of sizes; a ratio of heights is the
    scale factor itself, which is what a scale set {1, 2, 3, 4} can express.
    """

    def __init__(self, hr_height: float):
        self.hr_height = float(hr_height)

    def __call__(self, pri: PRI, groups: SizeGroups, probs) -> torch.Tensor:
        out = torch.empty(groups.size, dtype=torch.long, device=pri.scales.device)
        for g in groups:
            out[g.index] = size_based_index(pri.scales, self.hr_height, torch.tensor([g.images.shape[-2]]))
        return out


def size_based_index(scales: torch.Tensor, hr_height: float, heights: torch.Tensor) -> torch.Tensor:
    """Index of the alternative nearest to hr_height / height, per probe height."""
    ratio = hr_height / heights.to(scales).reshape(-1, 1)
    return (scales.reshape(1, -1) - ratio).abs().argmin(1)


def ideal_scale(all_scale_features: torch.Tensor, probe_pids: torch.Tensor, gallery: torch.Tensor,
                gallery_pids: torch.Tensor) -> torch.Tensor:
    """The oracle of PRI Table 2: per probe, the scale whose recovery ranks a true match best.

    all_scale_features [B, N, D] from ``embed_all_scales``; gallery [M, D]. The
    rank of the first true match decides; ties go to the smaller distance to it.
    """
    B, N, _ = all_scale_features.shape
    d = pairwise_distances(all_scale_features.reshape(B * N, -1), gallery).reshape(B, N, -1)
    match = (gallery_pids[None, None, :] == probe_pids[:, None, None])  # [B, 1, M]
    d_true = d.masked_fill(~match, float("inf")).amin(2)  # [B, N] distance to the nearest true match
    d_true = d_true.nan_to_num(posinf=1e30)  # a probe without a true match: every scale ties
    rank = (d < d_true[..., None]).sum(2).float()  # gallery entries ranked before it
    return (rank + d_true / (d_true.max() + 1)).argmin(1)  # rank first, then distance


class Ideal:
    """Wraps :func:`ideal_scale` as a scale choice (needs the gallery and the probes' ids)."""

    def __init__(self, probe_pids: torch.Tensor, gallery: torch.Tensor, gallery_pids: torch.Tensor):
        self.probe_pids, self.gallery, self.gallery_pids = probe_pids, gallery, gallery_pids

    def __call__(self, pri: PRI, groups: SizeGroups, probs) -> torch.Tensor:
        return ideal_scale(pri.embed_all_scales(groups), self.probe_pids, self.gallery, self.gallery_pids)


# ---------------------------------------------------------------------- construction
def build_pri(cfg: ModelParams, num_classes: int, with_predictor: bool = True) -> PRI:
    """PRI from params: P and F on cfg.backbone (F = RIFE if cfg.reid == 'rife'), G from cfg.sr."""
    from components.models.recovery import build_recovery
    from components.models.reid import build_predictor, build_reid
    from components.models.rife import build_rife

    P = build_predictor(cfg) if with_predictor else None
    G = build_recovery(cfg.sr)
    F_ = build_rife(cfg, num_classes) if cfg.reid == "rife" else build_reid(cfg, num_classes)
    return PRI(P, G, F_, cfg.scales, (cfg.input_height, cfg.input_width))
