"""Reference rows as queued DVC experiments, end to end; a data set with three classes."""

import hashlib
import json
import sys

import pandas as pd
import pytest
from conftest import eval_details, made_zip, make_project, run, tiny_params, zip_bytes
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_queued_reference_rows_land_in_dvc_and_mlflow_with_their_params(tmp_path):
    project = make_project(tmp_path / "p", tiny_params(*made_zip(tmp_path, 90, 30, seed=4)))
    run([sys.executable, "experiments/queue_rows.py", "2", "14", "17"], project)
    run(["dvc", "exp", "run", "--run-all", "-j", "1"], project, timeout=900)

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = {
        exp["name"]: exp["revs"][0]["data"]
        for rev in shown
        for exp in (rev.get("experiments") or [])
        if exp.get("name")
    }
    assert set(experiments) == {"row-02-first-token", "row-14-no-padding-batch-1", "row-17-no-causal-mask"}
    params = {name: d["params"]["params.yaml"]["data"] for name, d in experiments.items()}
    assert params["row-02-first-token"]["finetune"]["pool"] == "first"
    assert params["row-14-no-padding-batch-1"]["pad_encode"]["max_length"] == "none"
    assert params["row-14-no-padding-batch-1"]["finetune"]["batch_size"] == 1
    assert params["row-17-no-causal-mask"]["finetune"]["causal_mask"] is False
    assert all("reports/metrics.json" in d["metrics"] for d in experiments.values())

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = {
        r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("gpt2-classifier").experiment_id])
    }
    assert set(runs) == set(experiments)
    assert runs["row-02-first-token"].data.params["finetune.pool"] == "first"
    assert runs["row-14-no-padding-batch-1"].data.params["resolved.padding"] == "none"
    assert runs["row-14-no-padding-batch-1"].data.params["resolved.pool"] == "flexible"
    assert runs["row-17-no-causal-mask"].data.params["finetune.causal_mask"] == "false"
    assert all(r.info.status == "FINISHED" and "test/accuracy" in r.data.metrics for r in runs.values())


def test_an_unknown_row_or_invalid_override_queues_nothing(tmp_path):
    project = make_project(tmp_path / "p", tiny_params("file:///nowhere.zip", None))
    result = run([sys.executable, "experiments/queue_rows.py", "20"], project, check=False)
    assert result.returncode == 2 and "no row 20" in result.stderr
    result = run([sys.executable, "experiments/queue_rows.py", "2", "--set", "finetune.lr=-1"], project, check=False)
    assert result.returncode == 2 and "finetune.lr" in result.stderr
    assert "row-02" not in run(["dvc", "queue", "status"], project).stdout


def test_three_labels_work_through_every_stage(tmp_path):
    lines = [
        f"{label}\t{label} message number {i} {'x ' * (i % 7)}" for i in range(60) for label in ("ham", "spam", "promo")
    ]
    data = ("\n".join(lines) + "\n").encode()
    archive = tmp_path / "three.zip"
    archive.write_bytes(zip_bytes({"SMSSpamCollection": data}))
    labels = {"labels": ["ham", "spam", "promo"]}
    params = tiny_params(archive.as_uri(), hashlib.sha256(data).hexdigest(), balance=labels, mlflow={"enabled": False})
    project = make_project(tmp_path / "p", params)
    run(["dvc", "repro"], project)
    config = json.loads((project / "models/classifier/config.json").read_text())
    assert config["labels"] == ["ham", "spam", "promo"]
    metrics = eval_details(project)
    assert set(metrics["test"]) >= {"accuracy", "precision", "recall", "f1"} and "roc_auc" not in metrics["test"]
    assert "promo" in (project / "reports/eval/confusion.csv").read_text()
    roc = pd.read_csv(project / "reports/eval/roc.csv")
    assert set(roc["class"]) == {"ham", "spam", "promo"}
