"""dvc.yaml: each stage lists exactly the code it runs (its import closure inside src/, derived with
`ast`), so editing a module reruns exactly the stages that import it; each plot is declared once,
with its fields, labels and title; the paths agree with paths.py."""

import ast
from pathlib import Path

import yaml
from conftest import PROJECT

PACKAGE = "gpt2_classifier"
SRC = PROJECT / "src" / PACKAGE


def imported_modules(path: Path) -> set[str]:
    """Modules of the package that `path` imports anywhere in it (top level or inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                base = node.module
                found |= {base} if base else {alias.name for alias in node.names}
            elif node.module == PACKAGE:  # from gpt2_classifier import x
                found |= {alias.name for alias in node.names}
            elif node.module and node.module.startswith(PACKAGE + "."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE + ".")}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            found.add(node.value.removesuffix(".py"))  # a module run by file name (MLflow's models from code)
    return {name for name in found if (SRC / f"{name}.py").is_file()}


def closure(script: Path) -> set[str]:
    """Every file of the package that running `script` may execute, as paths relative to the project."""
    seen, todo = set(), imported_modules(script)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo |= imported_modules(SRC / f"{name}.py")
    files = {f"src/{PACKAGE}/{name}.py" for name in seen}
    return files | {f"src/{PACKAGE}/__init__.py"} if files else files


def code_deps(stage: dict) -> set[str]:
    return {dep for dep in stage["deps"] if dep.endswith(".py")}


def test_every_stage_lists_exactly_the_code_it_runs():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        script = stage["cmd"].split()[-1]
        expected = {script} | closure(PROJECT / script)
        listed = code_deps(stage)
        assert listed == expected, f"{name}: missing {sorted(expected - listed)}, not run {sorted(listed - expected)}"


def test_the_closure_follows_imports_inside_functions():
    # tracking imports mlflow_model only where a model is logged; the closure must still see it
    assert f"src/{PACKAGE}/mlflow_model.py" in closure(PROJECT / "stages" / "finetune.py")
    assert f"src/{PACKAGE}/tensorfile.py" in closure(PROJECT / "stages" / "fetch_weights.py")
    assert f"src/{PACKAGE}/weights.py" in closure(PROJECT / "stages" / "fetch_weights.py")
    assert f"src/{PACKAGE}/pyfunc_entry.py" in closure(PROJECT / "stages" / "finetune.py")  # run by file name


def test_each_plot_is_declared_once_with_fields_and_labels():
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    assert not any("plots" in stage for stage in pipeline["stages"].values())  # else DVC draws them twice
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in pipeline["stages"].values() for o in s["outs"]}
    declared = []
    for entry in pipeline["plots"]:
        if isinstance(entry, str):  # an image
            declared.append(entry)
            continue
        ((name, plot),) = entry.items()
        assert {"title", "template", "x", "y", "x_label", "y_label"} <= set(plot), name
        ((path, columns),) = plot["y"].items()
        declared.append(path)
        header = None
        if (PROJECT / path).is_file():  # committed reports of a run: the columns must exist
            header = (PROJECT / path).read_text().splitlines()[0].split(",")
            ys = columns if isinstance(columns, list) else [columns]
            assert {plot["x"], *ys} <= set(header), (name, header)
    assert len(declared) == len(set(declared))
    assert set(declared) <= outs  # every plotted file is a stage's output


def test_stage_outputs_are_the_paths_of_paths_py():
    from gpt2_classifier import paths

    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    written = set()
    for stage in pipeline["stages"].values():
        for kind in ("outs", "metrics"):
            written |= {next(iter(o)) if isinstance(o, dict) else o for o in stage.get(kind, [])}
    top = {  # the project's paths, not its caches (.cache/) nor the user's (absolute)
        str(value)
        for name, value in vars(paths).items()
        if name.isupper() and not str(value).startswith(".") and not value.is_absolute()
    }
    folders = {str(paths.SPLIT_DIR), str(paths.ENCODED), str(paths.BASE), str(paths.CLASSIFIER)}
    files = top - folders - {str(paths.TRAIN_REPORTS), str(paths.EVAL_REPORTS)}
    assert files | folders <= written
