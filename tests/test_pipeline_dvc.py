"""The real pipeline: `lrreid` stages under real DVC in a temporary git repo.

Checks what a user relies on: `dvc repro` runs every stage, a second one runs
nothing, an experiment that changes `degrade.scales` re-runs only degrade and
split, bad params fail before any work, and a fresh regeneration of the default
dataset has exactly the md5 that the committed data.dvc records.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["components", "pipelines", "dvc.yaml", "params.yaml", ".dvcignore", "models/ablation/README.md"]

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", PYTHONPATH=str(REPO))
    return env


def sh(cmd: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _init_repo(path: Path, params_update: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, path / name)
    params = yaml.safe_load((path / "params.yaml").read_text())
    for dotted, value in (params_update or {}).items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], path)
    sh(["dvc", "init", "-q"], path)
    sh(["dvc", "config", "core.analytics", "false"], path)
    return path


TINY = {
    "data.synthetic.identities": 24,
    "data.synthetic.train_identities": 16,
    "data.synthetic.images_per_camera": 2,
    "data.synthetic.height": 64,
    "data.synthetic.width": 32,
    "degrade.hr_height": 64,
    "degrade.hr_width": 32,
    "split.repeats": 3,
    "split.val_identities": 4,  # 16 training identities: 12 left for a batch of 8
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    path = _init_repo(tmp_path_factory.mktemp("dvcproject"), TINY)
    sh(["lrreid", "synthesize", "--no-progress"], path)
    sh(["dvc", "add", "-q", "data/raw"], path)
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-qm", "tiny synthetic project"], path)
    return path


def _ran(output: str) -> set[str]:
    return {s for s in ("ingest", "degrade", "split") if f"Running stage '{s}'" in output}


def test_repro_runs_every_stage_then_nothing(project):
    out = sh(["dvc", "repro", "split"], project).stdout  # the data stages (training has its own tests)
    assert _ran(out) == {"ingest", "degrade", "split"}
    for path in ["data/canonical.parquet", "data/degraded.parquet", "data/split/split.parquet",
                 "data/split/pairs.parquet"]:
        assert (project / path).is_file(), path
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], project).stdout)
    flat = json.dumps(metrics)
    assert '"images": 96' in flat  # 24 ids x 2 cameras x 2 images
    assert '"test_identities": 8' in flat  # standard synthetic split: identities - train_identities
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "repro"], project)
    again = sh(["dvc", "repro", "split"], project).stdout
    assert _ran(again) == set(), again
    assert "split" not in sh(["dvc", "status", "split"], project).stdout


def test_exp_changing_degrade_scales_reruns_only_dependents(project):
    if not (project / "dvc.lock").exists():
        test_repro_runs_every_stage_then_nothing(project)
    out = sh(["dvc", "exp", "run", "-S", "degrade.scales=[2,3]", "split"], project)
    assert _ran(out.stdout) == {"degrade", "split"}, out.stdout
    report = json.loads((project / "reports" / "degrade.json").read_text())
    assert set(report["lr_images_per_scale"]) == {"x2", "x3"}
    # one of the paper's ten re-splits: only the split stage runs
    out = sh(["dvc", "exp", "run", "-S", "split.seed=1", "split"], project)
    assert _ran(out.stdout) == {"split"}, out.stdout
    assert json.loads((project / "reports" / "split.json").read_text())["seed"] == 1


def test_bad_params_stop_before_any_work(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["gamma"] = 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(params))
    out = tmp_path / "never.parquet"
    proc = sh(["lrreid", "degrade", "--params", str(bad), "--out", str(out)], project, ok=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.gamma = 2 is not allowed" in last and "odd integer" in last
    assert not out.exists()


def test_error_midway_leaves_no_output(project, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(project / "data" / "raw", raw)
    victim = sorted((raw / "bounding_box_train").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated image
    out = tmp_path / "canonical.parquet"
    proc = sh(["lrreid", "ingest", "--input", str(raw), "--out", str(out)], project, ok=False)
    assert proc.returncode == 2
    assert victim.name in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".canonical*"))


def test_help_lists_every_stage():
    out = sh(["lrreid", "--help"], REPO).stdout
    for stage in ("synthesize", "ingest", "degrade", "split", "pretrain", "train", "evaluate", "register", "query",
                  "preset", "tune"):
        assert stage in out
    degrade_help = sh(["lrreid", "degrade", "--help"], REPO).stdout
    assert "Inputs:" in degrade_help and "degrade.scales" in degrade_help


def test_default_dataset_matches_committed_data_dvc(tmp_path):
    """Regenerating data/raw from params.yaml gives exactly the md5 data.dvc records."""
    committed = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    path = _init_repo(tmp_path / "fresh")
    shutil.copy(REPO / "data.dvc", path / "data.dvc")  # as in a fresh clone: recorded, not in the cache
    log = sh(["lrreid", "synthesize", "--no-progress"], path).stderr
    assert "data/raw matches the md5 recorded in data.dvc" in log and "differs" not in log
    (path / "data.dvc").unlink()
    sh(["dvc", "add", "-q", "--no-commit", "data/raw"], path)
    fresh = yaml.safe_load((path / "data" / "raw.dvc").read_text())["outs"][0]
    assert (fresh["md5"], fresh["size"], fresh["nfiles"]) == (
        committed["md5"], committed["size"], committed["nfiles"])


def test_synthesize_regenerates_for_another_generator_version(tmp_path):
    """The manifest records the generator's version: data/raw made by an older generator is remade."""
    from components.data.synthetic import GENERATOR_VERSION

    path = _init_repo(tmp_path / "gen", TINY)
    sh(["lrreid", "synthesize", "--no-progress"], path)
    manifest = path / "data" / "raw" / "SYNTHETIC.json"
    assert json.loads(manifest.read_text())["generator"] == GENERATOR_VERSION
    assert "nothing to do" in sh(["lrreid", "synthesize", "--no-progress"], path).stderr
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "generator": GENERATOR_VERSION - 1}))
    log = sh(["lrreid", "synthesize", "--no-progress"], path).stderr
    assert "another generator version" in log and "wrote data/raw" in log
    assert json.loads(manifest.read_text())["generator"] == GENERATOR_VERSION


def _edges(path: Path) -> set[tuple[str, str]]:
    dot = sh(["dvc", "dag", "--dot"], path).stdout
    return {tuple(part.strip().strip(';"') for part in line.split("->")) for line in dot.splitlines() if "->" in line}


def test_ablation_variants_are_stages_that_feed_evaluate(tmp_path):
    """ablation.variants expands into pretrain_variant@V -> train_variant@V -> evaluate; [] leaves none."""
    path = _init_repo(tmp_path / "variants")
    edges = _edges(path)
    for v in ("bicubic", "ffsr_rife", "rife_pri"):
        assert ("split", f"pretrain_variant@{v}") in edges
        assert (f"pretrain_variant@{v}", f"train_variant@{v}") in edges
        assert (f"train_variant@{v}", "evaluate") in edges
    assert ("evaluate", "register") in edges
    names = sh(["dvc", "stage", "list", "--name-only"], path).stdout.split()
    assert "train_variant@ffsr_rife" in names and "train_variant@rife_pri" in names
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["ablation"]["variants"] = []
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    edges = _edges(path)
    assert not any("variant" in a or "variant" in b for a, b in edges)
    assert ("train", "evaluate") in edges
    status = sh(["dvc", "status", "evaluate"], path).stdout  # models/ablation/ is in git: never a missing dependency
    assert "evaluate" in status and "deleted:            models/ablation\n" not in status + "\n"
