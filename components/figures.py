"""The evaluation's pictures, written as PNG files.

- ``cmc_chart``: CMC curves of several methods in one chart.
- ``ranked_list``: Fig. 5 of the PRI paper: per probe, its recoveries at every
  scale with P's probabilities, and the top-ranked gallery images (true matches
  framed green, the others red).
- ``scale_histogram`` / ``scale_histogram_table``: which scale P predicts for
  each true down-sampling factor, as a chart and as rows (a DVC plots file).
- ``r_p_evolution``: Fig. 3 of the PRI paper: the predicted scale r_p of a few
  training images across epochs.
- ``image_grid``: a plain grid of images, e.g. LR probe | recovered x1..x4 | HR.
- ``search_scatter``: a hyperparameter search: the metric of every trial against
  each searched parameter (one panel per parameter).
- ``predictor_confusion``: P's predicted scale r_p per true down-sampling factor,
  a heatmap of row fractions with the counts written in (``components.diagnostics``).
- ``forest_plot``: paired differences (e.g. rank-1 of row A minus row B) with
  their 95% intervals, one line per comparison.

Images are torch tensors ``[3, H, W]`` (or ``[H, W, 3]`` arrays) of floats in
[0, 1], or ``H x W x 3`` uint8 arrays. Figures are drawn with matplotlib's Agg
canvas directly (no pyplot: no global state, safe in threads) and written
atomically (``components.fsutil.atomic_path``): a failure leaves no file behind.
Every function creates the parent folders and returns the path written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from components.fsutil import atomic_path

MATCH_COLOR = (0.0, 0.8, 0.0)      # frame of a true match (green)
MISMATCH_COLOR = (0.85, 0.1, 0.1)  # frame of a wrong match (red)
CHOSEN_COLOR = (0.85, 0.1, 0.1)    # caption of the chosen scale r_p
DPI = 100
SIGNIFICANT_COLOR = "tab:red"     # forest plot: a 95% interval that excludes 0
NOT_SIGNIFICANT_COLOR = "0.45"    # one that includes 0 (grey)

__all__ = ["cmc_chart", "ranked_list", "scale_histogram", "scale_histogram_table",
           "r_p_evolution", "image_grid", "search_scatter", "predictor_confusion", "forest_plot"]


# ---------------------------------------------------------------- helpers

def _to_hwc(image, name: str) -> np.ndarray:
    """An image (torch/numpy, CHW or HWC, float in [0, 1] or uint8) as an HxWx3 float array."""
    if hasattr(image, "detach"):  # a torch tensor; torch itself is not imported here
        image = image.detach().cpu().float().numpy()
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"{name}: expected an image [3, H, W] or [H, W, 3], got shape {x.shape}")
    if x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(1, 2, 0)
    if x.shape[-1] not in (1, 3) or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected an image [3, H, W] or [H, W, 3], got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return np.clip(x, 0.0, 1.0)


def _save(fig: Figure, path) -> Path:
    """Render ``fig`` to ``path`` as PNG, atomically; free the figure."""
    path = Path(path)
    try:
        FigureCanvasAgg(fig)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
    finally:
        fig.clear()
    return path


def _draw_image(ax, image: np.ndarray, frame=None) -> None:
    """Draw ``image`` in ``ax`` at its natural aspect, with an optional coloured frame."""
    ax.imshow(image, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        if frame is None:
            spine.set_visible(False)
        else:
            spine.set_color(frame)
            spine.set_linewidth(4)


@dataclass
class _Cell:
    image: np.ndarray
    title: str = ""
    caption: str = ""
    frame: object = None
    highlight: bool = False  # caption in bold red


def _grid_figure(rows: list[list[_Cell]], *, row_labels=None, col_labels=None,
                 gap_before: int | None = None, cell_h: float = 1.5) -> Figure:
    """A figure of image cells of equal height; a column is as wide as its widest image.

    Each image keeps its aspect (centred in its column). ``gap_before`` adds a
    wider gap before that column (e.g. between the recoveries and the gallery).
    """
    ncol = max(len(r) for r in rows)
    col_w = [cell_h * max((c[j].image.shape[1] / c[j].image.shape[0] for c in rows if j < len(c)),
                          default=0.5) for j in range(ncol)]
    pad, gap = 0.12, 0.45
    has_title = any(c.title for r in rows for c in r)
    title_h = 0.28 if has_title else 0.05
    caption_h = 0.42 if any(c.caption for r in rows for c in r) else 0.05
    left = 1.3 if row_labels else 0.1
    top = 0.35 if col_labels else 0.05
    row_h = title_h + cell_h + caption_h
    xs, x = [], left
    for j, w in enumerate(col_w):
        if j and gap_before == j:
            x += gap
        xs.append(x)
        x += w + pad
    width, height = x - pad + 0.1, top + len(rows) * row_h + 0.05
    fig = Figure(figsize=(width, height))
    for i, row in enumerate(rows):
        y = height - top - i * row_h - title_h - cell_h  # bottom of the image band, inches
        for j, cell in enumerate(row):
            ax = fig.add_axes((xs[j] / width, y / height, col_w[j] / width, cell_h / height))
            _draw_image(ax, cell.image, cell.frame)
            if cell.title:
                ax.set_title(cell.title, fontsize=8, pad=3)
            if cell.caption:
                ax.text(0.5, -0.04, cell.caption, transform=ax.transAxes, ha="center", va="top",
                        fontsize=7, color=CHOSEN_COLOR if cell.highlight else "black",
                        fontweight="bold" if cell.highlight else "normal")
        if row_labels:
            fig.text(0.1 / width, (y + cell_h / 2) / height, str(row_labels[i]), ha="left",
                     va="center", fontsize=8, wrap=True)
    for j, label in enumerate(col_labels or []):
        fig.text((xs[j] + col_w[j] / 2) / width, 1 - 0.05 / height, str(label), ha="center",
                 va="top", fontsize=8)
    return fig


def _check_per_probe(name: str, value, n: int) -> None:
    if value is not None and len(value) != n:
        raise ValueError(f"{name}: expected one entry per probe ({n}), got {len(value)}")


# ---------------------------------------------------------------- figures

def cmc_chart(curves: dict[str, np.ndarray], path, *, title: str = "CMC", max_rank: int = 20,
              std: dict[str, np.ndarray] | None = None) -> Path:
    """One chart of CMC curves, one line per method.

    ``curves`` maps a method name to its CMC as fractions in [0, 1] (``cmc[k]``
    = matching rate at rank k+1, as ``components.metrics.evaluate`` returns);
    drawn in % for ranks 1..``max_rank`` (or fewer if a curve is shorter). ``std``
    (same keys, fractions) adds a shaded band of +-1 standard deviation.
    """
    if not curves:
        raise ValueError("curves: expected at least one method, got none")
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank = {max_rank!r}: expected an integer >= 1")
    arrays = {}
    for name, cmc in curves.items():
        a = np.asarray(cmc, dtype=float).ravel()
        if a.size == 0 or not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1 + 1e-9:
            raise ValueError(f"curves[{name!r}]: expected a non-empty CMC of fractions in [0, 1]")
        arrays[name] = a[:max_rank]
    for name in std or {}:
        if name not in arrays:
            raise ValueError(f"std[{name!r}]: no curve of that name in curves")
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for name, a in arrays.items():
        ranks = np.arange(1, a.size + 1)
        (line,) = ax.plot(ranks, 100 * a, marker="o", markersize=3,
                          label=f"{name} (rank-1 {100 * a[0]:.1f}%)")
        if std and name in std:
            s = np.asarray(std[name], dtype=float).ravel()[: a.size]
            if s.size != a.size:
                raise ValueError(f"std[{name!r}]: expected at least {a.size} values, got {s.size}")
            ax.fill_between(ranks, 100 * np.maximum(a - s, 0), 100 * np.minimum(a + s, 1),
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlim(0.5, max(a.size for a in arrays.values()) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.4)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def ranked_list(probes: list, recoveries: list[list], gallery: list[list], path, *,
                probe_labels: list[str] | None = None,
                scale_probs: list[Sequence[float]] | None = None,
                scales: Sequence[float] | None = None,
                chosen: list[float] | None = None,
                matches: list[Sequence[bool]] | None = None,
                gallery_labels: list[Sequence[str]] | None = None,
                top_k: int = 10) -> Path:
    """Fig. 5 of the PRI paper: a row per probe, its recoveries, its top-ranked gallery.

    - ``probes``: the LR probe images (one row each).
    - ``recoveries``: per probe, its recovered images at every scale of ``scales``.
    - ``gallery``: per probe, its top-ranked gallery images, best first (the first
      ``top_k`` are drawn).
    - ``probe_labels``: per probe, a caption (e.g. "id 12, x3").
    - ``scale_probs``: per probe, P's probability of each scale; printed as
      "x{r}: p=0.42" under each recovery.
    - ``scales``: the scale factor of each recovery (default 1, 2, ..., N).
    - ``chosen``: per probe, the chosen scale r_p, whose caption is bold red
      (default: the argmax of ``scale_probs``, if given).
    - ``matches``: per probe, per gallery image, whether it is a true match
      (framed green; the others red). No frames without it.
    - ``gallery_labels``: per probe, a caption per gallery image (e.g. "id 12, d=3.1").

    Images of different sizes are drawn at their natural aspect in cells of equal height.
    """
    n = len(probes)
    if n == 0:
        raise ValueError("probes: expected at least one probe, got none")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k = {top_k!r}: expected an integer >= 1")
    for name, value in (("recoveries", recoveries), ("gallery", gallery)):
        if value is None or len(value) != n:
            raise ValueError(f"{name}: expected one entry per probe ({n}), got "
                             f"{'None' if value is None else len(value)}")
    for name, value in (("probe_labels", probe_labels), ("scale_probs", scale_probs),
                        ("chosen", chosen), ("matches", matches), ("gallery_labels", gallery_labels)):
        _check_per_probe(name, value, n)
    num_scales = len(recoveries[0])
    if any(len(r) != num_scales for r in recoveries):
        raise ValueError("recoveries: every probe needs the same number of recoveries (one per scale)")
    scales = list(scales) if scales is not None else list(range(1, num_scales + 1))
    if len(scales) != num_scales:
        raise ValueError(f"scales: {len(scales)} scales for {num_scales} recoveries per probe")

    rows = []
    for i in range(n):
        row = [_Cell(_to_hwc(probes[i], f"probes[{i}]"), title="probe",
                     caption=str(probe_labels[i]) if probe_labels else "")]
        probs = None
        if scale_probs is not None:
            probs = [float(p) for p in scale_probs[i]]
            if len(probs) != num_scales:
                raise ValueError(f"scale_probs[{i}]: {len(probs)} probabilities for {num_scales} scales")
        r_p = chosen[i] if chosen is not None else (scales[int(np.argmax(probs))] if probs else None)
        if r_p is not None and r_p not in scales:
            raise ValueError(f"chosen[{i}] = {r_p!r}: not one of scales {scales}")
        for j, (r, image) in enumerate(zip(scales, recoveries[i])):
            caption = f"x{r:g}: p={probs[j]:.2f}" if probs else f"x{r:g}"
            row.append(_Cell(_to_hwc(image, f"recoveries[{i}][{j}]"), caption=caption,
                             highlight=(r == r_p)))
        shown = list(gallery[i])[:top_k]
        for name, value in (("matches", matches), ("gallery_labels", gallery_labels)):
            if value is not None and len(value[i]) < len(shown):
                raise ValueError(f"{name}[{i}]: {len(value[i])} entries for {len(shown)} gallery images")
        for k, image in enumerate(shown):
            frame = None if matches is None else (MATCH_COLOR if matches[i][k] else MISMATCH_COLOR)
            row.append(_Cell(_to_hwc(image, f"gallery[{i}][{k}]"), title=f"#{k + 1}", frame=frame,
                             caption=str(gallery_labels[i][k]) if gallery_labels else ""))
        rows.append(row)
    return _save(_grid_figure(rows, gap_before=1 + num_scales), path)


def _scale_groups(true_scales: np.ndarray, bins: int) -> tuple[list, np.ndarray]:
    """Group labels and each probe's group index: unique values if <= 8, else quantile bins."""
    unique = np.unique(true_scales)
    if unique.size <= 8:
        return [float(u) for u in unique], np.searchsorted(unique, true_scales)
    edges = np.unique(np.quantile(true_scales, np.linspace(0, 1, bins + 1)))
    index = np.clip(np.searchsorted(edges, true_scales, side="right") - 1, 0, edges.size - 2)
    labels = [f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(edges[:-1], edges[1:])]
    return labels, index


def scale_histogram_table(true_scales, predicted_scales, scales: Sequence[float] = (1, 2, 3, 4), *,
                          bins: int = 4) -> list[dict]:
    """Which scale was predicted, per true down-sampling factor, as rows.

    Probes are grouped by their true factor: by value if there are at most 8
    distinct values (``true_scale`` is that float), else into ``bins`` quantile
    bins (``true_scale`` is a label "lo-hi"; the last bin includes its upper end).
    One row per group and alternative scale: ``{"true_scale", "predicted_scale",
    "fraction", "count"}``; the fractions of a group sum to 1.
    """
    true_scales = np.asarray(true_scales, dtype=float).ravel()
    predicted_scales = np.asarray(predicted_scales, dtype=float).ravel()
    scales = [float(s) for s in scales]
    if len(scales) == 0:
        raise ValueError("scales: expected at least one scale factor")
    if true_scales.size == 0:
        raise ValueError("true_scales: expected at least one probe, got none")
    if true_scales.size != predicted_scales.size:
        raise ValueError(f"true_scales and predicted_scales differ in length "
                         f"({true_scales.size} != {predicted_scales.size})")
    if not np.all(np.isfinite(true_scales)):
        raise ValueError("true_scales: expected finite numbers")
    unknown = sorted(set(predicted_scales.tolist()) - set(scales))
    if unknown:
        raise ValueError(f"predicted_scales: {unknown} not among scales {scales}")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins = {bins!r}: expected an integer >= 1")
    labels, group = _scale_groups(true_scales, bins)
    rows = []
    for g, label in enumerate(labels):
        predicted = predicted_scales[group == g]
        for s in scales:
            count = int(np.sum(predicted == s))
            rows.append({"true_scale": label, "predicted_scale": s,
                         "fraction": count / predicted.size, "count": count})
    return rows


def scale_histogram(true_scales, predicted_scales, path, *, scales: Sequence[float] = (1, 2, 3, 4),
                    bins: int = 4, title: str = "Predicted scale per true down-sampling factor") -> Path:
    """A grouped bar chart of ``scale_histogram_table``: x = true factor, one bar per predicted scale."""
    rows = scale_histogram_table(true_scales, predicted_scales, scales, bins=bins)
    labels = list(dict.fromkeys(r["true_scale"] for r in rows))
    scales = [float(s) for s in scales]
    fraction = {(r["true_scale"], r["predicted_scale"]): r["fraction"] for r in rows}
    fig = Figure(figsize=(max(6.4, 1.2 * len(labels) + 2), 4.8))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / len(scales)
    for j, s in enumerate(scales):
        ax.bar(x + (j - (len(scales) - 1) / 2) * width, [fraction[(g, s)] for g in labels],
               width, label=f"predicted x{s:g}")
    ax.set_xticks(x, [f"x{g:g}" if isinstance(g, float) else g for g in labels])
    ax.set_xlabel("true down-sampling factor")
    ax.set_ylabel("fraction of probes")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.4)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def r_p_evolution(history: dict[str, list[tuple[int, float]]], path, *,
                  scales: Sequence[float] = (1, 2, 3, 4), title: str = "Predicted scale r_p") -> Path:
    """Fig. 3 of the PRI paper: r_p of a few training images across epochs.

    ``history`` maps an image id to its ``(epoch, r_p)`` points; one line with
    markers per image. A single epoch gives single points.
    """
    if not history:
        raise ValueError("history: expected at least one image, got none")
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    last_epoch = 0
    for image_id, points in history.items():
        if len(points) == 0:
            raise ValueError(f"history[{image_id!r}]: expected (epoch, r_p) points, got none")
        try:
            epochs, r_p = zip(*sorted((int(e), float(r)) for e, r in points))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"history[{image_id!r}]: expected (epoch, r_p) pairs ({exc})") from None
        ax.plot(epochs, r_p, marker="o", markersize=4, label=str(image_id))
        last_epoch = max(last_epoch, epochs[-1])
    ax.set_xlim(-0.5, last_epoch + 0.5)  # epochs are integers: no fractional axis for a single epoch
    ax.set_yticks(list(scales))
    ax.set_ylim(min(scales) - 0.5, max(scales) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("joint epoch")
    ax.set_ylabel("r_p")
    ax.set_title(title)
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(phases: dict[str, list[dict]], path, *, title: str = "Training curves") -> Path:
    """Loss L and validation rank-1 per epoch, the phases one after the other (pretrain, then joint).

    ``phases`` maps a phase name to its epochs' metrics (dicts with "L" and, where a
    validation set was scored, "val_rank1"); a dashed line marks where a phase starts.
    """
    if not any(phases.values()):
        raise ValueError("phases: expected at least one epoch, got none")
    fig = Figure(figsize=(7.2, 3.4))
    ax_loss, ax_val = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    start = 0
    for phase, epochs in phases.items():
        x = [start + i + 1 for i in range(len(epochs))]
        ax_loss.plot(x, [e.get("L", np.nan) for e in epochs], marker="o", markersize=3, label=phase)
        if any("val_rank1" in e for e in epochs):
            ax_val.plot(x, [e.get("val_rank1", np.nan) for e in epochs], marker="o", markersize=3, label=phase)
        if start:
            for ax in (ax_loss, ax_val):
                ax.axvline(start + 0.5, color="grey", linestyle="--", linewidth=0.8)
        start += len(epochs)
    for ax, label in ((ax_loss, "training loss L"), (ax_val, "validation rank-1 (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.4)
        if ax.get_lines():
            ax.legend(fontsize=8)
    ax_val.set_title("held-out training identities", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def image_grid(rows: list[list], path, *, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None) -> Path:
    """A plain grid of images (rows may differ in length), e.g. LR | recovered x1..x4 | HR.

    Images keep their aspect in cells of equal height; a column is as wide as its
    widest image. ``row_labels`` are written on the left, ``col_labels`` on top.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("rows: expected at least one row of images, got none")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"row_labels: {len(row_labels)} labels for {len(rows)} rows")
    ncol = max(len(r) for r in rows)
    if col_labels is not None and len(col_labels) > ncol:
        raise ValueError(f"col_labels: {len(col_labels)} labels for {ncol} columns")
    cells = [[_Cell(_to_hwc(image, f"rows[{i}][{j}]")) for j, image in enumerate(row)]
             for i, row in enumerate(rows)]
    return _save(_grid_figure(cells, row_labels=row_labels, col_labels=col_labels), path)


def search_scatter(trials: list[dict], keys: Sequence[str], path, *, metric: str = "val_rank1",
                   log_keys: Sequence[str] = (), best: int | None = None, title: str = "search") -> Path:
    """``metric`` of every trial against each key of ``keys`` (one panel each); ``trials``
    are dicts with ``config`` (key -> value) and ``metric``; trials without it are left out.
    ``log_keys`` get a log x axis; trial ``best`` (an index) is drawn as a star."""
    if not keys:
        raise ValueError("search_scatter: no searched parameter to plot")
    cols = min(len(keys), 4)
    rows = (len(keys) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows))
    scored = [(i, t) for i, t in enumerate(trials) if t.get(metric) is not None]
    for n, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, n + 1)
        values = [t["config"].get(key) for _, t in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values})
        xs = [float(v) if numeric else labels.index(str(v)) for v in values]
        ys = [float(t[metric]) for _, t in scored]
        ax.scatter(xs, ys, s=24, color="tab:blue", alpha=0.8)
        for (i, _), x, y in zip(scored, xs, ys):
            if i == best:
                ax.scatter([x], [y], s=140, marker="*", color="tab:red", zorder=3, label="best")
        if not numeric:
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels)
        elif key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: {len(scored)} trials with {metric}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def predictor_confusion(confusion, true_scales: Sequence[float], scales: Sequence[float], path, *,
                        title: str = "Predicted scale r_p per true down-sampling factor",
                        row_name: str = "true down-sampling factor", row_format: str = "x{:g}") -> Path:
    """A heatmap of ``confusion`` [T, N] (probes per true factor and predicted scale, as
    ``components.diagnostics.predictor_diagnostics`` returns): colour = the fraction of
    its row, each cell annotated with its count and that fraction. Rows are labelled by
    ``true_scales`` (T) through ``row_format`` and titled ``row_name`` (another probe
    attribute, e.g. its noise level, may take the factor's place), columns by ``scales``
    (N). A row without probes stays blank."""
    counts = np.asarray(confusion, dtype=float)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"confusion has shape {counts.shape}: expected [true factors, scales]")
    if not np.all(np.isfinite(counts)) or counts.min() < 0 or np.any(counts != np.round(counts)):
        raise ValueError("confusion: expected counts (non-negative integers)")
    if counts.sum() == 0:
        raise ValueError("confusion: no probe counted")
    for name, labels, n, axis in (("true_scales", true_scales, counts.shape[0], "rows"),
                                  ("scales", scales, counts.shape[1], "columns")):
        if len(labels) != n:
            raise ValueError(f"{name}: {len(labels)} labels for the {n} {axis} of confusion")
    totals = counts.sum(1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    rows, cols = counts.shape
    fig = Figure(figsize=(1.2 * cols + 2.6, 0.9 * rows + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{int(counts[i, j])}\n{100 * fractions[i, j]:.0f}%", ha="center", va="center",
                    fontsize=9, color="white" if fractions[i, j] > 0.6 else "black")
    ax.set_xticks(range(cols), [f"x{float(s):g}" for s in scales])
    ax.set_yticks(range(rows), [f"{row_format.format(float(t))} ({int(n)})"
                                for t, n in zip(true_scales, totals[:, 0])])
    ax.set_xlabel("predicted r_p")
    ax.set_ylabel(f"{row_name} (probes)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="fraction of the row")
    fig.tight_layout()
    return _save(fig, path)


def forest_plot(rows: Sequence[tuple], path, *, title: str = "Paired differences (95% CI)",
                xlabel: str = "difference") -> Path:
    """A forest plot of paired differences, one line per ``(label, mean, low, high, p_value)``
    (top to bottom in the given order): the mean as a dot, the interval [low, high] as a bar,
    a dashed vertical line at 0, the label on the left and "mean [low, high]" (and the
    p-value, unless None or NaN) on the right. Intervals that exclude 0 are drawn in
    ``SIGNIFICANT_COLOR``, the others grey."""
    parsed = [_forest_row(i, row) for i, row in enumerate(rows or [])]
    if not parsed:
        raise ValueError("rows: expected at least one (label, mean, low, high, p_value), got none")
    n = len(parsed)
    fig = Figure(figsize=(8.0, 0.42 * n + 1.4))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]  # first row on top
    for yi, (_, mean, low, high, _) in zip(y, parsed):
        color = SIGNIFICANT_COLOR if low > 0 or high < 0 else NOT_SIGNIFICANT_COLOR
        ax.plot([low, high], [yi, yi], color=color, linewidth=2, solid_capstyle="butt")
        ax.plot([mean], [yi], "o", color=color, markersize=6)
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    lo, hi = min(0.0, *(p[2] for p in parsed)), max(0.0, *(p[3] for p in parsed))
    pad = 0.05 * (hi - lo) or 1.0
    ax.set_xlim(lo - pad, hi + pad)  # 0 always in view
    ax.set_yticks(y, [p[0] for p in parsed], fontsize=8)
    ax.set_ylim(-0.6, n - 0.4)
    right = ax.twinx()  # the numbers as the right axis' tick labels: kept inside the figure by tight_layout
    right.set_ylim(ax.get_ylim())
    right.set_yticks(y, [_forest_text(*p[1:]) for p in parsed], fontsize=8, family="monospace")
    for tick, (_, _, low, high, _) in zip(right.get_yticklabels(), parsed):
        tick.set_color(SIGNIFICANT_COLOR if low > 0 or high < 0 else "black")
    right.tick_params(length=0)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.4)
    fig.tight_layout()
    return _save(fig, path)


def _forest_row(i: int, row) -> tuple[str, float, float, float, float | None]:
    """(label, mean, low, high, p_value) of rows[i], checked."""
    try:
        label, mean, low, high, p_value = row
        mean, low, high = float(mean), float(low), float(high)
        p_value = None if p_value is None or np.isnan(float(p_value)) else float(p_value)
    except (TypeError, ValueError):
        raise ValueError(f"rows[{i}] = {row!r}: expected (label, mean, low, high, p_value) numbers") from None
    if not all(np.isfinite([mean, low, high])) or low > high:
        raise ValueError(f"rows[{i}] ({label!r}): mean {mean}, interval [{low}, {high}]: expected finite "
                         "numbers with low <= high")
    if p_value is not None and not 0 <= p_value <= 1:
        raise ValueError(f"rows[{i}] ({label!r}): p_value = {p_value}: expected a probability in [0, 1]")
    return str(label), mean, low, high, p_value


def _forest_text(mean: float, low: float, high: float, p_value: float | None) -> str:
    text = f"{mean:+5.1f} [{low:+5.1f}, {high:+5.1f}]"
    return text if p_value is None else f"{text}  p={p_value:.2g}"
