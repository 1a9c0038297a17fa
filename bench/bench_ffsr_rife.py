"""Benchmark: how FFSR + RIFE learns, epoch by epoch, on the validation hold-out (issue 15).

In one process (no Ray, 2 torch threads), on the split's training identities minus
``split.val_identities`` (the hold-out the training stages validate on; never test
identities): the FFSR paper's three steps (Sec. 5.2) with the epochs, optimisers and
schedules of params' ``ffsr_rife`` section, and after every epoch the validation
rank-1 of FFSR + RIFE (every image through FFSR then RIFE, Eq. 3) and of its RIFE
alone on bicubic probes, and the masked MSE (Eq. 5) of FFSR's and of bicubic's
enlargement of the validation probes against their HR originals. One JSON line per
epoch: step, losses, samples/s, rates, rows, SR errors.

``--set key=value`` overrides params.yaml (YAML values), e.g.
``--set model.rife.r_grad=predictors`` or ``--set ffsr_rife.rife.epochs=8``.

    PYTHONPATH=. .venv/bin/python bench/bench_ffsr_rife.py [--set k=v ...] [--out FILE]
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from bench.bench_learning import data_arguments, read_params
from components.data import table as T
from components.data.dataset import make_train_loader
from components.data.splits import training_rows
from components.evaluation import decode_images, embed_ffsr_rife, hr_probe_images, load_test_set, score_features
from components.models.ffsr import ffsr_loss, foreground_mask
from components.models.ffsr_rife import FFSRRIFE
from components.optim import make_optimizer, set_epoch_lr, step_spec
from components.rows import FFSR_RIFE, RIFE_BICUBIC
from components.training import FFSR_RIFE_STEPS, run_ffsr_rife_epoch


@torch.no_grad()
def sr_errors(model, test, hr_probes, hr_size, sigma) -> dict[str, float]:
    """Eq. 5 of FFSR(x_l) and of bicubic(x_l) against the probes' HR originals (no model trains on these)."""
    model.eval()
    mask = foreground_mask(*hr_size, sigma)
    lr = decode_images(test.query)
    err = {"FFSR": 0.0, "bicubic": 0.0}
    for x, hr in zip(lr, hr_probes):
        up = F.interpolate(x[None], size=hr_size, mode="bicubic", align_corners=False)
        err["FFSR"] += ffsr_loss(model.ffsr(x[None], hr_size), hr[None], mask).item() / len(lr)
        err["bicubic"] += ffsr_loss(up, hr[None], mask).item() / len(lr)
    return {k: round(v, 6) for k, v in err.items()}


def rows(model, test, hr_size) -> dict[str, float]:
    f = embed_ffsr_rife(model, test, hr_size=hr_size, progress=False)
    return {FFSR_RIFE: round(score_features(f["probe"], f["gallery"], test, max_rank=10)["rank1"], 1),
            RIFE_BICUBIC: round(score_features(f["probe_bicubic"], f["gallery_plain"], test, max_rank=10)["rank1"], 1)}


def main() -> None:
    ap = data_arguments(__doc__)
    ap.add_argument("--out", default=None, help="also write the records here (JSON list)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = read_params(args.params, args.set).for_variant("ffsr_rife")
    m, t, d = params.model, params.train, params.degrade
    split = T.read_table(f"{args.split}/split.parquet", T.SPLIT_SCHEMA)
    pairs = T.read_table(f"{args.split}/pairs.parquet", T.PAIRS_SCHEMA)
    train, pairs, validation = training_rows(split, pairs, n_val=params.split.val_identities, seed=params.split.seed)
    test = load_test_set(validation, 1, source="the validation hold-out")
    hr_size = (d.hr_height, d.hr_width)
    hr_probes = hr_probe_images(test, T.read_table(args.canonical, T.CANONICAL_SCHEMA), hr_size)
    torch.manual_seed(t.seed)
    loader = make_train_loader(train, pairs, scales=m.scales, P=params.batch_identities()[0],
                               K=t.images_per_identity, flip_p=t.flip_p, seed=t.seed)
    model = FFSRRIFE(m, loader.dataset.num_classes)
    precision = "fp32" if t.precision == "fp32" else "bf16"
    records, epoch = [], 0
    for step in FFSR_RIFE_STEPS:
        cfg = getattr(params.ffsr_rife, step)
        spec = step_spec(cfg)
        optimizer = make_optimizer(model if step == "joint" else getattr(model, step), spec)
        for k in range(cfg.epochs):
            set_epoch_lr(optimizer, spec, k)
            metrics = run_ffsr_rife_epoch(model.ffsr, model.rife, loader, optimizer, step=step, epoch=epoch,
                                          loss=params.loss, device="cpu", precision=precision,
                                          hr_width=d.hr_width, sigma=m.ffsr.sigma)
            keep = ("L", "L_ffsr", "L_x", "L_r", "samples_per_s", "seconds", "lr_head")
            rec = {"step": step, "epoch": epoch, **{k_: round(float(metrics[k_]), 5) for k_ in keep if k_ in metrics},
                   "rank1": rows(model, test, hr_size), "sr_mse": sr_errors(model, test, hr_probes, hr_size,
                                                                             m.ffsr.sigma)}
            print(json.dumps(rec), flush=True)
            records.append(rec)
            epoch += 1
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
