"""The papers' evaluation protocol on a split: embed once, score every scale choice.

The test part of a split table (``split`` = query / gallery) holds the LR probes
(the same in every repeat) and one HR gallery image per test identity per
gallery draw (``repeat`` 0..R-1). :func:`embed_test_set` runs the model once:

- every probe x_l recovered at every alternative scale r_i and embedded,
  F(G_{r_i}(x_l)) -> ``all_scales`` [Q, N, D], and P's probabilities [Q, N];
- bicubic probes: F on x_l resized bicubically to F's input (no G);
- every distinct gallery image x_h: F(x_h).

A scale choice is then only an index per probe, so PRI Table 2's rows (fixed
x1..xN, size-based, ideal, adaptive) cost no extra forward passes.
:func:`score` evaluates each row on each gallery draw with
:func:`components.metrics.evaluate_features` (Market-1501 protocol, Euclidean
distance) and returns the mean and standard deviation over the draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from components import images
from components.data import table as T
from components.data.dataset import SizeGroups, to_tensor
from components.metrics import evaluate_features
from components.models.ffsr import enlarge
from components.models.pri import PRI, Adaptive, SizeBased, ideal_scale, size_based_index
from components.rows import ADAPTIVE, BICUBIC_PROBES, IDEAL, NOISE_ORACLE, SIZE_BASED


@dataclass
class TestSet:
    """The probes and every gallery draw of one split, as arrays (images decoded lazily)."""

    query: pa.Table
    gallery: pa.Table  # distinct HR gallery images of all draws
    draws: list[np.ndarray]  # per draw: row indices into ``gallery``
    draw_ids: list[int]

    @property
    def q_pids(self) -> np.ndarray:
        return np.array(self.query[T.PERSON_ID].to_numpy())  # a writable copy (arrow buffers are read-only)

    @property
    def q_cams(self) -> np.ndarray:
        return np.array(self.query[T.CAMERA_ID].to_numpy())

    @property
    def q_scales(self) -> np.ndarray:
        """The true down-sampling factor of each probe (from the degrade stage)."""
        return np.array(self.query[T.SCALE].to_numpy(), dtype=np.float64)

    @property
    def g_pids(self) -> np.ndarray:
        return np.array(self.gallery[T.PERSON_ID].to_numpy())

    @property
    def g_cams(self) -> np.ndarray:
        return np.array(self.gallery[T.CAMERA_ID].to_numpy())


def load_test_set(split: pa.Table, repeats: int | None = None, source: str = "the split table") -> TestSet:
    """Probes and gallery draws 0..repeats-1 (all draws if ``repeats`` is None) of a split table."""
    query = split.filter(pc.equal(split[T.SPLIT], "query"))
    rows = split.filter(pc.equal(split[T.SPLIT], "gallery"))
    if query.num_rows == 0 or rows.num_rows == 0:
        raise ValueError(f"{source} has {query.num_rows} query and {rows.num_rows} gallery rows: "
                         "evaluation needs both (run the split stage: `dvc repro split`)")
    available = sorted(set(rows[T.REPEAT].to_pylist()))
    if repeats is not None:
        if repeats > len(available):
            raise ValueError(f"evaluate.repeats = {repeats}, but {source} has {len(available)} gallery draws; "
                             f"lower evaluate.repeats or raise split.repeats")
        available = available[:repeats]
    ids = rows[T.IMAGE_ID].to_pylist()
    distinct = list(dict.fromkeys(ids))
    position = {image_id: i for i, image_id in enumerate(distinct)}
    first = [ids.index(image_id) for image_id in distinct]
    gallery = rows.take(pa.array(first))
    repeat = rows[T.REPEAT].to_pylist()
    draws = [np.array([position[i] for i, r in zip(ids, repeat) if r == k], dtype=np.int64) for k in available]
    return TestSet(query=query, gallery=gallery, draws=draws, draw_ids=available)


def decode_images(table: pa.Table) -> list[torch.Tensor]:
    """The table's images as float CHW tensors in [0, 1]."""
    names = table[T.IMAGE_ID].to_pylist()
    return [to_tensor(images.decode(data, name)) for data, name in zip(table[T.IMAGE].to_pylist(), names)]


@dataclass
class Embeddings:
    all_scales: torch.Tensor  # [Q, N, D] F(G_{r_i}(x_l)) for every alternative r_i
    probs: torch.Tensor | None  # [Q, N] P's softmax, None without P
    bicubic: torch.Tensor  # [Q, D] F(bicubic(x_l)): the baseline without G
    gallery: torch.Tensor  # [G, D] F(x_h) of the distinct gallery images
    heights: np.ndarray  # [Q] probe heights (for the size-based choice)


@torch.no_grad()
def embed_test_set(pri: PRI, test: TestSet, *, batch_size: int = 64, device="cpu",
                   progress: bool = True) -> Embeddings:
    """Run the model once over the test set (see the module docstring)."""
    pri = pri.to(device).eval()
    q_images, g_images = decode_images(test.query), decode_images(test.gallery)
    all_scales, probs, bicubic = [], [], []
    bar = tqdm(total=len(q_images) + len(g_images), desc="embed test set", unit="img", disable=not progress)
    for start in range(0, len(q_images), batch_size):
        chunk = [x.to(device) for x in q_images[start:start + batch_size]]
        groups = SizeGroups.of(chunk)
        all_scales.append(pri.embed_all_scales(groups).float().cpu())
        if pri.P is not None:
            probs.append(pri.predict(groups).float().softmax(1).cpu())
        bicubic.append(_bicubic_features(pri, chunk).cpu())
        bar.update(len(chunk))
    gallery = []
    for start in range(0, len(g_images), batch_size):
        chunk = torch.stack([x.to(device) for x in g_images[start:start + batch_size]])
        gallery.append(pri.embed_gallery(chunk).float().cpu())
        bar.update(len(chunk))
    bar.close()
    return Embeddings(all_scales=torch.cat(all_scales), probs=torch.cat(probs) if probs else None,
                      bicubic=torch.cat(bicubic), gallery=torch.cat(gallery),
                      heights=np.array([x.shape[-2] for x in q_images]))


def _bicubic_features(pri: PRI, chunk: list[torch.Tensor]) -> torch.Tensor:
    """F(x_l up-sampled bicubically to F's input size): the bicubic-probes row (the whole
    "Bicubic + F" baseline when F was trained that way, ablation variant "bicubic")."""
    up = [torch.nn.functional.interpolate(x[None], size=pri.input_size, mode="bicubic", align_corners=False)
          .clamp_(0, 1) for x in chunk]
    return pri.embed_gallery(torch.cat(up)).float()


def hr_probe_images(test: TestSet, canonical: pa.Table, hr_size: tuple[int, int]) -> list[torch.Tensor]:
    """Each probe's source image before down-sampling, normalised to the HR size as the degrade
    stage normalises HR images: the probes SR works toward ("HR probes", the upper bound)."""
    wanted = test.query[T.SOURCE_IMAGE_ID].to_pylist()
    rows = canonical.filter(pc.is_in(canonical[T.IMAGE_ID], value_set=pa.array(sorted(set(wanted)))))
    found = dict(zip(rows[T.IMAGE_ID].to_pylist(), rows[T.IMAGE].to_pylist()))
    missing = [w for w in wanted if w not in found]
    if missing:
        raise ValueError(f"{len(missing)} probe source images (e.g. {missing[0]!r}) are not in the canonical "
                         "table: the split was made from another dataset (run `dvc repro split`)")
    return [to_tensor(images.resize(images.decode(found[w], w), *hr_size)) for w in wanted]


@torch.no_grad()
def embed_images(pri: PRI, xs: list[torch.Tensor], *, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """F's features of same-size images (no G), in batches."""
    pri = pri.to(device).eval()
    return torch.cat([pri.embed_gallery(torch.stack(xs[i:i + batch_size]).to(device)).float().cpu()
                      for i in range(0, len(xs), batch_size)])


# ---------------------------------------------------------------------- scoring
def choices(pri: PRI, emb: Embeddings, hr_height: float) -> dict[str, torch.Tensor]:
    """The fixed, size-based and adaptive scale choices of PRI Table 2, as indices [Q]."""
    scales = pri.scales.cpu()
    Q = len(emb.heights)
    out = {f"Fixed x{float(r):g}": torch.full((Q,), k, dtype=torch.long) for k, r in enumerate(scales.tolist())}
    out[SIZE_BASED] = size_based_index(scales, hr_height, torch.as_tensor(emb.heights, dtype=torch.float32))
    if emb.probs is not None:
        out[ADAPTIVE] = emb.probs.argmax(1)
    return out


def score(pri: PRI, emb: Embeddings, test: TestSet, *, hr_height: float, max_rank: int = 50,
          seed: int = 0) -> dict[str, dict]:
    """Every row (scale choices, ideal, its noise baseline, bicubic probes) on every gallery draw:
    mean / std of rank-1/5/10 and mAP in %, the mean CMC curve, per-probe ranks and APs, and the
    chosen scales."""
    indices = choices(pri, emb, hr_height)
    indices[IDEAL] = None  # the oracle depends on the draw
    scales = pri.scales.cpu()
    rows = {}
    for name, fixed in indices.items():
        results, picked = _score_choice(emb.all_scales, fixed, emb.gallery, test, max_rank)
        scale = scales[torch.stack(picked)].numpy()  # [D, Q]
        rows[name] = {**_summary(results), "scales": scale[0], "scale": scale}  # scales: draw 0's choice
    results, _ = _score_choice(noisy_scales(emb.all_scales, seed), None, emb.gallery, test, max_rank)
    rows[NOISE_ORACLE] = {**_summary(results), "scale": None}
    rows[BICUBIC_PROBES] = score_features(emb.bicubic, emb.gallery, test, max_rank=max_rank)
    return rows


def _score_choice(all_scales: torch.Tensor, index: torch.Tensor | None, gallery: torch.Tensor, test: TestSet,
                  max_rank: int) -> tuple[list[dict], list[torch.Tensor]]:
    """Per draw: the probes' features at ``index`` [Q] (None: the oracle's choice in that draw) scored
    against the draw's gallery (per-query results kept); and the indices used."""
    Q = all_scales.shape[0]
    results, picked = [], []
    for draw in test.draws:
        g = gallery[draw]
        idx = index  # ideal: per probe the scale ranking a true match best in this draw
        if idx is None:
            idx = ideal_scale(all_scales, torch.as_tensor(test.q_pids), g, torch.as_tensor(test.g_pids[draw]))
        picked.append(idx)
        results.append(evaluate_features(all_scales[torch.arange(Q), idx], g, test.q_pids, test.g_pids[draw],
                                         test.q_cams, test.g_cams[draw], max_rank=max_rank, per_query=True))
    return results, picked


def noisy_scales(all_scales: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """N features per probe that differ only by noise: the mean of its N scale features plus
    isotropic Gaussian noise, centred and scaled so that the copies have exactly the real ones'
    mean and per-probe spread around it (RMS per dimension). The oracle among them ("Noise
    oracle") gains from selection on noise alone: the part of Ideal's lead that is no headroom
    for a predictor."""
    def spread(f):  # [Q, 1, 1] RMS per dimension around the probe's mean feature
        return (f - f.mean(1, keepdim=True)).pow(2).mean((1, 2), keepdim=True).sqrt()

    noise = torch.randn(all_scales.shape, generator=torch.Generator().manual_seed(seed))
    noise = (noise - noise.mean(1, keepdim=True)) / spread(noise)
    return all_scales.mean(1, keepdim=True) + spread(all_scales) * noise


@torch.no_grad()
def embed_ffsr_rife(model: torch.nn.Module, test: TestSet, *, hr_size: tuple[int, int], batch_size: int = 64,
                    device="cpu", progress: bool = True, bicubic: bool = True) -> dict[str, torch.Tensor]:
    """The FFSR paper's model (an FFSRRIFE) on the test set, every image through FFSR then RIFE
    (Eq. 3), probes super-resolved to ``hr_size``: "probe" [Q, D] and "gallery" [G, D].
    With ``bicubic`` also RIFE alone, without FFSR: "probe_bicubic" (RIFE on the probes
    bicubic-enlarged to ``hr_size``) and "gallery_plain" (RIFE on the gallery images)."""
    model = model.to(device).eval()
    q_images, g_images = decode_images(test.query), decode_images(test.gallery)
    out = {k: [] for k in ("probe", "gallery") + (("probe_bicubic", "gallery_plain") if bicubic else ())}
    bar = tqdm(total=len(q_images) + len(g_images), desc="embed test set (FFSR+RIFE)", unit="img",
               disable=not progress)
    for start in range(0, len(q_images), batch_size):
        chunk = q_images[start:start + batch_size]
        groups = SizeGroups.of([x.to(device) for x in chunk])
        out["probe"].append(groups.map(lambda x: model(x, hr_size).feature.float().cpu()))
        if bicubic:
            out["probe_bicubic"].append(groups.map(lambda x: model.rife(enlarge(x, hr_size)).feature.float().cpu()))
        bar.update(len(chunk))
    for start in range(0, len(g_images), batch_size):
        chunk = torch.stack([x.to(device) for x in g_images[start:start + batch_size]])
        out["gallery"].append(model(chunk, tuple(chunk.shape[-2:])).feature.float().cpu())
        if bicubic:
            out["gallery_plain"].append(model.rife(chunk).feature.float().cpu())
        bar.update(len(chunk))
    bar.close()
    return {k: torch.cat(v) for k, v in out.items()}


def score_features(probe: torch.Tensor, gallery: torch.Tensor, test: TestSet, *, max_rank: int = 50) -> dict:
    """One row of the table for a model that gives its own probe and gallery features
    (e.g. FFSR + RIFE): the same protocol and summary as :func:`score`."""
    results = [evaluate_features(probe, gallery[d], test.q_pids, test.g_pids[d], test.q_cams, test.g_cams[d],
                                 max_rank=max_rank, per_query=True) for d in test.draws]
    return {**_summary(results), "scale": None}


@torch.no_grad()
def validate(pri: PRI, test: TestSet, *, hr_height: float, batch_size: int = 64, device="cpu") -> dict[str, float]:
    """Rank-1 and mAP (%) of the model's own scale choice on a validation set: the adaptive
    r_p with P, the size-based one without (pretraining). The metric a search optimises."""
    was_training = pri.training
    pri.eval()
    choose = Adaptive() if pri.P is not None else SizeBased(hr_height)
    q_images, g_images = decode_images(test.query), decode_images(test.gallery)
    probes = [pri.embed_probe(SizeGroups.of([x.to(device) for x in q_images[i:i + batch_size]]), choose)[0].float()
              for i in range(0, len(q_images), batch_size)]
    gallery = [pri.embed_gallery(torch.stack(g_images[i:i + batch_size]).to(device)).float()
               for i in range(0, len(g_images), batch_size)]
    pri.train(was_training)
    row = score_features(torch.cat(probes).cpu(), torch.cat(gallery).cpu(), test, max_rank=1)
    return {"val_rank1": row["rank1"], "val_mAP": row["mAP"]}


def validate_ffsr_rife(model: torch.nn.Module, test: TestSet, *, hr_size: tuple[int, int], batch_size: int = 64,
                       device="cpu") -> dict[str, float]:
    """Rank-1 and mAP (%) of FFSR + RIFE (Eq. 3, as :func:`embed_ffsr_rife`) on a validation set."""
    was_training = model.training
    feats = embed_ffsr_rife(model, test, hr_size=hr_size, batch_size=batch_size, device=device, progress=False,
                            bicubic=False)
    model.train(was_training)
    row = score_features(feats["probe"], feats["gallery"], test, max_rank=1)
    return {"val_rank1": row["rank1"], "val_mAP": row["mAP"]}


def _summary(results: list[dict]) -> dict:
    """Mean / std over the draws; with per-query results also "first_rank" and "ap" [D, Q]."""
    cmc = np.stack([r["cmc"] for r in results]) * 100
    mAP = np.array([r["mAP"] for r in results]) * 100
    out = {"cmc": cmc.mean(0), "cmc_std": cmc.std(0), "repeats": len(results),
           "mAP": float(mAP.mean()), "mAP_std": float(mAP.std()),
           "num_skipped": int(results[0]["num_skipped"])}
    if "first_rank" in results[0]:
        out["first_rank"] = np.stack([r["first_rank"] for r in results])
        out["ap"] = np.stack([r["ap"] for r in results])
    for k in (1, 5, 10):
        if k <= cmc.shape[1]:
            out[f"rank{k}"] = float(cmc[:, k - 1].mean())
            out[f"rank{k}_std"] = float(cmc[:, k - 1].std())
    return out
