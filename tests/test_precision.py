"""bf16 on CPUs: the AMX guard, the check against fp32 on the model's layers, the fall-back of
"auto" and the error of an explicit "bf16", all against a simulated broken kernel (tests/faults.py),
so that they do not depend on the CPU the suite runs on."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from components import precision as P
from tests import faults
from tests.conftest import tiny_model_params, tiny_triplet_batch

CPU = torch.device("cpu")


@pytest.fixture
def broken_bf16():
    faults.break_bf16()
    yield
    faults.restore()


@pytest.fixture
def sound_bf16():
    faults.sound_bf16()
    yield
    faults.restore()


@pytest.fixture
def pri_and_batch():
    from components.models.pri import build_pri

    batch, num_classes = tiny_triplet_batch()
    torch.manual_seed(0)
    return build_pri(tiny_model_params(), num_classes, with_predictor=True), batch


def _probe(pri, batch):
    return lambda: P.bf16_fault(P.layer_inputs(pri, lambda: pri(batch, mode="joint")), CPU)


@pytest.mark.parametrize("flags, preset, capped", [
    ({"avx512f", "amx_bf16", "amx_tile"}, None, True),   # Sapphire Rapids class: capped below AMX
    ({"avx512f", "avx512_bf16"}, None, False),           # AVX-512 bf16 without AMX (e.g. AMD Zen 4): untouched
    ({"avx2"}, None, False),
    ({"amx_bf16"}, "ALL", False),                        # the user's own choice is kept
])
def test_guard_caps_onednn_only_on_amx(monkeypatch, flags, preset, capped):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if preset:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", preset)
    line = P.guard_onednn(frozenset(flags))
    import os

    assert (line is not None) == capped
    assert os.environ.get("ONEDNN_MAX_CPU_ISA") == (P.AMX_SAFE_ISA if capped else preset)
    if capped:
        assert "AMX" in line and "ONEDNN_MAX_CPU_ISA" in line and "\n" not in line


def test_layer_inputs_lists_the_models_own_shapes_and_changes_nothing(pri_and_batch):
    pri, batch = pri_and_batch
    pri.train()
    before = {k: v.clone() for k, v in pri.state_dict().items()}
    layers = P.layer_inputs(pri, lambda: pri(batch, mode="joint"))
    assert pri.training and all(m.training for m in pri.modules())  # modes restored
    assert all(torch.equal(before[k], v) for k, v in pri.state_dict().items())  # no BatchNorm update
    calls = []  # every conv / linear call of the forward, recorded independently
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.append((m, a[0].shape)))
             for m in pri.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        pri.eval()(batch, mode="joint")
    for h in hooks:
        h.remove()
    kernels = {(repr(m), s) for m, s in calls}  # what decides the kernel: the layer's config and input shape
    assert {(repr(m), s) for m, s in layers} == kernels and len(layers) == len(kernels) < len(calls)
    assert {id(m) for m, _ in calls} >= {id(m) for m in pri.G.modules() if isinstance(m, nn.Conv2d)}  # G, P, F run
    g_first = next(m for m in pri.G.modules() if isinstance(m, nn.Conv2d))
    assert len({s for m, s in layers if repr(m) == repr(g_first)}) > 1  # G at each LR size of the batch


def test_sound_bf16_passes_the_check(pri_and_batch, sound_bf16):
    pri, batch = pri_and_batch
    assert P.bf16_fault(P.layer_inputs(pri, lambda: pri(batch, mode="joint")), CPU) is None
    grads_before = [p.grad for p in pri.parameters()]
    assert all(g is None for g in grads_before)  # the check leaves .grad alone


def test_broken_bf16_is_found_named_and_avoided(pri_and_batch, broken_bf16, caplog):
    pri, batch = pri_and_batch
    fault = _probe(pri, batch)()
    assert fault is not None and "Conv2d" in fault and "non-finite bf16" in fault
    with caplog.at_level(logging.WARNING, logger="lrreid"):
        assert P.checked_precision(CPU, "auto", _probe(pri, batch)) == "fp32"
    assert "auto chose fp32, not bf16: bf16 is broken on this CPU (Conv2d" in caplog.text
    with pytest.raises(P.PrecisionError) as err:
        P.checked_precision(CPU, "bf16", _probe(pri, batch))
    msg = str(err.value)
    assert "\n" not in msg and "train.precision = 'bf16' is broken on this CPU" in msg and "fp32" in msg
    assert P.checked_precision(CPU, "fp32", lambda: pytest.fail("fp32 needs no check")) == "fp32"


def test_the_trainers_precision_check_falls_back(broken_bf16, monkeypatch):
    """The check a Train worker runs (one real batch of its loader) on PRI and on FFSR + RIFE."""
    from components.config import DegradeParams, FFSRParams, RIFEParams, validate_params
    from components.data.dataset import make_train_loader
    from components.data.protocols import degrade
    from components.data.splits import split_identities
    from components.training.trainers import make_trainer
    from tests.conftest import make_canonical

    monkeypatch.setattr(P, "_cpu_runs_bf16", lambda: True)
    deg = degrade(make_canonical(n_ids=5, per_cam=2), DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]),
                  progress=False).table
    res = split_identities(deg, n_test=1, repeats=1, seed=0)
    loader = make_train_loader(res.table, res.pairs, scales=[1, 2, 3, 4], P=4, K=2, flip_p=0.5, seed=0)
    m = tiny_model_params(ffsr=FFSRParams(channels=4), rife=RIFEParams(feature_dim=16, weight_hidden=8))

    def trainer(kind: str, phase: str):
        params = validate_params({"model": m.model_dump(mode="json"), "train": {"model": kind},
                                  "degrade": {"hr_height": 32, "hr_width": 16}})
        return make_trainer(params, phase, loader, device=CPU)

    for kind, phase in (("pri", "joint"), ("ffsr_rife", "pretrain")):
        assert trainer(kind, phase).check_precision("auto") == "fp32"
        with pytest.raises(P.PrecisionError, match="is broken on this CPU"):
            trainer(kind, phase).check_precision("bf16")
    faults.sound_bf16()
    assert trainer("pri", "pretrain").check_precision("auto") == "bf16"


def test_inference_never_runs_bf16(broken_bf16, pri_and_batch):
    """evaluate, the pyfunc model and `lrreid query` embed with PRI.embed in fp32: a broken bf16
    kernel cannot reach them."""
    pri, batch = pri_and_batch
    pri.eval()
    feats, r_p, probs = pri.embed_probe(batch.x_l)
    gallery = pri.embed_gallery(batch.x_h)
    for t in (feats, probs, gallery, pri.embed_all_scales(batch.x_l)):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
