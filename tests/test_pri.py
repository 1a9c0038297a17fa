"""PRI composed: shapes, where each loss's gradient goes, inference scale choices, a tiny overfit."""

import pytest
import torch

from components.losses import id_loss, prediction_loss, sr_loss, total_loss, triplet_loss
from components.models.pri import Adaptive, Fixed, Ideal, SizeBased, build_pri, ideal_scale
from components.soft_label import soft_labels
from tests.conftest import tiny_model_params, tiny_triplet_batch


@pytest.fixture(scope="module")
def batch_and_classes():
    torch.manual_seed(0)
    return tiny_triplet_batch()


def _pri(num_classes, **kw):
    torch.manual_seed(0)
    return build_pri(tiny_model_params(**kw), num_classes)


def _losses(pri, batch, fwd, labels=None):
    terms = {
        "L_sr": torch.stack([sr_loss(g.images, batch.x_h[g.index]) for g in fwd.sr_sl]).mean(),
        "L_id": sum(id_loss(o.logits, batch.label) for o in (fwd.out_rp, fwd.out_sl, fwd.out_h)) / 3,
        "L_tri": triplet_loss(torch.cat([fwd.out_rp.feature, fwd.out_sl.feature, fwd.out_h.feature]),
                              batch.label.repeat(3), margin=10.0),
    }
    if labels is not None:
        terms["L_p"] = prediction_loss(fwd.p_logits, labels)
    return terms


def test_training_forward_shapes(batch_and_classes):
    batch, C = batch_and_classes
    pri = _pri(C)
    B = len(batch.x_h)
    fwd = pri(batch, mode="joint")
    assert fwd.p_logits.shape == (B, 4)
    assert fwd.r_index.shape == (B,)
    for out in (fwd.out_rp, fwd.out_sl, fwd.out_h):
        assert out.feature.shape == (B, 32) and out.logits.shape == (B, C)
    for g in fwd.sr_sl:  # G(x_sl, r_sl) comes back at (about) the HR size
        assert abs(g.images.shape[-2] - 32) < 4 and abs(g.images.shape[-1] - 16) < 4
    assert pri(batch, mode="pretrain", generator=torch.Generator().manual_seed(0)).p_logits is None


def _grad_owners(pri):
    owners = set()
    for name in ("P", "G", "F"):
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(pri, name).parameters()):
            owners.add(name)
    return owners


def test_L_p_reaches_only_P_and_L_sr_reaches_G(batch_and_classes):
    batch, C = batch_and_classes
    pri = _pri(C)
    fwd = pri(batch, mode="joint")
    d = pri.scale_distances(batch.x_l, batch.x_h)
    labels = soft_labels(d, gamma=1.0)
    terms = _losses(pri, batch, fwd, labels)
    terms["L_p"].backward(retain_graph=True)
    assert _grad_owners(pri) == {"P"}
    pri.zero_grad(set_to_none=True)
    terms["L_sr"].backward(retain_graph=True)
    assert _grad_owners(pri) == {"G"}
    pri.zero_grad(set_to_none=True)
    terms["L_id"].backward()
    assert _grad_owners(pri) == {"G", "F"}  # identity loss trains F and, through recovery, G; never P


def test_scale_distances_are_distances_to_the_anchor(batch_and_classes):
    batch, C = batch_and_classes
    pri = _pri(C).eval()
    d = pri.scale_distances(batch.x_l, batch.x_h)
    assert d.shape == (len(batch.x_h), 4) and (d >= 0).all() and not d.requires_grad
    # column k equals the explicit computation at scale k
    k = 2
    f_h = pri.embed_gallery(batch.x_h)
    f_k = pri.embed(pri.recover(batch.x_l, torch.full((len(batch.x_h),), k))).feature
    torch.testing.assert_close(d[:, k], (f_k - f_h).norm(dim=1), rtol=1e-4, atol=1e-4)


def test_inference_scale_choices(batch_and_classes):
    batch, C = batch_and_classes
    pri = _pri(C).eval()
    B = len(batch.x_h)
    feat, r_p, probs = pri.embed_probe(batch.x_l)
    assert feat.shape == (B, 32) and probs.shape == (B, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(B))
    torch.testing.assert_close(r_p, pri.scales[probs.argmax(1)])
    _, r_fixed, _ = pri.embed_probe(batch.x_l, Fixed(3))
    assert (r_fixed == 3).all()
    with pytest.raises(ValueError, match="not one of model.scales"):
        pri.embed_probe(batch.x_l, Fixed(5))
    # size-based: HR height 32 -> a 16-high probe gets x2, an 8-high probe gets x4
    _, r_size, _ = pri.embed_probe(batch.x_l, SizeBased(32))
    for g in batch.x_l:
        assert (r_size[g.index] == 32 / g.images.shape[-2]).all()
    # the oracle picks, per probe, the scale that ranks its true match best
    gallery, g_pids = pri.embed_gallery(batch.x_h), batch.person_id
    _, r_ideal, _ = pri.embed_probe(batch.x_l, Ideal(batch.person_id, gallery, g_pids))
    assert r_ideal.shape == (B,)


def test_ideal_scale_by_hand():
    gallery = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    pids = torch.tensor([7, 8])
    # probe of person 7: scale 0 lands next to person 8, scale 1 next to person 7
    feats = torch.tensor([[[9.0, 0.0], [1.0, 0.0]]])
    assert ideal_scale(feats, torch.tensor([7]), gallery, pids).tolist() == [1]
    assert ideal_scale(feats, torch.tensor([8]), gallery, pids).tolist() == [0]


def test_rife_can_replace_F(batch_and_classes):
    batch, C = batch_and_classes
    pri = _pri(C, reid="rife")
    fwd = pri(batch, mode="joint")
    assert fwd.out_rp.extras["w_L"].shape == (len(batch.x_h), 4)
    assert fwd.out_h.feature.shape[1] == 256


def test_bicubic_G_baseline(batch_and_classes):
    from components.config import SRParams
    batch, C = batch_and_classes
    pri = _pri(C, sr=SRParams(kind="bicubic"))
    assert sum(p.numel() for p in pri.G.parameters()) == 0
    feat, _, _ = pri.eval().embed_probe(batch.x_l, Fixed(2))
    assert feat.shape[0] == len(batch.x_h)


def test_tiny_overfit_total_loss_falls(batch_and_classes):
    batch, C = batch_and_classes
    pri = _pri(C)
    opt = torch.optim.Adam(pri.parameters(), lr=3e-3)
    labels = soft_labels(pri.scale_distances(batch.x_l, batch.x_h), gamma=1.0)
    history = []
    for _ in range(25):
        fwd = pri(batch, mode="joint")
        loss = total_loss(_losses(pri, batch, fwd, labels), alpha=1.0, beta=0.01, lambda_p=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.6 * history[0], history


def test_one_factory_builds_either_model_by_train_model():
    from components.models import build_model
    from components.models.ffsr_rife import FFSRRIFE
    from components.models.pri import PRI

    cfg = tiny_model_params()
    joint, pretrain = build_model("pri", cfg, 5), build_model("pri", cfg, 5, with_predictor=False)
    assert isinstance(joint, PRI) and joint.P is not None and pretrain.P is None
    assert isinstance(build_model("ffsr_rife", cfg, 5), FFSRRIFE)
    with pytest.raises(ValueError, match="'srgan': use one of pri, ffsr_rife"):
        build_model("srgan", cfg, 5)
