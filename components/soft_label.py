"""PRI's scale factor metric (Eq. 3) and the dynamic soft-label bank.

For a LR training image x_l recovered at every alternative scale r_1..r_N, with
d_i the Euclidean distance between F(G_{r_i}(x_l)) and the HR anchor F(x_h):

    l_{r_i} = softmax_i( g(mean_j d_j - d_i) ),   g(x) = sign(x) |x|^gamma     (Eq. 3)

gamma is odd or the reciprocal of an odd number, so a scale closer to the anchor
than average gets a higher probability; gamma = 0 gives uniform labels (all
scales equal, PRI Sec. 4.3). The one-hot variant (PRI Table 3) puts 1 on the
scale with the smallest distance.

:class:`LabelBank` keeps one label vector per LR training image, refreshed every
omega epochs (omega = 0: each epoch decides at random whether to refresh, as in
the paper) and saved with checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def regulate(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """g(x) = sign(x) |x|^gamma of Eq. 3 (defined for fractional gamma on negative x)."""
    return torch.sign(x) * x.abs().pow(gamma)


@torch.no_grad()
def soft_labels(distances: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 3 on a (batch, N) tensor of distances d_i; rows sum to 1. Carries no gradient."""
    d = distances.float()
    if d.ndim != 2:
        raise ValueError(f"distances must be (batch, N), got shape {tuple(d.shape)}")
    if gamma == 0:  # g(x) = 1: every scale factor equally likely
        return torch.full_like(d, 1.0 / d.shape[1])
    centred = d.mean(dim=1, keepdim=True) - d  # mean(d) - d_i
    return F.softmax(regulate(centred, gamma), dim=1)


@torch.no_grad()
def onehot_labels(distances: torch.Tensor) -> torch.Tensor:
    """The one-hot label of PRI Table 3: 1 on the scale closest to the HR anchor."""
    return F.one_hot(distances.argmin(dim=1), distances.shape[1]).float()


def label_entropy(labels: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of label rows: log(N) for uniform labels, 0 for one-hot."""
    p = labels.clamp_min(1e-12)
    return -(labels * p.log()).sum(dim=1).mean()


class LabelBank:
    """One label vector per LR training image, refreshed every omega epochs.

    ``labels[i]`` is the current label of LR item i (the TripletDataset index);
    rows start uniform and ``refreshed[i]`` is the epoch of their last update
    (-1: never). ``should_refresh(epoch)`` says whether epoch ``epoch`` recomputes
    the labels: always when some row was never computed, else every omega epochs
    counting from the first refresh; omega = 0 flips a seeded coin per epoch.
    """

    def __init__(self, num_items: int, num_scales: int, omega: int, kind: str = "soft",
                 gamma: float = 1.0, seed: int = 0):
        if kind not in ("soft", "onehot"):
            raise ValueError(f"label kind {kind!r}: use 'soft' or 'onehot'")
        if omega < 0:
            raise ValueError(f"omega = {omega}: use 0 (random) or a positive number of epochs")
        self.omega, self.kind, self.gamma, self.seed = int(omega), kind, float(gamma), int(seed)
        self.labels = torch.full((num_items, num_scales), 1.0 / num_scales)
        self.refreshed = torch.full((num_items,), -1, dtype=torch.long)
        self.first_refresh: int | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def should_refresh(self, epoch: int) -> bool:
        if self.first_refresh is None or bool((self.refreshed < 0).any()):
            return True
        if self.omega == 0:  # PRI Sec. 4.3: omega = 0 decides at random each epoch
            return bool(np.random.default_rng([self.seed, epoch]).integers(2))
        return (epoch - self.first_refresh) % self.omega == 0

    def labels_from_distances(self, distances: torch.Tensor) -> torch.Tensor:
        """Soft (Eq. 3) or one-hot labels for a (batch, N) distance tensor."""
        return soft_labels(distances, self.gamma) if self.kind == "soft" else onehot_labels(distances)

    def update(self, index: torch.Tensor, distances: torch.Tensor, epoch: int) -> None:
        """Store the labels computed from ``distances`` for the LR items ``index``."""
        index = index.cpu().long()
        self.labels[index] = self.labels_from_distances(distances.detach().cpu())
        self.refreshed[index] = epoch
        if self.first_refresh is None:
            self.first_refresh = int(epoch)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.labels[index.cpu().long()]

    def entropy(self) -> float:
        return float(label_entropy(self.labels))

    def marginal_cross_entropy(self) -> float:
        """L_p (Eq. 4) of a P that predicts every item the labels' mean: what P scores when it
        learned the labels' frequencies and nothing of the image. ``entropy()`` is what a P that
        reproduces every label scores; P's own L_p lies between the two when it learned anything."""
        mean = self.labels.mean(0).clamp_min(1e-12)
        return float(-(self.labels * mean.log()).sum(1).mean())

    def state_dict(self) -> dict:
        return {"labels": self.labels.clone(), "refreshed": self.refreshed.clone(),
                "first_refresh": -1 if self.first_refresh is None else self.first_refresh,
                "omega": self.omega, "kind": self.kind, "gamma": self.gamma, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["labels"].shape) != tuple(self.labels.shape):
            raise ValueError(f"label bank of shape {tuple(state['labels'].shape)} does not fit "
                             f"{tuple(self.labels.shape)} (items x scales): was it saved for another dataset?")
        self.labels = state["labels"].clone()
        self.refreshed = state["refreshed"].clone()
        self.first_refresh = None if int(state["first_refresh"]) < 0 else int(state["first_refresh"])
        self.omega, self.kind = int(state["omega"]), str(state["kind"])
        self.gamma, self.seed = float(state["gamma"]), int(state["seed"])
