"""Identity splits, gallery draws and training pairs.

One ``split.seed`` gives one identity split; the paper's ten random re-splits are
ten seeds (ten ``dvc exp run -S split.seed=K``). Within a split:

- MLR / genuine: test identities = a random subset of the dataset's standard size;
  probes (``query``) = every LR image of the test identities; ``repeats`` gallery
  draws of one random HR image per test identity (``gallery`` rows with
  ``repeat`` = the draw; an image drawn twice appears twice).
- VR: the dataset's own train / query / gallery division; one gallery (repeat 0).

``train`` and ``query`` rows carry ``repeat = -1``: they are the same in every
repeat. ``evaluation_set(table, k)`` returns the query and gallery of repeat k.

Training pairs (x_l, x_h): every LR training image with every HR training image
of the same identity from another camera. LR training images without such a
partner are dropped and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.data import table as T


class SplitError(ValueError):
    """The requested split does not fit the data; names the param and the limit."""


@dataclass
class SplitResult:
    table: pa.Table  # SPLIT_SCHEMA
    pairs: pa.Table  # PAIRS_SCHEMA
    summary: dict = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)


def _rows(table: pa.Table, mask: np.ndarray, split: str, repeat: int) -> pa.Table:
    sub = table.filter(pa.array(mask))
    n = sub.num_rows
    return sub.append_column(T.SPLIT, pa.array([split] * n, pa.string())).append_column(
        T.REPEAT, pa.array([repeat] * n, pa.int32())
    )


def training_pairs(train: pa.Table) -> pa.Table:
    """Every (x_l, x_h) of one identity from different cameras, sorted by lr then hr id."""
    role = np.asarray(train[T.ROLE].to_pylist())
    pids = train[T.PERSON_ID].to_numpy()
    cams = train[T.CAMERA_ID].to_numpy()
    ids = np.asarray(train[T.IMAGE_ID].to_pylist(), dtype=object)
    lr_rows, hr_rows = np.flatnonzero(role == "lr"), np.flatnonzero(role == "hr")
    hr_by_pid: dict[int, np.ndarray] = {}
    for pid in np.unique(pids[hr_rows]):
        hr_by_pid[int(pid)] = hr_rows[pids[hr_rows] == pid]
    lr_ids, hr_ids, pair_pids = [], [], []
    for i in lr_rows:
        cand = hr_by_pid.get(int(pids[i]), np.empty(0, dtype=np.int64))
        cand = cand[cams[cand] != cams[i]]
        lr_ids.extend([ids[i]] * len(cand))
        hr_ids.extend(ids[cand].tolist())
        pair_pids.extend([int(pids[i])] * len(cand))
    pairs = pa.table(
        {"lr_image_id": pa.array(lr_ids, pa.string()), "hr_image_id": pa.array(hr_ids, pa.string()),
         T.PERSON_ID: pa.array(pair_pids, pa.int64())},
        schema=T.PAIRS_SCHEMA,
    )
    return pairs.sort_by([("lr_image_id", "ascending"), ("hr_image_id", "ascending")])


def _finish(parts: list[pa.Table], dropped: Counter, summary: dict) -> SplitResult:
    table = pa.concat_tables(parts).cast(T.SPLIT_SCHEMA)
    is_train = pc.equal(table[T.SPLIT], "train")
    train = table.filter(is_train)
    pairs = training_pairs(train)
    # LR training images with no HR partner from another camera cannot form a triplet
    paired = set(pairs["lr_image_id"].to_pylist())
    lr_train = pc.and_(is_train, pc.equal(table[T.ROLE], "lr"))
    orphan = pc.and_(lr_train, pc.invert(pc.is_in(table[T.IMAGE_ID], pa.array(sorted(paired), pa.string()))))
    n_orphan = pc.sum(orphan).as_py() or 0
    if n_orphan:
        dropped["LR training image without an HR image of its identity from another camera"] += n_orphan
        table = table.filter(pc.invert(orphan))
    table = table.sort_by([(T.SPLIT, "ascending"), (T.REPEAT, "ascending"), (T.IMAGE_ID, "ascending")])
    if pairs.num_rows == 0:
        raise SplitError("no training pairs: no training identity has HR and LR images from different cameras")
    roles = Counter(zip(table[T.SPLIT].to_pylist(), table[T.ROLE].to_pylist()))
    summary.update(
        train_hr_images=roles[("train", "hr")],
        train_lr_images=roles[("train", "lr")],
        query_images=roles[("query", "lr")] + roles[("query", "hr")],
        gallery_rows=roles[("gallery", "hr")] + roles[("gallery", "lr")],
        training_pairs=pairs.num_rows,
    )
    return SplitResult(table, pairs, summary, dict(dropped))


def split_identities(table: pa.Table, *, n_test: int, repeats: int, seed: int) -> SplitResult:
    """MLR / genuine split: random test identities, all their LR probes, gallery draws."""
    pids = table[T.PERSON_ID].to_numpy()
    role = np.asarray(table[T.ROLE].to_pylist())
    identities = np.unique(pids)
    if n_test >= len(identities):
        raise SplitError(
            f"split.test_identities = {n_test} is not allowed: the table has {len(identities)} "
            f"identities with HR and LR images; use at most {len(identities) - 1}"
        )
    rng = np.random.default_rng(seed)
    test_ids = np.sort(rng.permutation(identities)[:n_test])
    is_test = np.isin(pids, test_ids)
    parts = [_rows(table, ~is_test, "train", -1), _rows(table, is_test & (role == "lr"), "query", -1)]
    hr_test_rows = np.flatnonzero(is_test & (role == "hr"))
    for k in range(repeats):
        draw_rng = np.random.default_rng([seed, k])
        chosen = []
        for pid in test_ids:
            rows = hr_test_rows[pids[hr_test_rows] == pid]
            if len(rows) == 0:
                raise SplitError(f"test identity {pid} has no HR image for the gallery; re-run degrade")
            chosen.append(int(rows[int(draw_rng.integers(len(rows)))]))
        mask = np.zeros(len(pids), dtype=bool)
        mask[chosen] = True
        parts.append(_rows(table, mask, "gallery", k))
    summary = dict(train_identities=int(len(identities) - n_test), test_identities=int(n_test),
                   repeats=int(repeats), seed=int(seed))
    return _finish(parts, Counter(), summary)


def split_standard(table: pa.Table) -> SplitResult:
    """VR split: the layout's own train / query / gallery division, one gallery (repeat 0)."""
    src = np.asarray(table[T.SOURCE_SPLIT].to_pylist())
    role = np.asarray(table[T.ROLE].to_pylist())
    pids = table[T.PERSON_ID].to_numpy()
    parts = [
        _rows(table, src == "train", "train", -1),
        _rows(table, (src == "query") & (role == "lr"), "query", -1),
        _rows(table, (src == "gallery") & (role == "lr"), "gallery", 0),
    ]
    summary = dict(train_identities=int(len(np.unique(pids[src == "train"]))),
                   test_identities=int(len(np.unique(pids[src == "query"]))), repeats=1)
    return _finish(parts, Counter(), summary)


def evaluation_set(table: pa.Table, repeat: int) -> tuple[pa.Table, pa.Table]:
    """(query, gallery) of gallery draw ``repeat`` from a split table."""
    query = table.filter(pc.equal(table[T.SPLIT], "query"))
    gallery = table.filter(pc.and_(pc.equal(table[T.SPLIT], "gallery"), pc.equal(table[T.REPEAT], repeat)))
    if gallery.num_rows == 0:
        draws = sorted(set(table.filter(pc.equal(table[T.SPLIT], "gallery"))[T.REPEAT].to_pylist()))
        raise SplitError(f"repeat {repeat} has no gallery; this split has draws {draws}")
    return query, gallery


def hold_out_validation(split: pa.Table, *, n_val: int, seed: int) -> SplitResult:
    """Hold ``n_val`` training identities out of a split table for validation.

    The training rows are split again like :func:`split_identities` with one gallery
    draw: the result's ``train`` rows and pairs are what is left to train on, its
    ``query`` / ``gallery`` rows the validation probes and gallery. The test
    identities of ``split`` are never touched (they are not in the result).
    """
    train = split.filter(pc.equal(split[T.SPLIT], "train")).drop_columns([T.SPLIT, T.REPEAT])
    n_ids = len(set(train[T.PERSON_ID].to_pylist()))
    if n_val < 1 or n_val > n_ids - 2:
        raise SplitError(f"split.val_identities = {n_val} is not allowed: the split has {n_ids} training "
                         f"identities; hold out between 1 and {n_ids - 2} (some must stay for training), or 0")
    return split_identities(train, n_test=n_val, repeats=1, seed=seed)


def training_rows(split: pa.Table, pairs: pa.Table, *, n_val: int, seed: int
                  ) -> tuple[pa.Table, pa.Table, pa.Table | None]:
    """(training rows, their LR/HR pairs, validation table or None) of a split table: ``n_val``
    training identities held out by :func:`hold_out_validation` (none when ``n_val`` is 0)."""
    if n_val == 0:
        return split.filter(pc.equal(split[T.SPLIT], "train")), pairs, None
    held = hold_out_validation(split, n_val=n_val, seed=seed)
    is_train = pc.equal(held.table[T.SPLIT], "train")
    return held.table.filter(is_train), held.pairs, held.table.filter(pc.invert(is_train))
