"""MLR / VR / genuine protocols and the identity split, on small in-memory tables."""

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from components.config import DegradeParams
from components.data import table as T
from components.data.protocols import ProtocolError, degrade
from components.data.splits import SplitError, evaluation_set, split_identities, split_standard
from tests.conftest import make_canonical


def _rows(table):
    return table.to_pylist()


def test_mlr_one_hr_camera_per_identity_and_sizes(canonical):
    res = degrade(canonical, DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]), progress=False)
    rows = _rows(res.table)
    by_pid = {}
    for r in rows:
        by_pid.setdefault(r[T.PERSON_ID], []).append(r)
    for pid, rs in by_pid.items():
        hr_cams = {r[T.CAMERA_ID] for r in rs if r[T.ROLE] == "hr"}
        lr_cams = {r[T.CAMERA_ID] for r in rs if r[T.ROLE] == "lr"}
        assert len(hr_cams) == 1 and hr_cams.isdisjoint(lr_cams) and lr_cams
    for r in rows:
        if r[T.ROLE] == "hr":
            assert (r[T.HEIGHT], r[T.WIDTH], r[T.SCALE]) == (32, 16, 1.0)
        else:
            assert r[T.SCALE] in (2.0, 4.0)
            assert (r[T.HEIGHT], r[T.WIDTH]) == (32 // r[T.SCALE], 16 // r[T.SCALE])
    # both factors are used and the draw is reproducible
    assert {r[T.SCALE] for r in rows if r[T.ROLE] == "lr"} == {2.0, 4.0}
    again = degrade(canonical, DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]), progress=False)
    assert again.table.equals(res.table)


def test_mlr_drops_single_camera_identities_and_junk():
    table = make_canonical(n_ids=4)
    extra = make_canonical(n_ids=1, cams=(1,), seed=1)  # an identity seen by one camera
    extra = extra.set_column(1, T.PERSON_ID, pc.add(extra[T.PERSON_ID], 99))
    junk = make_canonical(n_ids=1, seed=2)
    junk = junk.set_column(1, T.PERSON_ID, pc.multiply(junk[T.PERSON_ID], 0))  # person id 0
    res = degrade(pa.concat_tables([table, extra, junk]), DegradeParams(hr_height=32, hr_width=16), progress=False)
    assert res.dropped["identity seen by one camera only"] == 1
    assert res.dropped["distractor or junk image (person id <= 0)"] == 6
    assert set(res.table[T.PERSON_ID].to_pylist()) == {1, 2, 3, 4}


def test_vr_widths_in_range_and_train_keeps_hr():
    split_of = lambda pid, cam, k: "train" if pid <= 3 else ("query" if k == 0 else "gallery")
    table = make_canonical(size=(64, 32), source_split=split_of)
    res = degrade(table, DegradeParams(protocol="vr", width_range=(8, 16), hr_height=64, hr_width=32), progress=False)
    lr = res.table.filter(pc.equal(res.table[T.ROLE], "lr")).to_pylist()
    assert len(lr) == table.num_rows
    assert all(8 <= r[T.WIDTH] < 16 for r in lr)
    assert all(r[T.SCALE] == pytest.approx(32 / r[T.WIDTH]) for r in lr)
    assert all(abs(r[T.HEIGHT] - 2 * r[T.WIDTH]) <= 1 for r in lr)  # aspect ratio kept
    hr = res.table.filter(pc.equal(res.table[T.ROLE], "hr")).to_pylist()
    assert {r[T.SOURCE_SPLIT] for r in hr} == {"train"} and all(r[T.IMAGE_ID].endswith("#hr") for r in hr)
    split = split_standard(res.table)
    q, g = evaluation_set(split.table, 0)
    assert set(q[T.PERSON_ID].to_pylist()) == {4, 5, 6}
    assert set(g[T.ROLE].to_pylist()) == {"lr"}
    assert split.pairs.num_rows > 0


def test_vr_needs_a_standard_division(canonical):
    with pytest.raises(ProtocolError, match="vr"):
        degrade(canonical, DegradeParams(protocol="vr"), progress=False)


def test_genuine_auto_picks_the_smaller_camera():
    big = make_canonical(cams=(1,), size=(64, 32))
    small = make_canonical(cams=(2,), size=(20, 10), seed=3)
    res = degrade(pa.concat_tables([big, small]), DegradeParams(protocol="genuine", hr_height=64, hr_width=32),
                  progress=False)
    roles = Counter((r[T.CAMERA_ID], r[T.ROLE]) for r in res.table.to_pylist())
    assert roles == {(1, "hr"): 18, (2, "lr"): 18}
    lr = res.table.filter(pc.equal(res.table[T.ROLE], "lr")).to_pylist()
    assert all(r[T.HEIGHT] == 20 and r[T.SCALE] == pytest.approx(64 / 20) for r in lr)
    with pytest.raises(ProtocolError, match="lr_camera = 7"):
        degrade(pa.concat_tables([big, small]), DegradeParams(protocol="genuine", lr_camera=7), progress=False)


def _mlr_split(n_ids=10, n_test=4, repeats=3, seed=0):
    table = make_canonical(n_ids=n_ids, per_cam=3)
    deg = degrade(table, DegradeParams(hr_height=32, hr_width=16), progress=False).table
    return split_identities(deg, n_test=n_test, repeats=repeats, seed=seed)


def test_identity_split_and_gallery_draws():
    res = _mlr_split()
    t = res.table
    train_ids = set(t.filter(pc.equal(t[T.SPLIT], "train"))[T.PERSON_ID].to_pylist())
    query_ids = set(t.filter(pc.equal(t[T.SPLIT], "query"))[T.PERSON_ID].to_pylist())
    assert len(query_ids) == 4 and len(train_ids) == 6 and not (train_ids & query_ids)
    for k in range(3):
        q, g = evaluation_set(t, k)
        assert set(q[T.ROLE].to_pylist()) == {"lr"}
        assert sorted(g[T.PERSON_ID].to_pylist()) == sorted(query_ids)  # one HR image per test identity
        assert set(g[T.ROLE].to_pylist()) == {"hr"}
    draws = [tuple(evaluation_set(t, k)[1][T.IMAGE_ID].to_pylist()) for k in range(3)]
    assert len(set(draws)) > 1  # the draws differ
    assert set(t.filter(pc.equal(t[T.SPLIT], "train"))[T.REPEAT].to_pylist()) == {-1}
    # pairs: same identity, different camera, LR -> HR
    rows = {r[T.IMAGE_ID]: r for r in t.to_pylist()}
    for p in res.pairs.to_pylist():
        lr, hr = rows[p["lr_image_id"]], rows[p["hr_image_id"]]
        assert lr[T.ROLE] == "lr" and hr[T.ROLE] == "hr" and lr[T.SPLIT] == hr[T.SPLIT] == "train"
        assert lr[T.PERSON_ID] == hr[T.PERSON_ID] and lr[T.CAMERA_ID] != hr[T.CAMERA_ID]
    with pytest.raises(SplitError, match="repeat 5"):
        evaluation_set(t, 5)


def test_split_seed_changes_identities_and_is_reproducible():
    a, b, c = _mlr_split(seed=0), _mlr_split(seed=0), _mlr_split(seed=1)
    assert a.table.equals(b.table)
    ids = lambda r: set(r.table.filter(pc.equal(r.table[T.SPLIT], "query"))[T.PERSON_ID].to_pylist())
    assert ids(a) != ids(c)


def test_split_larger_than_identities_names_the_key():
    with pytest.raises(SplitError, match=r"split.test_identities = 10 .* at most 9"):
        _mlr_split(n_ids=10, n_test=10)


def test_lr_sensor_noise_is_drawn_per_image_apart_from_r_and_only_on_lr(monkeypatch):
    """degrade.lr_noise: each LR image gets one sigma, from (seed, image id) alone; HR images and
    r's draw are as without noise; the noise has the sigma asked for; the bytes are reproducible."""
    import numpy as np

    from components import images
    from components.data.protocols import noise_sigma

    canonical = make_canonical(n_ids=40, per_cam=3, size=(64, 32), seed=1)
    clean_p = DegradeParams(hr_height=64, hr_width=32, scales=[2, 4])
    noisy_p = DegradeParams(hr_height=64, hr_width=32, scales=[2, 4], lr_noise=[0, 24])
    clean, noisy = (degrade(canonical, p, progress=False) for p in (clean_p, noisy_p))
    assert noisy.table.drop_columns([T.IMAGE]).equals(clean.table.drop_columns([T.IMAGE]))  # r, sizes, roles
    assert any("LR sensor noise (sigma: images): 0: " in n and ", 24: " in n for n in noisy.notes)
    cells, diffs = Counter(), []
    for a, b in zip(clean.table.to_pylist(), noisy.table.to_pylist()):
        x, y = (images.decode(r[T.IMAGE], r[T.IMAGE_ID]).astype(float) for r in (a, b))
        sigma = noise_sigma(noisy_p, b[T.IMAGE_ID])
        if b[T.ROLE] == "hr" or sigma == 0:
            assert np.array_equal(x, y)
        else:
            diffs.append((y - x).ravel())
        if b[T.ROLE] == "lr":
            cells[(b[T.SCALE], sigma)] += 1
    assert set(cells) == {(2.0, 0.0), (2.0, 24.0), (4.0, 0.0), (4.0, 24.0)}  # every level at every r
    pooled = np.concatenate(diffs)  # thousands of values: the sample std is within ~1 of sigma
    assert len(pooled) > 2000 and 20 < pooled.std() < 25.5  # 24, less what clipping at 0 / 255 takes
    assert degrade(canonical, noisy_p, progress=False).table.equals(noisy.table)
    assert noise_sigma(clean_p, "0001_c1_00") == 0.0


def test_lr_noise_params_are_checked():
    from components.config import ParamsError, validate_params

    with pytest.raises(ParamsError, match="degrade.lr_noise"):
        validate_params({"degrade": {"lr_noise": [0, -3]}})
