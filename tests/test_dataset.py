"""TripletDataset, IdentityBatchSampler, collate_triplets / ungroup on a tiny split table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from components.data import table as T
from components.data.dataset import (
    IdentityBatchSampler,
    SizeGroup,
    SizeGroups,
    TripletDataset,
    collate_triplets,
    make_train_loader,
    to_tensor,
)
from components.images import decode, downsample, encode_png

H, W = 32, 16
SCALES = [1, 2, 3, 4]
IDENTITIES = 6


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_tables(identities: int = IDENTITIES, hr_per_id: int = 2, lr_per_id: int = 3):
    """HR 32x16 on camera 1, LR at /2, /3, /4 on camera 2, plus a test row to ignore."""
    rng = np.random.default_rng(0)
    rows, pairs = [], []

    def add(image_id, pid, cam, role, scale, arr, split="train"):
        rows.append({
            T.IMAGE_ID: image_id, T.PERSON_ID: pid, T.CAMERA_ID: cam,
            T.SOURCE_PATH: f"{image_id}.png", T.SOURCE_SPLIT: "train",
            T.HEIGHT: arr.shape[0], T.WIDTH: arr.shape[1], T.IMAGE: encode_png(arr),
            T.ROLE: role, T.SCALE: float(scale), T.SOURCE_IMAGE_ID: image_id,
            T.SPLIT: split, T.REPEAT: -1,
        })

    for p in range(identities):
        pid = 100 + p  # not contiguous: labels must be
        hr_ids = [f"p{p}_c1_{j}" for j in range(hr_per_id)]
        for hid in hr_ids:
            add(hid, pid, 1, "hr", 1.0, _image(rng, H, W))
        for j in range(lr_per_id):
            r = (2, 3, 4)[j % 3]
            lid = f"p{p}_c2_{j}"
            add(lid, pid, 2, "lr", r, downsample(_image(rng, H, W), r))
            pairs += [(lid, hid, pid) for hid in hr_ids]
    add("test_lr", 999, 2, "lr", 2.0, _image(rng, H // 2, W // 2), split="query")
    table = pa.Table.from_pylist(rows, schema=T.SPLIT_SCHEMA)
    pairs_table = pa.Table.from_pylist(
        [dict(zip(T.PAIRS_SCHEMA.names, p)) for p in pairs], schema=T.PAIRS_SCHEMA
    )
    return table, pairs_table


@pytest.fixture(scope="module")
def tables():
    return make_tables()


def _rows(table):
    return {r[T.IMAGE_ID]: r for r in table.select([T.IMAGE_ID, T.PERSON_ID, T.CAMERA_ID, T.IMAGE]).to_pylist()}


def _hr_id_of(item, table):
    """Which HR image is x_h (compare pixels, undoing a flip if needed)."""
    for image_id, row in _rows(table).items():
        if not image_id.startswith(f"p{item['person_id'] - 100}_c1"):
            continue
        ref = to_tensor(decode(row[T.IMAGE]))
        if torch.equal(ref, item["x_h"]) or torch.equal(ref.flip(-1), item["x_h"]):
            return image_id
    return None


def test_items_shapes_and_partners(tables):
    table, pairs = tables
    ds = TripletDataset(table, pairs, scales=SCALES, flip_p=0.5, seed=0)
    assert len(ds) == IDENTITIES * 3  # the query row is ignored
    assert ds.num_classes == IDENTITIES
    assert ds.person_ids == [100 + p for p in range(IDENTITIES)]
    rows = _rows(table)
    lr_ids = sorted(i for i in rows if "_c2_" in i)
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i
        assert item["x_h"].dtype == torch.float32 and item["x_h"].shape == (3, H, W)
        assert 0 <= item["x_h"].min() and item["x_h"].max() <= 1
        r = item["r_sl"]
        assert r in SCALES
        assert item["x_sl"].shape == (3, int(H // r), int(W // r))
        lr_id = lr_ids[i]  # items are ordered by image_id
        assert item["person_id"] == rows[lr_id][T.PERSON_ID]
        assert ds.person_ids[item["label"]] == item["person_id"]
        lr_scale = (2, 3, 4)[int(lr_id[-1]) % 3]
        assert item["lr_scale"] == lr_scale
        assert item["x_l"].shape == (3, H // lr_scale, W // lr_scale)
        hr_id = _hr_id_of(item, table)
        assert hr_id is not None, "x_h is not an HR image of the same identity"
        assert rows[hr_id][T.CAMERA_ID] != rows[lr_id][T.CAMERA_ID]


def test_flip_is_joint(tables):
    table, pairs = tables
    plain = TripletDataset(table, pairs, scales=SCALES, flip_p=0.0, seed=3)
    flipped = TripletDataset(table, pairs, scales=SCALES, flip_p=1.0, seed=3)
    for i in range(len(plain)):
        a, b = plain[i], flipped[i]
        assert a["r_sl"] == b["r_sl"]
        for key in ("x_h", "x_l", "x_sl"):
            assert torch.equal(b[key], a[key].flip(-1)), key
            assert not torch.equal(b[key], a[key]), key
    # flip_p = 0 never flips: x_l equals the stored LR image
    rows = _rows(table)
    lr_ids = sorted(i for i in rows if "_c2_" in i)
    ref = to_tensor(decode(rows[lr_ids[0]][T.IMAGE]))
    assert torch.equal(plain[0]["x_l"], ref)


def _same(a, b):
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_determinism_across_workers_and_epochs(tables):
    table, pairs = tables
    ds = TripletDataset(table, pairs, scales=SCALES, flip_p=0.5, seed=7)
    ds2 = TripletDataset(table, pairs, scales=SCALES, flip_p=0.5, seed=7)
    ds.set_epoch(2)
    ds2.set_epoch(2)
    expected = [ds[i] for i in range(len(ds))]
    assert all(_same(expected[i], ds2[i]) for i in reversed(range(len(ds))))  # order-free

    loader = DataLoader(ds, batch_size=None, num_workers=2, shuffle=False)
    got = list(loader)
    assert len(got) == len(expected)
    assert all(_same(e, g) for e, g in zip(expected, got))

    ds.set_epoch(3)
    other = [ds[i] for i in range(len(ds))]
    assert [e["r_sl"] for e in expected] != [o["r_sl"] for o in other]
    assert any(not torch.equal(e["x_h"], o["x_h"]) for e, o in zip(expected, other))


def test_loader_end_to_end(tables):
    table, pairs = tables
    kw = dict(scales=SCALES, P=3, K=2, flip_p=0.5, seed=1)
    loader = make_train_loader(table, pairs, num_workers=2, **kw)
    reference = make_train_loader(table, pairs, num_workers=0, **kw)
    loader.set_epoch(4)
    reference.set_epoch(4)
    batches, ref_batches = list(loader), list(reference)
    assert len(batches) == len(loader) == IDENTITIES // 3
    for b, rb in zip(batches, ref_batches):
        assert len(b) == 6 and b.x_h.shape == (6, 3, H, W)
        assert torch.equal(b.index, rb.index) and torch.equal(b.x_h, rb.x_h)
        x_sl = b.x_sl.map(lambda x: x.flatten(1).sum(1))
        ref_sl = rb.x_sl.map(lambda x: x.flatten(1).sum(1))
        assert torch.equal(x_sl, ref_sl)
        for g in b.x_sl:
            assert len(set(b.r_sl[g.index].tolist())) == 1


def test_sampler_batches():
    labels = [c for c in range(10) for _ in range(3)] + [10]  # identity 10 has one item
    P, K = 3, 4
    s = IdentityBatchSampler(labels, P=P, K=K, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 11 // P
    for batch in batches:
        assert len(batch) == P * K
        ids = [labels[i] for i in batch]
        assert len(set(ids)) == P
        assert all(ids.count(c) == K for c in set(ids))
    assert list(s) == batches  # deterministic
    assert list(IdentityBatchSampler(labels, P=P, K=K, seed=0)) == batches
    s.set_epoch(1)
    assert list(s) != batches
    # K <= items per identity: no repeats
    for batch in IdentityBatchSampler(labels[:-1], P=2, K=3, seed=0):
        assert len(set(batch)) == len(batch)


def test_sampler_ranks_disjoint_and_even():
    labels = [c for c in range(11) for _ in range(4)]
    ranks = [IdentityBatchSampler(labels, P=2, K=2, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(3)
    b0, b1 = list(ranks[0]), list(ranks[1])
    # 11 identities x 2 chunks of K=2 -> 10 or 11 batches of P=2 -> 5 per rank
    assert len(b0) == len(b1) == len(ranks[0]) == 5
    items0 = {i for b in b0 for i in b}
    items1 = {i for b in b1 for i in b}
    assert not items0 & items1


def test_sampler_epoch_visits_nearly_every_item():
    labels = [c for c in range(20) for _ in range(6)]  # 20 identities x 6 items
    s = IdentityBatchSampler(labels, P=4, K=3, seed=1)
    seen = [i for b in s for i in b]
    assert len(seen) == len(set(seen))  # no item twice within an epoch
    assert len(seen) >= 0.9 * len(labels)  # chunks of K over all items, not one chunk per identity
    assert len(s) == len(list(s))


def test_sampler_too_few_identities():
    with pytest.raises(ValueError, match="P = 4"):
        IdentityBatchSampler([0, 0, 1, 1, 2, 2], P=4, K=2)


def _sample(index, lr_side, sl_side, r_sl):
    tag = float(index)
    return {
        "x_h": torch.full((3, H, W), tag),
        "x_l": torch.full((3, lr_side, lr_side // 2), tag),
        "x_sl": torch.full((3, sl_side, sl_side // 2), tag),
        "r_sl": r_sl, "label": index % 3, "person_id": 100 + index % 3,
        "index": index, "lr_scale": 2.0,
    }


def test_collate_groups_and_back_to_batch_order():
    specs = [(16, 32, 1), (8, 16, 2), (16, 8, 4), (10, 16, 2), (8, 32, 1), (16, 10, 3), (10, 8, 4)]
    samples = [_sample(i, *spec) for i, spec in enumerate(specs)]
    batch = collate_triplets(samples)
    assert batch.x_h.shape == (7, 3, H, W)
    assert batch.index.tolist() == list(range(7))
    assert batch.r_sl.dtype == torch.float32 and batch.label.dtype == torch.long
    assert len(batch.x_l) == 3 and len(batch.x_sl) == 4
    for groups, key in ((batch.x_l, "x_l"), (batch.x_sl, "x_sl")):
        assert sorted(i for g in groups for i in g.index.tolist()) == list(range(7))
        for g in groups:
            assert isinstance(g, SizeGroup) and g.images.shape[0] == len(g.index)
            for j, pos in enumerate(g.index.tolist()):
                assert g.images[j].shape == samples[pos][key].shape
                assert torch.equal(g.images[j], samples[pos][key])
        # per-group "features" carry the tag; map and in_batch_order must restore batch order
        assert isinstance(groups, SizeGroups) and groups.size == 7
        feats = groups.map(lambda x: x[:, 0, 0, :1].repeat(1, 5))
        assert feats.shape == (7, 5)
        assert feats[:, 0].tolist() == [float(i) for i in range(7)]
        assert torch.equal(groups.in_batch_order(groups.cat(lambda x: x[:, 0, 0, :1].repeat(1, 5))), feats)
        assert groups.widths().tolist() == [float(samples[i][key].shape[-1]) for i in range(7)]

    # gradients flow back to every group's output
    outputs = [g.images.flatten(1).mean(1, keepdim=True).requires_grad_() for g in batch.x_l]
    batch.x_l.in_batch_order(torch.cat(outputs)).sum().backward()
    assert all(o.grad is not None for o in outputs)

    moved = batch.to("cpu")
    assert torch.equal(moved.x_h, batch.x_h) and len(moved.x_l) == len(batch.x_l)
    assert isinstance(moved.x_l, SizeGroups) and moved.x_l.size == 7

    missing = SizeGroups(batch.x_l.groups[:-1], batch.x_l.size)  # a position in no group
    with pytest.raises(ValueError, match="cover"):
        missing.in_batch_order(torch.zeros(sum(len(g.index) for g in missing), 1))
    both = SizeGroups.concat([batch.x_l, SizeGroups.stacked(batch.x_h)])  # the second's positions follow
    assert both.size == 14 and both.in_batch_order(both.cat(lambda x: x.flatten(1)[:, :1]))[7:].equal(
        batch.x_h.flatten(1)[:, :1])


def test_collate_rejects_mixed_hr_sizes():
    a = _sample(0, 16, 32, 1)
    b = _sample(1, 16, 32, 1)
    b["x_h"] = torch.zeros(3, H + 1, W)
    with pytest.raises(ValueError, match="canonical size"):
        collate_triplets([a, b])


def test_lr_without_partner_is_named(tables):
    table, pairs = tables
    keep = [lid != "p2_c2_1" for lid in pairs["lr_image_id"].to_pylist()]
    with pytest.raises(ValueError, match="p2_c2_1"):
        TripletDataset(table, pairs.filter(pa.array(keep)), scales=SCALES)


def test_no_lr_rows(tables):
    table, pairs = tables
    hr_only = table.filter(pa.compute.equal(table[T.ROLE], "hr"))
    with pytest.raises(ValueError, match="no LR rows"):
        TripletDataset(hr_only, pairs, scales=SCALES)
