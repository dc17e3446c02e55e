"""The classifier's predictions on every split, as finetune writes them and evaluate reads them.

One CSV per split (reports/predictions/<split>.csv), row i for row i of data/split/<split>.csv:
the actual and the predicted class, then each class's probability (`prob_<class>`), written so
that reading it back gives the same float32 values. numpy only: evaluate needs no torch."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.textfiles import csv_reader

PREFIX = "prob_"


@dataclass(frozen=True)
class Predictions:
    classes: list[str]
    labels: np.ndarray  # (n,) int64: the actual class of each row
    probs: np.ndarray  # (n, classes) float32


def write_predictions(path: str | os.PathLike, predictions: Predictions) -> None:
    classes = predictions.classes
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["actual", "predicted", *(PREFIX + name for name in classes)])
        predicted = predictions.probs.argmax(1)
        for label, guess, row in zip(predictions.labels, predicted, predictions.probs.tolist(), strict=True):
            writer.writerow([classes[label], classes[guess], *(repr(p) for p in row)])


def read_predictions(path: str | os.PathLike) -> Predictions:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv_reader(f))
        header = rows[0]
        classes = [name.removeprefix(PREFIX) for name in header[2:]]
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[row[0]] for row in rows[1:]], dtype=np.int64)
        probs = np.array([[float(p) for p in row[2:]] for row in rows[1:]], dtype=np.float32)
    except (OSError, IndexError, KeyError, ValueError) as exc:
        raise PipelineError(f"{path}: not the predictions finetune writes ({exc}); run `dvc repro finetune`") from None
    return Predictions(classes, labels, probs.reshape(len(labels), len(classes)))
