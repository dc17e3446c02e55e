"""The package's import graph, read with `ast`: which of its files a script or module may run.

Imports inside functions count (a module imported where it is used still runs), and so does a
module named by file name (MLflow's models from code: `pyfunc_entry.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import PROJECT

PACKAGE = "gpt2_classifier"
SRC = PROJECT / "src"
ROOT = SRC / PACKAGE


def _module_file(dotted: list[str]) -> Path | None:
    path = SRC.joinpath(*dotted)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").is_file() else None


def _with_parents(dotted: list[str]) -> set[Path]:
    """A module and the package __init__ files that importing it runs."""
    found = set()
    for k in range(1, len(dotted) + 1):
        file = _module_file(dotted[:k])
        if file is not None:
            found.add(file)
    return found


def imports(path: Path) -> set[Path]:
    """The package's files that importing or running `path` executes directly (not transitively)."""
    tree = ast.parse(path.read_text(), str(path))
    here = list(path.relative_to(SRC).parent.parts) if ROOT in path.parents else None
    found: set[Path] = set()
    for node in ast.walk(tree):
        names: list[list[str]] = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert here is not None, f"{path}: relative import outside the package"
                base = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                base = (node.module or "").split(".")
            names = [base] + [base + [a.name] for a in node.names]  # `from pkg import module` or a name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            beside = path.with_name(node.value)
            if beside.is_file() and ROOT in beside.parents:
                found.add(beside)
        for dotted in names:
            if dotted and dotted[0] == PACKAGE:
                found |= _with_parents(dotted)
    return found


def closure(script: Path) -> set[Path]:
    """Every file of the package that running `script` may execute."""
    seen: set[Path] = set()
    todo = imports(script)
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo |= imports(file)
    return seen


def modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def folder(file: Path) -> str:
    """The folder of the package a file is in ('' for the package's own top level)."""
    parts = file.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else ""
