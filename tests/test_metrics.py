"""components.metrics against a per-query reference loop and hand-computed values."""

import warnings

import numpy as np
import pytest
import torch

from components import metrics
from components.metrics import euclidean_distances, evaluate, evaluate_features


def reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The straightforward per-query loop: torchreid's eval_market1501 in NumPy, plus fast-reid's mINP.

    Sorts each query's full gallery row; junk (same person id and camera) is
    removed; queries without a match are skipped. Returns evaluate()'s dict.
    """
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(num_q):
        order = np.argsort(distmat[q])
        same_pid = g_pids[order] == q_pids[q]
        keep = ~(same_pid & (g_camids[order] == q_camids[q]))
        raw_cmc = same_pid[keep]  # 1 where the entry at this rank is a match
        if not raw_cmc.any():
            continue
        hits = raw_cmc.cumsum()
        last = np.flatnonzero(raw_cmc)[-1]
        all_inp.append(hits[last] / (last + 1.0))
        cmc = np.minimum(hits, 1)[:max_rank].astype(np.float64)
        all_cmc.append(np.pad(cmc, (0, max_rank - len(cmc)), mode="edge"))  # junk shortened the row
        precision = hits / np.arange(1.0, len(hits) + 1)
        all_ap.append((precision * raw_cmc).sum() / raw_cmc.sum())
    num_valid = len(all_ap)
    assert num_valid > 0, "no query has a match in the gallery"
    return {"cmc": np.sum(all_cmc, axis=0) / num_valid, "mAP": float(np.mean(all_ap)),
            "mINP": float(np.mean(all_inp)), "num_valid": num_valid, "num_skipped": num_q - num_valid}


def random_problem(num_q, num_g, num_ids, num_cams, seed, dtype=np.float64):
    """Random distances and ids; the query ids run past the gallery's, so some queries have no match."""
    rng = np.random.default_rng(seed)
    distmat = rng.random((num_q, num_g)).astype(dtype)
    q_pids = rng.integers(0, num_ids + 3, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    return distmat, q_pids, g_pids, q_camids, g_camids


def assert_same(result, expected):
    """Equal to 1e-6; the reference's CMC stops at the gallery size, evaluate() repeats the last value."""
    n = len(expected["cmc"])
    np.testing.assert_allclose(result["cmc"][:n], expected["cmc"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(result["cmc"][n:], result["cmc"][n - 1])
    assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert result["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)
    assert (result["num_valid"], result["num_skipped"]) == (expected["num_valid"], expected["num_skipped"])


@pytest.mark.parametrize("num_q, num_g, num_ids, num_cams, seed", [
    (40, 300, 30, 6, 0),    # ~10 entries per id, several matches per query
    (50, 200, 100, 2, 1),   # ~2 entries per id: many queries skipped or with junk only
    (30, 500, 3, 3, 2),     # few ids: >100 matches per query
    (64, 64, 64, 2, 3),     # about one entry per id
    (1, 30, 2, 2, 4),
])
def test_evaluate_matches_the_reference_loop(num_q, num_g, num_ids, num_cams, seed):
    problem = random_problem(num_q, num_g, num_ids, num_cams, seed)
    expected = reference_evaluate(*problem, max_rank=20)
    assert expected["num_skipped"] > 0 or num_q == 1
    assert_same(evaluate(*problem, max_rank=20), expected)


def test_chunks_and_the_binary_search_path_give_the_same_result(monkeypatch):
    problem = random_problem(100, 400, 10, 4, seed=5)
    expected = reference_evaluate(*problem)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7 * 400)  # 7 rows per chunk, a partial last one
    assert_same(evaluate(*problem), expected)
    monkeypatch.setattr(metrics, "_MAX_PASSES", 20)  # some queries (~30 matches) by binary search
    assert_same(evaluate(*problem), expected)
    monkeypatch.setattr(metrics, "_MAX_PASSES", 0)  # all of them
    assert_same(evaluate(*problem), expected)


def test_queries_with_only_junk_are_skipped():
    # query 0 (pid 1, cam 0): its only pid-1 entries are in cam 0 -> junk, skipped
    # query 1 (pid 2, cam 0): one junk entry, one match
    # query 2 (pid 9): not in the gallery at all -> skipped
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                        [0.5, 0.1, 0.2, 0.3, 0.4],
                        [0.1, 0.2, 0.3, 0.4, 0.5]])
    problem = (distmat, np.array([1, 2, 9]), np.array([1, 1, 2, 2, 3]), np.array([0, 0, 0]),
               np.array([0, 0, 0, 1, 1]))
    result = evaluate(*problem, max_rank=3)
    # query 1, junk (col 2) removed: col 1 (0.1), col 3 (0.3, match), col 4, col 0 -> match at rank 2
    np.testing.assert_allclose(result["cmc"], [0.0, 1.0, 1.0])
    assert result["mAP"] == pytest.approx(0.5)
    assert (result["num_valid"], result["num_skipped"]) == (1, 2)
    assert_same(result, reference_evaluate(*problem, max_rank=3))


def test_hand_computed_one_query():
    # gallery ranked by distance: m, n, m, n, m (m = match) -> matches at ranks 1, 3, 5
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    result = evaluate(distmat, np.array([7]), np.array([7, 8, 7, 9, 7]), np.array([0]),
                      np.array([1, 1, 2, 1, 2]), max_rank=5)
    np.testing.assert_allclose(result["cmc"], [1, 1, 1, 1, 1])
    assert result["mAP"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert result["mINP"] == pytest.approx(3 / 5)

    # shuffled columns, first match at rank 3, one junk entry (same camera 0) at the front
    distmat = np.array([[0.4, 0.05, 0.3, 0.1, 0.2, 0.9]])
    g_pids = np.array([7, 7, 7, 8, 9, 8])
    g_camids = np.array([1, 0, 2, 1, 1, 1])
    result = evaluate(distmat, np.array([7]), g_pids, np.array([0]), g_camids, max_rank=4)
    # without the junk: 0.1 (n), 0.2 (n), 0.3 (m), 0.4 (m), 0.9 (n)
    np.testing.assert_allclose(result["cmc"], [0, 0, 1, 1])
    assert result["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert result["mINP"] == pytest.approx(2 / 4)


def test_ties_rank_the_non_match_first():
    distmat = np.array([[0.5, 0.5, 0.7]])  # match and non-match at the same distance
    result = evaluate(distmat, np.array([1]), np.array([1, 2, 3]), np.array([0]), np.array([1, 1, 1]),
                      max_rank=3)
    np.testing.assert_allclose(result["cmc"], [0, 1, 1])
    assert result["mAP"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("make", [np.asarray, np.asfortranarray, torch.from_numpy, "memmap", "float32",
                                  "string ids"])
def test_input_kinds(make, tmp_path):
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(20, 50, 8, 3, seed=6)
    expected = reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids)
    if make == "memmap":
        np.save(tmp_path / "d.npy", distmat)
        distmat = np.load(tmp_path / "d.npy", mmap_mode="r")  # read-only
    elif make == "float32":
        distmat = distmat.astype(np.float32)  # no ties in 20 x 50 draws: same ranking
    elif make == "string ids":
        q_pids, g_pids = q_pids.astype(str), g_pids.astype(str)
    else:
        distmat = make(distmat)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50), expected)


def test_evaluate_features_agrees_with_distances_and_cdist(monkeypatch):
    rng = np.random.default_rng(7)
    qf = rng.standard_normal((60, 16)).astype(np.float32)
    gf = rng.standard_normal((250, 16)).astype(np.float32)
    _, q_pids, g_pids, q_camids, g_camids = random_problem(60, 250, 25, 6, seed=7)
    ids = (q_pids, g_pids, q_camids, g_camids)

    d = euclidean_distances(qf, gf, chunk=16)
    reference = torch.cdist(torch.from_numpy(qf).double(), torch.from_numpy(gf).double())
    torch.testing.assert_close(d.double(), reference, rtol=1e-5, atol=1e-5)

    expected = reference_evaluate(reference.numpy(), *ids)
    assert_same(evaluate(d, *ids), expected)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 9 * 250)  # ranked 9 queries at a time
    monkeypatch.setattr(metrics, "_DISTANCE_BLOCK_ELEMENTS", 20 * 250)  # distances 20 at a time
    assert_same(evaluate_features(qf, gf, *ids), expected)
    assert_same(evaluate_features(torch.from_numpy(qf), torch.from_numpy(gf), *ids), expected)


def test_max_rank_beyond_the_gallery_warns_and_pads():
    problem = random_problem(10, 6, 3, 2, seed=8)
    with pytest.warns(UserWarning, match="max_rank = 10 is larger than the gallery"):
        result = evaluate(*problem, max_rank=10)
    assert len(result["cmc"]) == 10
    np.testing.assert_allclose(result["cmc"][5:], 1.0)
    assert_same(result, reference_evaluate(*problem, max_rank=10))


def test_no_query_with_a_match_raises():
    distmat = np.random.default_rng(9).random((3, 4))
    with pytest.raises(ValueError, match="no query has a match in the gallery"):
        evaluate(distmat, np.array([1, 2, 3]), np.array([1, 2, 3, 4]), np.zeros(3), np.zeros(4), max_rank=4)


GOOD = random_problem(5, 8, 3, 2, seed=10)


@pytest.mark.parametrize("index, bad, name", [
    (0, np.zeros(8), "distmat"),                       # 1-D
    (0, np.zeros((5, 8, 1)), "distmat"),
    (0, np.zeros((5, 0)), "distmat"),
    (1, np.zeros(4, int), "q_pids"),
    (1, np.zeros((5, 1), int), "q_pids"),
    (2, np.zeros(9, int), "g_pids"),
    (3, np.zeros(6, int), "q_camids"),
    (4, np.zeros(7, int), "g_camids"),
])
def test_shape_errors_name_the_argument(index, bad, name):
    args = list(GOOD)
    args[index] = bad
    with pytest.raises(ValueError, match=name) as err:
        evaluate(*args)
    assert str(tuple(np.shape(bad))) in str(err.value)


@pytest.mark.parametrize("max_rank", [0, -1, 2.5, True])
def test_bad_max_rank(max_rank):
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(*GOOD, max_rank=max_rank)


def test_nan_distance_raises():
    distmat = GOOD[0].copy()
    distmat[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"distmat has NaN distances \(first in query row 3\)"):
        evaluate(distmat, *GOOD[1:], max_rank=5)


def test_feature_errors_name_the_argument():
    qf, gf = np.zeros((5, 4), np.float32), np.zeros((8, 4), np.float32)
    ids = GOOD[1:]
    with pytest.raises(ValueError, match="qf has shape"):
        evaluate_features(np.zeros(4), gf, *ids)
    with pytest.raises(ValueError, match="feature dimensions"):
        evaluate_features(qf, np.zeros((8, 3)), *ids)
    with pytest.raises(ValueError, match=r"g_pids has shape \(8,\): expected \(9,\)"):
        evaluate_features(qf, np.zeros((9, 4)), *ids)
    bad = gf.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="gf has NaN"):
        evaluate_features(qf, bad, *ids)


# --- per-query results ---------------------------------------------------------


def reference_per_query(distmat, q_pids, g_pids, q_camids, g_camids):
    """Per query, by the loop of reference_evaluate: (first match rank, 0-based, junk removed, -1
    without a match; AP, NaN without a match)."""
    first_rank = np.full(len(distmat), -1, dtype=np.int64)
    ap = np.full(len(distmat), np.nan)
    for q in range(len(distmat)):
        order = np.argsort(distmat[q])
        same_pid = g_pids[order] == q_pids[q]
        raw_cmc = same_pid[~(same_pid & (g_camids[order] == q_camids[q]))]
        if raw_cmc.any():
            first_rank[q] = np.flatnonzero(raw_cmc)[0]
            precision = raw_cmc.cumsum() / np.arange(1.0, len(raw_cmc) + 1)
            ap[q] = (precision * raw_cmc).sum() / raw_cmc.sum()
    return first_rank, ap


def assert_per_query_consistent(result, max_rank):
    """first_rank / ap reproduce the returned CMC, mAP and counts."""
    rank, ap = result["first_rank"], result["ap"]
    assert rank.dtype == np.int64 and ap.dtype == np.float64
    valid = rank >= 0
    np.testing.assert_array_equal(np.isnan(ap), ~valid)
    assert (int(valid.sum()), int((~valid).sum())) == (result["num_valid"], result["num_skipped"])
    cmc = np.array([np.mean(rank[valid] < k) for k in range(1, max_rank + 1)])
    np.testing.assert_allclose(result["cmc"], cmc, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result["mAP"], np.mean(ap[valid]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk_rows, max_passes", [(None, None), (7, None), (7, 20), (13, 0)])
@pytest.mark.parametrize("num_q, num_g, num_ids, num_cams, seed", [
    (100, 400, 10, 4, 11),  # ~40 matches per query, junk, some queries without a match
    (90, 300, 60, 2, 12),   # ~5 entries per id: many queries skipped, matches vary 0..10
])
def test_per_query_matches_the_reference_and_the_aggregates(monkeypatch, chunk_rows, max_passes,
                                                            num_q, num_g, num_ids, num_cams, seed):
    problem = random_problem(num_q, num_g, num_ids, num_cams, seed)
    if chunk_rows:  # several chunks, a partial last one
        monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", chunk_rows * num_g)
    if max_passes is not None:  # some or all queries by the binary search
        monkeypatch.setattr(metrics, "_MAX_PASSES", max_passes)
    result = evaluate(*problem, max_rank=30, per_query=True)
    first_rank, ap = reference_per_query(*problem)
    assert 0 < result["num_skipped"] < num_q
    assert (first_rank >= 30).any()  # a first match beyond max_rank keeps its own rank
    np.testing.assert_array_equal(result["first_rank"], first_rank)
    np.testing.assert_allclose(result["ap"], ap, rtol=1e-12, atol=0)  # NaN where NaN
    assert_per_query_consistent(result, 30)
    assert_same(result, reference_evaluate(*problem, max_rank=30))


def test_per_query_keeps_the_query_order():
    # queries without a match, with one match and with two, shuffled: the chunk ranks them most matches first
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                        [0.5, 0.1, 0.2, 0.3, 0.4, 0.6],
                        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                        [0.3, 0.4, 0.5, 0.6, 0.1, 0.2]])
    problem = (distmat, np.array([1, 2, 9, 3]), np.array([1, 1, 2, 2, 3, 3]), np.array([0, 0, 0, 0]),
               np.array([0, 0, 0, 1, 1, 1]))
    result = evaluate(*problem, max_rank=3, per_query=True)
    # query 0: junk only; 1: col 2 is junk, match col 3 at rank 1; 2: no id 9; 3: matches at ranks 0, 1
    np.testing.assert_array_equal(result["first_rank"], [-1, 1, -1, 0])
    np.testing.assert_allclose(result["ap"], [np.nan, 0.5, np.nan, 1.0])
    assert_per_query_consistent(result, 3)


def test_per_query_is_opt_in_and_changes_nothing_else(monkeypatch):
    problem = random_problem(60, 200, 20, 3, seed=13)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 11 * 200)
    plain = evaluate(*problem, max_rank=20)
    assert set(plain) == {"cmc", "mAP", "mINP", "num_valid", "num_skipped"}
    full = evaluate(*problem, max_rank=20, per_query=True)
    assert set(full) == set(plain) | {"first_rank", "ap"}
    np.testing.assert_array_equal(full["cmc"], plain["cmc"])  # bit-identical
    assert [full[k] for k in ("mAP", "mINP", "num_valid", "num_skipped")] == \
           [plain[k] for k in ("mAP", "mINP", "num_valid", "num_skipped")]


def test_evaluate_features_per_query(monkeypatch):
    rng = np.random.default_rng(14)
    qf = rng.standard_normal((70, 16)).astype(np.float32)
    gf = rng.standard_normal((240, 16)).astype(np.float32)
    _, *ids = random_problem(70, 240, 24, 5, seed=14)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 9 * 240)  # ranked 9 queries at a time
    monkeypatch.setattr(metrics, "_DISTANCE_BLOCK_ELEMENTS", 20 * 240)  # distances 20 at a time
    result = evaluate_features(qf, gf, *ids, max_rank=25, per_query=True)
    reference = torch.cdist(torch.from_numpy(qf).double(), torch.from_numpy(gf).double()).numpy()
    first_rank, ap = reference_per_query(reference, *ids)
    assert 0 < result["num_skipped"] < 70
    np.testing.assert_array_equal(result["first_rank"], first_rank)
    np.testing.assert_allclose(result["ap"], ap, rtol=1e-12, atol=0)
    assert_per_query_consistent(result, 25)
    from_distances = evaluate(euclidean_distances(qf, gf), *ids, max_rank=25, per_query=True)
    np.testing.assert_array_equal(result["first_rank"], from_distances["first_rank"])
    # chunks of 9, 9, 2 per block of 20 here, of 9 there: AP sums may differ in the last bit
    np.testing.assert_allclose(result["ap"], from_distances["ap"], rtol=1e-12, atol=0)
