"""The evaluate stage's work: from the classifier's predictions on the full splits (finetune writes
them, with the model in memory), accuracy, precision, recall and F1, and the test set's confusion
matrix and ROC, written for DVC and logged to finetune's MLflow run and model. No torch here."""

from __future__ import annotations

import re

import numpy as np

from gpt2_classifier.core.files import write_json, write_rows
from gpt2_classifier.core.params import Params
from gpt2_classifier.core.paths import EVAL_REPORTS, METRICS, PREDICTIONS, RUN_FILE, SPLITS
from gpt2_classifier.metrics.classification import (
    classification_report,
    confusion_matrix,
    per_class_report,
    roc_auc,
    roc_curve,
)
from gpt2_classifier.metrics.decision import DECISION_FILE, Decision
from gpt2_classifier.metrics.plots import plot_confusion
from gpt2_classifier.metrics.predictions import Predictions, read_predictions
from gpt2_classifier.tracking.runs import continue_run


def evaluate(params: Params) -> dict[str, dict[str, float]]:
    with continue_run(params.mlflow, RUN_FILE) as (tracker, record):
        predictions = {name: read_predictions(PREDICTIONS / f"{name}.csv") for name in SPLITS}
        metrics = {
            name: classification_report(p.labels, p.probs) | per_class_report(p.labels, p.probs, p.classes)
            for name, p in predictions.items()
        }
        decision = Decision.read(PREDICTIONS / DECISION_FILE)
        if decision.threshold is not None:  # beside argmax's: where the classifier's threshold puts them
            for name in ("validation", "test"):
                metrics[name]["at_threshold"] = report_at_threshold(predictions[name], decision)
        test_auc = write_test_reports(predictions["test"], decision)
        if test_auc is not None:
            metrics["test"]["roc_auc"] = test_auc
        write_json(METRICS, metrics)
        # At the training's last step, where the logged model reads its metrics.
        flat = {metric_key(split, *keys): value for split, values in metrics.items() for keys, value in leaves(values)}
        tracker.log_metrics(flat, step=record.step, model_id=record.model_id)
        reports = [EVAL_REPORTS / name for name in ("confusion.png", "confusion.csv", "roc.csv")]
        tracker.log_artifacts([METRICS, *reports], "evaluate")
        tracker.log_lineage("evaluate", inputs=None, outputs={"metrics": METRICS})
        register_as = params.mlflow.register_as
        if register_as and record.model_uri:
            version = tracker.register(record.model_uri, register_as, metrics["test"]["accuracy"])
            print(f"evaluate: registered {register_as} version {version}")
    print("evaluate: accuracy " + ", ".join(f"{name} {metrics[name]['accuracy']:.2%}" for name in SPLITS))
    return metrics


def leaves(tree: dict, keys: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], float]]:
    """(path of keys, value) of every number in nested dicts."""
    found = []
    for key, value in tree.items():
        found += leaves(value, (*keys, key)) if isinstance(value, dict) else [((*keys, key), value)]
    return found


def metric_key(*parts: str) -> str:
    """An MLflow metric name: test/accuracy, test/per_class/<class>/f1 (a class name's characters that
    MLflow refuses in names, '/' among them, become '_')."""
    return "/".join(re.sub(r"[^\w.\- :]", "_", part) for part in parts)


def report_at_threshold(p: Predictions, decision: Decision) -> dict[str, float]:
    """The threshold, and accuracy, precision, recall and F1 of the labels it gives."""
    decided = np.eye(len(p.classes))[decision.predict(decision.calibrate(p.probs))]  # one-hot: its argmax
    return {"threshold": decision.threshold} | classification_report(p.labels, decided)


def write_test_reports(test: Predictions, decision: Decision) -> float | None:
    """The test set's predictions as the classifier decides (confusion.csv, for dvc plots), their
    confusion matrix (PNG) and the ROC (roc.csv: of the positive class for two labels, one-vs-rest per
    label for more). Returns the ROC AUC for two labels."""
    labels, names = test.labels, test.classes
    probs = decision.calibrate(test.probs)
    predicted = decision.predict(probs)
    EVAL_REPORTS.mkdir(parents=True, exist_ok=True)
    pairs = zip(labels.tolist(), predicted.tolist(), strict=True)
    write_rows(EVAL_REPORTS / "confusion.csv", [{"actual": names[a], "predicted": names[p]} for a, p in pairs])
    plot_confusion(confusion_matrix(labels, predicted, len(names)).tolist(), names, EVAL_REPORTS / "confusion.png")
    positives = [1] if len(names) == 2 else range(len(names))
    curves = {c: roc_curve((labels == c).astype(np.int64), probs[:, c]) for c in positives}
    write_rows(EVAL_REPORTS / "roc.csv", [{"class": names[c], **p} for c, points in curves.items() for p in points])
    return roc_auc(curves[1]) if len(names) == 2 else None
