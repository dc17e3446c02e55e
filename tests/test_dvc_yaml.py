"""dvc.yaml: each stage lists exactly the code it runs (its import closure inside src/, derived with
`ast`), so editing a module reruns exactly the stages that import it; each plot is declared once,
with its fields, labels and title; the paths agree with paths.py."""

from pathlib import Path

import yaml
from conftest import PROJECT
from imports import ROOT, closure


def expected_deps(script: str) -> set[str]:
    return {script} | {file.relative_to(PROJECT).as_posix() for file in closure(PROJECT / script)}


def code_deps(stage: dict) -> set[str]:
    return {dep for dep in stage["deps"] if dep.endswith(".py")}


def test_every_stage_lists_exactly_the_code_it_runs():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        script = stage["cmd"].split()[-1]
        expected = expected_deps(script)
        listed = code_deps(stage)
        assert listed == expected, f"{name}: missing {sorted(expected - listed)}, not run {sorted(listed - expected)}"


def test_the_closure_follows_imports_inside_functions():
    # finetune imports the logged model, which imports predict only where MLflow loads the model
    finetune = expected_deps("stages/finetune.py")
    assert "src/gpt2_classifier/serve/predict.py" in finetune
    assert "src/gpt2_classifier/serve/pyfunc_entry.py" in finetune  # run by file name
    assert "src/gpt2_classifier/model/__init__.py" in finetune  # a package's __init__ runs with its modules
    fetch = expected_deps("stages/fetch_weights.py")
    assert {"src/gpt2_classifier/model/tensorfile.py", "src/gpt2_classifier/model/weights.py"} <= fetch
    assert (ROOT / "serve" / "pyfunc_entry.py").is_file()


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
    from gpt2_classifier.core import paths

    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    written = set()
    for stage in pipeline["stages"].values():
        for kind in ("outs", "metrics"):
            written |= {next(iter(o)) if isinstance(o, dict) else o for o in stage.get(kind, [])}
    top = {  # the project's paths, not its caches (.cache/) nor the user's (absolute)
        str(value)
        for name, value in vars(paths).items()
        if isinstance(value, Path) and not str(value).startswith(".") and not value.is_absolute()
    }
    folders = {str(paths.SPLIT_DIR), str(paths.ENCODED), str(paths.BASE), str(paths.CLASSIFIER)}
    files = top - folders - {str(paths.TRAIN_REPORTS), str(paths.EVAL_REPORTS)}
    assert files | folders <= written
