"""Materialise data/raw, the source dataset that data.dvc tracks.

With data.layout = synthetic, generate the procedural pedestrian dataset
(params data.synthetic.*) into data/raw in Market-1501 layout. The bytes
depend only on those params, so a fresh clone regenerates exactly the directory
whose md5 data.dvc records, and needs no DVC remote. A manifest
(SYNTHETIC.json) inside the folder records the params and the generator's
version; when both match, nothing is regenerated. With a real layout, only
check that data/raw is there.

Inputs:  params data.layout, data.synthetic.*
Outputs: data/raw/ (then `dvc add data/raw` records a new version in data.dvc)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from components.data import synthetic
from components.fsutil import atomic_path
from pipelines.common import RAW, StageError, add_params_arg, log, params_from, timed

MANIFEST = "SYNTHETIC.json"


def configure(parser: argparse.ArgumentParser) -> None:
    add_params_arg(parser)
    parser.add_argument("--force", action="store_true", help="regenerate even if the manifest matches")


def _md5s(raw: Path) -> tuple[str, str] | None:
    """(md5 that data.dvc records, md5 of ``raw`` as DVC hashes a folder); None without a DVC repo
    or data.dvc. Hashes the folder itself: `dvc status` cannot tell a changed folder from one
    that is only missing from the cache (every fresh clone)."""
    try:
        import yaml
        from dvc.repo import Repo
        from dvc_data.hashfile.build import build

        recorded = yaml.safe_load(Path("data.dvc").read_text())["outs"][0]["md5"]
        with Repo(".") as repo:
            _, _, obj = build(repo.cache.local, str(raw), repo.fs, "md5", dry_run=True, ignore=repo.dvcignore)
        return recorded, obj.hash_info.value
    except Exception as exc:  # not a DVC repo, or no data.dvc yet
        log.debug("md5 of %s against data.dvc: %s", raw, exc)
        return None


def run(args: argparse.Namespace) -> None:
    params = params_from(args)
    raw = Path(RAW)
    if params.data.layout != "synthetic":
        if not raw.is_dir():
            raise StageError(
                f"{raw}: missing; data.layout = {params.data.layout} reads a real dataset from there: "
                f"place it in its standard layout (README, 'Bring a real dataset') or `dvc pull`"
            )
        log.info("data.layout = %s: using %s as it is", params.data.layout, raw)
        return
    want = {**params.data.synthetic.model_dump(), "generator": synthetic.GENERATOR_VERSION}
    manifest = raw / MANIFEST
    if raw.exists() and not args.force:
        try:
            have = json.loads(manifest.read_text())
        except (OSError, ValueError):
            have = None
        if have == want:
            log.info("%s already holds the synthetic dataset of these params; nothing to do", raw)
            _report_dvc(raw)
            return
        log.info("%s was made with other params or another generator version (or is not synthetic): "
                 "regenerating", raw)
    with timed("synthesis"), atomic_path(raw) as tmp:
        counts = synthetic.generate(tmp, params.data.synthetic, progress=not args.no_progress)
        (tmp / MANIFEST).write_text(json.dumps(want, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s: %s", raw, counts)
    _report_dvc(raw)


def _report_dvc(raw: Path) -> None:
    md5s = _md5s(raw)
    if md5s is None:
        return
    if md5s[0] == md5s[1]:
        log.info("%s matches the md5 recorded in data.dvc", raw)
    else:
        log.warning("%s (md5 %s) differs from the version data.dvc records (%s; other data.synthetic params?): "
                    "record it with `dvc add %s` and commit data.dvc", raw, md5s[1], md5s[0], raw)
