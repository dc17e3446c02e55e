"""`dvc repro` end to end, in temporary git+DVC copies of the project."""

import hashlib
import json

import pytest
import yaml
from conftest import REAL_TSV_SHA256, eval_details, make_project, run, run_seeing_imports, stages_run, tiny_params

pytestmark = pytest.mark.slow

ALL_STAGES = ["download", "balance", "split", "pad-encode", "fetch-weights", "finetune", "evaluate"]
DATA_OUTS = [
    "data/raw/source",
    "data/balanced.csv",
    "data/balance.json",
    "data/split/train.csv",
    "data/split/validation.csv",
    "data/split/test.csv",
    "data/encoded/train.safetensors",
    "data/encoded/validation.safetensors",
    "data/encoded/test.safetensors",
    "data/encoded/meta.json",
]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def set_param(project, section, key, value):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def heavy_imports(project, script: str) -> set[str]:
    """Which of torch and pandas running stages/<script>.py (to its end) imported."""
    return run_seeing_imports(f"stages/{script}.py", project, ["torch", "pandas"])[1]


def repro(project, *args) -> list[str]:
    return stages_run(run(["dvc", "repro", *args], project).stdout)


def test_full_pipeline_caches_and_reruns_only_what_changed(tmp_path, made_data):
    project = make_project(tmp_path / "project", tiny_params(*made_data))
    assert repro(project) == ALL_STAGES
    metrics = eval_details(project)
    assert {"train", "validation", "test"} <= set(metrics)
    assert all(0 <= metrics[s]["accuracy"] <= 1 for s in ("train", "validation", "test"))
    for out in ["models/classifier/model.safetensors", "models/classifier/config.json", "reports/train/loss.csv",
                "reports/train/accuracy.csv", "reports/eval/confusion.csv",
                "reports/eval/roc.csv", "reports/eval/confusion.png"]:  # fmt: skip
        assert (project / out).is_file(), out
    shown = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert '"test/accuracy"' in shown and '"validation/accuracy"' in shown

    # nothing changed: only download runs (always: it checks the data's source), and finds it unchanged
    assert repro(project) == ["download"]
    assert "data/raw/source is up to date" in run(["dvc", "repro"], project).stdout

    model_digest = digest(project / "models/classifier/model.safetensors")
    assert repro(project, "--force", "--single-item", "finetune") == ["finetune"]  # same params, same weights
    assert digest(project / "models/classifier/model.safetensors") == model_digest

    metrics_code = project / "src/gpt2_classifier/metrics/classification.py"
    metrics_code.write_text(metrics_code.read_text() + "\n# an edit\n")
    assert repro(project) == ["download", "evaluate"]
    set_param(project, "split", "seed", 5)
    assert repro(project) == ["download", "split", "pad-encode", "finetune", "evaluate"]
    # Last, as they rewrite outputs outside DVC. Lean stages: only fetch-weights (random weights) and finetune
    # import torch; the data stages not pandas either (evaluate's MLflow does).
    for script in ("download", "balance", "split", "pad_encode"):
        assert heavy_imports(project, script) == set(), script
    assert "torch" not in heavy_imports(project, "evaluate")
    assert "torch" in heavy_imports(project, "finetune")  # the check can see an import


def test_failed_stage_reports_one_line_and_commits_nothing(tmp_path, made_data):
    url, _ = made_data
    project = make_project(tmp_path / "project", tiny_params(url, "0" * 64))
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and url in errors[0] and "expected " + "0" * 64 in errors[0]
    assert not (project / "data/raw/source").exists()
    assert not (project / "dvc.lock").exists()


def test_real_data_stages_reproduce_the_reference_counts_byte_identically(tmp_path, shared_data):
    params = tiny_params(str(shared_data / "sms+spam+collection.zip"), REAL_TSV_SHA256)
    first = make_project(tmp_path / "first", params)
    second = make_project(tmp_path / "second", params)
    for project in (first, second):
        assert repro(project, "pad-encode") == ["download", "balance", "split", "pad-encode"]
    counts = json.loads((first / "data/balance.json").read_text())
    assert counts == {"messages": 5574, "parsed": {"ham": 4827, "spam": 747}, "balanced": {"ham": 747, "spam": 747},
                      "labels": ["ham", "spam"]}  # fmt: skip
    meta = json.loads((first / "data/encoded/meta.json").read_text())
    assert [meta["splits"][s]["messages"] for s in ("train", "validation", "test")] == [1045, 149, 300]
    assert meta["max_length"] == meta["longest_train"] == 120
    for out in DATA_OUTS:
        assert digest(first / out) == digest(second / out), out

    assert repro(first) == ["download", "fetch-weights", "finetune", "evaluate"]
    metrics = eval_details(first)
    assert metrics["test"]["accuracy"] > 0.6  # a 2-block random model still learns something from 1045 messages
