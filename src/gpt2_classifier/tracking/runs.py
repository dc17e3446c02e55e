"""MLflow tracking: one run per `finetune`, continued by `evaluate` through a small run file.

The default store is a SQLite file, `mlflow.db`, in the project folder (the DVC root,
also for queued experiments that run in a temporary copy), with artifacts beside it in
`mlartifacts/`. `MLFLOW_TRACKING_URI` points runs at another store or a server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import warnings
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


def sqlite_file(uri: str) -> Path | None:
    """The file of a SQLite store's URI (`sqlite:///mlflow.db`, `sqlite:////abs/mlflow.db`), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def bound_http_waits() -> None:
    """MLflow's HTTP retries and timeouts as HTTP_WAITS has them, where the user did not set them."""
    for key, value in HTTP_WAITS.items():
        os.environ.setdefault(key, value)


def unreachable(exc: BaseException) -> str | None:
    """Why the store could not be reached ('no answer within N s', 'cannot connect'); None for other errors."""
    import requests
    import urllib3

    causes, cause = [], exc
    while cause is not None and len(causes) < 10:  # MLflow wraps requests' error, which wraps urllib3's
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
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


def store_failure(uri: str, exc: BaseException, what: str = "cannot be used", fix: str | None = None) -> TrackingError:
    """One line for a store that failed: the URI without credentials, why, and what to do."""
    reason = unreachable(exc)
    if fix is None:
        fix = WHAT_TO_DO if reason or what == "cannot be used" else "set mlflow.enabled: false to run without tracking"
    return TrackingError(f"MLflow tracking store {redact(uri)} {what} ({reason or first_line(exc)}); {fix}")


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
        return mlflow.create_experiment(name, artifact_location=artifacts)
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
            if not deleted and (experiment.tags if experiment else {}).get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                # mlflow ui opens the experiment on its training runs, not on GenAI traces
                mlflow.MlflowClient().set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        except Exception as exc:  # MLflow raises many types for an unreachable or broken store
            raise store_failure(uri, exc) from None
    if deleted:
        raise TrackingError(
            f"MLflow experiment '{name}' (mlflow.experiment_name) is deleted in {redact(uri)}; restore it "
            f"(mlflow experiments restore --experiment-id {experiment_id}) or choose another mlflow.experiment_name"
        )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# The tag by which MLflow's UI knows what an experiment holds (here: model training, not GenAI traces).
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


class Tracker:
    """Logs to one MLflow run, or does nothing when tracking is off."""

    def __init__(self, run_id: str | None, where: str = "MLflow off"):
        self.run_id = run_id
        self.where = where  # for the stage's last line
        self.model_id: str | None = None
        self.model_uri: str | None = None

    def log_model(self, log: Callable[[int], Any], step: int) -> None:
        """The run's model, logged by `log(step)` (which returns MLflow's ModelInfo); it carries the metrics
        logged at `step`. Tracking knows no model: the stage says how its model is logged."""
        if self.run_id:
            info = log(step)
            self.model_id, self.model_uri = info.model_id, info.model_uri

    def register(self, model_uri: str, name: str, test_accuracy: float) -> str | None:
        """A new version of `name` in the Model Registry, tagged with its test accuracy."""
        if not self.run_id:
            return None
        import mlflow

        version = mlflow.register_model(model_uri, name).version
        client = mlflow.MlflowClient()
        client.set_model_version_tag(name, version, "test_accuracy", f"{test_accuracy:.6f}")
        client.set_model_version_tag(name, version, "run_id", self.run_id)
        return version

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_params({k: yaml_value(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, model_id=model_id)

    def log_series(self, key: str, points: list[tuple[int, float]]) -> None:
        """Many values of one metric at once, each at its step (MLflow's batch call, 1000 values a request)."""
        if self.run_id and points:
            import time

            import mlflow
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(key, float(value), now, step) for step, value in points]
            for start in range(0, len(metrics), 1000):
                mlflow.MlflowClient().log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_artifacts(self, paths: list[Path], folder: str | None = None) -> None:
        if self.run_id:
            import mlflow

            for path in paths:
                if Path(path).exists():
                    mlflow.log_artifact(str(path), artifact_path=folder)

    def log_model_artifacts(self, paths: list[Path]) -> None:
        """Files stored with the run's logged model (MLflow 3), beside its own."""
        if self.run_id and self.model_id:
            import mlflow

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
                    mlflow.log_input(dataset, context=name)

    def log_lineage(self, stage: str, inputs: Future[Hashed] | None, outputs: dict[str, Path]) -> None:
        """A tag `input.<name>` or `output.<name>` per path (short keys: MLflow's UI cuts long ones), holding
        the first SHORT_HASH digits of DVC's hash of it as this run found (`inputs`, hashed since the run
        began: see `hash_in_background`) or wrote it, as git shortens a commit; the whole hashes, and that
        of every file, are in `lineage/<stage>.json`."""
        if not self.run_id:
            return
        import mlflow

        from gpt2_classifier.tracking.lineage import path_hashes

        tags, record = {}, {"inputs": {}, "outputs": {}}
        for kind, hashed in (("inputs", inputs.result() if inputs else {}), ("outputs", path_hashes(outputs))):
            for name, (path, md5, files) in hashed.items():
                tags[f"{kind.removesuffix('s')}.{name}"] = md5[:SHORT_HASH]
                record[kind][path.as_posix()] = {"md5": md5, "files": files}
        mlflow.set_tags(tags)
        mlflow.log_dict(record, f"lineage/{stage}.json")

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags(tags)


def _start_system_metrics(enabled: bool) -> bool:
    if enabled:
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_INTERVAL))
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    return enabled


@contextlib.contextmanager
def finetune_run(settings: MlflowParams, run_file: Path, run_name: str, tags: dict[str, str]) -> Iterator[Tracker]:
    """A new run for this training; its record is written to `run_file` when training succeeds.

    A failure inside marks the run FAILED; Ctrl-C marks it KILLED.
    """
    if not settings.enabled:
        yield Tracker(None)
        write_json(run_file, RunRecord().model_dump())
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    experiment_id = _use_experiment(uri, settings.experiment_name)
    try:
        run = mlflow.start_run(
            run_name=run_name, tags=tags, log_system_metrics=_start_system_metrics(settings.system_metrics)
        )
    except MlflowException as exc:
        raise store_failure(uri, exc, "could not start a run") from None
    status = "FAILED"
    try:
        tracker = Tracker(run.info.run_id, f"MLflow run {run_name} ({run.info.run_id}) in {redact(uri)}")
        yield tracker
        record = RunRecord(
            run_id=run.info.run_id,
            tracking_uri=redact(uri),
            experiment_id=experiment_id,
            model_id=tracker.model_id,
            model_uri=tracker.model_uri,
        )
        write_json(run_file, record.model_dump())
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except MlflowException as exc:  # the store stopped answering, or refused what was logged
        raise store_failure(uri, exc, "failed during the run") from None
    finally:
        try:
            mlflow.end_run(status=status)
        except MlflowException as exc:
            if status == "FINISHED":  # else the error that ended the run is the one to report
                raise store_failure(uri, exc, "could not end the run") from None
        log.debug("MLflow run %s %s in %s", run.info.run_id, status.lower(), redact(uri))


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
        with mlflow.start_run(run_id=record.run_id, log_system_metrics=_start_system_metrics(settings.system_metrics)):
            tracker = Tracker(record.run_id)
            tracker.model_id, tracker.model_uri = record.model_id, record.model_uri
            yield tracker, record
    except MlflowException as exc:  # the store stopped answering, or refused what was logged
        raise store_failure(uri, exc, "failed during the run") from None
