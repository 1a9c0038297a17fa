"""Every dvc.yaml stage lists, in its deps, every module of this repo that its command runs.

A stage's command is `lrreid <command> ...`: the console script pipelines/cli.py, which
runs the command's module (pipelines.cli.STAGES). Their imports are followed with `ast`,
transitively, function-local ones included, within the repo's packages `components` and
`pipelines`. Not followed: cli.py's importlib of the other commands' modules (it only
builds their --help), and package __init__.py files that hold nothing but a docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from pipelines.cli import STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "pipelines")


def module_file(name: str) -> Path | None:
    """components.data.table -> components/data/table.py (or a package's __init__.py); None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return bool(body)


def imported_modules(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` names (anywhere in the file), with its parent packages."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipelines import tracking`
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def closure(roots: list[str]) -> set[str]:
    """Repo-relative paths of the repo's modules that ``roots`` import, transitively (roots included)."""
    todo, seen = [module_file(r) for r in roots], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [p for p in map(module_file, imported_modules(path)) if p is not None and p not in seen]
    return {p.relative_to(REPO).as_posix() for p in seen if p.name != "__init__.py" or has_code(p)}


def stages() -> dict[str, dict]:
    """name -> stage, foreach stages by their own name (their code deps do not depend on the item)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    return {name: stage.get("do", stage) for name, stage in dvc["stages"].items()}


def test_every_stage_runs_a_known_command():
    for name, stage in stages().items():
        words = stage["cmd"].split()
        assert words[0] == "lrreid" and words[1] in STAGES, f"stage {name}: cmd {stage['cmd']!r} is not `lrreid <command>`"


def test_stage_deps_cover_the_code_they_run():
    uncovered = []
    for name, stage in stages().items():
        command = stage["cmd"].split()[1]
        deps = [str(d).rstrip("/") for d in stage.get("deps", [])]
        for module in sorted(closure(["pipelines.cli", STAGES[command]])):
            if not any(module == d or module.startswith(d + "/") for d in deps):
                uncovered.append(f"stage {name} (lrreid {command}) runs {module}, which its deps do not cover")
    assert not uncovered, "dvc.yaml: add these to the stages' deps:\n" + "\n".join(uncovered)


def test_the_walk_follows_function_local_imports():
    # pipelines/train.py imports ray_train inside run(), which imports components.soft_label the same way
    assert {"pipelines/ray_train.py", "components/soft_label.py", "components/training/pri.py"} <= closure(["pipelines.train"])
    assert "pipelines/tracking.py" in closure(["pipelines.evaluate"])  # `from pipelines import tracking`
    assert "pipelines/cli.py" in closure(["pipelines.cli"]) and "components/config.py" in closure(["pipelines.cli"])
