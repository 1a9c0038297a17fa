"""Backbones (cut, last stride, local weights), P and F of PRI: shapes, gradients, errors."""

from __future__ import annotations


import pytest
import torch
import torchvision

from components.config import ModelParams
from components.models import backbones as B
from components.models.reid import Predictor, ReIDNet, ReIDOutput, build_predictor, build_reid

SIZE = (64, 32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name, channels", [
    ("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("mobilenet_v3_small", 576),
])
def test_backbone_and_models_shapes(name, channels):
    body, c = B.build_backbone(name)
    assert c == channels
    with torch.no_grad():
        maps = body.eval()(torch.rand(1, 3, *SIZE))
    assert maps.shape[:2] == (1, channels)

    p = Predictor(name, num_scales=4, feature_dim=32, input_size=SIZE).eval()
    f = ReIDNet(name, num_classes=7, feature_dim=32, input_size=SIZE).eval()
    with torch.no_grad():
        for hw in [(16, 8), (37, 11), (64, 32), (150, 70)]:
            x = torch.rand(1, 3, *hw)
            assert p(x).shape == (1, 4)
            out = f(x)
            assert isinstance(out, ReIDOutput)
            assert out.feature.shape == (1, 32) and out.logits.shape == (1, 7) and out.extras == {}


def test_inputs_are_resized_to_input_size():
    f = ReIDNet("resnet18", num_classes=3, feature_dim=16, input_size=SIZE).eval()
    seen = []
    f.backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    with torch.no_grad():
        for hw in [(16, 8), (128, 64), (30, 90)]:
            f(torch.rand(2, 3, *hw))
    assert seen == [SIZE] * 3


def test_no_classifier_and_train_mode_batch():
    f = ReIDNet("mobilenet_v3_small", num_classes=0, feature_dim=16, input_size=SIZE).train()
    out = f(torch.rand(2, 3, 20, 10))
    assert out.logits is None and out.feature.shape == (2, 16)


def test_last_stride_doubles_final_map():
    x = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        for name in ("resnet18", "resnet50"):
            s1 = B.build_backbone(name, last_stride=1)[0].eval()(x).shape[-2:]
            s2 = B.build_backbone(name, last_stride=2)[0].eval()(x).shape[-2:]
            assert (s1[0], s1[1]) == (2 * s2[0], 2 * s2[1]) == (SIZE[0] // 16, SIZE[1] // 16)


def test_weights_are_loaded_from_local_file(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    body, _ = B.build_backbone("resnet18", weights=path)
    assert torch.equal(body.conv1.weight, ref.conv1.weight)
    assert torch.equal(body.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    stem, stages, _ = B.resnet_stages("resnet18", weights=str(path))
    assert torch.equal(stem.conv1.weight, ref.conv1.weight)
    p = Predictor("resnet18", 4, feature_dim=8, input_size=SIZE, weights=path)
    assert torch.equal(p.backbone.conv1.weight, ref.conv1.weight)
    wrapped = tmp_path / "wrapped.pt"  # a training checkpoint of a DataParallel model
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}, "epoch": 3}, wrapped)
    assert torch.equal(B.build_backbone("resnet18", weights=wrapped)[0].conv1.weight, ref.conv1.weight)


def test_weights_for_mobilenet(tmp_path):
    ref = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "mb.pt"
    torch.save(ref.state_dict(), path)
    body, _ = B.build_backbone("mobilenet_v3_small", weights=path)
    assert torch.equal(body[0][0].weight, ref.features[0][0].weight)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "nowhere" / "r18.pt"
    with pytest.raises(FileNotFoundError) as e:
        B.build_backbone("resnet18", weights=path)
    msg = str(e.value)
    assert str(path) in msg and "model.backbone_weights" in msg and "downloaded" in msg
    cfg = ModelParams(backbone="resnet18", backbone_weights=str(path), width=64)
    with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
        build_predictor(cfg)


def test_wrong_architecture_names_keys(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError) as e:
        B.build_backbone("resnet18", weights=path)
    msg = str(e.value)
    assert "resnet18" in msg and "layer1.0.conv3.weight" in msg and "shape mismatch" in msg


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_weights_only_load(tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["evil"] = _Evil()
    torch.save(state, path)
    with pytest.raises(ValueError, match="weights_only"):
        B.build_backbone("resnet18", weights=path)

    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    good = tmp_path / "good.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), good)
    B.build_backbone("resnet18", weights=good)
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_gradients_reach_backbone():
    p = Predictor("resnet18", num_scales=5, feature_dim=16, input_size=SIZE).train()
    logits = p(torch.rand(2, 3, 24, 12))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert p.backbone.conv1.weight.grad.abs().sum() > 0

    f = ReIDNet("resnet18", num_classes=3, feature_dim=16, input_size=SIZE).train()
    out = f(torch.rand(2, 3, 24, 12))
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])).backward()
    assert f.backbone.conv1.weight.grad.abs().sum() > 0
    trunk = {id(q) for t in f.trunks() for q in t.parameters()}
    assert id(f.reduce.weight) not in trunk and id(f.classifier.weight) not in trunk
    assert id(f.backbone.conv1.weight) in trunk


def test_builders_from_config():
    cfg = ModelParams(backbone="resnet18", scales=[1, 2, 3], input_height=32, input_width=16, feature_dim=24)
    p = build_predictor(cfg).eval()
    f = build_reid(cfg, num_classes=5).eval()
    with torch.no_grad():
        assert p(torch.rand(1, 3, 10, 5)).shape == (1, 3)
        assert f(torch.rand(1, 3, 10, 5)).feature.shape == (1, 24)
    with pytest.raises(NotImplementedError, match="rife.py"):
        build_reid(cfg.model_copy(update={"reid": "rife"}), num_classes=5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_stages_reproduce_backbone(name):
    torch.manual_seed(1)
    body, c = B.build_backbone(name)
    stem, stages, chans = B.resnet_stages(name)
    stem.load_state_dict({k: v for k, v in body.state_dict().items() if k.split(".")[0] in ("conv1", "bn1")})
    for i, st in enumerate(stages):
        st.load_state_dict({k[len(f"layer{i + 1}."):]: v for k, v in body.state_dict().items()
                            if k.startswith(f"layer{i + 1}.")})
    assert chans[-1] == c
    x = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        h = stem.eval()(x)
        for st, ch in zip(stages, chans):
            h = st.eval()(h)
            assert h.shape[1] == ch
        assert torch.allclose(h, body.eval()(x), atol=1e-5)
    with pytest.raises(ValueError, match="mobilenet"):
        B.resnet_stages("mobilenet_v3_small")


def test_unknown_backbone():
    with pytest.raises(ValueError, match="vgg16"):
        B.build_backbone("vgg16")


def test_model_last_stride_reaches_every_backbone():
    """model.last_stride is passed to P, F and RIFE: stride 2 halves layer4's map of each."""
    from components.models.rife import build_rife

    x = torch.rand(1, 3, 64, 32)
    for stride, size in [(1, (4, 2)), (2, (2, 1))]:
        cfg = ModelParams(backbone="resnet18", input_height=64, input_width=32, predictor_height=64,
                          predictor_width=32, last_stride=stride)
        for net in (build_predictor(cfg), build_reid(cfg, num_classes=3)):
            assert tuple(net.backbone(x).shape[-2:]) == size
        rife = build_rife(cfg, num_classes=3)
        assert rife.blocks[-1].stage_L[0].conv1.stride == (stride, stride)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_width_scales_every_layer_and_keeps_torchvision_names(name):
    """model.width: the same network (torchvision's blocks and key names) with the channels scaled."""
    full, c64 = B.build_backbone(name)
    half, c32 = B.build_backbone(name, width=32)
    assert c32 == c64 // 2 == B.stage_channels(name, 32)[-1]
    assert list(half.state_dict()) == list(full.state_dict())  # same layers, same names
    shapes = {k: v.shape for k, v in full.state_dict().items()}
    for key, value in half.state_dict().items():
        if value.ndim == 4:  # conv weights: both channel axes halved (the stem's input stays RGB)
            out_c, in_c = shapes[key][:2]
            assert value.shape[:2] == (out_c // 2, in_c if in_c == 3 else in_c // 2), key
    n_full = sum(p.numel() for p in full.parameters())
    n_half = sum(p.numel() for p in half.parameters())
    assert 0.2 < n_half / n_full < 0.3
    assert half(torch.rand(2, 3, *SIZE)).shape[1] == c32
    stem, stages, chans = B.resnet_stages(name, width=32)
    assert chans == B.stage_channels(name, 32)


def test_width_reaches_p_f_and_rife_and_rejects_bad_values(tmp_path):
    from components.models.rife import build_rife

    cfg = ModelParams(backbone="resnet18", width=16, input_height=64, input_width=32, predictor_height=32,
                      predictor_width=16)
    assert build_predictor(cfg).out_channels == build_reid(cfg, 3).out_channels == 128
    assert build_rife(cfg, 3).blocks[-1].stage_H[0].conv1.out_channels == 128
    with pytest.raises(ValueError, match="multiple of 8"):
        B.build_backbone("resnet18", width=20)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    with pytest.raises(ValueError, match="model.width = 32.*width 64"):
        B.build_backbone("resnet18", weights, width=32)
    with pytest.raises(ValueError, match="model.width = 32 with model.backbone_weights"):
        ModelParams(backbone="resnet18", width=32, backbone_weights=str(weights))
