"""G (components/models/recovery.py): shapes, the fast integer path against the general
path and a per-pixel reference, MLP evaluations per phase, gradients, the bicubic
baseline, and load_weights errors. A tiny RDN keeps the whole file fast on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from components.config import SRParams
from components.models.recovery import (
    RDN, BicubicRecovery, MetaRDN, MetaUpscale, build_recovery, load_weights, out_size,
)

TINY = dict(blocks=2, convs_per_block=2, growth=8, channels=16, kernel=3, meta_hidden=32)
SCALES = (1, 2, 3, 4, 1.5, 2.5, 3.3)


@pytest.fixture
def g() -> MetaRDN:
    torch.manual_seed(0)
    return MetaRDN(**TINY)


def naive_meta_upscale(up: MetaUpscale, feat: torch.Tensor, r: float) -> torch.Tensor:
    """Per-pixel Meta-SR, straight from the definition (Python loops: tiny inputs only)."""
    B, C, H, W = feat.shape
    k = up.kernel
    Ho, Wo = out_size(H, W, r)
    padded = F.pad(feat, (k // 2,) * 4)
    out = torch.zeros(B, 3, Ho, Wo, dtype=feat.dtype)
    for i in range(Ho):
        for j in range(Wo):
            si, sj = math.floor(i / r + 1e-9), math.floor(j / r + 1e-9)
            v = torch.tensor([[1 / r, max(i / r - si, 0.0), max(j / r - sj, 0.0)]], dtype=feat.dtype)
            w = up.mlp(v).view(3, C, k, k)
            patch = padded[:, :, si:si + k, sj:sj + k]
            out[:, :, i, j] = torch.einsum("bcxy,ocxy->bo", patch, w)
    return out


@pytest.mark.parametrize("r", SCALES)
def test_output_shapes(g, r):
    x = torch.rand(2, 3, 13, 7)
    want = (2, 3, math.floor(r * 13 + 1e-9), math.floor(r * 7 + 1e-9))
    with torch.no_grad():
        assert g(x, r).shape == want
    assert BicubicRecovery()(x, r).shape == want
    assert RDN(2, 2, 8, 16)(x).shape == (2, 16, 13, 7)


def test_out_size_float_error():
    assert out_size(10, 20, 3.3) == (33, 66)  # 3.3 * 10 = 32.999... in floating point
    assert out_size(13, 7, 1) == (13, 7)


@pytest.mark.parametrize("r", (1, 2, 3, 4))
def test_integer_path_equals_general_path(g, r):
    feat = torch.randn(2, TINY["channels"], 9, 5)
    with torch.no_grad():
        fast = g.upscale.forward_integer(feat, r)
        general = g.upscale.forward_general(feat, float(r))
    assert fast.shape == general.shape
    torch.testing.assert_close(fast, general, atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", (2, 3, 2.5))
def test_paths_equal_per_pixel_reference(g, r):
    feat = torch.randn(1, TINY["channels"], 4, 3)
    with torch.no_grad():
        got = g.upscale(feat, r)
        ref = naive_meta_upscale(g.upscale, feat, r)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def _mlp_rows(g, x, r) -> int:
    rows = []
    hook = g.upscale.mlp[0].register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    with torch.no_grad():
        g(x, r)
    hook.remove()
    return sum(rows)


@pytest.mark.parametrize("r", (1, 2, 3, 4))
def test_mlp_runs_once_per_phase(g, r):
    assert _mlp_rows(g, torch.rand(2, 3, 16, 8), r) == r * r  # not 16*8*r*r


def test_mlp_runs_on_unique_fractions_only(g):
    # r = 2.5: fractions of i/2.5 repeat every 5 rows -> 5 x 5 unique pairs for a 40 x 20 output
    assert _mlp_rows(g, torch.rand(1, 3, 16, 8), 2.5) == 25


@pytest.mark.parametrize("r", (2, 2.5))
def test_gradients_reach_rdn_and_mlp(g, r):
    x = torch.rand(2, 3, 8, 6)
    g(x, r).abs().mean().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_untrained_g_starts_near_bicubic(g):
    x = torch.rand(2, 3, 16, 8)
    with torch.no_grad():
        diff = (g(x, 2) - BicubicRecovery()(x, 2)).abs().mean()
    assert diff < 0.2


@pytest.mark.parametrize("r", SCALES)
def test_bicubic_baseline(r):
    b = BicubicRecovery()
    assert len(list(b.parameters())) == 0
    x = torch.rand(2, 3, 13, 7)
    want = F.interpolate(x, size=out_size(13, 7, r), mode="bicubic", align_corners=False)
    torch.testing.assert_close(b(x, r), want)


def test_build_recovery(tmp_path):
    assert isinstance(build_recovery(SRParams(kind="bicubic")), BicubicRecovery)
    cfg = SRParams(**TINY)
    torch.manual_seed(1)
    src = build_recovery(cfg)
    assert isinstance(src, MetaRDN)
    torch.save(src.state_dict(), tmp_path / "g.pt")
    loaded = build_recovery(SRParams(**TINY, weights=str(tmp_path / "g.pt")))
    for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="model.sr.weights"):
        build_recovery(SRParams(**TINY, weights=str(tmp_path / "nope.pt")))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module."])
def test_load_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(2)
    src, dst = MetaRDN(**TINY), MetaRDN(**TINY)
    sd = src.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
           "module.": {"module." + k: v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pt")
    load_weights(dst, tmp_path / "w.pt", "model.sr.weights")
    x = torch.rand(1, 3, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(dst(x, 2), src(x, 2), atol=0, rtol=0)


def test_load_weights_missing_file(tmp_path):
    path = tmp_path / "absent" / "rdn_div2k.pt"
    with pytest.raises(FileNotFoundError) as e:
        load_weights(MetaRDN(**TINY), path, "model.sr.weights")
    msg = str(e.value)
    assert str(path) in msg and "model.sr.weights" in msg and "downloaded" in msg


def test_load_weights_mismatch(tmp_path):
    other = MetaRDN(**{**TINY, "channels": 8})  # shape mismatch everywhere
    torch.save(other.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="shape mismatch") as e:
        load_weights(MetaRDN(**TINY), tmp_path / "w.pt", "model.sr.weights")
    assert "channels=16" in str(e.value) and "model.sr.weights" in str(e.value)

    sd = MetaRDN(**TINY).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["rdn.sfe1.weight"]
    torch.save(sd, tmp_path / "w2.pt")
    with pytest.raises(ValueError, match=r"missing 1: rdn\.sfe1\.weight.*unexpected 1: extra\.weight"):
        load_weights(MetaRDN(**TINY), tmp_path / "w2.pt", "model.sr.weights")


def test_features_once_then_any_scale_equals_the_plain_call(g):
    """G's RDN features are scale-independent (Meta-SR): PRI computes them once per size group."""
    x = torch.rand(2, 3, 12, 6)
    with torch.no_grad():
        features = g.features(x)
        for r in (1, 2, 3, 4):
            assert torch.equal(g.upscale_features(features, x, r), g(x, r))
    b = BicubicRecovery()
    assert torch.equal(b.upscale_features(b.features(x), x, 3), b(x, 3))
