"""The training engine: lr groups, PRI / FFSR+RIFE epochs, precision, label refresh, NaN stop, checkpoints."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from components import optim as O
from components import precision as Pr
from components import training as T
from components.config import DegradeParams, LossParams, TrainParams
from components.data.dataset import make_train_loader
from components.data.protocols import degrade
from components.data.splits import split_identities
from components.models import unwrap
from components.models.ffsr import FFSR, ffsr_loss, foreground_mask
from components.models.pri import build_pri
from components.models.rife import RIFE
from components.soft_label import LabelBank
from tests.conftest import make_canonical, tiny_model_params, tiny_triplet_batch

CPU = torch.device("cpu")
LOSS = LossParams(beta=0.01)  # the paper's weights: at the default 0.1 the tiny model's L_tri (margin 10) dominates 4 epochs
SLOW_LR = TrainParams(lr_backbone=1e-3, lr_head=1e-2, lr_decay=1.0)  # the paper's 0.01 / 0.1 is too much here


@pytest.fixture(scope="module")
def split():
    """8 training identities x 4 LR images (MLR, 32x16 HR): 4 batches of 4 x 2 per epoch."""
    canonical = make_canonical(n_ids=9, per_cam=4, size=(32, 16), seed=0)
    deg = degrade(canonical, DegradeParams(hr_height=32, hr_width=16, scales=[2, 4]), progress=False).table
    return split_identities(deg, n_test=1, repeats=1, seed=0)


def _loader(split, seed=0, **kw):
    return make_train_loader(split.table, split.pairs, scales=[1, 2, 3, 4], P=4, K=2, flip_p=0.5, seed=seed, **kw)


def _pri(num_classes, seed=0, **kw):
    torch.manual_seed(seed)
    return build_pri(tiny_model_params(**kw), num_classes)


def _epoch(model, loader, opt, phase, epoch, bank=None, precision="fp32", naive=False, **kw):
    return T.run_pri_epoch(model, loader, opt, phase=phase, epoch=epoch, loss=LOSS, bank=bank, naive_labels=naive,
                           device=CPU, precision=precision, generator=torch.Generator().manual_seed(epoch), **kw)


# ---------------------------------------------------------------------- optimiser
def test_param_groups_split_trunks_from_added_layers():
    pri = _pri(5)
    groups = O.param_groups(pri, 0.01, 0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"] and [g["lr"] for g in groups] == [0.01, 0.1]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in pri.parameters()}  # each exactly once
    trunk = {id(p) for m in (pri.P.backbone, pri.F.backbone) for p in m.parameters()}
    assert {id(p) for p in groups[0]["params"]} == trunk
    assert {id(p) for p in pri.G.parameters()} <= {id(p) for p in groups[1]["params"]}

    rife = _pri(5, reid="rife").F  # RIFE: stem and both DSB streams are the trunk
    back = {id(p) for p in O.param_groups(rife, 1, 1)[0]["params"]}
    streams = {id(p) for n, p in rife.named_parameters() if n.startswith("stem.") or ".stage_" in n}
    assert back == streams and streams < {id(p) for p in rife.parameters()}  # predictors, FC, classifier: head

    both = nn.ModuleDict({"ffsr": FFSR(channels=4), "rife": rife})  # FFSR is an added layer
    head = {id(p) for p in O.param_groups(both, 1, 1)[1]["params"]}
    assert {id(p) for p in both["ffsr"].parameters()} <= head

    wrapped = nn.DataParallel(pri)  # DDP / DP wrappers are looked through
    assert unwrap(wrapped) is pri
    assert len(O.param_groups(wrapped, 1, 1)[0]["params"]) == len(groups[0]["params"])


def test_build_optimizer_decays_joint_rates():
    pri, train = _pri(5), TrainParams(lr_backbone=0.01, lr_head=0.1, lr_decay=0.1)
    pre, joint = O.build_optimizer(pri, train, "pretrain"), O.build_optimizer(pri, train, "joint")
    assert isinstance(pre, torch.optim.Adam) and pre.param_groups[0]["betas"] == (0.9, 0.999)
    assert [g["lr"] for g in pre.param_groups] == [0.01, 0.1]
    assert [g["lr"] for g in joint.param_groups] == pytest.approx([0.001, 0.01])
    with pytest.raises(ValueError, match="phase"):
        O.build_optimizer(pri, train, "finetune")


# ---------------------------------------------------------------------- precision
@pytest.mark.parametrize("runs_bf16, emulated", [(True, None), (True, "bf16 is emulated"), (False, None)])
def test_precision_resolution_on_cpu(monkeypatch, runs_bf16, emulated):
    from components import precision

    monkeypatch.setattr(precision, "_cpu_runs_bf16", lambda: runs_bf16)
    monkeypatch.setattr(precision, "bf16_emulated", lambda: emulated)
    assert Pr.resolve_precision(CPU, "auto") == ("bf16" if runs_bf16 and not emulated else "fp32")
    assert Pr.resolve_precision(CPU, "fp32") == "fp32" and Pr.resolve_precision(CPU, "bf16") == "bf16"
    with pytest.raises(ValueError, match="train.precision = 'fp16'"):
        Pr.resolve_precision(CPU, "fp16")
    with pytest.raises(ValueError, match="train.precision"):
        Pr.autocast(CPU, "fp8")
    with Pr.autocast(CPU, "bf16"):
        assert nn.Linear(4, 2)(torch.rand(3, 4)).dtype == torch.bfloat16
    with Pr.autocast(CPU, "fp32"):
        assert nn.Linear(4, 2)(torch.rand(3, 4)).dtype == torch.float32


# ---------------------------------------------------------------------- PRI epochs
PRI_KEYS = {"L", "L_sr", "L_id", "L_tri", "samples", "seconds", "samples_per_s", "lr_backbone", "lr_head"}


def test_pretrain_and_joint_epochs_return_every_key(split):
    loader = _loader(split)
    pri = _pri(loader.dataset.num_classes)
    steps = []
    pre = _epoch(pri, loader, O.build_optimizer(pri, SLOW_LR, "pretrain"), "pretrain", 0,
                 progress=lambda i, n, running: steps.append((i, n, running)))
    assert PRI_KEYS <= set(pre) and "L_p" not in pre and not any(k.startswith("r_p") for k in pre)
    assert [s[0] for s in steps] == list(range(1, len(loader) + 1)) and steps[-1][1] == len(loader)
    assert pre["samples"] == sum(len(b) for b in loader)

    bank = LabelBank(len(loader.dataset), 4, omega=1)
    T.refresh_label_bank(pri, loader.dataset, bank, 1, device=CPU, precision="fp32")
    opt = O.build_optimizer(pri, SLOW_LR, "joint")
    for naive in (False, True):
        joint = _epoch(pri, loader, opt, "joint", 1, bank=bank, naive=naive)
        assert PRI_KEYS | {"L_p", "label_entropy", "r_p_x1", "r_p_x2", "r_p_x3", "r_p_x4"} <= set(joint)
        assert sum(joint[f"r_p_x{r}"] for r in (1, 2, 3, 4)) == pytest.approx(1.0)
        assert 0 < joint["label_entropy"] <= np.log(4) + 1e-6
        assert all(np.isfinite(v) for v in joint.values())
    assert pri.training


def _overfit(pri, loader, phase, precision="fp32", epochs=4, steps=8) -> list[dict]:
    """``epochs`` epochs of ``steps`` steps on one fixed batch: what a model that learns at all
    memorises, whatever the CPU's rounding (a fresh batch per step is a noisy curve instead)."""
    batch = next(iter(loader))
    opt = O.build_optimizer(pri, SLOW_LR, phase)
    bank = LabelBank(len(loader.dataset), 4, omega=1)
    if phase == "joint":
        T.refresh_label_bank(pri, loader.dataset, bank, 0, device=CPU, precision=precision)
    return [_epoch(pri, [batch] * steps, opt, phase, epoch, bank=bank, precision=precision) for epoch in range(epochs)]


def _assert_memorised(history: list[dict], num_classes: int) -> None:
    """Far below what the data gives a model that learned nothing: L_id under a tenth of chance
    (log of the number of classes), L_tri under a tenth of its margin phi, the total below its start."""
    first, last = history[0], history[-1]
    assert last["L_id"] < 0.1 * np.log(num_classes), [h["L_id"] for h in history]
    assert last["L_tri"] < 0.1 * LOSS.margin, [h["L_tri"] for h in history]
    assert last["L"] < first["L"], [h["L"] for h in history]


@pytest.mark.parametrize("phase, precision", [("joint", "fp32"), ("pretrain", "bf16"), ("pretrain", "fp32")])
def test_training_memorises_a_fixed_batch(split, phase, precision, monkeypatch):
    """bf16: autocast through the whole step, with convolutions simulated sound (tests/faults.py:
    torch 2.14.1's real bf16 kernels fail at random on some CPUs, which the suite must not depend on)."""
    from tests import faults

    if precision == "bf16":
        monkeypatch.setattr(nn.Conv2d, "forward", nn.Conv2d.forward)  # put back after the test
        faults.sound_bf16()
    loader = _loader(split)
    pri = _pri(loader.dataset.num_classes)
    history = _overfit(pri, loader, phase, precision)
    _assert_memorised(history, loader.dataset.num_classes)
    assert ("L_p" in history[-1]) == (phase == "joint")


def test_bicubic_baseline_trains_F_alone(split):
    """Ablation variant "bicubic" (Bicubic + F): G is bicubic up-sampling, nothing of it to train;
    F still learns, from bicubic-enlarged x_l and x_sl beside x_h."""
    from components.config import SRParams

    loader = _loader(split)
    pri = _pri(loader.dataset.num_classes, sr=SRParams(kind="bicubic"))
    before = {k: v.clone() for k, v in pri.F.state_dict().items()}
    _assert_memorised(_overfit(pri, loader, "pretrain"), loader.dataset.num_classes)
    assert any(not torch.equal(before[k], v) for k, v in pri.F.state_dict().items())


def test_cached_labels_equal_naive_labels_on_the_same_weights(split):
    loader = _loader(split)
    pri = _pri(loader.dataset.num_classes)
    bank = LabelBank(len(loader.dataset), 4, omega=1, gamma=1 / 3)  # gamma 1/3 sharpens small differences
    seconds = T.refresh_label_bank(pri, loader.dataset, bank, 2, device=CPU, precision="fp32", batch_size=5)
    assert seconds > 0 and pri.training  # train mode restored
    assert bool((bank.refreshed == 2).all()) and loader.dataset.epoch == 0  # dataset epoch restored
    loader.set_epoch(2)  # the same x_h partners and flips as the refresh
    for batch in list(loader)[:2]:
        naive = T.batch_labels(pri, batch, bank, device=CPU, precision="fp32")
        torch.testing.assert_close(naive, bank[batch.index], atol=1e-5, rtol=0)
        assert (naive - 0.25).abs().max() > 1e-3  # not trivially uniform
    loader.set_epoch(3)  # other partners / flips: other labels (the comparison above can fail)
    batch = next(iter(loader))
    assert (T.batch_labels(pri, batch, bank, device=CPU, precision="fp32") - bank[batch.index]).abs().max() > 1e-3


def test_nan_stops_with_epoch_step_and_term(split):
    loader = _loader(split)
    pri = _pri(loader.dataset.num_classes)
    with torch.no_grad():
        pri.F.reduce.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(T.NonFiniteLossError, match=r"epoch 3, step 0: L_id is nan"):
        _epoch(pri, loader, O.build_optimizer(pri, SLOW_LR, "pretrain"), "pretrain", 3)


def test_pri_losses_with_rife_add_the_resolution_loss():
    batch, C = tiny_triplet_batch()
    pri = _pri(C, reid="rife")
    fwd = pri(batch, mode="pretrain", generator=torch.Generator().manual_seed(0))
    total, terms = T.pri_losses(fwd, batch, None, LOSS)
    assert set(terms) == {"L", "L_sr", "L_id", "L_tri", "L_r"} and terms["L"] is total
    eq6 = terms["L_sr"] + LOSS.alpha * terms["L_id"] + LOSS.beta * terms["L_tri"]
    torch.testing.assert_close(total, eq6 + LOSS.beta_r * terms["L_r"])
    B = len(batch)
    w = [torch.cat([o.extras[k] for o in (fwd.out_rp, fwd.out_sl, fwd.out_h)]) for k in ("w_L", "w_H")]
    r_l = torch.empty(B)
    for g in batch.x_l:
        r_l[g.index] = g.images.shape[-1] / batch.x_h.shape[-1]
    r_sl = torch.empty(B)
    for g in batch.x_sl:
        r_sl[g.index] = g.images.shape[-1] / batch.x_h.shape[-1]
    r = torch.cat([r_l, r_sl, torch.ones(B)])
    expected = ((w[0] - (1 - r[:, None])) ** 2 + (w[1] - r[:, None]) ** 2).sum(1).mean()
    torch.testing.assert_close(terms["L_r"], expected)


# ---------------------------------------------------------------------- FFSR + RIFE
@pytest.mark.parametrize("step", ["ffsr", "rife", "joint"])
def test_ffsr_rife_steps(split, step):
    loader = _loader(split)
    torch.manual_seed(0)
    model = nn.ModuleDict({"ffsr": FFSR(channels=8),
                           "rife": RIFE("resnet18", loader.dataset.num_classes, feature_dim=32, input_size=(32, 16))})
    opt = O.build_optimizer(model, SLOW_LR, "pretrain")
    rife_before = [p.detach().clone() for p in model["rife"].parameters()]
    out = T.run_ffsr_rife_epoch(model["ffsr"], model["rife"], loader, opt, step=step, epoch=0, loss=LOSS,
                                device=CPU, precision="fp32", hr_width=16, sigma=0.5)
    keys = {"ffsr": {"L_ffsr"}, "rife": {"L_rife", "L_x", "L_r"}, "joint": {"L_ffsr", "L_rife", "L_x", "L_r"}}[step]
    assert keys | {"L", "samples", "samples_per_s", "lr_backbone", "lr_head"} <= set(out)
    assert all(np.isfinite(v) for v in out.values()) and out["L"] > 0
    if step == "joint":
        assert out["L"] == pytest.approx(out["L_ffsr"] + LOSS.alpha_rife * out["L_rife"], rel=1e-5)
    rife_moved = any(not torch.equal(a, b) for a, b in zip(rife_before, model["rife"].parameters()))
    assert rife_moved == (step != "ffsr")  # step 1 trains FFSR only


def test_ffsr_loss_compares_each_sr_image_with_its_own_hr(split):
    """Eq. 5: FFSR(x_h) and FFSR(x_sl) against x_h, their own HR image; x_l (another image of the
    person, from another camera) has no HR version here and is never compared with x_h."""
    torch.manual_seed(0)
    rife = RIFE("resnet18", 8, feature_dim=16, input_size=(32, 16))
    # r_sl = 1 only: x_sl = x_h, which an untrained FFSR (bicubic at the same size: the identity) restores exactly
    loader = make_train_loader(split.table, split.pairs, scales=[1], P=4, K=2, flip_p=0.5, seed=0)
    ffsr = FFSR(channels=8)
    out = T.run_ffsr_rife_epoch(ffsr, rife, loader, torch.optim.SGD(ffsr.parameters(), lr=0.0), step="ffsr",
                                epoch=0, loss=LOSS, device=CPU, precision="fp32", hr_width=16, sigma=0.5)
    assert out["L_ffsr"] == 0.0
    # any FFSR: the epoch's loss is the mean over batches of Eq. 5 on [FFSR(x_h) | FFSR(x_sl)] vs [x_h | x_h]
    loader = _loader(split)
    nn.init.normal_(ffsr.conv_out.weight, std=0.05)
    out = T.run_ffsr_rife_epoch(ffsr, rife, loader, torch.optim.SGD(ffsr.parameters(), lr=0.0), step="ffsr",
                                epoch=0, loss=LOSS, device=CPU, precision="fp32", hr_width=16, sigma=0.5)
    mask, own, total = foreground_mask(32, 16, 0.5), [], 0
    with torch.no_grad():
        for batch in loader:  # the same epoch's batches
            B = len(batch)
            x_sl = batch.x_sl.map(lambda x: F.interpolate(x, size=(32, 16), mode="bicubic", align_corners=False))
            sr = ffsr(torch.cat([batch.x_h, x_sl]), (32, 16))
            own.append(ffsr_loss(sr, torch.cat([batch.x_h, batch.x_h]), mask).item() * B)
            total += B
    assert out["L_ffsr"] == pytest.approx(sum(own) / total, rel=1e-5)


def test_ffsr_rife_step_2_keeps_ffsr_fixed(split):
    """Step 2 trains RIFE on FFSR's outputs (Eq. 3) without changing FFSR."""
    loader = _loader(split)
    torch.manual_seed(0)
    ffsr, rife = FFSR(channels=8), RIFE("resnet18", loader.dataset.num_classes, feature_dim=16, input_size=(32, 16))
    nn.init.normal_(ffsr.conv_out.weight, std=0.05)
    before = {k: v.clone() for k, v in ffsr.state_dict().items()}
    opt = torch.optim.SGD(list(ffsr.parameters()) + list(rife.parameters()), lr=0.1, momentum=0.9)
    T.run_ffsr_rife_epoch(ffsr, rife, loader, opt, step="rife", epoch=0, loss=LOSS, device=CPU, precision="fp32",
                          hr_width=16, sigma=0.5)
    assert all(torch.equal(v, ffsr.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in ffsr.parameters())


# ---------------------------------------------------------------------- checkpoints
def _small(num_classes=5, seed=0, **kw):
    return _pri(num_classes, seed=seed, backbone="mobilenet_v3_small", **kw)  # small files


def _stepped_optimizer(model):
    opt = O.build_optimizer(model, SLOW_LR, "joint")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return opt


def test_training_state_round_trip(tmp_path, monkeypatch):
    model = _small()
    opt = _stepped_optimizer(model)
    bank = LabelBank(7, 4, omega=2, gamma=3.0)
    bank.update(torch.arange(7), torch.rand(7, 4), epoch=1)
    path = tmp_path / "ckpt" / "state.pt"
    T.TrainingState(model, opt, bank, phase="joint", epoch=3, extra={"note": "x", "gen": torch.Generator().get_state()}).save(path)
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temporary left behind
    expected_random = (random.random(), np.random.rand(), torch.rand(3))  # the numbers after the save

    other = _small(seed=1)
    other_opt, other_bank = O.build_optimizer(other, SLOW_LR, "joint"), LabelBank(7, 4, omega=1)
    state = T.TrainingState(other, other_opt, other_bank, phase="joint")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    random.random(), np.random.rand(), torch.rand(5)  # move every RNG on
    state.load(path)
    assert calls == [True]
    assert (random.random(), np.random.rand()) == expected_random[:2]
    torch.testing.assert_close(torch.rand(3), expected_random[2], rtol=0, atol=0)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    saved, loaded = opt.state_dict(), other_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i, s in saved["state"].items():
        assert torch.equal(s["exp_avg"], loaded["state"][i]["exp_avg"]) and torch.equal(s["step"], loaded["state"][i]["step"])
    assert torch.equal(other_bank.labels, bank.labels) and other_bank.first_refresh == 1 and other_bank.gamma == 3.0
    assert state.epoch == 3 and state.extra["note"] == "x" and torch.equal(state.extra["gen"], torch.Generator().get_state())
    assert T.TrainingState.peek(path)["epoch"] == 3


def test_training_state_rejects_other_models_phases_and_corrupt_files(tmp_path):
    model = _small()
    path = tmp_path / "state.pt"
    T.TrainingState(model, _stepped_optimizer(model), phase="joint", epoch=0).save(path)

    other = _small(feature_dim=16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"state\.pt: saved for another model"):
        T.TrainingState(other, O.build_optimizer(other, SLOW_LR, "joint"), phase="joint").load(path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched
    with pytest.raises(ValueError, match=r"state\.pt: saved in phase 'joint'"):
        T.TrainingState(model, O.build_optimizer(model, SLOW_LR, "pretrain"), phase="pretrain").load(path)
    bad_bank = LabelBank(3, 4, omega=1)
    T.TrainingState(model, O.build_optimizer(model, SLOW_LR, "joint"), LabelBank(7, 4, omega=1), "joint").save(path)
    with pytest.raises(ValueError, match="label bank"):
        T.TrainingState(model, O.build_optimizer(model, SLOW_LR, "joint"), bad_bank, "joint").load(path)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt.pt"):
        T.TrainingState(model, O.build_optimizer(model, SLOW_LR, "joint"), phase="joint").load(corrupt)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        T.TrainingState(model, O.build_optimizer(model, SLOW_LR, "joint"), phase="joint").load(tmp_path / "missing.pt")


def test_save_and_load_weights(tmp_path):
    model = _small()
    path = tmp_path / "model.pt"
    T.save_weights(model, path, {"phase": "joint", "epochs": 2, "scales": [1.0, 2.0]})
    state, meta = T.load_weights_file(path)
    assert meta == {"phase": "joint", "epochs": 2, "scales": [1.0, 2.0]}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="meta"):
        T.save_weights(model, tmp_path / "bad.pt", {"path": tmp_path})
    assert not (tmp_path / "bad.pt").exists()
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a weights file"):
        T.load_weights_file(tmp_path / "other.pt")
    T.TrainingState(model, _stepped_optimizer(model), phase="joint", epoch=4).save(tmp_path / "ckpt.pt")
    assert T.load_weights_file(tmp_path / "ckpt.pt")[1]["epoch"] == 4  # a checkpoint's model works too


# ---------------------------------------------------------------------- torch.distributed
def _distributed_worker(rank, world, init_file, split, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loader = _loader(split, num_replicas=world, rank=rank)
        pri = _pri(loader.dataset.num_classes)  # same seed: same weights on both ranks
        bank = LabelBank(len(loader.dataset), 4, omega=1, gamma=1 / 3)
        T.refresh_label_bank(pri, loader.dataset, bank, 1, device=CPU, precision="fp32")
        metrics = _epoch(pri, loader, O.build_optimizer(pri, SLOW_LR, "pretrain"), "pretrain", 1)
        if rank == 0:  # a NaN on one rank stops every rank at the same step (no hang)
            with torch.no_grad():
                pri.F.reduce.weight[0, 0, 0, 0] = float("nan")
        try:
            _epoch(pri, loader, O.build_optimizer(pri, SLOW_LR, "pretrain"), "pretrain", 2)
            error = ""
        except T.NonFiniteLossError as exc:
            error = str(exc)
        torch.save({"labels": bank.labels, "samples": metrics["samples"], "error": error}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_refresh_metrics_and_nan(split, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), split, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    loader = _loader(split)
    pri = _pri(loader.dataset.num_classes)
    bank = LabelBank(len(loader.dataset), 4, omega=1, gamma=1 / 3)
    T.refresh_label_bank(pri, loader.dataset, bank, 1, device=CPU, precision="fp32")
    for r in ranks:  # every rank holds the full bank, equal to a single process's
        torch.testing.assert_close(r["labels"], bank.labels, atol=1e-5, rtol=0)
    shard = _loader(split, num_replicas=2, rank=0)
    shard.set_epoch(1)
    assert ranks[0]["samples"] == ranks[1]["samples"] == 2 * sum(len(b) for b in shard)  # metrics over all ranks
    assert ranks[0]["error"] == "epoch 2, step 0: L_id is nan"
    assert ranks[1]["error"] == "epoch 2, step 0: L_id is not finite on another rank"


def test_tracked_scales_follow_P_and_the_label_bank(split):
    """PRI Fig. 3 data: r_p = argmax P(x_l) of a few images and the argmax of their current soft label."""
    loader = _loader(split)
    ds = loader.dataset
    pri = _pri(ds.num_classes).eval()
    bank = LabelBank(len(ds), 4, 1, kind="soft", gamma=1, seed=0)
    bank.labels[:] = torch.tensor([0.1, 0.2, 0.6, 0.1])  # optimal scale x3 everywhere
    out = T.tracked_scales(pri, ds, bank, 3, device=CPU, precision="fp32")
    images = [k[len("r_p/"):] for k in out if k.startswith("r_p/")]
    assert len(images) == 3 and images[0] == ds.lr_image_id(0) and images[-1] == ds.lr_image_id(len(ds) - 1)
    assert all(out[f"r_opt/{i}"] == 3.0 for i in images)
    with torch.no_grad():
        expected = pri.scales[pri.predict(ds[0]["x_l"][None]).argmax(1)].item()
    assert out[f"r_p/{images[0]}"] == expected and not pri.training
    assert T.tracked_scales(pri, ds, bank, 0, device=CPU, precision="fp32") == {}


# ---------------------------------------------------------------------- trainers
def test_ffsr_rife_trainer_resumes_at_the_step_boundary_with_the_next_steps_optimiser(split, tmp_path):
    """A checkpoint after step 1's last epoch: the resumed trainer restores step 1's optimiser state,
    then starts step 2 with its own optimiser (kind, rate), as an uninterrupted trainer does."""
    from components.config import FFSRParams, RIFEParams, validate_params
    from components.training.trainers import make_trainer

    m = tiny_model_params(ffsr=FFSRParams(channels=4), rife=RIFEParams(feature_dim=16, weight_hidden=8))
    steps = {"ffsr": {"epochs": 1, "optimizer": "sgd", "lr": 0.01},
             "rife": {"epochs": 1, "optimizer": "adam", "lr": 0.002}, "joint": {"epochs": 1}}
    params = validate_params({"model": m.model_dump(mode="json"), "train": {"model": "ffsr_rife", "seed": 0},
                              "degrade": {"hr_height": 32, "hr_width": 16}, "ffsr_rife": steps})

    def trainer():
        torch.manual_seed(0)
        return make_trainer(params, "pretrain", _loader(split), device=CPU, naive_labels=True)

    first = trainer()
    assert first.epochs == 2 and first.next_epoch == 0
    metrics = first.train_epoch(0, "fp32")
    assert "L_ffsr" in metrics and isinstance(first.state.optimizer, torch.optim.SGD)
    first.end_epoch(0, metrics)
    first.state.save(tmp_path / "state.pt")
    resumed = trainer()
    resumed.resume(tmp_path / "state.pt")
    assert resumed.next_epoch == 1 and len(resumed.history) == 1
    for run in (first, resumed):
        out = run.train_epoch(1, "fp32")
        assert "L_rife" in out and isinstance(run.state.optimizer, torch.optim.Adam)
        assert out["lr_head"] == pytest.approx(0.002)
    for a, b in zip(first.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b)  # the same epoch from the checkpoint as without the stop


def test_pri_trainer_refreshes_its_bank_and_tracks_scales(split):
    from components.config import validate_params
    from components.training.trainers import make_trainer

    params = validate_params({"model": tiny_model_params(omega=1).model_dump(mode="json"),
                              "train": {"track_images": 2}, "degrade": {"hr_height": 32, "hr_width": 16}})
    torch.manual_seed(0)
    trainer = make_trainer(params, "joint", _loader(split), device=CPU)
    assert trainer.epochs == params.train.epochs and trainer.state.bank is not None
    metrics = trainer.train_epoch(0, "fp32")
    assert metrics["refresh_seconds"] > 0 and "L_p" in metrics  # omega = 1: the bank is refreshed first
    trainer.end_epoch(0, metrics)
    assert "label_bank_entropy" in metrics and sum(k.startswith("r_p/") for k in metrics) == 2
    assert metrics["label_bank_entropy"] <= metrics["L_p_marginal"] <= metrics["L_p_uniform"] + 1e-6
    assert trainer.history[-1]["L"] == metrics["L"] and trainer.state.epoch == 0
