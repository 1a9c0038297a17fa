"""The evaluation's pictures: real PNGs, frames really drawn, clear errors, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from components import figures


def _png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.mode in ("RGB", "RGBA")
        assert im.width > 50 and im.height > 50
        return np.asarray(im.convert("RGB"))


def _green_pixels(rgb: np.ndarray) -> int:
    r, g, b = (rgb[..., k].astype(int) for k in range(3))
    return int(np.sum((g > 150) & (r < 60) & (b < 60)))


def _grey(h, w, value=0.5):
    """A flat grey torch image [3, H, W] (no green anywhere)."""
    return torch.full((3, h, w), value)


def _blue_uint8(h, w):
    x = np.zeros((h, w, 3), dtype=np.uint8)
    x[..., 2] = 200
    return x


def _ranked(tmp_path, matches, name="ranked.png"):
    probes = [_grey(16, 8), _blue_uint8(32, 16)]  # two probes of different sizes and kinds
    recoveries = [[_grey(16 * r, 8 * r, 0.2 * r) for r in (1, 2, 3, 4)] for _ in probes]
    gallery = [[_grey(64, 32, 0.3) for _ in range(12)], [_blue_uint8(64, 32) for _ in range(10)]]
    return figures.ranked_list(
        probes, recoveries, gallery, tmp_path / name,
        probe_labels=["id 3, x4", "id 7, x2"],
        scale_probs=[[0.1, 0.42, 0.28, 0.2], [0.5, 0.2, 0.2, 0.1]],
        matches=matches,
        gallery_labels=[[f"id {k}, d={k / 3:.1f}" for k in range(12)], [f"id {k}" for k in range(10)]],
        top_k=10)


def test_cmc_chart(tmp_path):
    cmc = np.linspace(0.4, 1.0, 50)
    out = figures.cmc_chart({"PRI": cmc, "baseline": cmc * 0.8}, tmp_path / "sub" / "cmc.png",
                            std={"PRI": np.full(50, 0.05)})
    assert out == tmp_path / "sub" / "cmc.png"
    _png(out)
    with pytest.raises(ValueError, match="curves"):
        figures.cmc_chart({}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="curves"):
        figures.cmc_chart({"percent": cmc * 100}, tmp_path / "pct.png")
    assert not (tmp_path / "empty.png").exists()


def test_ranked_list_frames_are_drawn(tmp_path):
    with_match = _ranked(tmp_path, [[k in (0, 3) for k in range(12)], [False] * 10])
    without = _ranked(tmp_path, [[False] * 12, [False] * 10], name="no_match.png")
    plain = _ranked(tmp_path, None, name="plain.png")
    green = _green_pixels(_png(with_match))
    assert green > 100  # two green frames of ~4 px around 1.5-inch cells
    assert _green_pixels(_png(without)) == 0
    assert _green_pixels(_png(plain)) == 0
    # the red frames of the non-matches are there too
    rgb = _png(without).astype(int)
    assert np.sum((rgb[..., 0] > 180) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)) > 100


def test_ranked_list_bad_input(tmp_path):
    probes = [_grey(16, 8), _grey(32, 16)]
    with pytest.raises(ValueError, match="recoveries"):
        figures.ranked_list(probes, [[_grey(16, 8)]], [[_grey(64, 32)]] * 2, tmp_path / "x.png")
    with pytest.raises(ValueError, match="scale_probs"):
        figures.ranked_list(probes, [[_grey(16, 8)] * 4] * 2, [[_grey(64, 32)]] * 2, tmp_path / "x.png",
                            scale_probs=[[0.25] * 4])
    with pytest.raises(ValueError, match="probes"):
        figures.ranked_list([], [], [], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_scale_histogram_table_counts():
    true = [2, 2, 2, 2, 3, 3, 4]
    pred = [2, 2, 3, 1, 3, 3, 2]
    rows = figures.scale_histogram_table(true, pred, (1, 2, 3, 4))
    assert len(rows) == 3 * 4
    by = {(r["true_scale"], r["predicted_scale"]): r for r in rows}
    assert [by[(2.0, s)]["count"] for s in (1, 2, 3, 4)] == [1, 2, 1, 0]
    assert [by[(3.0, s)]["count"] for s in (1, 2, 3, 4)] == [0, 0, 2, 0]
    assert [by[(4.0, s)]["count"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert by[(2.0, 2.0)]["fraction"] == pytest.approx(0.5)
    for t in (2.0, 3.0, 4.0):
        assert sum(by[(t, s)]["fraction"] for s in (1, 2, 3, 4)) == pytest.approx(1.0)


def test_scale_histogram_continuous_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.uniform(1.0, 4.0, size=200)  # VR protocol: continuous factors -> quantile bins
    pred = rng.choice([1, 2, 3, 4], size=200)
    rows = figures.scale_histogram_table(true, pred, bins=4)
    groups = {r["true_scale"] for r in rows}
    assert len(groups) == 4 and all(isinstance(g, str) for g in groups)
    assert sum(r["count"] for r in rows) == 200
    for g in groups:
        assert sum(r["fraction"] for r in rows if r["true_scale"] == g) == pytest.approx(1.0)
    _png(figures.scale_histogram(true, pred, tmp_path / "hist_vr.png"))
    _png(figures.scale_histogram([2, 3, 4, 4], [2, 2, 4, 3], tmp_path / "hist.png"))
    with pytest.raises(ValueError, match="predicted_scales"):
        figures.scale_histogram_table([2, 3], [2], (1, 2, 3, 4))
    with pytest.raises(ValueError, match="predicted_scales"):
        figures.scale_histogram_table([2, 3], [2, 5], (1, 2, 3, 4))


def test_r_p_evolution(tmp_path):
    history = {"0001_c1_00": [(e, 2 + (e % 2)) for e in range(1, 40)],
               "0002_c2_01": [(e, 2) for e in range(1, 40)]}
    _png(figures.r_p_evolution(history, tmp_path / "rp.png"))
    _png(figures.r_p_evolution({"only": [(1, 3)], "other": [(1, 2)]}, tmp_path / "rp1.png"))
    with pytest.raises(ValueError, match="history"):
        figures.r_p_evolution({}, tmp_path / "none.png")


def test_image_grid(tmp_path):
    hr = torch.rand(3, 64, 32)
    rows = [[_grey(16, 8)] + [_grey(16 * r, 8 * r) for r in (1, 2, 3, 4)] + [hr],
            [_blue_uint8(21, 11), np.ones((64, 32, 3), dtype=np.float32), hr.permute(1, 2, 0).numpy()]]
    out = figures.image_grid(rows, tmp_path / "grid.png", row_labels=["probe a", "probe b"],
                             col_labels=["LR", "x1", "x2", "x3", "x4", "HR"])
    _png(out)
    with pytest.raises(ValueError, match="row_labels"):
        figures.image_grid(rows, tmp_path / "bad.png", row_labels=["one"])
    with pytest.raises(ValueError, match=r"rows\[0\]\[0\]"):
        figures.image_grid([[np.zeros((4, 4, 4, 4))]], tmp_path / "bad.png")


def test_failure_leaves_no_file(tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    target = tmp_path / "out" / "cmc.png"
    with pytest.raises(RuntimeError, match="disk full"):
        figures.cmc_chart({"PRI": np.linspace(0.5, 1, 20)}, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary left either


def _red_pixels(rgb: np.ndarray) -> int:
    """Pixels of figures.SIGNIFICANT_COLOR (tab:red, ~(214, 39, 40))."""
    r, g, b = (rgb[..., k].astype(int) for k in range(3))
    return int(np.sum((r > 180) & (g < 80) & (b < 80)))


def test_predictor_confusion(tmp_path):
    confusion = np.array([[3, 40, 10, 1], [0, 12, 30, 8], [1, 2, 10, 45]])
    out = figures.predictor_confusion(confusion, [2, 3, 4], [1, 2, 3, 4], tmp_path / "sub" / "confusion.png",
                                      title="P's r_p per true factor")
    assert out == tmp_path / "sub" / "confusion.png"
    rgb = _png(out)
    assert rgb.shape[1] > 300 and rgb.shape[0] > 200
    # a row without probes is drawn blank, not divided by zero
    _png(figures.predictor_confusion([[0, 0], [2, 1]], [2.0, 3.5], [1, 2], tmp_path / "empty_row.png"))
    with pytest.raises(ValueError, match="true_scales"):
        figures.predictor_confusion(confusion, [2, 3], [1, 2, 3, 4], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="scales"):
        figures.predictor_confusion(confusion, [2, 3, 4], [1, 2, 3], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="confusion"):
        figures.predictor_confusion(np.array([1, 2, 3]), [2], [1, 2, 3], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="confusion"):
        figures.predictor_confusion([[1.5, np.nan]], [2], [1, 2], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="confusion"):
        figures.predictor_confusion([[0, 0]], [2], [1, 2], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_forest_plot(tmp_path):
    rows = [("Adaptive (PRI) - Fixed x1", 3.2, 1.1, 5.4, 0.002),
            ("Adaptive (PRI) - best fixed", 0.3, -1.2, 1.9, 0.7),
            ("Ideal - Adaptive (PRI)", 12.5, 10.1, 14.8, 1e-4),
            ("RIFE as F + PRI - Bicubic + F", 1.0, -0.5, 2.5, None)]
    out = figures.forest_plot(rows, tmp_path / "sub" / "paired.png", title="rank-1", xlabel="points")
    assert out == tmp_path / "sub" / "paired.png"
    rgb = _png(out)
    assert rgb.shape[1] > 400 and rgb.shape[0] > 150
    assert _red_pixels(rgb) > 100  # the intervals that exclude 0
    # all intervals containing 0: nothing red
    grey = figures.forest_plot([(label, 0.1, -1.0, 1.2, 0.8) for label, *_ in rows], tmp_path / "grey.png")
    assert _red_pixels(_png(grey)) == 0
    _png(figures.forest_plot([("A - B", -2.0, -3.0, -1.0, np.nan)], tmp_path / "one.png"))  # 0 outside the data
    with pytest.raises(ValueError, match="rows"):
        figures.forest_plot([], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        figures.forest_plot([rows[0], ("A - B", 1.0, 2.0, 0.5, 0.1)], tmp_path / "bad.png")  # low > high
    with pytest.raises(ValueError, match=r"rows\[0\]"):
        figures.forest_plot([("A - B", np.nan, 0.0, 1.0, 0.1)], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"rows\[0\]"):
        figures.forest_plot([("A - B", 1.0, 0.0)], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="p_value"):
        figures.forest_plot([("A - B", 1.0, 0.0, 2.0, 1.5)], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_training_curves(tmp_path):
    pre = [{"epoch": e, "L": 6 - e * 0.5, "val_rank1": 10 + 5 * e} for e in range(4)]
    joint = [{"epoch": e, "L": 5 - e * 0.2, "val_rank1": 30 + e} for e in range(3)]
    _png(figures.training_curves({"pretrain": pre, "joint": joint}, tmp_path / "curves.png"))
    _png(figures.training_curves({"joint": [{"epoch": 0, "L": 1.0}]}, tmp_path / "no_val.png"))
    with pytest.raises(ValueError, match="phases"):
        figures.training_curves({"pretrain": []}, tmp_path / "none.png")
