"""MLflow tracking: one run per `finetune`, continued by `evaluate` through a small run file.

The default store is a SQLite file, `mlflow.db`, in the project folder (the DVC root,
also for queued experiments that run in a temporary copy), with artifacts beside it in
`mlartifacts/`. `MLFLOW_TRACKING_URI` points runs at another store or a server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.files import project_root, read_validated, write_json
from gpt2_classifier.core.params import MlflowParams
from gpt2_classifier.core.redact import redact, redact_text
from gpt2_classifier.tracking.lineage import (
    Hashed,
    baseline_params,
    changed_params,
    code_differs,
    git_head,
    yaml_value,
)
from gpt2_classifier.tracking.store import create_store

log = logging.getLogger(__name__)
DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


class TrackingError(PipelineError):
    """The tracking store cannot be used."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DEFAULT_DB}"


# MLflow's own defaults wait up to 120 s for an answer and retry 7 times with doubling waits: over
# 20 minutes per call to a server that stopped answering, and a run makes hundreds of calls. Unless
# the user set them, a call gives up after 3 attempts of at most 60 s (about 3 minutes).
HTTP_WAITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
PROBE_TIMEOUT = 10  # seconds the check before a run waits for the server: once, no retries
WHAT_TO_DO = "start the server or fix MLFLOW_TRACKING_URI, or set mlflow.enabled: false"
# A run waits for a store that does not take its writes at most this long in all (seconds; the variable
# sets it); training goes on meanwhile, and what it logs waits in memory.
STORE_WAIT_VARIABLE = "GPT2_CLASSIFIER_STORE_WAIT"
STORE_WAIT = 300.0
RETRY_PAUSE = 30.0  # the longest pause between two tries of a write the store did not take


def sqlite_file(uri: str) -> Path | None:
    """The file of a SQLite store's URI (`sqlite:///mlflow.db`, `sqlite:////abs/mlflow.db`), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def bound_http_waits() -> None:
    """MLflow's HTTP retries and timeouts as HTTP_WAITS has them, where the user did not set them."""
    for key, value in HTTP_WAITS.items():
        os.environ.setdefault(key, value)


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from: MLflow wraps requests' error, which wraps urllib3's, and
    SQLAlchemy's error, which wraps sqlite3's."""
    causes, cause = [], exc
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    return causes


def unreachable(exc: BaseException) -> str | None:
    """Why the store could not be reached ('no answer within N s', 'cannot connect'); None for other errors."""
    import requests
    import urllib3

    causes = _causes(exc)
    if any(isinstance(c, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError)) for c in causes):
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT')} s"
    if any(isinstance(c, requests.exceptions.SSLError) for c in causes):
        return "cannot connect: TLS failed, e.g. an untrusted certificate (MLFLOW_TRACKING_INSECURE_TLS)"
    if any(isinstance(c, requests.exceptions.ConnectionError) for c in causes):
        return "cannot connect"
    return None


def first_line(exc: BaseException) -> str:
    """The start of an MLflow error's message, without the credentials of the URLs in it."""
    line = redact_text((str(exc).splitlines() or [""])[0])  # before cutting: no half password
    return f"{type(exc).__name__}: {line[:200]}"


def sqlite_message(exc: BaseException) -> str | None:
    """What SQLite said, where `exc` comes from an error of SQLite's (through SQLAlchemy and MLflow)."""
    import sqlite3

    for cause in _causes(exc):
        for error in (cause, getattr(cause, "orig", None)):  # SQLAlchemy keeps the driver's error as .orig
            if isinstance(error, sqlite3.Error):
                return str(error)
    return None


# What SQLite's message means for the store's file, and what to do: {db} the file, {folder} its folder.
SQLITE_ADVICE = {
    "database is locked": (
        "another program holds a write lock on {db}",
        "close that program, or save or discard its changes (an SQLite browser with an unsaved edit holds one)",
    ),
    "attempt to write a readonly database": (
        "{db} is read-only",
        "make it and its folder writable (chmod u+w {db} {folder})",
    ),
    "unable to open database file": (
        "SQLite cannot open {db} or write its journal beside it",
        "make {folder} writable, or fix the path in MLFLOW_TRACKING_URI",
    ),
    "database or disk is full": ("the disk that holds {db} is full", "free space on it"),
    "disk i/o error": ("SQLite could not read or write {db}", "check that its disk has space and works"),
    "file is not a database": (
        "{db} is no SQLite database",
        "move it aside (a new store is made) or fix MLFLOW_TRACKING_URI",
    ),
    "database disk image is malformed": (
        "{db} is damaged",
        "restore it from a backup, or move it aside (a new store is made)",
    ),
}
SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database or disk is full", "disk i/o error")
SERVER_FIX = "start the server or fix MLFLOW_TRACKING_URI"


def diagnosis(uri: str, exc: BaseException) -> tuple[str, str | None]:
    """Why the store failed, in words that fit it (its SQLite file's, or its server's), and what to do
    about it where that is known."""
    db = sqlite_file(uri)
    said = sqlite_message(exc) if db is not None else None
    if said is not None:
        names = {"db": db, "folder": db.parent}
        for start, (meaning, fix) in SQLITE_ADVICE.items():
            if said.lower().startswith(start):
                return f"{said}: {meaning.format(**names)}", fix.format(**names)
        return said, None
    reason = unreachable(exc)
    return (reason, SERVER_FIX) if reason else (first_line(exc), None)


def transient(exc: BaseException) -> bool:
    """Whether the store may take the same write later: it is locked or full, cannot be reached, does
    not answer in time, or answered 'try later' (429, 5xx) until MLflow's own retries ran out."""
    import requests

    said = sqlite_message(exc)
    if said is not None:
        return said.lower().startswith(SQLITE_TRANSIENT)
    if unreachable(exc) is not None:
        return True
    causes = _causes(exc)
    return any(isinstance(c, requests.exceptions.RetryError) for c in causes) or any(
        getattr(c, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") for c in causes
    )


def store_failure(uri: str, exc: BaseException, what: str = "cannot be used", fix: str | None = None) -> TrackingError:
    """One line for a store that failed: the URI without credentials, why, and what to do (for a SQLite
    file, what fits its file; for a server, the server's fix)."""
    reason, advice = diagnosis(uri, exc)
    if fix is None:
        db = sqlite_file(uri)
        if advice:
            fix = f"{advice}, or set mlflow.enabled: false"
        elif what == "cannot be used" and db is None:
            fix = WHAT_TO_DO
        elif what == "cannot be used":
            fix = f"check {db}, or set MLFLOW_TRACKING_URI to another store or mlflow.enabled: false"
        else:
            fix = "set mlflow.enabled: false to run without tracking"
    return TrackingError(f"MLflow tracking store {redact(uri)} {what} ({reason}); {fix}")


@contextlib.contextmanager
def quick_http_failures() -> Iterator[None]:
    """MLflow retries HTTP for minutes by default; a reachability probe should not."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT)}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def set_up_mlflow() -> None:
    """What every use of MLflow here starts with: its output quiet, its HTTP waits bounded."""
    _quiet_mlflow()
    bound_http_waits()


def _quiet_mlflow() -> None:
    """Stage output says what the stage did: MLflow's info lines (table creation, input example
    validation, system metrics start and stop) and artifact progress bars stay out of it; its
    warnings still show."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for name in REPORTED_HERE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ReportedHere) for f in logger.filters):
            logger.addFilter(_ReportedHere(REPORTED_HERE[name]))


# What MLflow logs about a store error that reaches our code, which says it in one line: the traceback of
# each failed SQL statement, its system metrics thread's failures (they stop its sampling), and a line
# for each of its HTTP retries (HTTP_WAITS).
REPORTED_HERE = {
    "mlflow.store.db.utils": ("SQLAlchemy database error",),
    "urllib3.connectionpool": ("Retrying (",),
    "mlflow.system_metrics.system_metrics_monitor": ("Failed to get mlflow run", "Failed to log system metrics",
                                                     "Error terminating system metrics"),
}  # fmt: skip


class _ReportedHere(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def _first_call(uri: str) -> Iterator[None]:
    """Point MLflow at `uri` for the first call of a stage, which names a store that cannot be used
    within seconds."""
    import mlflow
    from filelock import FileLock

    set_up_mlflow()
    mlflow.set_tracking_uri(uri)
    # Two runs starting at once on a fresh SQLite file would both try to create its tables.
    db = sqlite_file(uri)
    lock = FileLock(f"{db}.lock") if db is not None else contextlib.nullcontext()
    with lock, quick_http_failures():
        if db is not None and not any(c in str(db) for c in "?:") and not db.exists() and db.parent.is_dir():
            create_store(db)  # not a query string or `:memory:`
        yield


def _create_experiment(uri: str, name: str) -> str:
    """A new experiment, or the one another run created since we looked: runs that start at once
    (`dvc queue start -j 2`) on a server both find no experiment and both create it, and the second
    create is refused (RESOURCE_ALREADY_EXISTS), which would fail that run before it starts."""
    import mlflow
    from mlflow.exceptions import MlflowException

    db = sqlite_file(uri)
    artifacts = (db.parent / ARTIFACTS_DIR).as_uri() if db is not None else None
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
    except MlflowException as exc:
        existing = mlflow.get_experiment_by_name(name) if exc.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if existing is None:
            raise
        return existing.experiment_id


def _use_experiment(uri: str, name: str) -> str:
    """Set the tracking URI and experiment (creating it, with artifacts beside a local store)."""
    import mlflow

    with _first_call(uri):
        try:
            experiment = mlflow.get_experiment_by_name(name)
            deleted = experiment is not None and experiment.lifecycle_stage == "deleted"
            experiment_id = experiment.experiment_id if experiment else _create_experiment(uri, name)
        except Exception as exc:  # MLflow raises many types for an unreachable or broken store
            raise store_failure(uri, exc) from None
    if deleted:
        raise TrackingError(
            f"MLflow experiment '{name}' (mlflow.experiment_name) is deleted in {redact(uri)}; restore it "
            f"(mlflow experiments restore --experiment-id {experiment_id}) or choose another mlflow.experiment_name"
        )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# The tag by which MLflow knows what an experiment holds (model training, not GenAI traces), set when finetune
# creates it (MLflow 3.17's UI asks the address instead: make ui prints the link, tools/ui_link.py).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SHORT_HASH = 8  # hex digits of a hash in a tag: the run's header shows them whole
SYSTEM_METRICS_INTERVAL = 2.0  # seconds between samples of CPU, memory and GPU use (MLflow's default: 10)


class RunRecord(BaseModel):
    """reports/train/mlflow_run.json: the run that `finetune` made, for `evaluate` to continue."""

    run_id: str | None = None  # None: tracking was off
    tracking_uri: str | None = None  # redacted of credentials
    experiment_id: str | None = None
    model_id: str | None = None  # the logged model (MLflow 3), which carries the final metrics
    model_uri: str | None = None

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        if not Path(path).exists():
            return cls()
        return read_validated(cls, path, TrackingError, "rerun finetune (dvc repro -f -s finetune)")


def run_tags(params: dict, validate: Callable[[dict], dict] | None = None) -> dict[str, str]:
    """Where the run's code came from and what it changed: the commit and whether code differs
    from it, the DVC experiment and its baseline, and the params that differ from the baseline's
    params.yaml (as `changed_params` and the run's description)."""
    dirty = code_differs()
    tags = {
        "mlflow.source.git.commit": git_head() or "unknown",
        "python": platform.python_version(),
        "git.dirty": "unknown" if dirty is None else str(dirty).lower(),
    }
    for variable, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    baseline_rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    baseline = baseline_params(baseline_rev)
    if baseline is not None:
        if validate is not None:
            with contextlib.suppress(Exception):  # a baseline of an older schema is compared as written
                baseline = validate(baseline)
        changes = changed_params(
            {k: v for k, v in params.items() if k != "mlflow"}, {k: v for k, v in baseline.items() if k != "mlflow"}
        )
        tags["changed_params"] = "; ".join(changes) or "none"
        where = f"baseline {baseline_rev[:7]}" if baseline_rev != "HEAD" else "the committed params.yaml"
        listed = "\n".join(f"- `{change}`" for change in changes) or "none"
        tags["mlflow.note.content"] = f"Params changed from {where}:\n{listed}"
    return tags


def store_wait() -> float:
    """Seconds a run may wait for its store in all: GPT2_CLASSIFIER_STORE_WAIT, else STORE_WAIT."""
    value = os.environ.get(STORE_WAIT_VARIABLE)
    if value is None or not value.strip():
        return STORE_WAIT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise TrackingError(
            f"{STORE_WAIT_VARIABLE}={value!r} is no number of seconds; set it to one, such as 300, or unset it"
        )
    return seconds


def _written(call: str, args: tuple, kwargs: dict) -> tuple[str, list[str]]:
    """What a write records, for the line that says what was not recorded: ('metrics', their names), ..."""
    if call == "log_metrics":
        return "metrics", list(args[0])
    if call == "log_batch":
        return "metrics", list(dict.fromkeys(m.key for m in kwargs.get("metrics", ())))
    if call in ("log_artifact", "log_model_artifact"):
        return "artifacts", [Path(args[-1] if call == "log_model_artifact" else args[0]).name]
    if call == "log_dict":
        return "artifacts", [args[1]]
    if call == "log_input":
        return "datasets", [kwargs.get("context") or "?"]
    return {"log_params": "params", "set_tags": "tags", "set_model_version_tag": "model version tags"}[call], []


class StoreWrites:
    """A run's writes to its tracking store, so that a store that is briefly locked, unreachable or slow
    never stops the training: a write the store does not take waits in memory, in order with those after
    it, and is tried again on a later write (after a pause that doubles up to RETRY_PAUSE, training going
    on meanwhile) and at the run's end (`finish`). Time spent waiting on a failing store counts against
    `wait` seconds in all; once they are spent, nothing more is tried and the run ends with one line
    naming what was not recorded. A write the store refuses for good (an invalid value) is dropped and
    named there too."""

    def __init__(self, uri: str, wait: float):
        self.uri, self.wait = uri, wait
        self.pending: deque[tuple[tuple[str, list[str]], Callable[[], Any]]] = deque()
        self.refused: list[tuple[str, list[str]]] = []
        self.error: BaseException | None = None  # why the store failed last
        self.refusal: BaseException | None = None  # why it refused the first write it refused
        self.waited = 0.0
        self.tries = 0  # failed in a row
        self.retry_at = 0.0
        self.gave_up = False

    @property
    def behind(self) -> bool:
        """Something logged is not in the store (yet, or for good)."""
        return bool(self.pending or self.refused)

    def write(self, what: tuple[str, list[str]], call: Callable[[], Any], wait: bool = False) -> None:
        self.pending.append((what, call))
        self.flush(wait)

    def call(self, what: str, call: Callable[[], Any]) -> Any:
        """`call()`'s result, once every write before it is in; tried as writes are, waiting for the store.
        None where the store stays unusable or refuses it (then it is named at the end)."""
        result: list[Any] = []
        self.write((what, []), lambda: result.append(call()), wait=True)
        return result[0] if result else None

    def flush(self, wait: bool = False) -> bool:
        """Try the writes that wait, oldest first, until one fails; with `wait`, pause and try again until all
        are in or the wait is spent. True when none is left waiting."""
        while self.pending and not self.gave_up:
            pause = self.retry_at - time.monotonic()
            if pause > 0:
                if not wait:
                    return False
                pause = min(pause, self.wait - self.waited)
                time.sleep(max(pause, 0))
                self.waited += max(pause, 0)
            what, call = self.pending[0]
            start = time.monotonic()
            try:
                call()
            except Exception as exc:  # MLflow raises many types for a store that fails
                self._failed(what, exc, time.monotonic() - start)
                continue
            self.pending.popleft()
            if self.tries:
                log.info("MLflow tracking store %s takes writes again", redact(self.uri))
            self.tries = 0
        return not self.pending

    def _failed(self, what: tuple[str, list[str]], exc: Exception, seconds: float) -> None:
        if not transient(exc):
            self.pending.popleft()
            self.refused.append(what)
            self.refusal = self.refusal or exc
            log.debug("MLflow tracking store %s refused a write: %s", redact(self.uri), first_line(exc))
            return
        self.error, self.waited, self.tries = exc, self.waited + seconds, self.tries + 1
        if self.tries == 1:  # once an outage: the stage's last line says what came of it
            log.warning(
                "MLflow tracking store %s did not take a write (%s); the stage goes on and tries again later, "
                "waiting for the store %.0f s at most in all (%s)",
                redact(self.uri), diagnosis(self.uri, exc)[0], self.wait, STORE_WAIT_VARIABLE,
            )  # fmt: skip
        if self.waited >= self.wait:
            self.gave_up = True
            return
        self.retry_at = time.monotonic() + min(2.0 ** (self.tries - 1), RETRY_PAUSE)

    def finish(self) -> bool:
        """All writes in, waiting for the store as long as `wait` allows; True when nothing is missing."""
        self.flush(wait=True)
        return not self.behind

    def missing(self) -> str:
        """What was not recorded, in short: 'metrics (train_loss, val_loss), params, the model'."""
        kinds: dict[str, dict[str, None]] = {}
        for kind, names in [what for what, _ in self.pending] + self.refused:
            kinds.setdefault(kind, {}).update(dict.fromkeys(names))
        parts = []
        for kind, names in kinds.items():
            listed = list(names)[:6] + ([f"{len(names) - 6} more"] if len(names) > 6 else [])
            parts.append(f"{kind} ({', '.join(listed)})" if names else kind)
        return ", ".join(parts)

    def failure(self, stage: str, kept: Path | None = None) -> TrackingError:
        """The one line that ends a run whose store missed writes: which store and why, what is missing,
        and how to record it (the rerun; with the training `kept`, it does not train again)."""
        exc = self.error if self.pending else self.refusal
        reason, advice = diagnosis(self.uri, exc) if exc else ("?", None)
        state = "was unusable during the run" if self.pending else "refused writes during the run"
        first = advice or ("once it works again" if self.pending else "set mlflow.enabled: false to track nothing")
        again = f", which resumes from the training kept in {_shown(kept)} instead of training again" if kept else ""
        return TrackingError(
            f"MLflow tracking store {redact(self.uri)} {state} ({reason}); not recorded: {self.missing()}; "
            f"{first}, then rerun {stage} (dvc repro){again}"
        )


def _shown(path: Path) -> str:
    """`path` as the user knows it: relative to the project where it is inside."""
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(project_root()))
    return str(path)


class _Buffered:
    """Stands in for the `mlflow` module (or an MlflowClient) in the Tracker's logging calls: each call that
    writes to the run goes through StoreWrites, retried and buffered."""

    CALLS = frozenset({"log_params", "log_metrics", "set_tags", "log_dict", "log_artifact", "log_input",
                       "log_batch", "log_model_artifact", "set_model_version_tag"})  # fmt: skip

    def __init__(self, writes: StoreWrites, client: bool = False):
        self._writes, self._client = writes, client

    def MlflowClient(self) -> _Buffered:  # noqa: N802 (MLflow's name)
        return _Buffered(self._writes, client=True)

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name not in self.CALLS:
            raise AttributeError(f"{name} is no write to the tracking store")

        def write(*args: Any, **kwargs: Any) -> None:
            import mlflow

            if name == "log_metrics":  # when it was measured, also if it is written later
                kwargs.setdefault("timestamp", int(time.time() * 1000))
            client = self._client
            self._writes.write(
                _written(name, args, kwargs),
                lambda: getattr(mlflow.MlflowClient() if client else mlflow, name)(*args, **kwargs),
            )

        return write


class Tracker:
    """Logs to one MLflow run, or does nothing when tracking is off."""

    def __init__(self, run_id: str | None, where: str = "MLflow off", writes: StoreWrites | None = None):
        self.run_id = run_id
        self.where = where  # for the stage's last line
        self.model_id: str | None = None
        self.model_uri: str | None = None
        self.writes = writes or StoreWrites("", 0.0)  # each write retried and buffered (tracking off: unused)
        self.kept: Path | None = None  # the training, kept while the store misses what it logged

    def caught_up(self) -> bool:
        """Whether everything logged so far is in the store, waiting for it (within its wait) if need be."""
        return not self.run_id or self.writes.finish()

    def log_model(self, log: Callable[[int], Any], step: int) -> None:
        """The run's model, logged by `log(step)` (which returns MLflow's ModelInfo); it carries the metrics
        logged at `step`. Tracking knows no model: the stage says how its model is logged."""
        if self.run_id:
            info = self.writes.call("the model", lambda: log(step))
            if info is not None:
                self.model_id, self.model_uri = info.model_id, info.model_uri

    def register(self, model_uri: str, name: str, test_accuracy: float) -> str | None:
        """A new version of `name` in the Model Registry, tagged with its test accuracy."""
        if not self.run_id:
            return None
        import mlflow

        version = self.writes.call("the registered version", lambda: mlflow.register_model(model_uri, name).version)
        if version is None:
            return None
        client = _Buffered(self.writes).MlflowClient()
        client.set_model_version_tag(name, version, "test_accuracy", f"{test_accuracy:.6f}")
        client.set_model_version_tag(name, version, "run_id", self.run_id)
        return version

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id:
            mlflow = _Buffered(self.writes)

            mlflow.log_params({k: yaml_value(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None:
        if self.run_id:
            mlflow = _Buffered(self.writes)

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, model_id=model_id)

    def log_series(self, key: str, points: list[tuple[int, float]]) -> None:
        """Many values of one metric at once, each at its step (MLflow's batch call, 1000 values a request)."""
        if self.run_id and points:
            from mlflow.entities import Metric

            mlflow = _Buffered(self.writes)

            now = int(time.time() * 1000)
            metrics = [Metric(key, float(value), now, step) for step, value in points]
            for start in range(0, len(metrics), 1000):
                mlflow.MlflowClient().log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_artifacts(self, paths: list[Path], folder: str | None = None) -> None:
        if self.run_id:
            mlflow = _Buffered(self.writes)

            for path in paths:
                if Path(path).exists():
                    mlflow.log_artifact(str(path), artifact_path=folder)

    def log_model_artifacts(self, paths: list[Path]) -> None:
        """Files stored with the run's logged model (MLflow 3), beside its own."""
        if self.run_id and self.model_id:
            mlflow = _Buffered(self.writes)

            for path in paths:
                mlflow.MlflowClient().log_model_artifact(self.model_id, str(path))

    def log_datasets(self, files: dict[str, Path]) -> None:
        """Each split's CSV as an MLflow dataset input (its digest, schema and row count)."""
        if self.run_id:
            import mlflow
            import pandas as pd

            with warnings.catch_warnings():  # MLflow's hints about integer columns and ambiguous local sources
                warnings.simplefilter("ignore", UserWarning)
                for name, file in files.items():
                    frame = pd.read_csv(file, dtype={"text": str}, keep_default_na=False)
                    dataset = mlflow.data.from_pandas(frame, source=str(file), name=name, targets="label")
                    _Buffered(self.writes).log_input(dataset, context=name)

    def log_lineage(self, stage: str, inputs: Future[Hashed] | None, outputs: dict[str, Path]) -> None:
        """A tag `input.<name>` or `output.<name>` per path (short keys: MLflow's UI cuts long ones), holding
        the first SHORT_HASH digits of DVC's hash of it as this run found (`inputs`, hashed since the run
        began: see `hash_in_background`) or wrote it, as git shortens a commit; the whole hashes, and that
        of every file, are in `lineage/<stage>.json`."""
        if not self.run_id:
            return
        from gpt2_classifier.tracking.lineage import path_hashes

        mlflow = _Buffered(self.writes)

        tags, record = {}, {"inputs": {}, "outputs": {}}
        for kind, hashed in (("inputs", inputs.result() if inputs else {}), ("outputs", path_hashes(outputs))):
            for name, (path, md5, files) in hashed.items():
                tags[f"{kind.removesuffix('s')}.{name}"] = md5[:SHORT_HASH]
                record[kind][path.as_posix()] = {"md5": md5, "files": files}
        mlflow.set_tags(tags)
        mlflow.log_dict(record, f"lineage/{stage}.json")

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            mlflow = _Buffered(self.writes)

            mlflow.set_tags(tags)


def _start_system_metrics(enabled: bool) -> bool:
    if enabled:
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_INTERVAL))
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    return enabled


@contextlib.contextmanager
def finetune_run(settings: MlflowParams, run_file: Path, run_name: str, tags: dict[str, str]) -> Iterator[Tracker]:
    """A new run for this training; its record is written to `run_file` when training succeeds.

    A failure inside marks the run FAILED; Ctrl-C marks it KILLED. A store that stops taking writes
    during the run does not stop it (StoreWrites); if it missed some at the end, the run fails with
    one line that names them.
    """
    if not settings.enabled:
        yield Tracker(None)
        write_json(run_file, RunRecord().model_dump())
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    writes = StoreWrites(uri, store_wait())
    experiment_id = _use_experiment(uri, settings.experiment_name)
    try:
        run = mlflow.start_run(
            run_name=run_name, tags=tags, log_system_metrics=_start_system_metrics(settings.system_metrics)
        )
    except MlflowException as exc:
        raise store_failure(uri, exc, "could not start a run") from None
    with _ending_run(uri, writes, run.info.run_id):
        tracker = Tracker(run.info.run_id, f"MLflow run {run_name} ({run.info.run_id}) in {redact(uri)}", writes)
        yield tracker
        if not writes.finish():
            raise writes.failure("finetune", tracker.kept)
        record = RunRecord(
            run_id=run.info.run_id,
            tracking_uri=redact(uri),
            experiment_id=experiment_id,
            model_id=tracker.model_id,
            model_uri=tracker.model_uri,
        )
        write_json(run_file, record.model_dump())


@contextlib.contextmanager
def _ending_run(uri: str, writes: StoreWrites, run_id: str) -> Iterator[None]:
    """The active run (`run_id`) ends with its block: FINISHED where the block completes, KILLED on Ctrl-C, else
    FAILED."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _end_run(uri, writes, status)
        log.debug("MLflow run %s %s in %s", run_id, status.lower(), redact(uri))


def _end_run(uri: str, writes: StoreWrites, status: str) -> None:
    """End the active run with `status`; after a failure, with what the run logged before it, where the
    store takes that at once. A store given up on is asked once, without MLflow's HTTP retries."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if status == "FAILED":
        writes.flush()
    try:
        with quick_http_failures() if writes.gave_up else contextlib.nullcontext():
            mlflow.end_run(status=status)
    except MlflowException as exc:
        if status == "FINISHED":  # else the error that ended the run is the one to report
            raise store_failure(uri, exc, "could not end the run") from None


@contextlib.contextmanager
def continue_run(settings: MlflowParams, run_file: Path) -> Iterator[tuple[Tracker, RunRecord]]:
    """Reopen the run that `finetune` recorded in `run_file`, so evaluation lands on it."""
    record = RunRecord.read(run_file)
    if not settings.enabled or record.run_id is None:
        yield Tracker(None), record
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    writes = StoreWrites(uri, store_wait())
    with _first_call(uri):
        try:
            run = mlflow.get_run(record.run_id)
        except Exception as exc:
            if unreachable(exc) or getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise store_failure(uri, exc) from None
            raise TrackingError(
                f"{run_file}: run {record.run_id} is not in {redact(uri)}; rerun finetune (dvc repro -f -s finetune) "
                "or point MLFLOW_TRACKING_URI at the store that holds it"
            ) from None
    try:  # the run's own experiment, even if mlflow.experiment_name changed since
        mlflow.set_experiment(experiment_id=run.info.experiment_id)
    except MlflowException as exc:  # such as a deleted experiment
        raise store_failure(uri, exc, f"cannot continue run {record.run_id}") from None

    try:
        mlflow.start_run(run_id=record.run_id, log_system_metrics=_start_system_metrics(settings.system_metrics))
    except MlflowException as exc:
        raise store_failure(uri, exc, f"cannot continue run {record.run_id}") from None
    with _ending_run(uri, writes, record.run_id):
        tracker = Tracker(record.run_id, writes=writes)
        tracker.model_id, tracker.model_uri = record.model_id, record.model_uri
        yield tracker, record
        if not writes.finish():
            raise writes.failure("evaluate")
