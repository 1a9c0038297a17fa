"""What every stage shares: logging set-up, params loading, the error exit, paths.

Paths are the ones dvc.yaml names; a stage's command-line options default to them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from components.config import Params, ParamsError, load_params

RAW = "data/raw"  # the source dataset in its standard layout, tracked by data.dvc
CANONICAL = "data/canonical.parquet"
DEGRADED = "data/degraded.parquet"
SPLIT_DIR = "data/split"
REPORTS = "reports"

log = logging.getLogger("lrreid")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def add_params_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_report_arg(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--report", default=None,
                        help=f"the stage's JSON report (default: {REPORTS}/{name}; with another --out, next to "
                        "that table: --out x.parquet writes x.json, so a trial run leaves the pipeline's reports alone)")


def report_path(args: argparse.Namespace, default_out: str, name: str) -> Path:
    """--report, else reports/<name> for the pipeline's own --out, else next to the user's --out table."""
    if args.report:
        return Path(args.report)
    out = Path(args.out)
    return Path(REPORTS) / name if out.resolve() == Path(default_out).resolve() else out.with_suffix(".json")


def params_from(args: argparse.Namespace) -> Params:
    """Load and validate params before the stage does any work (with --variant's overrides, if any)."""
    return load_params(args.params).for_variant(getattr(args, "variant", None))


def add_variant_arg(parser: argparse.ArgumentParser) -> None:
    from components.config import VARIANTS

    parser.add_argument("--variant", choices=list(VARIANTS), default=None,
                        help="train an ablation variant (ablation.variants: " + ", ".join(
                            f"{k} = {v}" for k, v in VARIANTS.items()) + ") instead of the main model; its "
                        "files go to models/ablation/<variant>/ and reports/ablation/<variant>/")


def variant_path(path: str | Path, variant: str | None) -> Path:
    """Where a variant keeps a stage's file: models/model.pt -> models/ablation/<variant>/model.pt."""
    path = Path(path)
    return path if variant is None else path.parent / "ablation" / variant / path.name


@contextmanager
def timed(what: str):
    start = time.perf_counter()
    yield
    log.info("%s took %.1f s", what, time.perf_counter() - start)


class StageError(RuntimeError):
    """A stage cannot go on; the message says what to change."""


def dvc_repro_hint() -> str:
    """Under DVC (it sets DVC_STAGE, e.g. `train_variant@rife_pri`, for a stage's command) the stage's
    previous outputs were removed before it ran: a failing stage says how to get them back."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    return (f"; dvc removed the stage's previous outputs before running it: `dvc checkout {stage}` restores "
            "the cached ones, `git checkout -- <file>` its reports kept in git")


# errors a user can fix: printed as one line, exit code 2, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ParamsError, StageError, FileNotFoundError, ValueError)
