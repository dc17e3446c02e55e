"""The package's shape: folders in layers, imports only downward, no circle, and the torch side out of
the stages that never run it (their dvc.yaml deps, which test_dvc_yaml ties to the imports)."""

from __future__ import annotations

import subprocess
import sys
from graphlib import CycleError, TopologicalSorter

from conftest import PROJECT
from imports import ROOT, closure, folder, imports, modules

# Each folder may import its own modules and those of the folders in lower layers, never a higher or
# equal one: core is the bottom; finetune.py and evaluate.py, the two stages' work, are the top ('').
LAYERS = {"core": 0, "data": 1, "metrics": 1, "tracking": 1, "model": 2, "train": 3, "search": 3, "serve": 4, "": 5}
TORCH_SIDE = {"model", "train", "serve"}


def test_every_folder_has_a_layer():
    assert {folder(file) for file in modules()} == set(LAYERS)


def test_imports_run_only_downward():
    upward = []
    for file in modules():
        for target in imports(file):
            mine, theirs = folder(file), folder(target)
            if target.name == "__init__.py" and target.parent == ROOT:
                continue  # the package's own __init__ runs with everything
            if mine != theirs and LAYERS[theirs] >= LAYERS[mine]:
                upward.append(f"{file.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    assert not upward, upward


def test_no_module_imports_itself_through_others():
    graph = {file: imports(file) - {file} for file in modules()}
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        raise AssertionError(f"import circle: {[str(f.relative_to(ROOT)) for f in exc.args[1]]}") from None


def test_the_stages_without_torch_run_none_of_the_torch_side():
    for stage in ("download", "balance", "split", "pad_encode", "evaluate"):
        ran = {folder(file) for file in closure(PROJECT / "stages" / f"{stage}.py")}
        assert not ran & TORCH_SIDE, (stage, sorted(ran & TORCH_SIDE))


def test_importing_a_stages_work_imports_no_heavy_library_it_may_not_use():
    """MLflow only where tracking is on (it costs seconds to import), torch never for evaluate."""
    probe = "import sys, {0}; print(*sorted(m for m in ('mlflow', 'torch') if m in sys.modules))"
    for module, allowed in (("gpt2_classifier.finetune", {"torch"}), ("gpt2_classifier.evaluate", set())):
        out = subprocess.run([sys.executable, "-c", probe.format(module)], capture_output=True, text=True, check=True)
        assert set(out.stdout.split()) == allowed, (module, out.stdout)


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a core module importing the model would be reported."""
    import imports as graph

    package = tmp_path / "src" / "gpt2_classifier"
    for name, text in {"core/paths.py": "from gpt2_classifier.model import gpt\n", "model/gpt.py": ""}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
        (package / name).with_name("__init__.py").touch()
    monkeypatch.setattr(graph, "SRC", tmp_path / "src")
    monkeypatch.setattr(graph, "ROOT", package)
    (found,) = [t for t in graph.imports(package / "core/paths.py") if t.name == "gpt.py"]
    assert LAYERS[graph.folder(found)] > LAYERS["core"]
