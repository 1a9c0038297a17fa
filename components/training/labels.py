"""PRI's dynamic soft labels during training: per batch (naive), the label bank's refresh, tracked scales.

Eq. 3 on d_i = ||F(G_{r_i}(x_l)) - F(x_h)||, computed in eval mode; the bank's refresh
is split over the ranks of torch.distributed and summed, so every rank ends with the
same bank (PRI Sec. 3.4). Tracked scales are PRI Fig. 3's r_p against the optimal scale.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from components.data.dataset import SizeGroups, TripletBatch, TripletDataset, collate_triplets
from components.models import unwrap
from components.precision import autocast
from components.soft_label import LabelBank
from components.training.engine import _comm_device, _world


@torch.no_grad()
def batch_labels(model: nn.Module, batch: TripletBatch, bank: LabelBank, *, device, precision: str) -> Tensor:
    """The labels of one batch computed now (the "naive" way, every step): Eq. 3 on
    d_i = ||F(G_{r_i}(x_l)) - F(x_h)||, in eval mode like :func:`refresh_label_bank`
    (so BatchNorm uses its running statistics and they are not updated), through the
    bank's own ``labels_from_distances``: both ways give the same labels on the same weights."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        with autocast(device, precision):
            d = net.scale_distances(batch.x_l, batch.x_h)
    finally:
        net.train(was_training)
    return bank.labels_from_distances(d.float()).to(batch.x_h.device)


@torch.no_grad()
def refresh_label_bank(pri: nn.Module, dataset: TripletDataset, bank: LabelBank, epoch: int, *,
                       batch_size: int = 64, device, precision: str, progress: bool = False,
                       num_workers: int = 0) -> float:
    """Recompute every LR item's label (Eq. 3) into ``bank``; returns the seconds spent.

    One pass over the dataset's items at ``epoch`` in index order (x_h partner and flip
    of that epoch, x_sl unused): d = pri.scale_distances(x_l, x_h) -> bank.update. The
    model is in eval mode during the pass and restored afterwards; the dataset's epoch
    is restored too. Under torch.distributed with W ranks, rank k computes items
    k, k + W, ...; the distances and a mask are summed over ranks (each row comes from
    exactly one rank, so the sum is exact) and every rank updates its bank from the
    full table: all ranks end with the same bank.
    """
    start = time.perf_counter()
    device = torch.device(device)
    net = unwrap(pri)
    if len(bank) != len(dataset):
        raise ValueError(f"the label bank has {len(bank)} rows but the dataset {len(dataset)} LR items; "
                         "was the bank built for another dataset?")
    rank, world = _world()
    mine = list(range(rank, len(dataset), world))
    N = len(net.scales)
    d_all = torch.zeros(len(dataset), N)
    mask = torch.zeros(len(dataset))
    old_epoch, was_training = dataset.epoch, net.training
    dataset.set_epoch(epoch)
    net.eval()
    try:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                             collate_fn=collate_triplets, num_workers=num_workers)
        for batch in tqdm(loader, desc=f"soft labels (epoch {epoch})", unit="batch",
                          disable=None if progress else True):
            batch = batch.to(device)
            with autocast(device, precision):
                d = net.scale_distances(batch.x_l, batch.x_h)
            index = batch.index.cpu()
            d_all[index] = d.float().cpu()
            mask[index] = 1.0
    finally:
        dataset.set_epoch(old_epoch)
        net.train(was_training)
    if world > 1:
        comm = _comm_device(device)
        d_all, mask = d_all.to(comm), mask.to(comm)
        dist.all_reduce(d_all)
        dist.all_reduce(mask)
        d_all, mask = d_all.cpu(), mask.cpu()
    if not bool((mask == 1).all()):
        raise RuntimeError(f"label refresh at epoch {epoch}: {int((mask != 1).sum())} of {len(mask)} items were "
                           "computed by no rank or by several")
    bank.update(torch.arange(len(dataset)), d_all, epoch)
    return time.perf_counter() - start


@torch.no_grad()
def tracked_scales(pri: nn.Module, dataset: TripletDataset, bank: LabelBank, n: int, *, device,
                   precision: str) -> dict[str, float]:
    """PRI Fig. 3: for ``n`` training images spread over the dataset, the scale P picks now
    (r_p = argmax P(x_l)) and the optimal one of the current soft label (argmax of Eq. 3).

    Returns {"r_p/<image_id>": r_p, "r_opt/<image_id>": r*}, logged every joint epoch.
    """
    net = unwrap(pri)
    if n <= 0 or net.P is None:
        return {}
    device = torch.device(device)
    index = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().long().unique().tolist()
    was_training = net.training
    net.eval()
    try:
        with autocast(device, precision):
            logits = net.predict(SizeGroups.of([dataset[i]["x_l"].to(device) for i in index]))
    finally:
        net.train(was_training)
    scales = net.scales.cpu()
    r_p = scales[logits.float().argmax(1).cpu()]
    r_opt = scales[bank.labels[index].argmax(1)]
    out = {}
    for i, p, o in zip(index, r_p.tolist(), r_opt.tolist()):
        out[f"r_p/{dataset.lr_image_id(i)}"] = p
        out[f"r_opt/{dataset.lr_image_id(i)}"] = o
    return out
