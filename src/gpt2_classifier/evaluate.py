"""The evaluate stage's work: from the classifier's predictions on the full splits (finetune writes
them, with the model in memory), accuracy, precision, recall, F1, log loss, Brier score and ECE, and
the test set's confusion matrix, ROC, precision-recall curve, reliability diagram and bootstrap
intervals, written for DVC and logged to finetune's MLflow run and model: the headline (names.py) as
reports/metrics.json and MLflow metrics, every number in reports/eval/details.json. No torch here."""

from __future__ import annotations

import numpy as np

from gpt2_classifier.core.files import atomic_path, read_json, write_json, write_rows
from gpt2_classifier.core.params import EvaluateParams, Params
from gpt2_classifier.core.paths import (
    BALANCE_COUNTS,
    CLASSIFIER,
    EVAL_DETAILS,
    EVAL_REPORTS,
    METRICS,
    MODEL_CARD,
    PREDICTIONS,
    RUN_FILE,
    SPLITS,
    TRAIN_DETAILS,
)
from gpt2_classifier.metrics.bootstrap import bootstrap_intervals
from gpt2_classifier.metrics.calibration import calibration_report, reliability_bins
from gpt2_classifier.metrics.card import CardInputs, model_card
from gpt2_classifier.metrics.classification import (
    average_precision,
    classification_report,
    confusion_matrix,
    per_class_report,
    precision_recall_curve,
    roc_auc,
    roc_curve,
)
from gpt2_classifier.metrics.decision import DECISION_FILE, Decision
from gpt2_classifier.metrics.names import TEST_HEADLINE, flat_metrics, headline
from gpt2_classifier.metrics.plots import plot_confusion, plot_precision_recall, plot_reliability
from gpt2_classifier.metrics.predictions import Predictions, read_predictions
from gpt2_classifier.tracking.runs import continue_run


def evaluate(params: Params) -> dict[str, dict[str, float]]:
    with continue_run(params.mlflow, RUN_FILE) as (tracker, record):
        predictions = {name: read_predictions(PREDICTIONS / f"{name}.csv") for name in SPLITS}
        decision = Decision.read(PREDICTIONS / DECISION_FILE)
        served = {
            name: Predictions(p.classes, p.labels, decision.calibrate(p.probs)) for name, p in predictions.items()
        }
        bins = params.evaluate.calibration_bins
        metrics = {  # calibration: of the probabilities the classifier serves (decision.calibration)
            name: classification_report(p.labels, p.probs)
            | calibration_report(p.labels, served[name].probs, bins)
            | per_class_report(p.labels, p.probs, p.classes)
            for name, p in predictions.items()
        }
        if decision.threshold is not None:  # beside argmax's: where the classifier's threshold puts them
            for name in ("validation", "test"):
                metrics[name]["at_threshold"] = report_at_threshold(predictions[name], decision)
        test_auc = write_test_reports(predictions["test"], decision)
        if test_auc is not None:
            metrics["test"]["roc_auc"] = test_auc
        metrics["test"] = add_test_metrics(metrics["test"], served["test"], params.evaluate)
        details = flat_metrics(metrics)
        write_json(EVAL_DETAILS, details)
        write_json(METRICS, headline(details, TEST_HEADLINE))
        write_card(params, predictions, decision, metrics, record.model_uri)
        # Once, without a step (a bar per run in MLflow), on the run and its logged model.
        tracker.log_metrics(headline(details, TEST_HEADLINE), model_id=record.model_id)
        tracker.log_artifacts([EVAL_REPORTS / name for name in PLOTS])  # at the top: the compare page shows those
        tables = [EVAL_REPORTS / name for name in TABLES]
        tracker.log_artifacts([METRICS, EVAL_DETAILS, MODEL_CARD, *tables], "evaluate")
        tracker.log_model_artifacts([MODEL_CARD])  # the card travels with the model
        tracker.log_lineage("evaluate", inputs=None, outputs={"metrics": METRICS})
        register_as = params.mlflow.register_as
        if register_as and record.model_uri:
            version = tracker.register(record.model_uri, register_as, metrics["test"]["accuracy"])
            print(f"evaluate: registered {register_as} version {version}")
    interval = metrics["test"].get("accuracy_ci")
    print(
        "evaluate: accuracy "
        + ", ".join(f"{name} {metrics[name]['accuracy']:.2%}" for name in SPLITS)
        + (f" (95 % interval {interval['low']:.2%} to {interval['high']:.2%})" if interval else "")
    )
    return metrics


# reports/eval/, for MLflow
PLOTS = ("confusion.png", "pr.png", "reliability.png")
TABLES = ("confusion.csv", "roc.csv", "pr.csv", "reliability.csv")


def add_test_metrics(test: dict, predictions: Predictions, settings: EvaluateParams) -> dict:
    """Adds to the test metrics what a deployer checks before trusting them: average precision (of
    class 1 for two classes; for more, macro-averaged and each class's one-vs-rest under per_class)
    and the bootstrap intervals of accuracy and F1; writes the precision-recall curves (pr.csv: of
    class 1, or one-vs-rest per class as roc.csv) and the reliability diagram (reliability.csv, .png).
    Returns the metrics with the numbers first, then the intervals, then macro and per_class."""
    labels, probs, names = predictions.labels, predictions.probs, predictions.classes
    positives = [1] if len(names) == 2 else range(len(names))
    curves = {c: precision_recall_curve((labels == c).astype(np.int64), probs[:, c]) for c in positives}
    write_rows(EVAL_REPORTS / "pr.csv", [{"class": names[c], **p} for c, points in curves.items() for p in points])
    bins = settings.calibration_bins
    reliability = reliability_bins(labels, probs, bins)
    write_rows(EVAL_REPORTS / "reliability.csv", reliability)
    plot_reliability(reliability, bins, test["ece"], EVAL_REPORTS / "reliability.png")
    precision = {c: average_precision(points) for c, points in curves.items()}
    named = {names[c]: points for c, points in curves.items()}
    plot_precision_recall(named, {names[c]: ap for c, ap in precision.items()}, EVAL_REPORTS / "pr.png")
    if len(names) == 2:
        test["average_precision"] = precision[1]
    else:
        test["average_precision"] = test["macro"]["average_precision"] = float(np.mean(list(precision.values())))
        for c, name in enumerate(names):
            test["per_class"][name]["average_precision"] = precision[c]
    test |= bootstrap_intervals(labels, probs, settings.bootstrap, settings.seed)
    return dict(sorted(test.items(), key=lambda item: (isinstance(item[1], dict), item[0] in ("macro", "per_class"))))


def write_card(
    params: Params, predictions: dict[str, Predictions], decision: Decision, metrics: dict, model_uri: str | None
) -> None:
    """reports/model_card.md, from what the stages before wrote and the metrics."""
    counts = {
        name: {p.classes[c]: int(n) for c, n in enumerate(np.bincount(p.labels, minlength=len(p.classes)))}
        for name, p in predictions.items()
    }
    inputs = CardInputs(
        params=params,
        balance=read_json(BALANCE_COUNTS),
        classifier=read_json(CLASSIFIER / "config.json"),
        training=read_json(TRAIN_DETAILS),
        split_counts=counts,
        decision=decision,
        metrics=metrics,
        model_uri=model_uri,
    )
    with atomic_path(MODEL_CARD) as tmp:
        tmp.write_text(model_card(inputs), encoding="utf-8")


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
