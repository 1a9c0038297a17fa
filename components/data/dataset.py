"""PRI training data: triplets {x_h, x_l, x_sl} and the P x K identity sampler.

PRI (Sec. 3.1) trains on sets of three images of one identity:

- x_l:  a low-resolution (LR) training image; one dataset item per LR image;
- x_h:  a high-resolution (HR) image of the same identity from a different
        camera, drawn at random from the pairs table;
- x_sl: x_h down-sampled by a factor r_sl drawn uniformly from the scale set
        (Sec. 3.3; r_sl = 1 gives x_sl = x_h).

The three are flipped horizontally together (Sec. 4.1). All randomness of an
item comes from (seed, epoch, index), so the same item at the same epoch is the
same triplet in any DataLoader worker process.

x_l and x_sl have different sizes within a batch, so :func:`collate_triplets`
groups them by size into stacked tensors (:class:`SizeGroups`, the one mixed-size
batch type), whose ``map`` / ``in_batch_order`` put model outputs back into batch order.

Usage::

    loader = make_train_loader(table, pairs, scales=[1, 2, 3, 4], P=8, K=4,
                               flip_p=0.5, seed=0, num_workers=4)
    for epoch in range(epochs):
        loader.set_epoch(epoch)          # reaches the dataset and the sampler
        for batch in loader:             # TripletBatch
            batch = batch.to(device)
            for g in batch.x_sl:         # one r_sl per group
                r_sl = float(batch.r_sl[g.index[0]])
                ...
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Sequence

import albumentations as A
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from components.data import table as T
from components.images import decode, downsample

# Independent random streams derived from the one seed.
_ITEM_STREAM = 1
_SAMPLER_STREAM = 2

_REQUIRED_COLUMNS = (T.IMAGE_ID, T.PERSON_ID, T.CAMERA_ID, T.IMAGE, T.ROLE, T.SCALE)


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A generator determined by the seed and a key (stream, epoch, index...)."""
    if any(k < 0 for k in key):
        raise ValueError(f"random key {key} must be non-negative (epoch and index start at 0)")
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=key))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 array -> 3xHxW float32 tensor in [0, 1]."""
    chw = np.array(image.transpose(2, 0, 1), dtype=np.float32)  # a fresh, writable copy
    return torch.from_numpy(chw).div_(255.0)


class TripletDataset(Dataset):
    """One item per LR training image x_l: a dict with the triplet {x_h, x_l, x_sl}.

    Items hold ``x_h``, ``x_l``, ``x_sl`` (float32 CHW tensors in [0, 1]), ``r_sl``
    (float), ``label`` (class index 0..num_classes-1 of the identity), ``person_id``,
    ``index`` (the item's position; LR rows are ordered by image_id) and
    ``lr_scale`` (the down-sampling factor the LR row was made with).

    ``person_ids[label]`` is the person_id of a class; ``labels[i]`` the label of
    item i. Images stay PNG bytes until an item is read.
    """

    def __init__(
        self,
        table: pa.Table,
        pairs: pa.Table,
        scales: Sequence[float],
        flip_p: float = 0.5,
        seed: int = 0,
    ):
        missing = [c for c in _REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(
                f"training table lacks columns {missing}; it must come from the split stage"
            )
        for c in ("lr_image_id", "hr_image_id"):
            if c not in pairs.column_names:
                raise ValueError(f"pairs table lacks column {c!r}; it must come from the split stage")
        if not scales or any(float(r) < 1 for r in scales):
            raise ValueError(f"scales = {list(scales)}: need a non-empty list of factors >= 1")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p = {flip_p}: a probability in [0, 1]")

        if T.SPLIT in table.column_names:
            table = table.filter(pc.equal(table[T.SPLIT], "train"))
        self.scales = [float(r) for r in scales]
        self.flip_p = float(flip_p)
        self.seed = int(seed)
        self.epoch = 0

        image_ids = table[T.IMAGE_ID].to_pylist()
        roles = table[T.ROLE].to_pylist()
        person = table[T.PERSON_ID].to_pylist()
        self._images = table[T.IMAGE]  # PNG bytes, decoded per item
        self._image_ids = image_ids
        self._camera = table[T.CAMERA_ID].to_pylist()
        row_of = {image_id: row for row, image_id in enumerate(image_ids)}

        lr_rows = sorted((r for r, role in enumerate(roles) if role == "lr"), key=image_ids.__getitem__)
        if not lr_rows:
            raise ValueError("training table has no LR rows (role == 'lr'); nothing to train on")

        partners: dict[str, list[int]] = defaultdict(list)
        for lr_id, hr_id in zip(pairs["lr_image_id"].to_pylist(), pairs["hr_image_id"].to_pylist()):
            hr_row = row_of.get(hr_id)
            if hr_row is not None and roles[hr_row] == "hr":
                partners[lr_id].append(hr_row)

        self._lr_rows: list[int] = lr_rows
        self._hr_rows: list[list[int]] = []  # per item: its candidate x_h rows
        for row in lr_rows:
            lr_id = image_ids[row]
            candidates = sorted(set(partners.get(lr_id, ())))
            if not candidates:
                raise ValueError(
                    f"LR training image {lr_id!r} has no HR partner in the pairs table "
                    "(an HR image of the same identity from another camera); re-run the split stage"
                )
            wrong = [image_ids[h] for h in candidates if person[h] != person[row]]
            if wrong:
                raise ValueError(
                    f"pairs table pairs LR image {lr_id!r} (person {person[row]}) with HR "
                    f"{wrong[0]!r} of another person; re-run the split stage"
                )
            self._hr_rows.append(candidates)

        self.person_ids: list[int] = sorted({person[r] for r in lr_rows})
        label_of = {pid: c for c, pid in enumerate(self.person_ids)}
        self.item_person_ids: list[int] = [person[r] for r in lr_rows]
        self.labels: list[int] = [label_of[p] for p in self.item_person_ids]
        self.lr_scales: list[float] = table[T.SCALE].take(lr_rows).to_pylist()

        # One joint flip of {x_h, x_l, x_sl}; they differ in size.
        self._flip = A.Compose(
            [A.HorizontalFlip(p=self.flip_p)],
            additional_targets={"x_l": "image", "x_sl": "image"},
            is_check_shapes=False,
            seed=self.seed,
        )

    @property
    def num_classes(self) -> int:
        return len(self.person_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws (partner, r_sl, flip) of this epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._lr_rows)

    def lr_image_id(self, index: int) -> str:
        """The image_id of LR item ``index``."""
        return self._image_ids[self._lr_rows[index]]

    def _decode(self, row: int) -> np.ndarray:
        return decode(self._images[row].as_py(), self._image_ids[row])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range 0..{len(self) - 1}")
        rng = _rng(self.seed, _ITEM_STREAM, self.epoch, index)
        candidates = self._hr_rows[index]
        hr_row = candidates[int(rng.integers(len(candidates)))]
        r_sl = self.scales[int(rng.integers(len(self.scales)))]
        flip_seed = int(rng.integers(2**32))

        x_l = self._decode(self._lr_rows[index])
        x_h = self._decode(hr_row)
        x_sl = x_h if r_sl == 1 else downsample(x_h, r_sl)

        self._flip.set_random_seed(flip_seed)
        out = self._flip(image=x_h, x_l=x_l, x_sl=x_sl)
        return {
            "x_h": to_tensor(out["image"]),
            "x_l": to_tensor(out["x_l"]),
            "x_sl": to_tensor(out["x_sl"]),
            "r_sl": r_sl,
            "label": self.labels[index],
            "person_id": self.item_person_ids[index],
            "index": index,
            "lr_scale": float(self.lr_scales[index]),
        }


class IdentityBatchSampler(Sampler[list[int]]):
    """P identities x K items per batch, for the triplet loss (torchreid's scheme).

    Each epoch shuffles every identity's items and cuts them into chunks of K
    (an identity with fewer than K items is filled up by sampling with
    replacement; a remainder shorter than K is dropped). Batches then take one
    chunk from each of P distinct identities drawn at random among those with
    chunks left, until fewer than P remain. So an epoch visits (nearly) every
    item once. Batches are split evenly over ``num_replicas`` ranks (rank r gets
    batches r, r + num_replicas, ...; a remainder is dropped so every rank gets
    the same count). Same (seed, epoch) -> same batches.
    """

    def __init__(
        self,
        labels: Sequence[int],
        P: int,
        K: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if P < 1 or K < 1:
            raise ValueError(f"P = {P}, K = {K}: both must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank = {rank} must be in 0..num_replicas-1 (num_replicas = {num_replicas})")
        items: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            items[int(label)].append(i)
        self._identities = sorted(items)
        self._items = [np.asarray(items[c]) for c in self._identities]
        if len(self._identities) < P * num_replicas:
            raise ValueError(
                f"{len(self._identities)} training identities, but a batch needs P = {P} "
                f"distinct identities on each of {num_replicas} rank(s); lower "
                "train.identities_per_batch or use more training identities"
            )
        self.P, self.K = P, K
        self.seed = int(seed)
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._all_batches()) // self.num_replicas

    def _all_batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = _rng(self.seed, _SAMPLER_STREAM, self.epoch)
        chunks: list[list[list[int]]] = []
        for pool in self._items:
            items = rng.permutation(pool)
            if len(items) < self.K:
                items = rng.choice(pool, size=self.K, replace=True)
            chunks.append([[int(i) for i in items[j : j + self.K]]
                           for j in range(0, len(items) - self.K + 1, self.K)])
        batches = []
        available = [c for c in range(len(chunks)) if chunks[c]]
        while len(available) >= self.P:
            chosen = rng.choice(available, size=self.P, replace=False)
            batches.append([i for c in chosen for i in chunks[c].pop()])
            available = [c for c in available if chunks[c]]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self):
        batches = self._all_batches()[: len(self) * self.num_replicas]
        return iter(batches[self.rank :: self.num_replicas])


@dataclass
class SizeGroup:
    """Images of one size within a batch: ``images[j]`` is batch item ``index[j]``."""

    index: torch.Tensor  # LongTensor [n], positions in the batch
    images: torch.Tensor  # [n, 3, h, w]

    def to(self, device, non_blocking: bool = False) -> "SizeGroup":
        return SizeGroup(self.index.to(device, non_blocking=non_blocking),
                         self.images.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SizeGroup":
        return SizeGroup(self.index.pin_memory(), self.images.pin_memory())


@dataclass
class SizeGroups:
    """The one mixed-size batch type: ``size`` images as same-size :class:`SizeGroup` s.

    Every batch position 0..size-1 is in exactly one group. A model runs once per group
    (:meth:`map`) or once on all groups concatenated in group order (:meth:`cat`), and
    :meth:`in_batch_order` puts rows in group order back into batch order.
    """

    groups: list[SizeGroup]
    size: int  # B, the number of images

    @classmethod
    def of(cls, images: Sequence[torch.Tensor], keys: Sequence | None = None) -> "SizeGroups":
        """Stack same-size images (and same extra key, if given) into groups, in first-seen order."""
        positions: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            key = tuple(image.shape) + ((keys[i],) if keys is not None else ())
            positions.setdefault(key, []).append(i)
        return cls([SizeGroup(torch.tensor(idx, dtype=torch.long), torch.stack([images[i] for i in idx]))
                    for idx in positions.values()], len(images))

    @classmethod
    def stacked(cls, x: torch.Tensor) -> "SizeGroups":
        """One same-size batch [B, 3, H, W] as a single group."""
        return cls([SizeGroup(torch.arange(len(x), device=x.device), x)], len(x))

    @classmethod
    def concat(cls, parts: Sequence["SizeGroups"]) -> "SizeGroups":
        """``parts`` one after the other: the second's positions follow the first's, and so on."""
        groups, offset = [], 0
        for part in parts:
            groups += [SizeGroup(g.index + offset, g.images) for g in part.groups]
            offset += part.size
        return cls(groups, offset)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def to(self, device, non_blocking: bool = False) -> "SizeGroups":
        return SizeGroups([g.to(device, non_blocking) for g in self.groups], self.size)

    def pin_memory(self) -> "SizeGroups":
        return SizeGroups([g.pin_memory() for g in self.groups], self.size)

    def cat(self, fn=None) -> torch.Tensor:
        """Every group's images (or ``fn`` of them) concatenated in group order."""
        return torch.cat([g.images if fn is None else fn(g.images) for g in self.groups])

    def in_batch_order(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows in group order (one per image, as :meth:`cat` lays them out) -> batch order [B, ...].
        Differentiable: gradients flow back to every row."""
        order = torch.cat([g.index.to(rows.device) for g in self.groups])
        if rows.shape[0] != order.numel():
            raise ValueError(f"{rows.shape[0]} rows for groups of {order.numel()} images")
        if order.numel() != self.size or not torch.equal(torch.sort(order).values,
                                                          torch.arange(self.size, device=order.device)):
            raise ValueError(f"the groups' indices do not cover batch positions 0..{self.size - 1} once each")
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(self.size, device=order.device)
        return rows[inverse]

    def map(self, fn) -> torch.Tensor:
        """``fn`` on each group's images, the outputs back in batch order [B, ...]."""
        return self.in_batch_order(torch.cat([fn(g.images) for g in self.groups]))

    def widths(self, device=None) -> torch.Tensor:
        """The image width of every batch position, float [B]."""
        w = torch.empty(self.size, device=device)
        for g in self.groups:
            w[g.index] = float(g.images.shape[-1])
        return w


@dataclass
class TripletBatch:
    """A collated batch of B triplets.

    ``x_h`` is stacked [B, 3, H, W]; ``x_l`` and ``x_sl`` are :class:`SizeGroups`
    (mixed sizes). All ``x_sl`` in one group share one r_sl.
    """

    x_h: torch.Tensor
    x_l: SizeGroups
    x_sl: SizeGroups
    r_sl: torch.Tensor  # float32 [B]
    label: torch.Tensor  # int64 [B]
    person_id: torch.Tensor  # int64 [B]
    index: torch.Tensor  # int64 [B], dataset item indices
    lr_scale: torch.Tensor  # float32 [B]

    def __len__(self) -> int:
        return self.x_h.shape[0]

    def _map(self, fn_tensor, fn_group) -> "TripletBatch":
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = fn_group(v) if isinstance(v, SizeGroups) else fn_tensor(v)
        return TripletBatch(**values)

    def to(self, device, non_blocking: bool = False) -> "TripletBatch":
        return self._map(
            lambda t: t.to(device, non_blocking=non_blocking),
            lambda g: g.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "TripletBatch":
        return self._map(lambda t: t.pin_memory(), lambda g: g.pin_memory())


def collate_triplets(samples: Sequence[dict]) -> TripletBatch:
    """Collate TripletDataset items; x_l and x_sl are grouped by size (x_sl also by r_sl)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    sizes = {tuple(s["x_h"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(
            f"HR images x_h of one batch have different sizes {sorted(sizes)} (items "
            f"{[s['index'] for s in samples]}); HR images must share one canonical size "
            "(degrade.hr_height x degrade.hr_width)"
        )
    r_sl = [float(s["r_sl"]) for s in samples]
    return TripletBatch(
        x_h=torch.stack([s["x_h"] for s in samples]),
        x_l=SizeGroups.of([s["x_l"] for s in samples]),
        x_sl=SizeGroups.of([s["x_sl"] for s in samples], keys=r_sl),
        r_sl=torch.tensor(r_sl, dtype=torch.float32),
        label=torch.tensor([s["label"] for s in samples], dtype=torch.long),
        person_id=torch.tensor([s["person_id"] for s in samples], dtype=torch.long),
        index=torch.tensor([s["index"] for s in samples], dtype=torch.long),
        lr_scale=torch.tensor([s["lr_scale"] for s in samples], dtype=torch.float32),
    )


class TripletLoader(DataLoader):
    """A DataLoader of TripletBatches whose ``set_epoch`` reaches dataset and sampler.

    Call ``loader.set_epoch(epoch)`` before each epoch. Workers are not
    persistent, so each epoch's workers see the dataset's new epoch.
    """

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)


def make_train_loader(
    table: pa.Table,
    pairs: pa.Table,
    *,
    scales: Sequence[float],
    P: int,
    K: int,
    flip_p: float,
    seed: int,
    num_workers: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> TripletLoader:
    """The PRI training loader: TripletDataset + IdentityBatchSampler + collate_triplets."""
    dataset = TripletDataset(table, pairs, scales=scales, flip_p=flip_p, seed=seed)
    sampler = IdentityBatchSampler(
        dataset.labels, P=P, K=K, seed=seed, num_replicas=num_replicas, rank=rank
    )
    return TripletLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_triplets,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
