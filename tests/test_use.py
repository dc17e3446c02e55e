"""Using the fine-tuned model: the CLI, the MLflow pyfunc model served over HTTP, the registry."""

import csv
import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import requests
from conftest import made_zip, make_project, run, tiny_params
from safetensors import safe_open

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project after a tiny `dvc repro`, its model registered as spam-classifier."""
    tmp = tmp_path_factory.mktemp("use")
    params = tiny_params(*made_zip(tmp, 90, 30, seed=5), mlflow={"register_as": "spam-classifier"})
    project = make_project(tmp / "p", params)
    run(["dvc", "repro"], project)
    return project


def cli(project, *args, check=True):
    return run([sys.executable, "-m", "gpt2_classifier.serve.cli", *args], project, check=check)


def test_classify_prints_label_and_each_class_probability(trained):
    out = cli(trained, "classify", "WIN a FREE prize now, reply STOP", "see you at home later").stdout.splitlines()
    assert len(out) == 2
    for line, text in zip(out, ("WIN a FREE prize now, reply STOP", "see you at home later"), strict=True):
        label, scores, shown = line.split("\t", 2)
        probability = {name: float(p) for name, p in (pair.split("=") for pair in scores.split(" "))}
        assert list(probability) == ["ham", "spam"] and abs(sum(probability.values()) - 1) < 1e-3
        assert label == max(probability, key=probability.get) and shown == text


def test_classify_a_text_file_and_a_csv_column(trained, tmp_path):
    messages = ["WIN cash now", "lunch at 1?", "FREE entry, txt WIN", "ok see you"]
    text_file = tmp_path / "inbox.txt"
    text_file.write_text("\n".join(messages) + "\n")
    cli(trained, "classify", "--file", str(text_file))
    with open(tmp_path / "inbox.scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == messages
    for row in rows:
        assert abs(float(row["p_ham"]) + float(row["p_spam"]) - 1) < 1e-5 and row["label"] in ("ham", "spam")

    csv_file = tmp_path / "inbox.csv"
    pd.DataFrame({"id": range(4), "body": messages}).to_csv(csv_file, index=False)
    cli(trained, "classify", "--file", str(csv_file), "--column", "body", "--output", str(tmp_path / "out.csv"))
    assert len(pd.read_csv(tmp_path / "out.csv")) == 4
    bad = cli(trained, "classify", "--file", str(csv_file), "--column", "message", check=False)
    assert bad.returncode == 1 and "no column 'message'" in bad.stderr


def test_the_classifier_stores_only_what_training_changed(trained):
    config = json.loads((trained / "models/classifier/config.json").read_text())
    n_layers = config["gpt"]["n_layers"]
    with safe_open(str(trained / "models/classifier/model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert names and all(n.startswith((f"trf_blocks.{n_layers - 1}.", "final_norm.", "out_head.")) for n in names)
    base_size = (trained / "models/base/model.safetensors").stat().st_size
    assert (trained / "models/classifier/model.safetensors").stat().st_size < base_size / 5
    assert config["base"]["sha256"] == json.loads((trained / "models/base/config.json").read_text())["sha256"]


def test_pyfunc_model_loads_and_predicts_probabilities(trained):
    import mlflow

    run_info = json.loads((trained / "reports/train/mlflow_run.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{trained / 'mlflow.db'}")
    assert run_info["model_uri"].startswith("models:/m-")
    model = mlflow.pyfunc.load_model(run_info["model_uri"])
    assert model.metadata.signature is not None
    out = model.predict(pd.DataFrame({"text": ["FREE prize, txt WIN", "home soon"]}))
    assert list(out.columns) == ["label", "p_ham", "p_spam"] and len(out) == 2
    assert out.equals(model.predict(["FREE prize, txt WIN", "home soon"]))  # a list, as the README shows
    assert ((out.p_ham + out.p_spam) - 1).abs().max() < 1e-5


def test_logging_the_model_loads_it_once(trained, tmp_path, monkeypatch):
    """MLflow loads a model twice as it logs it (the output schema, then the serving check): the second
    takes the first's classifier. Outside logging, each load is its own."""
    import mlflow

    from gpt2_classifier.serve import logged_model, predict

    loads, from_folder = [], predict.TextClassifier.from_folder.__func__
    monkeypatch.setattr(
        predict.TextClassifier,
        "from_folder",
        classmethod(lambda cls, f, *a: loads.append(f) or from_folder(cls, f, *a)),
    )
    monkeypatch.chdir(trained)  # where the base weights are
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run(experiment_id=mlflow.create_experiment("logging")):
        info = logged_model.log_classifier(trained / "models/classifier", "c")
    assert len(loads) == 1
    for _ in range(2):
        mlflow.pyfunc.load_model(info.model_uri).predict(["hi"])
    assert len(loads) == 3


def test_registered_version_carries_test_accuracy_and_serves_the_cli(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    version = client.get_model_version("spam-classifier", "1")
    test_accuracy = json.loads((trained / "reports/metrics.json").read_text())["test/accuracy"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(test_accuracy)
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{trained / 'mlflow.db'}"}
    cli = [sys.executable, "-m", "gpt2_classifier.serve.cli"]
    cmd = [*cli, "classify", "--registered", "spam-classifier/1", "hi there"]
    out = run(cmd, trained, extra_env=store)
    assert out.stdout.split("\t")[0] in ("ham", "spam")
    run_id = json.loads((trained / "reports/train/mlflow_run.json").read_text())["run_id"]
    by_run = run([*cmd[:4], "--run-id", run_id, "hi there"], trained, extra_env=store)
    assert by_run.stdout == out.stdout  # the run's logged model is the registered version
    missing = run([*cmd[:4], "--run-id", "0" * 32, "hi"], trained, check=False, extra_env=store)
    assert missing.returncode == 1 and missing.stderr.startswith(f"error: no MLflow run {'0' * 32} in sqlite:///")


def test_mlflow_models_serve_answers_invocations(trained):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model_uri = json.loads((trained / "reports/train/mlflow_run.json").read_text())["model_uri"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{trained / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"  # for its uvicorn
    server = subprocess.Popen(cmd, cwd=trained, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                records = {"inputs": ["WIN cash", "at home"]}  # as the README's curl sends them
                answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=records, timeout=30)
                break
            except requests.ConnectionError:
                time.sleep(1)
        assert answer is not None, server.stderr.read().decode()[-2000:] if server.poll() is not None else "no answer"
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == 2
        for p in predictions:
            assert p["label"] in ("ham", "spam") and abs(p["p_ham"] + p["p_spam"] - 1) < 1e-5
    finally:
        server.terminate()
        server.wait(timeout=30)
