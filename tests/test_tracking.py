"""MLflow: what a run records, the DVC experiment workflows, a real server, failures."""

import json
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import make_project, run, stages_run, tiny_params
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def client_for(project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def all_runs(client: MlflowClient):
    experiment = client.get_experiment_by_name("gpt2-classifier")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def assert_complete_run(client: MlflowClient, run_id: str, metrics_file) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["finetune.lr"] == "0.001" and params["model.name"] == "gpt2-small"
    assert params["resolved.device"] == "cpu" and int(params["resolved.trainable_parameters"]) > 0
    assert "resolved.torch_version" in params and "resolved.max_length" in params
    assert len(client.get_metric_history(run_id, "val_loss")) > 1
    assert len(client.get_metric_history(run_id, "val_accuracy")) == 1  # one epoch
    test_accuracy = json.loads(metrics_file.read_text())["test"]["accuracy"]
    assert run.data.metrics["test/accuracy"] == pytest.approx(test_accuracy)
    for key in ("validation/accuracy", "train/accuracy", "test/precision", "test/recall", "test/f1"):
        assert key in run.data.metrics
    tags = run.data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert tags["dvc.md5.data/encoded"].endswith(".dir") and tags["dvc.md5.models/base"].endswith(".dir")
    artifacts = {a.path for folder in ("finetune", "evaluate") for a in client.list_artifacts(run_id, folder)}
    for path in ("finetune/loss.png", "finetune/accuracy.png", "finetune/params.yaml", "evaluate/metrics.json",
                 "evaluate/confusion.png"):  # fmt: skip
        assert path in artifacts, path
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"} and all(d.digest for d in inputs.values())


def test_repro_records_one_complete_run_and_evaluate_reruns_continue_it(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    run(["dvc", "repro"], project)
    client = client_for(project)
    runs = all_runs(client)
    assert len(runs) == 1
    run_id = json.loads((project / "reports/train/mlflow_run.json").read_text())["run_id"]
    assert runs[0].info.run_id == run_id
    assert_complete_run(client, run_id, project / "reports/metrics.json")
    assert (project / "mlartifacts").is_dir()  # artifacts beside the local store, not in a temp folder

    assert stages_run(run(["dvc", "repro", "--force", "--single-item", "evaluate"], project).stdout) == ["evaluate"]
    assert len(all_runs(client)) == 1  # no orphan run
    assert len(client.get_metric_history(run_id, "test/accuracy")) == 2


def test_experiments_make_runs_that_differ_in_the_changed_key(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    run(["dvc", "exp", "run", "-n", "lr-high", "-S", "finetune.lr=0.002"], project)
    run(["dvc", "exp", "run", "-n", "lr-low", "-S", "finetune.lr=0.0005"], project)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    names = {exp.get("name") for rev in shown for exp in (rev.get("experiments") or []) for exp in exp["revs"]}
    assert {"lr-high", "lr-low"} <= names
    client = client_for(project)
    runs = {r.info.run_name: r for r in all_runs(client)}
    assert set(runs) == {"lr-high", "lr-low"}
    assert runs["lr-high"].data.tags["dvc.exp_name"] == "lr-high"
    high, low = runs["lr-high"].data.params, runs["lr-low"].data.params
    assert {k for k in high.keys() | low.keys() if high.get(k) != low.get(k)} == {"finetune.lr"}


def test_queued_sweep_runs_in_parallel_and_every_run_lands(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    run(["dvc", "exp", "run", "--queue", "-S", "finetune.lr=0.001,0.002,0.003"], project)
    run(["dvc", "exp", "run", "--run-all", "-j", "2"], project, timeout=900)
    runs = all_runs(client_for(project))
    assert sorted(r.data.params["finetune.lr"] for r in runs) == ["0.001", "0.002", "0.003"]
    for r in runs:
        assert r.info.status == "FINISHED" and "test/accuracy" in r.data.metrics
        assert len(client_for(project).get_metric_history(r.info.run_id, "val_loss")) > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts")]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            MlflowClient(url).search_experiments(max_results=1)
            break
        except Exception:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("mlflow server did not start within 120 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_team_setup_logs_to_a_real_mlflow_server(tmp_path, made_data, mlflow_server, monkeypatch):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    run(["dvc", "repro"], project, extra_env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert not (project / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(mlflow_server)
    runs = all_runs(client)
    assert len(runs) == 1
    assert_complete_run(client, runs[0].info.run_id, project / "reports/metrics.json")


def test_unreachable_server_fails_before_training(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data))
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = run(["dvc", "repro"], project, check=False, extra_env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and uri in errors[0] and "MLFLOW_TRACKING_URI" in errors[0]
    assert not (project / "models/classifier").exists()
    assert "finetune: gpt2-small on" not in result.stdout  # training never started
    assert time.monotonic() - start < 120


def test_tracking_can_be_switched_off(tmp_path, made_data):
    project = make_project(tmp_path / "p", tiny_params(*made_data, mlflow={"enabled": False}))
    run(["dvc", "repro"], project)
    assert not (project / "mlflow.db").exists()
    assert json.loads((project / "reports/train/mlflow_run.json").read_text())["run_id"] is None


def test_a_crash_marks_the_run_failed(tmp_path, monkeypatch):
    from gpt2_classifier.tracking import finetune_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    params = yaml.safe_load(yaml.safe_dump({"model": {"name": "gpt2-small", "weights": "random"}, "mlflow": {}}))
    with pytest.raises(RuntimeError), finetune_run(params, tmp_path / "run.json") as tracker:
        tracker.log_metrics({"train_loss": 1.0}, step=0)
        raise RuntimeError("out of memory")
    runs = all_runs(MlflowClient(f"sqlite:///{tmp_path / 'store.db'}"))
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "run.json").exists()


WRITER = """
import sys
from gpt2_classifier.tracking import finetune_run
from pathlib import Path
params = {"model": {"name": "gpt2-small", "weights": "random"}, "mlflow": {}}
with finetune_run(params, Path(sys.argv[1])) as tracker:
    tracker.log_params({"writer": sys.argv[2]})
    for step in range(200):
        tracker.log_metrics({"val_loss": 1.0 / (step + 1)}, step=step)
"""


def test_two_processes_write_the_embedded_store_at_once(tmp_path):
    env_uri = f"sqlite:///{tmp_path / 'shared.db'}"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / f"run{i}.json"), str(i)],
                         env={**__import__("os").environ, "MLFLOW_TRACKING_URI": env_uri}, stderr=subprocess.PIPE)
        for i in range(2)
    ]  # fmt: skip
    for writer in writers:
        assert writer.wait(timeout=300) == 0, writer.stderr.read().decode()[-2000:]
    client = MlflowClient(env_uri)
    runs = all_runs(client)
    assert sorted(r.data.params["writer"] for r in runs) == ["0", "1"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "val_loss")) == 200
