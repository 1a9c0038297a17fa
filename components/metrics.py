"""Re-id evaluation: CMC, mAP and mINP of a query set against a gallery.

The protocol is Market-1501's, as torchreid's ``eval_market1501`` computes it
(mINP as fast-reid adds it). For each query the gallery is ranked by distance,
and the gallery entries with the query's person id AND camera are removed
("junk"): finding the same person in the same camera is not re-identification.
A query left without a match (same id, other camera) is skipped and counted.

- CMC: ``cmc[k]`` is the fraction of the valid queries whose first match is at
  rank k + 1 or better.
- AP of a query: the mean over its matches of the precision at each match,
  (k + 1) / (rank of match k), ranks counted from 1; mAP is the mean over queries.
- INP of a query: (number of matches) / (rank of its last match); mINP the mean.

Speed. A per-query loop spends its time in ``argsort`` of a full gallery row.
No row is sorted here: only a query's few matches decide its CMC, AP and INP,
and the rank of match k (from 0, junk removed) is k plus the number of
non-matches at a distance <= that match's. Queries are processed in chunks of
rows; pass k compares every row of a chunk with the row's k-th closest match
distance and sums (one vectorised compare and one row sum, in torch, on
torch's CPU threads); the counts of the matches and junk entries themselves,
known from the few same-id entries, are then taken out. The cost is
num_q x num_g x (mean matches per query) compares, about 0.2 ns each on one
core, against ~50 ns per entry for the loop's argsort. A chunk's working
arrays are bounded (``_CHUNK_ELEMENTS``), so memory does not grow with the
number of queries. Queries with very many matches (more than ``_MAX_PASSES``)
are counted with one binary search per gallery entry instead
(``torch.searchsorted``, ~25 ns per entry, whatever the number of matches).

Ties. A non-match at exactly the same distance as a match is ranked before it
(the pessimistic convention). With continuous features ties have probability
zero; torchreid's ``argsort`` breaks them arbitrarily.

:func:`evaluate` takes a distance matrix (numpy array, ``np.memmap`` or torch
tensor); :func:`evaluate_features` takes the features and computes Euclidean
distances chunk by chunk, so the num_q x num_g matrix never exists in memory.
Both take ``per_query=True`` to also return each query's first-match rank and
AP (for paired, per-probe comparisons); the default does none of that work.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


# Elements (rows x gallery size) of one chunk of the distance matrix. A chunk's
# working arrays are a few copies of it (4 MB each in float32): small enough to
# stay in cache during the per-match passes, large enough that the Python
# overhead per chunk does not matter.
_CHUNK_ELEMENTS = 2**20

# Above this many matches a query's counts come from a binary search per gallery
# entry (cost ~log(matches)) instead of one compare pass per match.
_MAX_PASSES = 128

# Elements of one block of distances computed from features by one matrix
# product (64 MB in float32): enough query rows for BLAS to run at full speed.
_DISTANCE_BLOCK_ELEMENTS = 2**24


def evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
             per_query: bool = False) -> dict:
    """CMC, mAP and mINP of ``distmat`` (num_query x num_gallery) under the Market-1501 protocol.

    ``distmat`` is a numpy array, an ``np.memmap`` (read chunk by chunk) or a torch
    tensor; smaller means more similar. ``q_pids`` / ``q_camids`` hold one person /
    camera id per row, ``g_pids`` / ``g_camids`` one per column (any comparable
    values: ints, strings).

    Returns ``{"cmc": float array of length max_rank, "mAP": float, "mINP": float,
    "num_valid": queries evaluated, "num_skipped": queries without a match}``.
    If ``max_rank`` exceeds the gallery size, a warning is issued (as torchreid
    does) and the CMC beyond the gallery size repeats its last value (1.0).

    With ``per_query=True`` the dict also holds each query's own result, in the
    query order: ``"first_rank"`` (int64, num_query: 0-based rank of its first
    match, junk removed; -1 for a query without a match) and ``"ap"`` (float64,
    num_query: its AP; NaN for a query without a match). ``cmc[k]`` is then the
    fraction of the ``first_rank >= 0`` entries that are ``<= k`` and ``mAP`` the
    mean of the non-NaN ``ap`` (up to float rounding of the sum).

    Raises ValueError on a shape mismatch, ``max_rank < 1``, a NaN distance
    (found chunk by chunk, before that chunk is ranked), or when no query has a
    match in the gallery.
    """
    distmat = _check_matrix("distmat", distmat)
    num_q, num_g = distmat.shape
    ids = _check_ids(q_pids, g_pids, q_camids, g_camids, num_q, num_g, "row of distmat", "column of distmat")
    max_rank = _check_max_rank(max_rank, num_g)
    rows = _chunk_rows(num_g)

    def chunks() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, num_q, rows):
            yield start, _as_tensor(distmat[start : start + rows])  # a view: no copy

    return _evaluate_chunks(chunks(), ids, max_rank, source="distmat", per_query=per_query)


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
                      per_query: bool = False) -> dict:
    """:func:`evaluate` on the Euclidean distances between query features ``qf``
    (num_query x dim) and gallery features ``gf`` (num_gallery x dim).

    The distances are computed one block of query rows at a time (64 MB) and
    ranked at once, so memory is the features plus one block: a 50k x 50k
    problem needs no 10 GB matrix. Same result as
    ``evaluate(euclidean_distances(qf, gf), ...)``, ``per_query`` included.
    """
    qf, gf = _check_features(qf, gf)
    num_q, num_g = qf.shape[0], gf.shape[0]
    ids = _check_ids(q_pids, g_pids, q_camids, g_camids, num_q, num_g, "row of qf", "row of gf")
    max_rank = _check_max_rank(max_rank, num_g)
    rows = _chunk_rows(num_g)

    def chunks() -> Iterator[tuple[int, torch.Tensor]]:
        # one matrix product per block of queries (a few ranking chunks: BLAS needs the rows)
        for start, block in _distance_chunks(qf, gf, max(rows, _DISTANCE_BLOCK_ELEMENTS // num_g)):
            for i in range(0, len(block), rows):
                yield start + i, block[i : i + rows]

    return _evaluate_chunks(chunks(), ids, max_rank, source="the distances between qf and gf",
                            per_query=per_query)


def euclidean_distances(qf, gf, chunk: int = 1024) -> torch.Tensor:
    """Euclidean distances (float32, num_query x num_gallery) between the rows of ``qf`` and ``gf``.

    sqrt of the squared distance ||q||^2 + ||g||^2 - 2 q.g clamped at 0, one
    matrix product per ``chunk`` query rows, gallery norms computed once. (For
    training, :func:`components.losses.pairwise_distances` is the differentiable
    version of the same formula.)
    """
    qf, gf = _check_features(qf, gf)
    if chunk < 1:
        raise ValueError(f"chunk = {chunk}: use a number of query rows >= 1")
    out = torch.empty(qf.shape[0], gf.shape[0], dtype=torch.float32)
    for start, block in _distance_chunks(qf, gf, chunk):
        out[start : start + len(block)] = block
    return out


# --- ranking -----------------------------------------------------------------


@dataclass
class _Ids:
    """Person / camera ids as integer codes, and the gallery grouped by person id."""

    q_pid: torch.Tensor  # (num_q,) code of each query's person id
    q_cam: torch.Tensor  # (num_q,)
    g_cam: torch.Tensor  # (num_g,)
    g_by_pid: torch.Tensor  # gallery indices sorted by person id
    pid_start: torch.Tensor  # (num_pids,) where each person id starts in g_by_pid
    pid_count: torch.Tensor  # (num_pids,) gallery entries of each person id


def _evaluate_chunks(chunks: Iterator[tuple[int, torch.Tensor]], ids: _Ids, max_rank: int,
                     source: str, per_query: bool = False) -> dict:
    """Accumulate CMC, AP and INP over chunks (start row, distances of those rows) of ``source``;
    with ``per_query``, also each query's first-match rank and AP (see :func:`evaluate`)."""
    depth = min(max_rank, len(ids.g_cam))  # no rank beyond the gallery exists
    if per_query:
        first_rank = torch.full((len(ids.q_pid),), -1, dtype=torch.int64)
        query_ap = torch.full((len(ids.q_pid),), float("nan"), dtype=torch.float64)
    first_hits = torch.zeros(depth + 1, dtype=torch.int64)  # first-match ranks, >= depth in the last bin
    scratch = _Scratch()
    ap_sum = inp_sum = 0.0
    num_valid = num_q = 0
    for start, dist in chunks:
        stop = start + len(dist)
        # a NaN makes the sum NaN (so can +inf and -inf together: then look row by row)
        nan_rows = torch.isnan(dist).any(1).nonzero() if torch.isnan(dist.sum()) else []
        if len(nan_rows):
            raise ValueError(f"{source} has NaN distances (first in query row {start + int(nan_rows[0])}): "
                             "drop those queries or fix the features before evaluating")
        ranks, n, order = _match_ranks(dist, ids.q_pid[start:stop], ids.q_cam[start:stop], ids, scratch)
        num_q += len(dist)
        if not len(n):
            continue
        k = torch.arange(ranks.shape[1])
        is_match = k < n[:, None]  # ranks beyond a query's n matches are padding
        precision = torch.where(is_match, (k + 1).double() / (ranks + 1).double(), 0.0)  # at each match
        ap = precision.sum(1).div(n)
        ap_sum += float(ap.sum())
        if per_query:  # the valid queries of the chunk come in _match_ranks' order
            first_rank[start + order] = ranks[:, 0]
            query_ap[start + order] = ap
        inp_sum += float((n.double() / (ranks.gather(1, (n - 1)[:, None])[:, 0] + 1)).sum())
        first_hits += torch.bincount(ranks[:, 0].clamp(max=depth), minlength=depth + 1)
        num_valid += len(n)
    if num_valid == 0:
        raise ValueError(f"no query has a match in the gallery (a gallery entry with its person id "
                         f"from another camera) among {num_q} queries: check that q_pids/g_pids and "
                         "q_camids/g_camids use the same ids")
    cmc = first_hits[:depth].cumsum(0).double().numpy() / num_valid
    cmc = np.pad(cmc, (0, max_rank - depth), mode="edge")
    out = {"cmc": cmc, "mAP": ap_sum / num_valid, "mINP": inp_sum / num_valid,
           "num_valid": num_valid, "num_skipped": num_q - num_valid}
    if per_query:
        out.update(first_rank=first_rank.numpy(), ap=query_ap.numpy())
    return out


def _match_ranks(dist: torch.Tensor, q_pid: torch.Tensor, q_cam: torch.Tensor, ids: _Ids,
                 scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranks (0-based, junk removed) of each query's matches, closest match first.

    Returns ``ranks`` (valid queries x max matches; columns past a query's own
    count are padding), ``n``, the number of matches of each valid query, and
    ``order``, the row in ``dist`` of each valid query (they come most matches
    first). Queries without a match are left out.
    """
    rows_in_chunk = len(dist)
    # Every gallery entry with the query's person id, as a flat (row, col) list, row by row.
    lens = ids.pid_count[q_pid]
    rows = torch.repeat_interleave(torch.arange(rows_in_chunk), lens)
    offset = ids.pid_start[q_pid] - (lens.cumsum(0) - lens)
    cols = ids.g_by_pid[torch.repeat_interleave(offset, lens) + torch.arange(len(rows))]
    values = dist[rows, cols]
    is_match = ids.g_cam[cols] != q_cam[rows]  # same camera: junk
    n = torch.bincount(rows[is_match], minlength=rows_in_chunk)
    n_junk = lens - n

    # Valid queries only, most matches first: pass k then works on a prefix of the rows.
    order = torch.argsort(n, descending=True, stable=True)[: int((n > 0).sum())]
    n, n_junk = n[order], n_junk[order]
    thresholds = _sorted_per_row(rows[is_match], values[is_match], rows_in_chunk)[order]
    junk = _sorted_per_row(rows[~is_match], values[~is_match], rows_in_chunk)[order]
    d = torch.index_select(dist, 0, order, out=scratch.get("rows", (len(order), dist.shape[1]), dist.dtype))

    # at_or_below[k, i]: gallery entries of query i (all of them) at a distance <= its match k.
    # Float sums of 0/1 are exact below 2**24 and much faster than integer ones.
    width = thresholds.shape[1]
    count_type = torch.float32 if d.shape[1] < 2**24 else torch.float64
    at_or_below = torch.zeros(width, len(n), dtype=count_type)
    many = int((n > _MAX_PASSES).sum())
    if many:
        # bucket of an entry = number of matches strictly closer; entries in buckets 0..k are <= match k
        bucket = torch.searchsorted(thresholds[:many], d[:many])
        hist = torch.zeros(many, width + 1, dtype=count_type)
        hist.scatter_add_(1, bucket, torch.ones(1, dtype=count_type).expand_as(bucket))
        at_or_below[:, :many] = hist.cumsum(1)[:, :width].T
    if many < len(n):
        hits = scratch.get("hits", d[many:].shape, count_type)
        active = (n[:, None] > torch.arange(width)).sum(0).tolist()  # queries with a match k
        for k in range(int(n[many])):
            rows_k, hits_k = slice(many, active[k]), hits[: active[k] - many]
            torch.le(d[rows_k], thresholds[rows_k, k : k + 1], out=hits_k)
            torch.sum(hits_k, 1, out=at_or_below[k, rows_k])

    # Take out the matches and the junk entries themselves: what is left is the
    # non-matches at a distance <= match k, and match k has k matches before it.
    matches_le = torch.searchsorted(thresholds, thresholds, right=True).clamp(max=n[:, None])
    junk_le = torch.searchsorted(junk, thresholds, right=True).clamp(max=n_junk[:, None])
    ranks = at_or_below.T.long() - matches_le - junk_le + torch.arange(width)
    return ranks, n, order


class _Scratch:
    """Working arrays reused from chunk to chunk: a fresh multi-MB allocation per
    chunk costs more (page faults) than the compares done in it."""

    def __init__(self) -> None:
        self.arrays: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        flat = self.arrays.get(name)
        if flat is None or flat.dtype != dtype or len(flat) < size:
            flat = self.arrays[name] = torch.empty(size, dtype=dtype)
        return flat[:size].view(shape)


def _sorted_per_row(rows: torch.Tensor, values: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The values of each row (``rows`` ascending), sorted, in a (num_rows, max count) matrix padded with +inf."""
    counts = torch.bincount(rows, minlength=num_rows)
    out = torch.full((num_rows, max(int(counts.max()) if len(rows) else 0, 1)), float("inf"), dtype=values.dtype)
    out[rows, torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]] = values
    return out.sort(1).values


# --- inputs ------------------------------------------------------------------


def _chunk_rows(num_g: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(num_g, 1))


def _distance_chunks(qf: torch.Tensor, gf: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start row, Euclidean distances of qf[start : start + rows] to gf), block by block."""
    g_norm = gf.pow(2).sum(1)
    for start in range(0, len(qf), rows):
        q = qf[start : start + rows]
        d2 = torch.addmm(g_norm[None, :], q, gf.T, alpha=-2)  # ||g||^2 - 2 q.g
        d2 += q.pow(2).sum(1, keepdim=True)
        yield start, d2.clamp_min_(0).sqrt_()


def _as_tensor(x) -> torch.Tensor:
    """A CPU torch view of x (numpy array, memmap, tensor), as float32 or float64; copied only to convert."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        with warnings.catch_warnings():  # read-only arrays (memmap mode "r"): we never write to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.asarray(x))
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.float() if t.is_floating_point() else t.double()


def _check_matrix(name: str, x):
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected a 2-D (num_query, num_gallery) matrix")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected at least one query and one gallery entry")
    return x


def _check_features(qf, gf) -> tuple[torch.Tensor, torch.Tensor]:
    """qf and gf as float32 CPU tensors, after checking shapes and values."""
    checked = []
    for name, x in [("qf", qf), ("gf", gf)]:
        t = _as_tensor(x).float()
        if t.ndim != 2 or t.shape[0] == 0:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected a 2-D (num_images, feature_dim) "
                             "matrix with at least one row")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has NaN or infinite values: fix the model output before evaluating")
        checked.append(t)
    qf, gf = checked
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf has {qf.shape[1]} feature dimensions and gf {gf.shape[1]}: "
                         "both must come from the same model")
    return qf, gf


def _check_ids(q_pids, g_pids, q_camids, g_camids, num_q: int, num_g: int,
               q_entry: str, g_entry: str) -> _Ids:
    """Validate the four id arrays against the matrix shape and code them as integers."""
    arrays = {}
    for name, x, size, entry in [("q_pids", q_pids, num_q, q_entry), ("g_pids", g_pids, num_g, g_entry),
                                 ("q_camids", q_camids, num_q, q_entry), ("g_camids", g_camids, num_g, g_entry)]:
        a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
        if a.shape != (size,):
            kind = "person" if name.endswith("pids") else "camera"
            raise ValueError(f"{name} has shape {a.shape}: expected ({size},), one {kind} id per {entry}")
        arrays[name] = a
    pid = _codes(arrays["q_pids"], arrays["g_pids"])
    cam = _codes(arrays["q_camids"], arrays["g_camids"])
    g_pid = pid[num_q:]
    pid_count = torch.bincount(g_pid, minlength=int(pid.max()) + 1)
    return _Ids(q_pid=pid[:num_q], q_cam=cam[:num_q], g_cam=cam[num_q:],
                g_by_pid=torch.argsort(g_pid, stable=True),
                pid_start=pid_count.cumsum(0) - pid_count, pid_count=pid_count)


def _codes(query: np.ndarray, gallery: np.ndarray) -> torch.Tensor:
    """Integer codes 0..m-1 of the query ids followed by the gallery ids (equal ids, equal codes)."""
    return torch.from_numpy(np.unique(np.concatenate([query, gallery]), return_inverse=True)[1].astype(np.int64))


def _check_max_rank(max_rank, num_g: int) -> int:
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank = {max_rank!r}: expected an integer >= 1 (the CMC length, e.g. 50)")
    if max_rank > num_g:
        warnings.warn(f"max_rank = {max_rank} is larger than the gallery ({num_g} entries): "
                      f"CMC ranks beyond {num_g} repeat the last value", stacklevel=3)
    return int(max_rank)
