"""`lrreid`: the command line. One subcommand per pipeline stage.

`lrreid --help` lists the stages; `lrreid <stage> --help` explains its inputs,
outputs and params (each stage module's docstring).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from components.fsutil import Terminated
from pipelines.common import USER_ERRORS, dvc_repro_hint, setup_logging

# command -> module in pipelines/ (stages in the pipeline's order, then tools)
STAGES = {
    "synthesize": "pipelines.synthesize",
    "ingest": "pipelines.ingest",
    "degrade": "pipelines.degrade",
    "split": "pipelines.split",
    "pretrain": "pipelines.pretrain",
    "train": "pipelines.train",
    "evaluate": "pipelines.evaluate",
    "register": "pipelines.register",
    "tune": "pipelines.tune",
    "pretrain-ffsr": "pipelines.pretrain_ffsr",
    "preset": "pipelines.preset",
    "query": "pipelines.query",
    "compare": "pipelines.compare",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrreid",
        description="Low-resolution person re-identification (PRI, FFSR+RIFE) pipeline stages. "
        "`dvc repro` runs them in order; each can also be run by hand.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, module_name in STAGES.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        args._run(args)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"lrreid {args.stage}: error: {exc}{dvc_repro_hint()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lrreid {args.stage}: interrupted; no partial output was kept{dvc_repro_hint()}", file=sys.stderr)
        return 130
    except Terminated:  # SIGTERM during an atomic write: raised once it was cleaned up
        print(f"lrreid {args.stage}: terminated (SIGTERM); no partial output was kept{dvc_repro_hint()}",
              file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
