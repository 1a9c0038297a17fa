"""Pretrain FFSR on a local folder of generic images with MSE (FFSR paper Sec. 5.2, step 1's first half).

    lrreid pretrain-ffsr --images /data/imagenet/train --out models/ffsr_generic.pt
    lrreid pretrain-ffsr --images DIR --out FILE --steps 20000 --batch-size 32 --patch 96x48

Random patches of the images, down-sampled by a factor of degrade.scales, super-
resolved back by FFSR (model.ffsr.channels) and fitted with plain MSE. Then set
model.ffsr.weights to the file: step 1 of `lrreid pretrain` (FFSR + RIFE) fine-tunes
it with L^FFSR. Not a DVC stage (its input is a folder outside the project);
nothing is downloaded.

Inputs:  --images: a local folder of .jpg / .png / .bmp images (searched recursively)
Outputs: --out: FFSR's weights ({"format", "state_dict", "meta"}, written atomically)
Params:  model.ffsr.channels, degrade.scales (the factors drawn), train.seed,
         train.cpus_per_worker (its torch threads; auto: this machine's CPUs)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipelines.common import add_params_arg, params_from

log = logging.getLogger(__name__)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give HEIGHTxWIDTH, e.g. 96x48") from None
    if h < 4 or w < 4:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be >= 4 pixels")
    return h, w


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--images", required=True, help="a local folder of generic images (e.g. ImageNet)")
    parser.add_argument("--out", required=True, help="where to write FFSR's weights")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps (default: 2000)")
    parser.add_argument("--batch-size", type=int, default=16, help="patches per step (default: 16)")
    parser.add_argument("--patch", type=_size, default=(96, 48), help="HR patch HEIGHTxWIDTH (default: 96x48)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")


def run(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from components.ffsr_pretraining import image_files, pretrain_ffsr
    from components.models.ffsr import FFSR
    from components.training import save_weights_dict

    params = params_from(args)
    files = image_files(args.images)  # a clear error before any work
    ffsr = FFSR(channels=params.model.ffsr.channels)
    bar = tqdm(total=args.steps, desc="pretrain FFSR (MSE)", unit="step", disable=args.no_progress or None)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(mse=f"{loss:.5f}")

    torch.set_num_threads(params.train.local_cpus())
    log.info("pretrain-ffsr: precision fp32 (MSE pretraining runs without autocast); %d torch thread(s)",
             torch.get_num_threads())
    torch.manual_seed(params.train.seed)
    result = pretrain_ffsr(ffsr, files, steps=args.steps, batch_size=args.batch_size, patch=args.patch,
                           scales=list(params.degrade.scales), lr=args.lr, seed=params.train.seed, progress=progress)
    bar.close()
    meta = {"model": "ffsr", "channels": params.model.ffsr.channels, "images": str(args.images),
            "num_images": len(files), "steps": args.steps, "patch": list(args.patch),
            "scales": list(params.degrade.scales), **result}
    save_weights_dict(ffsr.state_dict(), Path(args.out), meta)
    log.info("wrote %s: held-out MSE %.5f -> %.5f over %d images; set model.ffsr.weights: %s", args.out,
             result["mse_before"], result["mse_after"], len(files), args.out)
