"""MLflow tracking: one run per `finetune`, continued by `evaluate` through a small run file.

The default store is a SQLite file, `mlflow.db`, in the project folder (the DVC root,
also for queued experiments that run in a temporary copy), with artifacts beside it in
`mlartifacts/`. `MLFLOW_TRACKING_URI` points runs at another store or a server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from .download import redact
from .errors import PipelineError
from .files import project_root, read_json, write_json

log = logging.getLogger(__name__)
DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


class TrackingError(PipelineError):
    """The tracking store cannot be used."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DEFAULT_DB}"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and other leaves are kept as values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def lineage_tags() -> dict[str, str]:
    """Git commit and dirtiness, DVC experiment, and the content hashes DVC recorded for the inputs."""
    tags = {"mlflow.source.git.commit": _git("rev-parse", "HEAD") or "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags["git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    tags |= {f"dvc.md5.{path}": md5 for path, md5 in dvc_out_hashes().items()}
    return tags


def dvc_out_hashes(lock_path: str | os.PathLike = "dvc.lock") -> dict[str, str]:
    """Output path -> content hash, as DVC recorded them in dvc.lock for the finished stages."""
    try:
        lock = yaml.safe_load(Path(lock_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {
        out["path"]: out.get("md5") or out.get("hash", "")
        for stage in lock.get("stages", {}).values()
        for out in stage.get("outs", [])
    }


@contextlib.contextmanager
def _quick_http_failures() -> Iterator[None]:
    """MLflow retries HTTP for minutes by default; a reachability probe should not."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _use_experiment(uri: str, name: str) -> str:
    """Set the tracking URI and experiment (creating it, with artifacts beside a local store)."""
    import mlflow
    from filelock import FileLock

    mlflow.set_tracking_uri(uri)
    local = uri.startswith("sqlite:///")
    # Two runs starting at once on a fresh SQLite file would both try to create its tables.
    lock = FileLock(uri.removeprefix("sqlite:///") + ".lock") if local else contextlib.nullcontext()
    try:
        with lock, _quick_http_failures():
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                artifacts = (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).as_uri() if local else None
                experiment_id = mlflow.create_experiment(name, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
    except Exception as exc:  # MLflow raises many types for an unreachable or broken store
        reason = str(exc).splitlines()[0][:200]
        raise TrackingError(
            f"MLflow tracking store {redact(uri)} cannot be used ({type(exc).__name__}: {reason}); "
            "start the server or fix MLFLOW_TRACKING_URI, or set mlflow.enabled: false"
        ) from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def default_run_name(params: dict) -> str:
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return exp
    return f"{params['model']['name']}-{params['model']['weights']}-{datetime.now():%Y%m%d-%H%M%S}"


class Tracker:
    """Logs to one MLflow run, or does nothing when tracking is off."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.model_uri: str | None = None

    def log_classifier(self, folder: Path) -> None:
        """The classifier as an MLflow model (pyfunc) of this run."""
        if self.run_id:
            from .mlflow_model import log_classifier

            self.model_uri = log_classifier(folder)

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

            mlflow.log_params({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, paths: list[Path], folder: str | None = None) -> None:
        if self.run_id:
            import mlflow

            for path in paths:
                if Path(path).exists():
                    mlflow.log_artifact(str(path), artifact_path=folder)

    def log_datasets(self, frames: dict[str, Any], sources: dict[str, str]) -> None:
        if self.run_id:
            import mlflow

            with warnings.catch_warnings():  # MLflow's hints about integer columns and ambiguous local sources
                warnings.simplefilter("ignore", UserWarning)
                for name, frame in frames.items():
                    dataset = mlflow.data.from_pandas(frame, source=sources[name], name=name, targets="label")
                    mlflow.log_input(dataset, context=name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags(tags)


@contextlib.contextmanager
def finetune_run(params: dict, run_file: Path) -> Iterator[Tracker]:
    """A new run for this training; its id is written to `run_file` when training succeeds.

    A failure inside marks the run FAILED; Ctrl-C marks it KILLED.
    """
    settings = params.get("mlflow", {})
    if not settings.get("enabled", True):
        yield Tracker(None)
        write_json(run_file, {"run_id": None, "tracking_uri": None})
        return
    import mlflow

    uri = tracking_uri()
    experiment_id = _use_experiment(uri, settings.get("experiment_name", "gpt2-classifier"))
    run = mlflow.start_run(run_name=default_run_name(params))
    status = "FAILED"
    try:
        tracker = Tracker(run.info.run_id)
        tracker.set_tags(lineage_tags() | {"stage": "finetune", "python": platform.python_version()})
        yield tracker
        write_json(run_file, {"run_id": run.info.run_id, "tracking_uri": redact(uri), "experiment_id": experiment_id,
                              "model_uri": tracker.model_uri})  # fmt: skip
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)
        log.info("MLflow run %s %s in %s", run.info.run_id, status.lower(), redact(uri))


@contextlib.contextmanager
def continue_run(params: dict, run_file: Path) -> Iterator[Tracker]:
    """Reopen the run that `finetune` wrote to `run_file`, so evaluation lands on it."""
    settings = params.get("mlflow", {})
    recorded = read_json(run_file) if Path(run_file).exists() else {}
    run_id = recorded.get("run_id")
    if not settings.get("enabled", True) or run_id is None:
        yield Tracker(None)
        return
    import mlflow

    uri = tracking_uri()
    _use_experiment(uri, settings.get("experiment_name", "gpt2-classifier"))
    try:
        mlflow.get_run(run_id)
    except Exception:
        raise TrackingError(
            f"{run_file}: run {run_id} is not in {redact(uri)}; rerun finetune (dvc repro -f -s finetune) "
            "or point MLFLOW_TRACKING_URI at the store that holds it"
        ) from None
    with mlflow.start_run(run_id=run_id):
        yield Tracker(run_id)
