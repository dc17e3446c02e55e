"""The classifier as an MLflow pyfunc model (`ClassifierModel`): what `mlflow.pyfunc.load_model` returns
and `mlflow models serve` serves. pyfunc_entry.py hands it to MLflow (models from code); logged_model.py
logs it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd

# While `log_classifier` runs: the classifier MLflow loaded, by its folder's content. MLflow loads the
# model twice as it logs it (to infer the output schema from the input example, then to check that the
# saved copy serves it); the second load takes the first one's instead of reading the base weights and
# building the model again (500 MB for GPT-2, 6 GB for gpt2-xl).
_logging: dict[tuple[bytes, int], object] | None = None


def _content(folder: Path) -> tuple[bytes, int]:
    """A classifier folder's config and the size of its tensors: within one `log_classifier`, MLflow
    loads only the folder given to it and its own copy of that folder."""
    from gpt2_classifier.model.pretrained import CONFIG_FILE, WEIGHTS_FILE

    return (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).stat().st_size


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Input: messages, as a list of strings or a one-column DataFrame (such as `text`; MLflow turns
    it into the list, from the type hint). Output: one row per message with `label` and
    `p_<label>` for every label."""

    def load_context(self, context) -> None:
        from gpt2_classifier.serve.predict import TextClassifier

        folder = Path(context.artifacts["classifier"])
        if _logging is None:
            self.classifier = TextClassifier.from_folder(folder)
            return
        key = _content(folder)
        if key not in _logging:
            _logging[key] = TextClassifier.from_folder(folder)
        self.classifier = _logging[key]

    def predict(self, context, model_input: list[str], params=None) -> pd.DataFrame:
        return pd.DataFrame(self.classifier.predict([str(text) for text in model_input]))


@contextlib.contextmanager
def loads_shared() -> Iterator[None]:
    """While logging a model: MLflow's second load of it takes the first one's classifier."""
    global _logging
    _logging = {}
    try:
        yield
    finally:
        _logging = None
