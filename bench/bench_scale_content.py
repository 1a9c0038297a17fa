"""Benchmark: what decides the oracle's best scale for a trained PRI? (issue 14's diagnostic)

For the validation hold-out's probes (``split.val_identities`` training identities,
never test identities; ``--probes train`` takes every training probe instead) each
probe is recovered at every alternative scale r_i and compared with all HR images of
the same identities: d_i = distance to the nearest true match, and rank-1 per scale.
Prints rank-1 per fixed scale, the oracle (any scale ranks a true match first), P's
choice, and for slices of the probes (true down-sampling factor, LR camera, the
synthetic generator's attributes, the LR sensor noise of degrade.lr_noise) the histogram of
argmin_i d_i (and of P's r_p) and rank-1 per scale:
if the best scale depended on image content, some slice would prefer another scale.
Last, how much d varies across scales relative to d itself.

    PYTHONPATH=. .venv/bin/python bench/bench_scale_content.py [--model models/model.pt] [--probes val|train]
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from components.config import load_params
from components.data import table as T
from components.data.dataset import SizeGroups
from components.data.protocols import noise_sigma
from components.data.splits import training_rows
from components.data.synthetic import identity_attributes
from components.evaluation import decode_images
from components.losses import pairwise_distances
from components.models.pri import build_pri
from components.stats import bootstrap_means, group_sums
from components.training import load_weights_file


@torch.no_grad()
def features(pri, q_images, g_images):
    all_scales, probs = [], []
    for i in range(0, len(q_images), 64):
        groups = SizeGroups.of(q_images[i:i + 64])
        all_scales.append(pri.embed_all_scales(groups))
        probs.append(pri.predict(groups).softmax(1))
    gallery = torch.cat([pri.embed_gallery(torch.stack(g_images[i:i + 64])) for i in range(0, len(g_images), 64)])
    return torch.cat(all_scales), torch.cat(probs), gallery


def slice_table(name, values, best, hit):
    counts, hits = collections.defaultdict(lambda: np.zeros(hit.shape[1], int)), collections.defaultdict(list)
    for v, b, h in zip(values, best, hit):
        counts[v][b] += 1
        hits[v].append(h)
    print(f"by {name}:  value: n, histogram of argmin_i d_i over r_1..r_N, rank-1 (%) per scale")
    for v in sorted(counts, key=str):
        print(f"  {str(v):>10}: n={counts[v].sum():4d}  {counts[v].tolist()}  "
              f"{(np.mean(hits[v], 0) * 100).round(0).tolist()}")


def scale_gain_by_level(levels, hit, pids, resamples: int = 10000) -> None:
    """Rank-1 at the largest scale minus at r = 1, per content level, and its contrast between the
    highest and the lowest level (does the better scale depend on the content?), with 95% intervals
    from an identity bootstrap (``components.stats``: the probes of one identity resampled together;
    every level sees the same resamples, so the contrast is paired)."""
    levels = np.asarray(levels)
    gain = 100 * (hit[:, -1].astype(float) - hit[:, 0])
    values = sorted(set(levels.tolist()))
    means, boots = {}, {}
    for level in values:
        at = (levels == level).astype(float)
        _, sums, _ = group_sums(gain * at, pids)
        _, counts, _ = group_sums(at, pids)  # the level's probes per identity
        boots[level] = bootstrap_means(sums, counts, resamples, seed=0)[:, 0]  # the same seed: the same resamples
        means[level] = gain[levels == level].mean()
    print("rank-1 at the largest scale - at r = 1 (points), 95% identity-bootstrap interval:")
    for level in values:
        print(f"  level {level:g}: {means[level]:+.1f} {_interval(boots[level])}")
    lo, hi = values[0], values[-1]
    print(f"  level {hi:g} - level {lo:g}: {means[hi] - means[lo]:+.1f} {_interval(boots[hi] - boots[lo])}")


def _interval(boot: np.ndarray) -> str:
    return f"[{np.nanquantile(boot, 0.025):+.1f}, {np.nanquantile(boot, 0.975):+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--split", default="data/split")
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--probes", choices=("val", "train"), default="val")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = load_params(args.params)
    split = T.read_table(f"{args.split}/split.parquet", T.SPLIT_SCHEMA)
    pairs = T.read_table(f"{args.split}/pairs.parquet", T.PAIRS_SCHEMA)
    rows = split.filter(pc.equal(split[T.SPLIT], "train"))
    if args.probes == "val":
        _, _, validation = training_rows(split, pairs, n_val=params.split.val_identities, seed=params.split.seed)
        ids = pa.array(sorted(set(validation[T.PERSON_ID].to_pylist())))
        rows = rows.filter(pc.is_in(rows[T.PERSON_ID], value_set=ids))
    query, gallery = (rows.filter(pc.equal(rows[T.ROLE], role)) for role in ("lr", "hr"))
    state, meta = load_weights_file(args.model)
    pri = build_pri(params.model, int(meta["num_classes"]))
    pri.load_state_dict(state)
    all_scales, probs, g = features(pri.eval(), decode_images(query), decode_images(gallery))
    Q, N, D = all_scales.shape
    q_pids, g_pids = np.array(query[T.PERSON_ID].to_pylist()), np.array(gallery[T.PERSON_ID].to_pylist())
    d = pairwise_distances(all_scales.reshape(Q * N, D), g).reshape(Q, N, -1).numpy()
    d_true = np.where((g_pids[None, :] == q_pids[:, None])[:, None, :], d, np.inf).min(2)  # [Q, N]
    hit = (d < d_true[..., None]).sum(2) == 0  # [Q, N] rank-1 at each scale
    best = d_true.argmin(1)
    chosen = probs.argmax(1).numpy()
    print(f"{args.probes} probes: {Q}, gallery: {len(g_pids)} HR images of {len(set(g_pids))} identities")
    print(f"rank-1 (%) per fixed scale {(hit.mean(0) * 100).round(1).tolist()}, oracle "
          f"{hit.any(1).mean() * 100:.1f}, P's choice {hit[np.arange(Q), chosen].mean() * 100:.1f}")
    true_r = np.array(query[T.SCALE].to_pylist())
    cams = np.array(query[T.CAMERA_ID].to_pylist())
    slice_table("true down-sampling factor", true_r, best, hit)
    slice_table("LR camera", cams, best, hit)
    slice_table("factor / camera", [f"{r:g}/c{c}" for r, c in zip(true_r, cams)], best, hit)
    if params.degrade.lr_noise:  # the LR camera's sensor noise (degrade.lr_noise): a content feature apart from r
        sigma = [noise_sigma(params.degrade, i) for i in query[T.IMAGE_ID].to_pylist()]
        slice_table("LR sensor noise sigma", sigma, best, hit)
        slice_table("noise sigma / factor", [f"{s:g}/x{r:g}" for s, r in zip(sigma, true_r)], best, hit)
        slice_table("P's choice r_p, by noise sigma", sigma, chosen, hit)
        scale_gain_by_level(sigma, hit, q_pids)
    if params.data.layout == "synthetic":
        attrs = {a["pid"]: a for a in identity_attributes(params.data.synthetic.seed, params.data.synthetic.identities)}
        for key in ("pattern", "period", "logo", "top"):
            slice_table(key, [attrs[p][key] for p in q_pids], best, hit)
    spread = np.abs(d_true - d_true.mean(1, keepdims=True)).mean() / d_true.mean()
    print(f"mean |d_i - mean_i d| / mean d = {spread:.3f} (how much the scales differ for F)")


if __name__ == "__main__":
    main()
