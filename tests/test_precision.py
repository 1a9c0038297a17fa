"""bf16 on CPUs: the CPU-feature rule (native or emulated), the AMX guard, the check against fp32
on the model's layers, the timed step, the choice of "auto" and the error of an explicit "bf16",
all against simulated CPUs (flag sets) and simulated kernels (tests/faults.py: broken, or slow in
one precision), so that they do not depend on the CPU the suite runs on."""

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
def native(monkeypatch):
    """A CPU on which bf16 runs natively (the rule's verdict; the kernels stay this machine's)."""
    monkeypatch.setattr(P, "_cpu_runs_bf16", lambda: True)
    monkeypatch.setattr(P, "bf16_emulated", lambda: None)


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


@pytest.mark.parametrize("flags, cap, emulated", [
    ({"avx2", "fma"}, None, "no avx512_bf16"),                          # AVX2 only (e.g. AMD Zen 2/3, Intel Skylake)
    ({"avx2", "avx512f"}, None, "no avx512_bf16"),                      # AVX-512 without bf16 (Skylake-SP)
    ({"avx512f", "avx512_bf16"}, None, None),                            # AVX-512 bf16 (AMD Zen 4, Cooper Lake)
    ({"avx512f", "avx512_bf16"}, "ALL", None),
    ({"avx512f", "avx512_bf16"}, "AVX512_CORE_BF16", None),
    ({"avx512f", "avx512_bf16"}, "AVX2", "ONEDNN_MAX_CPU_ISA=AVX2"),      # the suite's AVX2-only stand-in
    ({"avx512f", "avx512_bf16"}, "avx512_core", "ONEDNN_MAX_CPU_ISA=AVX512_CORE"),
    ({"avx512f", "avx512_bf16", "amx_bf16"}, P.AMX_SAFE_ISA, None),      # AMX under the guard: AVX-512 bf16
    ({"avx2", "avx_ne_convert"}, None, None),                            # AVX2-VNNI-2 (Sierra Forest, Arrow Lake)
    ({"avx2", "avx_ne_convert"}, "AVX2", "ONEDNN_MAX_CPU_ISA=AVX2"),
    (set(), None, None),                                                 # no /proc/cpuinfo: the timed step decides
])
def test_the_rule_says_where_bf16_is_emulated(monkeypatch, flags, cap, emulated):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    why = P.bf16_emulated(frozenset(flags))
    assert (why is None) == (emulated is None)
    if emulated:
        assert emulated in why and "emulated" in why and "\n" not in why


def test_auto_on_an_emulating_cpu_is_fp32_at_no_cost(monkeypatch):
    monkeypatch.setattr(P, "bf16_emulated", lambda: "bf16 is emulated on this CPU (no avx512_bf16, ...)")
    monkeypatch.setattr(P, "_cpu_runs_bf16", lambda: True)
    never = lambda *a: pytest.fail("an emulating CPU needs neither the check nor the timed step")  # noqa: E731
    choice = P.choose_precision(CPU, "auto", fault=never, rate=never)
    assert choice.precision == "fp32" and choice.reason.startswith("auto: fp32, bf16 is emulated")
    assert P.resolve_precision(CPU, "auto") == "fp32"  # callers without a model (benches, labels) agree
    asked = P.choose_precision(CPU, "bf16", fault=lambda: None, rate=never)  # the user's choice is kept, and named
    assert asked.precision == "bf16" and "emulated" in asked.reason and "fp32 is much faster" in asked.reason


def test_auto_on_a_native_cpu_takes_the_faster_sound_precision(native):
    fast = P.choose_precision(CPU, "auto", fault=lambda: None, rate={"fp32": 37.0, "bf16": 57.4}.get)
    assert fast.precision == "bf16" and "bf16 57.4 vs fp32 37.0 samples/s" in fast.reason
    assert fast.rates == {"fp32": 37.0, "bf16": 57.4} and str(fast).startswith("bf16 (auto: bf16")
    slow = P.choose_precision(CPU, "auto", fault=lambda: None, rate={"fp32": 37.0, "bf16": 38.0}.get)
    assert slow.precision == "fp32" and "not 1.1x faster" in slow.reason  # within noise: the safe floor
    asked = P.choose_precision(CPU, "bf16", fault=lambda: None, rate={"fp32": 37.0, "bf16": 20.0}.get)
    assert asked.precision == "bf16" and "as asked" in asked.reason
    never = lambda *a: pytest.fail("fp32 needs no check")  # noqa: E731
    assert P.choose_precision(CPU, "fp32", fault=never, rate=never).precision == "fp32"


def test_broken_bf16_is_found_named_and_avoided(pri_and_batch, broken_bf16, native, caplog):
    pri, batch = pri_and_batch
    fault = _probe(pri, batch)()
    assert fault is not None and "Conv2d" in fault and "non-finite bf16" in fault
    never = lambda p: pytest.fail("a broken bf16 is not timed")  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="lrreid"):
        assert P.choose_precision(CPU, "auto", fault=_probe(pri, batch), rate=never).precision == "fp32"
    assert "auto chose fp32, not bf16: bf16 is broken on this CPU (Conv2d" in caplog.text
    with pytest.raises(P.PrecisionError) as err:
        P.choose_precision(CPU, "bf16", fault=_probe(pri, batch), rate=never)
    msg = str(err.value)
    assert "\n" not in msg and "train.precision = 'bf16' is broken on this CPU" in msg and "fp32" in msg


def test_step_rate_times_a_copy_and_changes_nothing(pri_and_batch):
    pri, batch = pri_and_batch
    pri.train()
    before = {k: v.clone() for k, v in pri.state_dict().items()}
    rng = torch.get_rng_state()
    rate = P.step_rate(pri, lambda net: net(batch, mode="joint"), len(batch), CPU, "fp32", repeats=1)
    assert rate > 0 and pri.training and all(p.grad is None for p in pri.parameters())
    assert all(torch.equal(before[k], v) for k, v in pri.state_dict().items())  # BN statistics too
    assert torch.equal(rng, torch.get_rng_state())
    fwd = pri(batch, mode="joint")  # what the timed backward starts from: every float output with a grad
    assert P._scalar(fwd).requires_grad and P._scalar((torch.ones(2), 3, "x")) is None


def _trainer(kind: str, phase: str):
    from components.config import DegradeParams, FFSRParams, RIFEParams, validate_params
    from components.data.dataset import make_train_loader
    from components.data.protocols import degrade
    from components.data.splits import split_identities
    from components.training.trainers import make_trainer
    from tests.conftest import make_canonical

    deg = degrade(make_canonical(n_ids=5, per_cam=2), DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]),
                  progress=False).table
    res = split_identities(deg, n_test=1, repeats=1, seed=0)
    loader = make_train_loader(res.table, res.pairs, scales=[1, 2, 3, 4], P=4, K=2, flip_p=0.5, seed=0)
    m = tiny_model_params(ffsr=FFSRParams(channels=4), rife=RIFEParams(feature_dim=16, weight_hidden=8))
    params = validate_params({"model": m.model_dump(mode="json"), "train": {"model": kind},
                              "degrade": {"hr_height": 32, "hr_width": 16}})
    return make_trainer(params, phase, loader, device=CPU)


def test_the_trainers_choice_falls_back(broken_bf16, native):
    """The check a Train worker runs (one real batch of its loader) on PRI and on FFSR + RIFE."""
    for kind, phase in (("pri", "joint"), ("ffsr_rife", "pretrain")):
        choice = _trainer(kind, phase).choose_precision("auto")
        assert choice.precision == "fp32" and "broken" in choice.reason
        with pytest.raises(P.PrecisionError, match="is broken on this CPU"):
            _trainer(kind, phase).choose_precision("bf16")


@pytest.mark.parametrize("slow", ["fp32", "bf16"])
def test_the_trainers_timed_step_decides(native, slow):
    """Sound bf16 on both families; the precision whose convolutions wait 5 ms each (dozens per
    step, against a few ms of this tiny model's compute) is the one "auto" leaves."""
    try:
        faults.slow_conv(slow, seconds=0.005)
        for kind, phase in (("pri", "pretrain"), ("ffsr_rife", "joint")):
            choice = _trainer(kind, phase).choose_precision("auto")
            assert choice.precision == ("bf16" if slow == "fp32" else "fp32"), choice
            assert set(choice.rates) == {"fp32", "bf16"} and "samples/s on this model's step" in choice.reason
    finally:
        faults.restore()


def test_inference_never_runs_bf16(broken_bf16, pri_and_batch):
    """evaluate, the pyfunc model and `lrreid query` embed with PRI.embed in fp32: a broken bf16
    kernel cannot reach them."""
    pri, batch = pri_and_batch
    pri.eval()
    feats, r_p, probs = pri.embed_probe(batch.x_l)
    gallery = pri.embed_gallery(batch.x_h)
    for t in (feats, probs, gallery, pri.embed_all_scales(batch.x_l)):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())


def _agree(rank: int, world: int, init: str, cases: list, out) -> None:
    """One gloo rank: every case's agreement in turn, in one process group (one spawn for all cases)."""
    import torch.distributed as dist

    from components.training.engine import agree_on_precision

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for case, asked in enumerate(cases):
            precision, error = asked[rank]
            choice = None if error else P.PrecisionChoice(precision, f"rank {rank}")
            got, err = agree_on_precision(choice, error, "cpu")
            out.put((case, rank, got.precision if got else None, err))
    finally:
        dist.destroy_process_group()


AGREEMENTS = [  # what each of two ranks decided on its own -> what both then do (precision, stop?)
    ([("bf16", None), ("fp32", None)], [("fp32", False), ("fp32", False)]),   # fp32 where any rank chose it
    ([("bf16", None), ("bf16", None)], [("bf16", False), ("bf16", False)]),
    ([(None, "bf16 is broken (Conv2d ...)"), ("bf16", None)], [(None, True), (None, True)]),  # both stop
]


def test_ranks_agree_on_the_precision(tmp_path):
    """Two real gloo ranks (processes): each decided on its own CPU; they train alike or stop alike."""
    import torch.multiprocessing as mp

    from components.training.engine import agree_on_precision

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    cases = [asked for asked, _ in AGREEMENTS]
    procs = [ctx.Process(target=_agree, args=(r, 2, f"file://{tmp_path}/pg", cases, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = {(c, r): (prec, err) for c, r, prec, err in (out.get(timeout=120) for _ in range(2 * len(cases)))}
    for p in procs:
        p.join(timeout=60)
    for case, (_, expected) in enumerate(AGREEMENTS):
        for rank, (precision, stops) in enumerate(expected):
            got, err = results[case, rank]
            assert got == precision and (err is not None) == stops, (case, results)
    assert agree_on_precision(P.PrecisionChoice("bf16", "one worker"), None, "cpu")[0].precision == "bf16"  # no group
