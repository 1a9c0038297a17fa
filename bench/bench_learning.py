"""Benchmark: how fast the default PRI learns, epoch by epoch, on the validation hold-out (issue 14).

In one process (no Ray, 2 torch threads), on the split's training identities minus
``split.val_identities`` (the same hold-out the training stages use; never test
identities): pretrain ``--pre`` epochs, then joint-train ``--joint`` epochs, and after
every epoch score the validation probes with every row of PRI Table 2 (fixed x1..xN,
size-based, adaptive, ideal, the noise oracle, PRI's F on bicubic probes) and HR probes. One JSON line per epoch:
the epoch's losses, samples/s, label-bank entropy, P's choices, and the rows' rank-1.

``--set key=value`` overrides params.yaml (YAML values), e.g. ``--set train.lr_decay=0.1``;
``--cache FILE`` saves the pretrained weights there, or starts the joint epochs from
them when the file exists (the pretraining of one setting is deterministic).

    PYTHONPATH=. .venv/bin/python bench/bench_learning.py --pre 4 --joint 4 [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import yaml

from components.config import validate_params
from components.data import table as T
from components.data.dataset import make_train_loader
from components.data.splits import training_rows
from components.evaluation import (embed_images, embed_test_set, hr_probe_images, load_test_set, score,
                                   score_features)
from components.models.pri import build_pri
from components.rows import HR_PROBES
from components.soft_label import LabelBank
from components.optim import build_optimizer
from components.training import refresh_label_bank, run_pri_epoch, save_weights


def read_params(path: str, overrides: list[str]):
    return override(yaml.safe_load(open(path)), overrides, f"{path} + --set")


def override(raw: dict, overrides: list[str], source: str):
    """Params from ``raw`` with ``key=value`` overrides (YAML values) applied, validated."""
    for item in overrides:
        key, value = item.split("=", 1)
        node, *path_, last = [raw, *key.split(".")]
        for k in path_:
            node = node[k]
        node[last] = yaml.safe_load(value)
    return validate_params(raw, source)


def epoch_record(model, test, params, phase: str, epoch: int, metrics: dict, hr_probes) -> dict:
    emb = embed_test_set(model, test, progress=False)
    rows = score(model, emb, test, hr_height=params.degrade.hr_height, max_rank=10)
    rows[HR_PROBES] = score_features(embed_images(model, hr_probes), emb.gallery, test, max_rank=10)
    keep = ("L", "L_sr", "L_id", "L_tri", "L_p", "samples_per_s", "seconds", "label_entropy")
    rec = {"phase": phase, "epoch": epoch, **{k: round(float(metrics[k]), 4) for k in keep if k in metrics},
           "rank1": {name: round(row["rank1"], 1) for name, row in rows.items()}}
    if emb.probs is not None:
        rec["P_choice_counts"] = torch.bincount(emb.probs.argmax(1), minlength=emb.probs.shape[1]).tolist()
    return rec


def data_arguments(doc: str) -> argparse.ArgumentParser:
    """The learning benches' common arguments: params, --set overrides, split, canonical table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--split", default="data/split")
    ap.add_argument("--canonical", default="data/canonical.parquet", help="the probes' HR originals")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    return ap


def main() -> None:
    ap = data_arguments(__doc__)
    ap.add_argument("--pre", type=int, default=4, help="pretraining epochs")
    ap.add_argument("--joint", type=int, default=4, help="joint epochs")
    ap.add_argument("--cache", default=None, help="pretrained weights: written, or read when present")
    ap.add_argument("--out", default=None, help="also write the records here (JSON list)")
    ap.add_argument("--save", default=None, help="write the final joint model here (for bench_scale_content.py)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = read_params(args.params, args.set)
    m, t = params.model, params.train
    split = T.read_table(f"{args.split}/split.parquet", T.SPLIT_SCHEMA)
    pairs = T.read_table(f"{args.split}/pairs.parquet", T.PAIRS_SCHEMA)
    train, pairs, validation = training_rows(split, pairs, n_val=params.split.val_identities, seed=params.split.seed)
    test = load_test_set(validation, 1, source="the validation hold-out")
    canonical = T.read_table(args.canonical, T.CANONICAL_SCHEMA)
    hr_probes = hr_probe_images(test, canonical, (params.degrade.hr_height, params.degrade.hr_width))
    torch.manual_seed(t.seed)
    loader = make_train_loader(train, pairs, scales=m.scales, P=t.identities_per_batch, K=t.images_per_identity,
                               flip_p=t.flip_p, seed=t.seed)
    data = loader.dataset
    generator = torch.Generator().manual_seed(t.seed)
    precision = "fp32" if t.precision == "fp32" else "bf16"
    records = []

    def log(rec):
        print(json.dumps(rec), flush=True)
        records.append(rec)

    model = build_pri(m, data.num_classes, with_predictor=False)
    if args.cache and os.path.exists(args.cache):
        model.load_state_dict(torch.load(args.cache, weights_only=True))
        args.pre = 0
    optimizer = build_optimizer(model, t, "pretrain")
    for epoch in range(args.pre):
        metrics = run_pri_epoch(model, loader, optimizer, phase="pretrain", epoch=epoch, loss=params.loss,
                                bank=None, naive_labels=False, device="cpu", precision=precision,
                                generator=generator)
        log(epoch_record(model, test, params, "pretrain", epoch, metrics, hr_probes))
    if args.cache and not os.path.exists(args.cache):
        torch.save(model.state_dict(), args.cache)
    joint = build_pri(m, data.num_classes, with_predictor=True)
    joint.load_state_dict(model.state_dict(), strict=False)
    optimizer = build_optimizer(joint, t, "joint")
    bank = LabelBank(len(data), len(m.scales), m.omega, kind=m.label, gamma=m.gamma, seed=t.seed)
    for epoch in range(args.joint):
        if bank.should_refresh(epoch):
            refresh_label_bank(joint, data, bank, epoch, device="cpu", precision=precision)
        metrics = run_pri_epoch(joint, loader, optimizer, phase="joint", epoch=epoch, loss=params.loss, bank=bank,
                                naive_labels=False, device="cpu", precision=precision, generator=generator)
        metrics["label_entropy"] = bank.entropy()
        log(epoch_record(joint, test, params, "joint", epoch, metrics, hr_probes))
    if args.save:
        save_weights(joint, args.save, {"num_classes": data.num_classes, "source": "bench_learning.py"})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
