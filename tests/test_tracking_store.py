"""A tracking store that is locked, read-only or unreachable during a run: training goes on, what it logged
is written once the store takes it, and a store that stays unusable ends the stage with one line naming its
file (or server), what was not recorded and how to record it, without a traceback."""

import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gpt2_classifier.core.params import MlflowParams
from gpt2_classifier.tracking import runs

# "Another program": it takes SQLite's write lock on the file (as an SQLite browser with an unsaved edit
# does) and holds it for argv[2] seconds, or until it is killed.
LOCKER = """import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


@contextlib.contextmanager
def locked(db, seconds: float = 3600):
    """`db` write-locked by another process for `seconds` (from when this returns) or until the block ends."""
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline() == "locked\n"
        yield locker
    finally:
        locker.kill()
        locker.wait()


@pytest.fixture
def store(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv(runs.STORE_WAIT_VARIABLE, raising=False)
    return db


@pytest.fixture
def short_sqlite_wait(monkeypatch):
    """MLflow has SQLite wait up to 20 s for a lock before a statement fails (PRAGMA busy_timeout in each
    session); here 0.3 s, so that a lock of seconds outlasts it as a longer one outlasts MLflow's own."""
    import mlflow.store.db.utils as db_utils
    import sqlalchemy

    text = sqlalchemy.sql.text
    shortened = types.SimpleNamespace(text=lambda sql: text(sql.replace("busy_timeout = 20000", "busy_timeout = 300")))
    monkeypatch.setattr(db_utils, "sql", shortened)


def run_of(db) -> tuple[MlflowClient, object]:
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("gpt2-classifier").experiment_id])
    return client, run


def no_traceback(capfd, caplog) -> None:
    """Nothing on the terminal or in the logs shows a traceback (MLflow logs one per failed SQL statement)."""
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


QUIET = MlflowParams(system_metrics=False)


def test_a_store_locked_for_seconds_during_training_loses_nothing(store, short_sqlite_wait, tmp_path, capfd, caplog):
    results = tmp_path / "summary.json"
    start = time.monotonic()
    with runs.finetune_run(QUIET, tmp_path / "run.json", "r", {}) as tracker:
        tracker.log_params({"finetune.lr": 0.001})
        with locked(store, seconds=2.5):
            for step in range(30):  # training: a step a tenth of a second, a metric each
                tracker.log_metrics({"train_loss": 1 / (step + 1)}, step=step)
                time.sleep(0.1)
            tracker.log_series("lr", [(step, 0.001) for step in range(30)])
            tracker.set_tags({"stopped": "epochs"})
            results.write_text("{}")
            tracker.log_artifacts([results], "finetune")
            tracker.log_metrics({"epochs_run": 1}, step=29)
    assert time.monotonic() - start < 30
    client, run = run_of(store)
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.value for m in losses] == [1 / (step + 1) for step in range(30)]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 30
    assert run.data.params == {"finetune.lr": "0.001"} and run.data.tags["stopped"] == "epochs"
    assert run.data.metrics["epochs_run"] == 1
    assert [a.path for a in client.list_artifacts(run.info.run_id, "finetune")] == ["finetune/summary.json"]
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == run.info.run_id
    assert all(a.timestamp < b.timestamp for a, b in zip(losses, losses[1:], strict=False))  # when measured
    no_traceback(capfd, caplog)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"database is locked: another program holds a write lock on {store}" in warned[0]


def test_a_lock_never_released_ends_the_run_with_one_line_once_its_wait_is_spent(
    store, short_sqlite_wait, tmp_path, capfd, caplog, monkeypatch
):
    monkeypatch.setenv(runs.STORE_WAIT_VARIABLE, "2")
    results = tmp_path / "summary.json"
    start = time.monotonic()
    with pytest.raises(runs.TrackingError) as info, contextlib.ExitStack() as lock:
        with runs.finetune_run(QUIET, tmp_path / "run.json", "r", {}) as tracker:
            lock.enter_context(locked(store))  # from the run's start until it ended
            for step in range(100):
                tracker.log_metrics({"train_loss": 1.0, "val_loss": 2.0}, step=step)
            tracker.log_series("lr", [(step, 0.001) for step in range(100)])
            tracker.log_params({"finetune.lr": 0.001})
            results.write_text("{}")  # the training's results: written whatever the store does
            tracker.kept = tmp_path / "kept.safetensors"
        pytest.fail("the run ended without an error")
    assert time.monotonic() - start < 2 + 10  # the wait, one statement's, ending the run
    assert results.is_file() and not (tmp_path / "run.json").exists()
    message = str(info.value)
    assert message == (
        f"MLflow tracking store sqlite:///{store} was unusable during the run (database is locked: another program "
        f"holds a write lock on {store}); not recorded: metrics (train_loss, val_loss, lr), params; close that "
        "program, or save or discard its changes (an SQLite browser with an unsaved edit holds one), then rerun "
        f"finetune (dvc repro), which resumes from the training kept in {tmp_path / 'kept.safetensors'} instead "
        "of training again"
    )
    no_traceback(capfd, caplog)


def test_a_store_refusing_a_write_does_not_stop_the_others(store, tmp_path):
    """A refusal for good (here a param changed within the run, which MLflow forbids) is named at the end."""
    with (
        pytest.raises(runs.TrackingError) as info,
        runs.finetune_run(QUIET, tmp_path / "run.json", "r", {}) as tracker,
    ):
        tracker.log_params({"finetune.lr": 0.001})
        tracker.log_params({"finetune.lr": 0.002})
        tracker.log_metrics({"train_loss": 1.0}, step=0)
    assert str(info.value).startswith(
        f"MLflow tracking store sqlite:///{store} refused writes during the run (MlflowException: Changing param values"
    )
    assert str(info.value).endswith(
        "not recorded: params; set mlflow.enabled: false to track nothing, then rerun finetune (dvc repro)"
    )
    client, run = run_of(store)
    assert run.info.status == "FAILED" and run.data.metrics == {"train_loss": 1.0}


READ_ONLY_STAGE = """import sys
from pathlib import Path
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.tracking.runs import finetune_run
if sys.argv[3] == "query_only":  # where the file cannot be made immutable: SQLite refuses every write
    import sqlalchemy
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", lambda db, _: db.execute("PRAGMA query_only = 1"))
def main(params):
    with finetune_run(params.mlflow, Path(sys.argv[1]), "r", {}) as tracker:
        print("training")
run_stage(main, sys.argv[2])
"""


@contextlib.contextmanager
def read_only(db):
    """`db` read-only even for root, who may write any file: immutable (chattr +i), else (a file system or
    a container without that) SQLite's query_only mode in the stage's process."""
    made = subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode == 0
    try:
        yield "immutable" if made else "query_only"
    finally:
        if made:
            subprocess.run(["chattr", "-i", str(db)], check=True)


def test_a_read_only_store_is_one_line_naming_the_file_and_its_fix(store, tmp_path):
    MlflowClient(f"sqlite:///{store}").create_experiment("gpt2-classifier")  # a store that was used before
    (tmp_path / "params.yaml").write_text("data: {url: unused}\nmlflow: {system_metrics: false}\n")
    with read_only(store) as how:
        result = subprocess.run(
            [sys.executable, "-c", READ_ONLY_STAGE, str(tmp_path / "run.json"), "params.yaml", how],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1 and "training" not in result.stdout
    assert result.stderr.splitlines() == [
        f"error: MLflow tracking store sqlite:///{store} could not start a run (attempt to write a readonly "
        f"database: {store} is read-only); make it and its folder writable (chmod u+w {store} {tmp_path}), or "
        "set mlflow.enabled: false"
    ]


def sqlite_error(message: str) -> Exception:
    """An error as MLflow raises it for a failed SQLite statement: SQLite's, wrapped by SQLAlchemy's and MLflow's."""
    import sqlalchemy
    from mlflow.exceptions import MlflowException

    error = sqlalchemy.exc.OperationalError("INSERT INTO metrics", {}, sqlite3.OperationalError(message))
    error.__cause__ = error.orig
    wrapped = MlflowException(f"(raised as a result of Query-invoked autoflush)\n{error}")
    wrapped.__cause__ = error
    return wrapped


@pytest.mark.parametrize(
    ("said", "advice"),
    [
        ("database is locked", "close that program"),
        ("attempt to write a readonly database", "make it and its folder writable (chmod u+w /p/mlflow.db /p)"),
        ("unable to open database file", "make /p writable"),
        ("database or disk is full", "free space on it"),
        ("file is not a database", "move it aside"),
        ("no such table: experiments", "check /p/mlflow.db, or set MLFLOW_TRACKING_URI to another store"),
    ],
)
def test_errors_of_a_sqlite_store_name_its_file_never_a_server(said, advice):
    message = str(runs.store_failure("sqlite:////p/mlflow.db", sqlite_error(said)))
    assert message.startswith(f"MLflow tracking store sqlite:////p/mlflow.db cannot be used ({said}")
    assert advice in message and "autoflush" not in message
    assert "server" not in message


def test_errors_of_a_server_keep_the_servers_advice():
    import requests

    exc = RuntimeError("API request to http://mlflow.example failed")  # as MLflow raises it, in requests' error
    exc.__context__ = requests.exceptions.ConnectionError("refused")
    assert runs.transient(exc)
    assert str(runs.store_failure("http://mlflow.example", exc)) == (
        "MLflow tracking store http://mlflow.example cannot be used (cannot connect); "
        "start the server or fix MLFLOW_TRACKING_URI, or set mlflow.enabled: false"
    )


def test_a_server_that_is_down_during_the_run_is_tried_again_quietly(monkeypatch, caplog):
    """MLflow's own HTTP retries log a line each (urllib3's); the stage's warning and last line say it all."""
    import mlflow
    from conftest import LoopbackServer

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    server = LoopbackServer()
    uri = server.url
    server.close()  # nothing listens there now
    runs.set_up_mlflow()
    mlflow.set_tracking_uri(uri)  # as the run's first call sets it
    writes = runs.StoreWrites(uri, wait=60)
    with caplog.at_level(logging.INFO):
        runs._Buffered(writes).MlflowClient().log_model_artifact("m-0123", "/p/model_card.md")
    assert writes.pending and not writes.gave_up and writes.retry_at > time.monotonic()  # tried again later
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        f"MLflow tracking store {uri} did not take a write (cannot connect)"
    ]
    assert writes.failure("evaluate").args[0] == (
        f"MLflow tracking store {uri} was unusable during the run (cannot connect); not recorded: artifacts "
        "(model_card.md); start the server or fix MLFLOW_TRACKING_URI, then rerun evaluate (dvc repro)"
    )


def test_which_failures_are_tried_again():
    assert runs.transient(sqlite_error("database is locked"))
    assert runs.transient(sqlite_error("database or disk is full"))
    assert not runs.transient(sqlite_error("attempt to write a readonly database"))
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    assert runs.transient(MlflowException("try later", error_code=TEMPORARILY_UNAVAILABLE))  # a server's answer
    assert not runs.transient(MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE))


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_a_wait_that_is_no_number_of_seconds_is_named(value, monkeypatch):
    monkeypatch.setenv(runs.STORE_WAIT_VARIABLE, value)
    with pytest.raises(runs.TrackingError, match=rf"^GPT2_CLASSIFIER_STORE_WAIT='{value}' is no number of seconds"):
        runs.store_wait()


def running_run(db) -> bool:
    """Whether `db` holds a run that started and has not ended (read without waiting for locks)."""
    if not db.exists():
        return False
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db, timeout=0.1)) as store:
        return store.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0] > 0
    return False


@pytest.mark.slow
@pytest.mark.long
def test_finetune_outlasts_a_store_locked_until_it_ends_and_the_rerun_records_all_without_training(tmp_path, made_data):
    from conftest import make_project, run, stages_run, tiny_params

    project = make_project(tmp_path / "p", tiny_params(*made_data))
    run(["dvc", "repro", "pad-encode", "fetch-weights"], project)
    db = project / "mlflow.db"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "MLFLOW_TRACKING_URI")}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", runs.STORE_WAIT_VARIABLE: "1"}
    stage = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not running_run(db) and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as lock:  # as another program would
        lock.execute("BEGIN IMMEDIATE")
        out, err = stage.communicate(timeout=600)
        lock.execute("ROLLBACK")
    assert stage.returncode != 0 and "Traceback" not in out + err, err
    warning, error, dvc = err.splitlines()  # nothing else: no traceback, no MLflow logs
    assert warning.startswith(f"gpt2_classifier.tracking.runs: MLflow tracking store sqlite:///{db} did not take")
    assert dvc.startswith("ERROR: failed to reproduce 'finetune'")
    kept = next((project / ".cache" / "checkpoints").glob("*.safetensors"))
    assert error.startswith(
        f"error: MLflow tracking store sqlite:///{db} was unusable during the run (database is locked: another "
        f"program holds a write lock on {db}); not recorded: "
    )
    assert error.endswith(
        "then rerun finetune (dvc repro), which resumes from the training kept in "
        f".cache/checkpoints/{kept.name} instead of training again"
    )
    assert "the model" in error and (project / "reports/train/summary.json").is_file()  # the results were written

    rerun = run(["dvc", "repro"], project)
    assert stages_run(rerun.stdout) == ["download", "finetune", "evaluate"]  # (download: on every repro)
    assert "finetune: resuming after epoch 1" in rerun.stdout  # of 1: nothing left to train
    assert not kept.exists()
    client = MlflowClient(f"sqlite:///{db}")
    run_id = json.loads((project / "reports/train/mlflow_run.json").read_text())["run_id"]
    recorded = client.get_run(run_id)
    summary = json.loads((project / "reports/train/summary.json").read_text())
    assert recorded.info.status == "FINISHED" and recorded.data.tags["resumed_after_epoch"] == "1"
    curve = (project / "reports/train/loss.csv").read_text().splitlines()[1:]
    assert len(client.get_metric_history(run_id, "validation_loss_estimate")) == len(curve) > 1  # every value, replayed
    assert client.get_metric_history(run_id, "lr")
    assert recorded.data.metrics["validation/accuracy"] == pytest.approx(summary["validation/accuracy"])
    assert "test/accuracy" in recorded.data.metrics and recorded.data.params["finetune.lr"] == "0.001"
    assert client.search_logged_models([recorded.info.experiment_id], filter_string=f"source_run_id='{run_id}'")
