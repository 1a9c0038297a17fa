"""Evaluate the trained model on the test split: the papers' protocol, ablation table, pictures.

For each gallery draw (evaluate.repeats, default all of split.repeats): the HR
gallery is embedded with F, the LR probes are recovered at the chosen scale and
embedded; CMC rank-1/5/10 and mAP (Market-1501 protocol, Euclidean distance)
are averaged over the draws (mean and standard deviation). Every row of PRI
Table 2 (fixed x1..xN, size-based, ideal, adaptive) and the diagnostic rows
(PRI's F on bicubic probes, on the probes' HR originals) come from one pass of
the model (components/evaluation.py). Each ablation variant trained beside it
(ablation.variants) adds its row under the same protocol: "Bicubic + F" (F
trained on bicubic-enlarged LR images, no G), "FFSR + RIFE" (the FFSR paper's
model, every image through FFSR then RIFE, Eq. 3) with "RIFE, bicubic probes" (its
RIFE alone), and "RIFE as F + PRI" (PRI with RIFE as its re-id module, adaptive scale)
with "RIFE as F, bicubic probes" (the same RIFE without G).

Every row is also kept probe by probe, and the claims are tested on those records
(components/comparisons.py, components/stats.py): paired differences of rank-1 and
mAP with 95% intervals from a bootstrap over the test identities (adaptive vs each
fixed scale, vs the best fixed scale chosen again in every resample, vs size-based,
vs bicubic + F; ideal vs adaptive; HR probes vs bicubic probes; each variant vs
bicubic + F; RIFE as F + PRI vs its own RIFE and FFSR + RIFE's RIFE on bicubic probes), every row per true down-sampling factor, the oracle's selection-bias
baselines, and P's diagnostics (agreement with the oracle's best scale against
chance, entropy, confusion matrix).

Inputs:  data/split/split.parquet, data/canonical.parquet (the probes' HR originals), models/model.pt, models/ablation/<variant>/model.pt,
         reports/plots/r_p_history.csv (train), reports/plots/{pretrain,joint}_curve.csv
Outputs: reports/eval/per_probe.parquet: one record per row x gallery draw x probe
           (row, draw, image_id, person_id, true_scale, scale, first_rank: 0-based
           rank of the first true match or -1, ap), its split and model in the metadata;
         reports/evaluate.json (DVC metrics: the evaluate.predictor row, the paired
           differences of rank-1 with their intervals, P's agreement and entropy);
         reports/ablation.md (the table, then paired differences, per-factor slices,
           the oracle's headroom, P's diagnostics) and ablation.json (the same numbers);
         reports/plots/{cmc,scale_histogram}.csv (DVC plots);
         reports/figures/*.png (CMC, paired_rank1 / paired_mAP forest plots,
           predictor_confusion, scale histogram, ranked lists, recovered images);
         an MLflow run with all of them
Params:  evaluate.* (evaluate.bootstrap: resamples of the intervals), model.*,
         ablation.variants, degrade.hr_height / hr_width
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np

from components.rows import (ADAPTIVE, BICUBIC, BICUBIC_PROBES, FFSR_RIFE, HR_PROBES, IDEAL, RIFE_BICUBIC, RIFE_PRI,
                            RIFE_PRI_BICUBIC, SIZE_BASED)
from pipelines.common import CANONICAL, REPORTS, SPLIT_DIR, StageError, add_params_arg, params_from, variant_path
from pipelines.train import OUT as MODEL

log = logging.getLogger("lrreid")

FIGURES = Path(REPORTS) / "figures"
PER_PROBE = Path(REPORTS) / "eval" / "per_probe.parquet"
PLOTS = Path(REPORTS) / "plots"
HEADLINE = {"adaptive": ADAPTIVE, "size_based": SIZE_BASED, "ideal": IDEAL, "fixed": "Fixed x1"}
VARIANT_ROWS = {"bicubic": BICUBIC, "ffsr_rife": FFSR_RIFE, "rife_pri": RIFE_PRI}  # variant -> its row


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--split", default=SPLIT_DIR, help=f"split folder (default: {SPLIT_DIR})")
    parser.add_argument("--model", default=MODEL, help=f"trained weights (default: {MODEL})")


def run(args: argparse.Namespace) -> None:
    import torch

    from components.data import table as T
    from components.evaluation import embed_test_set, load_test_set, score
    from pipelines import tracking

    params = params_from(args)
    e = params.evaluate
    if params.train.model != "pri":
        raise StageError(f"train.model = {params.train.model!r}: the evaluate stage's main model is PRI "
                         "(train.model: pri); FFSR + RIFE gets its row through ablation.variants: [ffsr_rife]")
    split_file = Path(args.split) / "split.parquet"
    pri, meta = load_trained(params, Path(args.model))
    variants = {}  # every model loads before the long embedding passes
    for v in params.ablation.variants:
        vparams = params.for_variant(v)
        variants[v] = (vparams, load_trained(vparams, variant_path(args.model, v), v)[0])
    test = load_test_set(T.read_table(split_file, T.SPLIT_SCHEMA), e.repeats, source=str(split_file))
    device = "cuda" if params.train.use_gpu and torch.cuda.is_available() else "cpu"
    log.info("evaluate: %d probes, %d gallery draws of %d images", test.query.num_rows, len(test.draws),
             len(test.draws[0]))
    emb = embed_test_set(pri, test, batch_size=e.batch_size, device=device, progress=not args.no_progress)
    rows = score(pri, emb, test, hr_height=params.degrade.hr_height, max_rank=e.max_rank)
    if params.degrade.protocol != "genuine":  # genuine LR probes have no HR version
        rows[HR_PROBES] = hr_probes_row(pri, emb.gallery, test, params, device)
    for variant, (vparams, model) in variants.items():
        rows.update(score_variant(vparams, variant, model, test, device, progress=not args.no_progress))

    headline = rows[HEADLINE[e.predictor]]
    sections = params.model_dump(mode="json")
    run_id = tracking.start_run("evaluate", sections,
                                Path(".lrreid") / "runs" / f"evaluate-{tracking.params_hash(sections)}.mlflow_run_id",
                                tags={"stage": "evaluate", "model_file_run": meta.get("mlflow_run_id", "")})
    try:
        metrics = {k: headline[k] for k in ("rank1", "rank1_std", "rank5", "rank10", "mAP", "mAP_std")
                   if k in headline}
        metrics.update(repeats=headline["repeats"], probes=test.query.num_rows, skipped=headline["num_skipped"],
                       predictor=e.predictor, dataset=params.data.layout, protocol=params.degrade.protocol,
                       mlflow_run_id=run_id, train_mlflow_run_id=meta.get("mlflow_run_id", ""))
        stats = write_statistics(rows, test, emb, pri, e.bootstrap, provenance(split_file, args))
        metrics.update(stats["headline"])
        outputs = write_reports(rows, metrics, emb, test, pri, stats) + stats["outputs"]
        outputs += write_figures(rows, emb, test, pri, e.figure_probes)
        tracking.log_metrics(run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
        tracking.log_metrics(run_id, {f"{_key(name)}.{k}": row[k] for name, row in rows.items()
                                      for k in ("rank1", "mAP") if k in row}, step=0)
        for path in outputs:
            tracking.log_artifact(run_id, path, str(path.parent.relative_to(REPORTS)) if path.parent != Path(REPORTS)
                                  else None)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    log.info("%s: rank-1 %.1f%% +- %.1f, mAP %.1f%% +- %.1f over %d draws (MLflow run %s)", HEADLINE[e.predictor],
             headline["rank1"], headline["rank1_std"], headline["mAP"], headline["mAP_std"], headline["repeats"],
             run_id)


def hr_probes_row(pri, gallery, test, params, device) -> dict:
    """F on the probes' HR originals (no down-sampling, no G) against the same gallery features."""
    from components.data import table as T
    from components.evaluation import embed_images, hr_probe_images, score_features

    size = (params.degrade.hr_height, params.degrade.hr_width)
    xs = hr_probe_images(test, T.read_table(Path(CANONICAL), T.CANONICAL_SCHEMA), size)
    feats = embed_images(pri, xs, batch_size=params.evaluate.batch_size, device=device)
    return score_features(feats, gallery, test, max_rank=params.evaluate.max_rank)


def load_trained(params, model_file: Path, variant: str | None = None):
    """The trained model in ``model_file`` built from ``params`` (a PRI, or an FFSRRIFE), and its meta."""
    from components.models import build_model
    from components.training import load_weights_file

    remedy = f"`dvc repro train_variant@{variant}`" if variant else "`dvc repro train`"
    if not model_file.exists():
        raise StageError(f"{model_file} does not exist: train it first ({remedy})"
                         + (f" or remove {variant!r} from ablation.variants" if variant else ""))
    state, meta = load_weights_file(model_file)
    kind = params.train.model
    if meta.get("model", "pri") != kind:
        raise StageError(f"{model_file} holds a {meta.get('model')!r} model, expected {kind!r}"
                         + ("" if variant else "; the evaluate stage's main model is PRI (train.model: pri)"))
    num_classes = int(meta["num_classes"])
    model = build_model(kind, params.model, num_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StageError(f"{model_file} does not fit params.yaml's model section (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): retrain it ({remedy}) or evaluate with the params it was "
                         "trained with")
    return model.eval(), meta


def score_variant(vparams, variant: str, model, test, device, progress: bool) -> dict[str, dict]:
    """The table rows of ablation variant ``variant`` (``model`` trained by train_variant@<variant>):
    its own row, and for FFSR + RIFE and RIFE as F + PRI also their RIFE alone on bicubic probes."""
    from components.evaluation import embed_ffsr_rife, embed_test_set, score, score_features

    e, d = vparams.evaluate, vparams.degrade
    log.info("evaluate: variant %s (%s)", variant, VARIANT_ROWS[variant])
    if vparams.train.model == "ffsr_rife":
        f = embed_ffsr_rife(model, test, hr_size=(d.hr_height, d.hr_width), batch_size=e.batch_size, device=device,
                            progress=progress)
        return {FFSR_RIFE: score_features(f["probe"], f["gallery"], test, max_rank=e.max_rank),
                RIFE_BICUBIC: score_features(f["probe_bicubic"], f["gallery_plain"], test, max_rank=e.max_rank)}
    emb = embed_test_set(model, test, batch_size=e.batch_size, device=device, progress=progress)
    rows = score(model, emb, test, hr_height=d.hr_height, max_rank=e.max_rank)
    if vparams.model.sr.kind == "bicubic":
        return {VARIANT_ROWS[variant]: rows[BICUBIC_PROBES]}
    out = {VARIANT_ROWS[variant]: rows[ADAPTIVE]}
    if variant == "rife_pri":  # its RIFE without PRI's recovery: the matched baseline of the recovery
        out[RIFE_PRI_BICUBIC] = rows[BICUBIC_PROBES]
    return out


def _key(name: str) -> str:
    """An MLflow-safe metric prefix for a table row or comparison ("Fixed x2" -> "fixed_x2",
    "Adaptive - best fixed" -> "adaptive_best_fixed")."""
    import re

    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def ablation_markdown(rows: dict[str, dict], paired: list[dict] = ()) -> str:
    """The table of every row; with an HR probes row whose lead over PRI's F on bicubic probes has a
    paired interval above 0 (``paired``: the statistics' comparisons), a column placing each row
    inside that gap."""
    lead = next((c["rank1"] for c in paired if c["label"] == f"{HR_PROBES} - {BICUBIC_PROBES}"), None)
    gap = lead is not None and lead["low"] > 0
    lo, hi = rows.get(BICUBIC_PROBES, {}).get("rank1"), rows.get(HR_PROBES, {}).get("rank1")
    lines = ["| method | rank-1 (%) | rank-5 (%) | rank-10 (%) | mAP (%) |" + (" of the gap (%) |" if gap else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if gap else "")]
    for name, r in rows.items():
        line = (f"| {name} | {r['rank1']:.1f} +- {r['rank1_std']:.1f} | {r.get('rank5', float('nan')):.1f} | "
                f"{r.get('rank10', float('nan')):.1f} | {r['mAP']:.1f} +- {r['mAP_std']:.1f} |")
        lines.append(line + (f" {100 * (r['rank1'] - lo) / (hi - lo):.0f} |" if gap else ""))
    repeats = next(iter(rows.values()))["repeats"]
    lines.append(f"\nMean +- standard deviation over {repeats} gallery draws.")
    if gap:
        lines.append(f"\"Of the gap\": where the row's rank-1 sits between {BICUBIC_PROBES} (0) and HR probes "
                     "(100), the probes' HR originals through the same F: the part of what resolution costs that "
                     "the row wins back.")
    elif lead is not None:
        lines.append(f"{HR_PROBES} - {BICUBIC_PROBES}: {lead['mean']:+.1f} rank-1 points [{lead['low']:+.1f}, "
                     f"{lead['high']:+.1f}] (95% CI): this F gains nothing measurable from the probes' full "
                     "resolution, so no row can win resolution back (no \"of the gap\" column).")
    return "\n".join(lines) + "\n"


def write_reports(rows: dict[str, dict], metrics: dict, emb, test, pri, stats: dict) -> list[Path]:
    """reports/evaluate.json, ablation.{md,json}, plots/*.csv (written atomically)."""
    from components.figures import scale_histogram_table
    from components.fsutil import atomic_path, write_json

    reports = Path(REPORTS)
    write_json(reports / "evaluate.json", metrics)
    table = {name: {k: v for k, v in r.items() if k not in ARRAYS} for name, r in rows.items()}
    write_json(reports / "ablation.json", {"rows": table, **stats["json"]})
    with atomic_path(reports / "ablation.md") as tmp:
        tmp.write_text(ablation_markdown(rows, stats["json"].get("paired", [])) + stats["markdown"])
    PLOTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(PLOTS / "cmc.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "rank", "matching_rate"])
        for name, r in rows.items():
            for k, v in enumerate(r["cmc"][:20], start=1):
                w.writerow([name, k, round(float(v), 3)])
    scales = pri.scales.cpu().tolist()
    adaptive = rows.get(ADAPTIVE, {}).get("scales")
    outputs = [reports / "evaluate.json", reports / "ablation.json", reports / "ablation.md", PLOTS / "cmc.csv"]
    if adaptive is not None:
        with atomic_path(PLOTS / "scale_histogram.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true_scale", "predicted_scale", "fraction", "count"])
            for r in scale_histogram_table(test.q_scales, adaptive, scales):
                w.writerow([r["true_scale"], r["predicted_scale"], round(r["fraction"], 4), r["count"]])
        outputs.append(PLOTS / "scale_histogram.csv")
    return outputs


ARRAYS = ("cmc", "cmc_std", "scales", "scale", "first_rank", "ap")  # per-draw / per-probe: not in the JSON


def provenance(split_file: Path, args) -> dict:
    """What the per-probe records come from: the split and model files (md5)."""
    from pipelines.training_stage import _md5

    return {"split": _md5(split_file), "model": _md5(Path(args.model))}


def write_statistics(rows: dict, test, emb, pri, resamples: int, source: dict) -> dict:
    """reports/eval/per_probe.parquet and what comes from it: paired differences of the claims (identity
    bootstrap), per-scale slices, the oracle's selection-bias baselines, P's diagnostics, the forest
    plot and P's confusion matrix. Returns {"headline": numbers for evaluate.json, "json": for
    ablation.json, "markdown": for ablation.md, "outputs": files written}."""
    from components import comparisons as C
    from components import figures
    from components.data import table as T
    from components.diagnostics import agreement_hits, predictor_diagnostics
    from components.stats import oracle_index, paired_bootstrap

    q_ids = np.asarray(test.query["image_id"].to_pylist(), dtype=object)
    table = C.per_probe_table(rows, q_ids, test.q_pids, test.q_scales, source)
    path = PER_PROBE
    T.write_table(table, path, table.schema)
    C.check_per_probe(table, str(path), list(rows), source)
    pairs = C.compare(table, C.claims(list(rows)), n_resamples=resamples)
    slices = C.per_scale(table)
    oracle = C.oracle_headroom(table)
    fixed = [r for r in rows if r.startswith("Fixed x")]
    ranks, aps, pids = zip(*(C.arrays(table, r) for r in fixed))
    best = oracle_index(np.stack(ranks, 2), np.stack(aps, 2))  # [D, Q], probes in image_id order
    order = np.argsort(q_ids, kind="stable")
    predictor = {}
    outputs = [path]
    if emb.probs is not None:
        probs = emb.probs.numpy()[order]
        scales = pri.scales.cpu().tolist()
        predictor = predictor_diagnostics(probs, test.q_scales[order], best, scales)
        hits = agreement_hits(probs, best)  # [D, Q] 0/1
        chance = predictor["chance_agreement"]
        diff = paired_bootstrap(100 * (hits.ravel() - chance), np.tile(pids[0], len(best)), n_resamples=resamples)[0]
        predictor["agreement_minus_chance"] = {"mean": diff.mean, "low": diff.low, "high": diff.high,
                                               "p_value": diff.p_value}
        outputs.append(figures.predictor_confusion(np.asarray(predictor["confusion"]), predictor["true_scales"],
                                                   scales, FIGURES / "predictor_confusion.png",
                                                   title="P's r_p per true down-sampling factor (test probes)"))
    for metric in ("rank1", "mAP"):
        outputs.append(figures.forest_plot(
            [(p["label"], p[metric].mean, p[metric].low, p[metric].high, p[metric].p_value) for p in pairs],
            FIGURES / f"paired_{metric}.png", title=f"Paired differences of {metric} (95% identity-bootstrap CI)",
            xlabel=f"{metric} difference (points)"))
    stats_json = dict(
        paired=[{"label": p["label"], "a": p["a"], "b": p["b"],
                 **{m: vars(p[m]) for m in ("rank1", "mAP")}} for p in pairs],
        per_scale=slices, oracle=oracle, predictor=_jsonable(predictor), bootstrap_resamples=resamples)
    markdown = ("\n## Paired differences\n\n" + C.paired_markdown(pairs, resamples)
                + "\n## Per true down-sampling factor\n\n" + C.per_scale_markdown(slices)
                + "\n## The oracle's headroom\n\n" + oracle_markdown(oracle)
                + ("\n## Is P predicting anything?\n\n" + predictor_markdown(predictor) if predictor else ""))
    headline = {}
    for p in pairs:  # e.g. adaptive_best_fixed.rank1, .rank1_low, .rank1_high, .rank1_p, the same for mAP
        key = _key(p["label"])
        for m in ("rank1", "mAP"):
            d = p[m]
            headline.update({f"{key}.{m}": d.mean, f"{key}.{m}_low": d.low, f"{key}.{m}_high": d.high,
                             f"{key}.{m}_p": d.p_value})
    if predictor:
        headline.update(p_agreement=predictor["agreement"], p_chance_agreement=predictor["chance_agreement"],
                        p_mean_entropy=predictor["mean_entropy"], p_max_entropy=predictor["max_entropy"])
    return {"headline": headline, "json": stats_json, "markdown": markdown, "outputs": outputs}


def oracle_markdown(oracle: dict) -> str:
    names = {"oracle": "Ideal (in-sample oracle over the fixed scales)",
             "held_out_oracle": "Held-out oracle (choice from the other gallery draws)",
             "noise_oracle": "Noise oracle (the same choice among N noise copies of the mean scale feature)",
             "mean_of_scales": "Mean of the fixed scales"}
    lines = ["| | rank-1 (%) | mAP (%) |", "|---|---:|---:|"]
    lines += [f"| {names[k]} | {v['rank1']:.1f} | {v['mAP']:.1f} |" for k, v in oracle.items() if k in names]
    lines.append("\nThe noise oracle picks among features that differ only by noise (the per-probe spread of the "
                 "real scale features, no structure): its lead is selection on noise alone. The held-out oracle "
                 "picks each draw's scale from the other draws: what it keeps over the mean of the scales is "
                 "headroom a predictor can reach.")
    return "\n".join(lines) + "\n"


def predictor_markdown(p: dict) -> str:
    d = p["agreement_minus_chance"]
    return (f"- agreement of r_p with the oracle's best scale: {100 * p['agreement']:.1f}% "
            f"(chance {100 * p['chance_agreement']:.1f}%, uniform {100 * p['uniform_agreement']:.1f}%); "
            f"agreement - chance {d['mean']:+.1f} points [{d['low']:+.1f}, {d['high']:+.1f}], p {d['p_value']:.3g}\n"
            f"- P's mean entropy {p['mean_entropy']:.3f} of at most ln N = {p['max_entropy']:.3f}; mean max "
            f"probability {p['mean_max_prob']:.3f}\n"
            f"- confusion matrix (rows: true factor, columns: r_p): figures/predictor_confusion.png\n")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_figures(rows: dict[str, dict], emb, test, pri, n_probes: int) -> list[Path]:
    """CMC chart, scale histogram, ranked lists (PRI Fig. 5) and recovered images."""
    import torch

    from components import figures
    from components.data.dataset import SizeGroups
    from components.evaluation import decode_images
    from pipelines.training_stage import read_curve

    out = [figures.cmc_chart({n: r["cmc"] / 100 for n, r in rows.items()}, FIGURES / "cmc.png",
                             title=f"CMC, mean of {next(iter(rows.values()))['repeats']} gallery draws")]
    scales = pri.scales.cpu().tolist()
    adaptive = rows.get(ADAPTIVE, {}).get("scales")
    if adaptive is not None:
        out.append(figures.scale_histogram(test.q_scales, adaptive, FIGURES / "scale_histogram.png", scales=scales))
    history = Path(PLOTS) / "r_p_history.csv"  # written by the train stage
    if history.exists():
        series: dict[str, list[tuple[int, float]]] = {}
        with open(history, newline="") as f:
            for row in csv.DictReader(f):
                series.setdefault(row["image"], []).append((int(row["epoch"]), float(row["r_p"])))
        if series:
            out.append(figures.r_p_evolution(series, FIGURES / "r_p_evolution.png", scales=scales))
    curves = {phase: read_curve(Path(PLOTS) / f"{phase}_curve.csv") for phase in ("pretrain", "joint")
              if (Path(PLOTS) / f"{phase}_curve.csv").exists()}  # written by the pretrain and train stages
    if any(curves.values()):
        out.append(figures.training_curves(curves, FIGURES / "training_curves.png"))
    if n_probes == 0:
        return out
    # a few probes, spread over the true down-sampling factors
    true = test.q_scales
    picks, seen = [], set()
    queues = [list(np.flatnonzero(true == s)) for s in np.unique(true)]
    while len(picks) < n_probes and any(queues):
        for q in queues:  # round robin over the true factors, one probe per person
            while q and test.q_pids[q[0]] in seen:
                q.pop(0)
            if q and len(picks) < n_probes:
                picks.append(q.pop(0))
                seen.add(test.q_pids[picks[-1]])
    probes = decode_images(test.query.take(picks))
    draw = test.draws[0]
    g_images = decode_images(test.gallery.take(draw))
    g_pids = test.g_pids[draw]
    index = torch.as_tensor(rows[ADAPTIVE]["scales"] if adaptive is not None else np.ones(len(true)))
    recoveries, probs, chosen, gallery, matches, labels = [], [], [], [], [], []
    with torch.no_grad():
        for i, x in zip(picks, probes):
            recoveries.append([pri.recover(SizeGroups.stacked(x[None]), torch.tensor([k])).cat()[0].clamp(0, 1)
                               for k in range(len(scales))])
            probs.append(emb.probs[i].tolist() if emb.probs is not None else None)
            chosen.append(float(index[i]))
            k = scales.index(float(index[i]))
            d = torch.cdist(emb.all_scales[i, k][None], emb.gallery[draw])[0]
            top = d.argsort()[:10].tolist()
            gallery.append([g_images[j] for j in top])
            matches.append([bool(g_pids[j] == test.q_pids[i]) for j in top])
            labels.append([f"id {g_pids[j]}, d={float(d[j]):.1f}" for j in top])
    out.append(figures.ranked_list(
        probes, recoveries, gallery, FIGURES / "ranked_list.png",
        probe_labels=[f"id {test.q_pids[i]}, true x{true[i]:g}" for i in picks],
        scale_probs=probs if emb.probs is not None else None, scales=scales, chosen=chosen,
        matches=matches, gallery_labels=labels))
    out.append(figures.image_grid(
        [[p] + rec for p, rec in zip(probes, recoveries)], FIGURES / "recovered.png",
        row_labels=[f"true x{true[i]:g}" for i in picks], col_labels=["LR probe"] + [f"G x{r:g}" for r in scales]))
    return out
