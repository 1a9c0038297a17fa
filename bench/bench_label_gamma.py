"""Benchmark: how sharp would PRI's soft labels (Eq. 3) be at another gamma, on a trained model's bank?

A joint checkpoint's label bank holds, per LR training image, l_i = softmax_i(g(mean_j d_j - d_i))
at the run's gamma. At gamma 1 the terms mean_j d_j - d_i are recovered exactly from the labels
(the row's log-labels, centred), so the labels at any other gamma follow without re-running F.
For each gamma it prints the labels' mean entropy
(the L_p of a P that reproduces every label), their marginal cross-entropy (the L_p of a P that
learned the frequencies only), their mean largest probability and the argmax histogram. Training
images only: nothing here looks at validation or test identities.

    PYTHONPATH=. .venv/bin/python bench/bench_label_gamma.py ray_results/joint-<id>/checkpoint_<t>/state.pt
"""

from __future__ import annotations

import argparse

import torch

from components.soft_label import LabelBank, regulate

GAMMAS = (1 / 5, 1 / 3, 1.0, 3.0)


def centred_terms(labels: torch.Tensor) -> torch.Tensor:
    """mean_j d_j - d_i per row, from labels of Eq. 3 at gamma 1: log l_i = (mean d - d_i) - logsumexp,
    and the (mean d - d_i) of a row sum to 0, so centring the log-labels leaves exactly them."""
    logits = labels.clamp_min(1e-12).log()
    return logits - logits.mean(1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a joint checkpoint's state.pt (its 'bank')")
    args = ap.parse_args()
    state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")["bank"]
    if state["kind"] != "soft" or state["gamma"] != 1.0:
        raise SystemExit(f"{args.checkpoint}: a bank of {state['kind']} labels at gamma {state['gamma']}; this "
                         "inversion needs soft labels at gamma 1 (their centred log-labels are mean d - d_i)")
    delta = centred_terms(state["labels"].double())
    print(f"{args.checkpoint}: {len(delta)} LR items; |mean d - d_i|: median {delta.abs().median():.3f}, "
          f"90th percentile {delta.abs().quantile(0.9):.3f}")
    print("gamma   entropy  marginal CE  mean max p  argmax histogram x1..xN")
    for gamma in GAMMAS:
        bank = LabelBank(*delta.shape, omega=1, gamma=gamma)
        bank.labels = torch.softmax(regulate(delta, gamma), 1).float()
        hist = torch.bincount(bank.labels.argmax(1), minlength=delta.shape[1]).tolist()
        print(f"{gamma:5.3f}  {bank.entropy():7.4f}  {bank.marginal_cross_entropy():11.4f}  "
              f"{bank.labels.max(1).values.mean():10.3f}  {hist}")


if __name__ == "__main__":
    main()
