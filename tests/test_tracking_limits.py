"""A tracking server that is down, or accepts connections and never answers, ends a stage in bounded
time with one line naming it (without credentials) and what to do; so does a deleted experiment, and
evaluate continues its run wherever mlflow.experiment_name pointed when finetune made it."""

import socket
import threading
import time

import pytest

from gpt2_classifier.core.params import MlflowParams
from gpt2_classifier.tracking import runs


@pytest.fixture
def silent_server():
    """A port on 127.0.0.1 that accepts connections and never answers; it counts the connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], accepted
    listener.close()
    for connection in accepted:
        connection.close()


@pytest.fixture(autouse=True)
def http_settings_restored(monkeypatch):
    for key in runs.HTTP_WAITS:
        monkeypatch.delenv(key, raising=False)


def test_a_server_that_never_answers_fails_the_run_within_seconds(silent_server, tmp_path, monkeypatch):
    port, _ = silent_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://team:secret@127.0.0.1:{port}")
    start = time.monotonic()
    with (
        pytest.raises(runs.TrackingError) as info,
        runs.finetune_run(MlflowParams(), tmp_path / "run.json", "r", {}),
    ):
        pytest.fail("the run started")
    assert time.monotonic() - start < runs.PROBE_TIMEOUT + 10
    assert str(info.value) == (
        f"MLflow tracking store http://***@127.0.0.1:{port} cannot be used (no answer within 10 s); "
        "start the server or fix MLFLOW_TRACKING_URI, or set mlflow.enabled: false"
    )
    assert not (tmp_path / "run.json").exists()


def test_a_closed_port_is_named_at_once(tmp_path, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    expected = rf"^MLflow tracking store http://127.0.0.1:{port} cannot be used \(cannot connect\); start the server"
    with (
        pytest.raises(runs.TrackingError, match=expected),
        runs.continue_run(MlflowParams(), _run_file(tmp_path)),
    ):
        pytest.fail("the run continued")
    assert time.monotonic() - start < 10  # MLflow's own retries would wait minutes


def _run_file(folder):
    path = folder / "mlflow_run.json"
    path.write_text('{"run_id": "0123456789abcdef"}')
    return path


@pytest.mark.parametrize("user_retries", [None, "0"])
def test_every_call_to_a_silent_server_gives_up_within_the_bound(silent_server, monkeypatch, user_retries):
    """After the check before a run, each call waits at most HTTP_WAITS' attempts (MLflow's defaults:
    8 attempts of up to 120 s each); a value the user set is kept."""
    from mlflow import MlflowClient

    port, accepted = silent_server
    monkeypatch.setattr(runs, "HTTP_WAITS", {**runs.HTTP_WAITS, "MLFLOW_HTTP_REQUEST_TIMEOUT": "1",
                                                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"})  # fmt: skip
    if user_retries is not None:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", user_retries)
    runs.bound_http_waits()
    outcome = []

    def call() -> None:
        try:
            MlflowClient(f"http://127.0.0.1:{port}").get_run("0123456789abcdef")
        except Exception as exc:
            outcome.append(runs.store_failure(f"http://127.0.0.1:{port}", exc))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=15)
    assert outcome, "the call still waits"
    assert "(no answer within 1 s)" in str(outcome[0])
    assert len(accepted) == (1 if user_retries == "0" else 1 + int(runs.HTTP_WAITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]))


def test_a_store_failing_during_the_run_is_one_line_without_credentials(tmp_path, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")

    def refused(*args, **kwargs):
        raise MlflowException("API request to https://team:secret@mlflow.example/api/2.0/mlflow/runs/log-batch failed")

    trained = []
    with (
        pytest.raises(runs.TrackingError) as info,
        runs.finetune_run(MlflowParams(), tmp_path / "run.json", "r", {}) as tracker,
    ):
        monkeypatch.setattr(mlflow, "log_metrics", refused)
        tracker.log_metrics({"train_loss": 1.0}, step=0)
        trained.append(True)  # the refusal does not stop the training: the run ends with it
    assert trained
    message = str(info.value)
    assert message.startswith(f"MLflow tracking store sqlite:///{tmp_path / 'store.db'} refused writes during the run")
    assert "https://***@mlflow.example/api" in message and "secret" not in message and "\n" not in message
    assert message.endswith("; not recorded: metrics (train_loss); set mlflow.enabled: false to track nothing, "
                            "then rerun finetune (dvc repro)")  # fmt: skip
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'store.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gpt2-classifier").experiment_id])
    assert run.info.status == "FAILED"


def test_a_deleted_experiment_is_named_with_the_way_to_restore_it(tmp_path, monkeypatch):
    import mlflow

    store = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = mlflow.MlflowClient(store)
    experiment_id = client.create_experiment("gpt2-classifier")
    client.delete_experiment(experiment_id)
    with (
        pytest.raises(runs.TrackingError) as info,
        runs.finetune_run(MlflowParams(), tmp_path / "run.json", "r", {}),
    ):
        pytest.fail("the run started")
    assert str(info.value) == (
        f"MLflow experiment 'gpt2-classifier' (mlflow.experiment_name) is deleted in {store}; restore it "
        f"(mlflow experiments restore --experiment-id {experiment_id}) or choose another mlflow.experiment_name"
    )


def test_evaluate_continues_the_run_after_the_experiment_name_changed(tmp_path, monkeypatch):
    import mlflow

    store = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with runs.finetune_run(MlflowParams(), tmp_path / "run.json", "r", {}) as tracker:
        run_id = tracker.run_id
    with runs.continue_run(MlflowParams(experiment_name="renamed"), tmp_path / "run.json") as (tracker, _):
        tracker.log_metrics({"test/accuracy": 0.5})
    client = mlflow.MlflowClient(store)
    assert client.get_run(run_id).data.metrics["test/accuracy"] == 0.5
    assert client.get_experiment_by_name("renamed") is None  # evaluate makes no experiment of its own


def test_tls_to_a_server_that_speaks_plain_http_is_named(server, tmp_path, monkeypatch):
    uri = server.url.replace("http://", "https://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with (
        pytest.raises(runs.TrackingError, match=rf"^MLflow tracking store {uri} cannot be used \(cannot connect: TLS"),
        runs.finetune_run(MlflowParams(), tmp_path / "run.json", "r", {}),
    ):
        pytest.fail("the run started")


def test_long_messages_are_cut_after_their_credentials_are_hidden():
    line = runs.first_line(RuntimeError(f"API request to https://team:{'s' * 300}@mlflow.example/api failed"))
    assert line == "RuntimeError: API request to https://***@mlflow.example/api failed"
