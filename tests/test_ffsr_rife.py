"""FFSR (Eq. 5) and RIFE (Eq. 6-9): shapes, layer count, masks, losses, tiny overfits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from components.config import FFSRParams, ModelParams, RIFEParams
from components.models.ffsr import FFSR, build_ffsr, ffsr_loss, foreground_mask
from components.models.reid import ReIDOutput
from components.models.rife import RIFE, DualStreamBlock, build_rife, resolution, resolution_loss, rife_loss

SIZE = (64, 32)  # RIFE input size in these tests


@pytest.fixture(scope="module")
def rife():
    torch.manual_seed(0)
    return RIFE("resnet18", num_classes=5, input_size=SIZE)


# ---------------------------------------------------------------- FFSR


@pytest.mark.parametrize(
    "lr_size, size", [((16, 8), (64, 32)), ((15, 7), (33, 17)), ((32, 16), (32, 16)), ((9, 5), (31, 13))]
)
def test_ffsr_output_size(lr_size, size):
    sr = FFSR(channels=8)(torch.rand(2, 3, *lr_size), size)
    assert sr.shape == (2, 3, *size)


def test_ffsr_has_12_conv_layers():
    convs = [m for m in FFSR(channels=8).modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 12
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in convs) == 2
    assert sum(m.stride == (2, 2) for m in convs if isinstance(m, nn.Conv2d)) == 2


def test_ffsr_global_residual():
    torch.manual_seed(0)
    model = FFSR(channels=8)
    x = torch.rand(2, 3, 15, 7)
    up = F.interpolate(x, size=(45, 21), mode="bicubic", align_corners=False)
    torch.testing.assert_close(model(x, (45, 21)), up)  # conv_out starts at zero: bicubic
    nn.init.normal_(model.conv_out.weight, std=0.1)
    out = model(x, (45, 21))
    assert not torch.allclose(out, up)
    torch.testing.assert_close(out - up, model.residual(up))


def test_foreground_mask():
    for h, w in [(64, 32), (33, 17)]:
        m = foreground_mask(h, w, sigma=0.5)
        assert m.shape == (1, 1, h, w)
        assert m.max().item() == pytest.approx(1.0)
        torch.testing.assert_close(m, m.flip(-1))
        torch.testing.assert_close(m, m.flip(-2))
        assert m[..., 0, 0].item() < m[..., h // 2, w // 2].item()
    m = foreground_mask(33, 17, sigma=0.5)
    assert m[0, 0, 16, 8].item() == 1.0  # odd size: the centre pixel
    corner = torch.exp(torch.tensor(-(16.0**2) / (2 * 16.5**2) - 8.0**2 / (2 * 8.5**2)))
    assert m[0, 0, 0, 0].item() == pytest.approx(corner.item(), rel=1e-5)
    assert foreground_mask(33, 17, sigma=0.2)[0, 0, 0, 0] < m[0, 0, 0, 0]  # smaller sigma, sharper focus


def test_foreground_mask_is_a_2d_gaussian_over_rows_and_columns():
    """M = g(row) g(col) with g Gaussian: its log is a sum of one parabola in the row and one in the column."""
    h, w, sigma = 24, 10, 0.4
    log_m = foreground_mask(h, w, sigma, dtype=torch.float64)[0, 0].log()
    rows, cols = log_m[:, :1] - log_m[:1, :1], log_m[:1, :] - log_m[:1, :1]
    torch.testing.assert_close(log_m - log_m[0, 0], rows + cols)  # separable: a product of a row and a column factor
    y = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    x = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    torch.testing.assert_close(rows[:, 0], -(y**2 - y[0] ** 2) / (2 * (sigma * h) ** 2))  # rows: std sigma * H
    torch.testing.assert_close(cols[0], -(x**2 - x[0] ** 2) / (2 * (sigma * w) ** 2))  # columns: std sigma * W


def test_ffsr_loss_by_hand():
    sr = torch.zeros(2, 3, 2, 2)
    hr = torch.ones(2, 3, 2, 2)
    hr[1] = 3.0
    mask = torch.tensor([[1.0, 0.5], [0.5, 0.0]]).view(1, 1, 2, 2)
    # image 0: sum over 3 channels of (1 + .25 + .25 + 0) = 4.5 over 12 elements; image 1: 9x that
    expected = (4.5 / 12 + 9 * 4.5 / 12) / 2
    assert ffsr_loss(sr, hr, mask).item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        ffsr_loss(sr, hr, torch.ones(1, 1, 3, 3))


def test_ffsr_overfits_two_images():
    torch.manual_seed(0)
    model = FFSR(channels=8)
    hr = F.interpolate(torch.rand(2, 3, 8, 4), size=(32, 16), mode="bilinear", align_corners=False)
    lr = F.interpolate(hr, size=(8, 4), mode="area")  # bicubic does not undo area + bilinear: room to learn
    mask = foreground_mask(32, 16, sigma=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = ffsr_loss(model(lr, (32, 16)), hr, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_build_ffsr_weights(tmp_path):
    src = FFSR(channels=8)
    nn.init.normal_(src.conv_out.weight)
    path = tmp_path / "ffsr.pt"
    torch.save(src.state_dict(), path)
    model = build_ffsr(FFSRParams(channels=8, weights=str(path)))
    torch.testing.assert_close(model.conv_out.weight, src.conv_out.weight)
    with pytest.raises(FileNotFoundError, match="model.ffsr.weights"):
        build_ffsr(FFSRParams(channels=8, weights=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="model.ffsr.channels"):
        build_ffsr(FFSRParams(channels=16, weights=str(path)))


# ---------------------------------------------------------------- RIFE


def test_rife_output(rife):
    out = rife(torch.rand(3, 3, 40, 20))  # any input size: resized to SIZE
    assert isinstance(out, ReIDOutput)
    assert out.feature.shape == (3, 256)
    assert out.logits.shape == (3, 5)
    for key in ("w_L", "w_H"):
        w = out.extras[key]
        assert w.shape == (3, 4)
        assert ((w > 0) & (w < 1)).all()
    assert RIFE("resnet18", num_classes=0, input_size=SIZE).eval()(torch.rand(1, 3, *SIZE)).logits is None


def test_dsb_streams_are_separate(rife):
    assert len(rife.blocks) == 4
    for block in rife.blocks:
        assert isinstance(block, DualStreamBlock)
        ptrs_L = {p.data_ptr() for p in block.stage_L.parameters()}
        ptrs_H = {p.data_ptr() for p in block.stage_H.parameters()}
        assert ptrs_L and not (ptrs_L & ptrs_H)
        assert block.weight_L.fc1.weight.data_ptr() != block.weight_H.fc1.weight.data_ptr()


def test_dsb_fusion_eq6():
    torch.manual_seed(0)
    block = DualStreamBlock(nn.Conv2d(4, 6, 3, padding=1), 6, weight_hidden=8)
    nn.init.normal_(block.stage_H.weight)  # make the streams differ
    m = torch.randn(2, 4, 5, 5)
    m_t, w_L, w_H = block(m)
    assert w_L.shape == w_H.shape == (2,)
    expected = w_L.view(2, 1, 1, 1) * block.stage_L(m) + w_H.view(2, 1, 1, 1) * block.stage_H(m)
    torch.testing.assert_close(m_t, expected)


@pytest.mark.parametrize("feature_bn", [False, True])
def test_rife_ranks_the_feature_the_identity_loss_trains(feature_bn):
    """Eq. 8: the classifier is an FC on f itself (no BatchNorm or other layer between), so the
    feature evaluation ranks is the one L_X shapes; feature_bn makes a BN the last layer of f."""
    torch.manual_seed(0)
    rife = RIFE("resnet18", num_classes=5, input_size=SIZE, feature_bn=feature_bn)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in rife.modules()) == int(feature_bn)
    rife.eval()
    out = rife(torch.rand(3, 3, *SIZE))
    torch.testing.assert_close(out.logits, rife.classifier(out.feature))
    rife.train()
    out = rife(torch.rand(4, 3, *SIZE))
    f = out.feature.detach().requires_grad_(True)
    L_x = F.cross_entropy(rife.classifier(f), torch.tensor([0, 1, 2, 3]))
    (g,) = torch.autograd.grad(L_x, f)
    assert g.abs().sum() > 0  # L_X's gradient arrives at f itself


@pytest.mark.parametrize("r_grad", ["streams", "predictors"])
def test_r_grad_decides_whether_L_r_reaches_the_streams(r_grad):
    torch.manual_seed(0)
    model = RIFE("resnet18", num_classes=4, input_size=SIZE, r_grad=r_grad)
    out = model(torch.rand(2, 3, *SIZE))
    resolution_loss(out.extras["w_L"], out.extras["w_H"], torch.tensor([0.25, 1.0])).backward()
    assert model.blocks[3].weight_L.fc1.weight.grad.abs().sum() > 0  # the predictors learn either way
    stream = model.blocks[0].stage_L[0].conv1.weight.grad
    assert (stream is not None and stream.abs().sum() > 0) == (r_grad == "streams")
    model.eval()  # the same weights and features: only the gradient's route differs
    other = RIFE("resnet18", num_classes=4, input_size=SIZE, r_grad="streams").eval()
    other.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, *SIZE)
    torch.testing.assert_close(model(x).feature, other(x).feature)


def test_resolution():
    torch.testing.assert_close(resolution([16, 32, 64], 64), torch.tensor([0.25, 0.5, 1.0]))
    with pytest.raises(ValueError, match="max_width"):
        resolution([80], 64)


def test_resolution_loss_by_hand():
    w_L = torch.full((2, 4), 0.8)
    w_H = torch.full((2, 4), 0.3)
    r = torch.tensor([0.25, 1.0])
    per_block = torch.tensor([(0.8 - 0.75) ** 2 + (0.3 - 0.25) ** 2, (0.8 - 0.0) ** 2 + (0.3 - 1.0) ** 2])
    expected = (4 * per_block).mean()
    assert resolution_loss(w_L, w_H, r).item() == pytest.approx(expected.item())


def test_rife_loss_and_gradients_reach_predictors(rife):
    rife.zero_grad()
    x = torch.rand(4, 3, *SIZE)
    out = rife(x)
    r = torch.tensor([0.25, 0.25, 1.0, 1.0])
    labels = torch.tensor([0, 1, 2, 3])
    total, parts = rife_loss(out, labels, r, beta=0.1)
    assert set(parts) == {"L_x", "L_r"}
    assert total.item() == pytest.approx(parts["L_x"].item() + 0.1 * parts["L_r"].item(), rel=1e-5)
    # the L^R term alone reaches every weight predictor (and the streams under them)
    resolution_loss(out.extras["w_L"], out.extras["w_H"], r).backward()
    for block in rife.blocks:
        for pred in (block.weight_L, block.weight_H):
            assert pred.fc1.weight.grad is not None and pred.fc1.weight.grad.abs().sum() > 0
    assert rife.blocks[0].stage_L[0].conv1.weight.grad.abs().sum() > 0
    assert rife.classifier.weight.grad is None  # L^R does not touch the classifier
    rife.zero_grad()


def test_rife_training_separates_resolutions():
    torch.manual_seed(0)
    model = RIFE("resnet18", num_classes=2, input_size=SIZE)
    hr = torch.rand(2, 3, *SIZE)
    lr = F.interpolate(F.interpolate(hr, size=(16, 8), mode="area"), size=SIZE, mode="bilinear", align_corners=False)
    x = torch.cat([lr, hr])
    r = torch.tensor([0.25, 0.25, 1.0, 1.0])  # an SR / upsampled image keeps the r of its LR source
    labels = torch.arange(2).repeat(2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        out = model(x)
        loss, parts = rife_loss(out, labels, r, beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["L_r"].item())
    with torch.no_grad():
        w = model(x).extras
    assert losses[-1] < 0.5 * losses[0]
    assert w["w_L"][:2].mean() > w["w_L"][2:].mean() + 0.3  # LR -> larger w_L
    assert w["w_H"][2:].mean() > w["w_H"][:2].mean() + 0.3  # HR -> larger w_H


def test_rife_imagenet_weights_load_into_both_streams(tmp_path):
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), path)
    cfg = ModelParams(input_height=SIZE[0], input_width=SIZE[1], backbone_weights=str(path), width=64,
                      rife=RIFEParams(backbone="resnet18", feature_dim=32, weight_hidden=16))
    model = build_rife(cfg, num_classes=3)
    assert model.fc.out_features == 32 and model.blocks[0].weight_L.fc1.out_features == 16
    torch.testing.assert_close(model.stem.conv1.weight, net.conv1.weight)
    for t, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        ref = getattr(net, name).state_dict()
        for stream in (model.blocks[t].stage_L, model.blocks[t].stage_H):
            for k, v in stream.state_dict().items():
                torch.testing.assert_close(v, ref[k])
    assert model(torch.rand(2, 3, 48, 24)).feature.shape == (2, 32)
    cfg = cfg.model_copy(update={"backbone_weights": str(tmp_path / "missing.pt")})
    with pytest.raises(FileNotFoundError, match="backbone_weights"):
        build_rife(cfg, num_classes=3)
