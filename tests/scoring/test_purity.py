"""scoring/ stays pure: only stdlib, numpy, scikit-learn and pydantic; no I/O, clock, env or eval.

The import walk follows scoring.* imports transitively from every module's source (ast, nothing is
imported), so a pure-looking module cannot smuggle in the shell through a helper.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.scoring.conftest import REPO_ROOT

SCORING = REPO_ROOT / "scoring"
FORBIDDEN = frozenset({"fastapi", "sqlalchemy", "sqlmodel", "httpx", "prometheus_client", "yaml", "service", "models"})
ALLOWED_THIRD_PARTY = frozenset({"numpy", "sklearn", "pydantic", "pydantic_core"})
# Stdlib modules that mean I/O, clocks, processes, randomness or code loading.
FORBIDDEN_STDLIB = frozenset(
    {
        "os",
        "sys",
        "io",
        "socket",
        "subprocess",
        "pickle",
        "marshal",
        "shelve",
        "random",
        "time",
        "urllib",
        "http",
        "sqlite3",
        "pathlib",
        "shutil",
        "tempfile",
        "importlib",
        "threading",
        "multiprocessing",
        "asyncio",
    }
)
FORBIDDEN_CALLS = frozenset({"eval", "exec", "compile", "open", "__import__", "input", "breakpoint"})
FORBIDDEN_ATTRIBUTES = frozenset(
    {"now", "utcnow", "today", "getenv", "environ", "perf_counter", "monotonic", "time_ns"}
)


def module_file(package_dir: Path, dotted: str) -> Path | None:
    """File of a module ``<package>.<rest>`` inside ``package_dir``, or None if not one of ours."""
    parts = dotted.split(".")
    if parts[0] != package_dir.name:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, package_dir: Path) -> set[str]:
    """Dotted names imported by ``path`` (relative imports resolved inside the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    relative = path.relative_to(package_dir.parent).with_suffix("").parts
    here = list(relative[:-1]) if relative[-1] != "__init__" else list(relative[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from scoring import features` imports the submodule scoring.features.
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def reachable_imports(package_dir: Path, roots: list[Path] | None = None) -> dict[str, set[str]]:
    """Top-level module names reachable from ``roots`` (default: every module of the package),
    following the package's own imports transitively -> the files that import them."""
    queue = list(roots) if roots is not None else sorted(package_dir.rglob("*.py"))
    seen: set[Path] = set()
    reached: dict[str, set[str]] = {}
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path, package_dir):
            target = module_file(package_dir, name)
            if target is not None:
                queue.append(target)
            elif name.split(".")[0] != package_dir.name:
                reached.setdefault(name.split(".")[0], set()).add(path.name)
    return reached


def violations(package_dir: Path, roots: list[Path] | None = None) -> list[str]:
    problems = []
    for top, importers in sorted(reachable_imports(package_dir, roots).items()):
        where = ", ".join(sorted(importers))
        if top in FORBIDDEN:
            problems.append(f"{top} (imported by {where}) is forbidden in the pure core")
        elif top in FORBIDDEN_STDLIB:
            problems.append(f"{top} (imported by {where}) means I/O, clock or code loading")
        elif top not in sys.stdlib_module_names and top not in ALLOWED_THIRD_PARTY:
            problems.append(f"{top} (imported by {where}) is not stdlib/numpy/sklearn/pydantic")
    return problems


def test_scoring_imports_only_pure_dependencies() -> None:
    assert violations(SCORING) == []


def test_scoring_has_modules_to_check() -> None:
    names = {p.name for p in SCORING.glob("*.py")}
    assert {"pipeline.py", "spec.py", "rules.py", "scorecard.py", "training.py"} <= names


@pytest.mark.parametrize("path", sorted(SCORING.rglob("*.py")), ids=lambda p: p.name)
def test_no_io_clock_env_or_eval_calls(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            bad.append(f"line {node.lineno}: {node.func.id}()")
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            bad.append(f"line {node.lineno}: .{node.attr}")
    assert bad == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import yaml\n", "yaml"),
        ("from fastapi import FastAPI\n", "fastapi"),
        ("import models.lead\n", "models"),
        ("from .sub.helper import x\n", "sqlalchemy"),  # transitively, through a scoring.* module
        ("from scoring.sub import helper\n", "sqlalchemy"),
        ("import os\n", "os"),
        ("import pandas\n", "pandas"),
    ],
)
def test_walker_catches_forbidden_imports(tmp_path: Path, source: str, expected: str) -> None:
    package = tmp_path / "scoring"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "helper.py").write_text("import sqlalchemy\nx = 1\n")
    core = package / "core.py"
    core.write_text(source)
    # Walk from core.py only: sqlalchemy is reachable solely through the scoring.sub.helper import.
    found = violations(package, roots=[core])
    assert any(v.startswith(expected) for v in found), found
    if expected != "sqlalchemy":
        assert not any(v.startswith("sqlalchemy") for v in found)
