"""Classification metrics from predicted probabilities: accuracy, precision, recall, F1, ROC, the
precision-recall curve and average precision (numpy: importing scikit-learn's metrics would cost
the evaluate stage more than computing them, see bench/README.md, `bench_imports.py`;
tests/test_metrics.py checks these against them)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are actual classes, columns predicted ones."""
    counts = np.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def _per_class(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """The confusion matrix, and each class's precision, recall and F1 (0 for a class never predicted,
    or never present)."""
    matrix = confusion_matrix(labels, probs.argmax(1), num_classes).astype(np.float64)
    true_positive = np.diag(matrix)
    precision = true_positive / np.maximum(matrix.sum(0), 1)
    recall = true_positive / np.maximum(matrix.sum(1), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return matrix, precision, recall, f1


def classification_report(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, and precision/recall/F1: of class 1 for two classes, macro-averaged for more."""
    num_classes = probs.shape[1]
    matrix, precision, recall, f1 = _per_class(labels, probs, num_classes)
    pick = (lambda a: a[1]) if num_classes == 2 else (lambda a: a.mean())
    return {
        "accuracy": float(np.diag(matrix).sum() / matrix.sum()),
        "precision": float(pick(precision)),
        "recall": float(pick(recall)),
        "f1": float(pick(f1)),
    }


def per_class_report(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Precision, recall and F1 macro-averaged over the classes, and of each class with its support
    (its number of examples); a class never predicted has precision 0."""
    matrix, precision, recall, f1 = _per_class(labels, probs, len(classes))
    return {
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(matrix[c].sum()),
            }
            for c, name in enumerate(classes)
        },
    }


def _counts_at_thresholds(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each distinct score from the highest down, and the positives (label 1) and negatives whose score
    is at least that (what predicting class 1 from that threshold gets right and wrong), with the
    number of positives and of negatives."""
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], (labels[order] == 1).astype(np.float64)
    last_of_each_threshold = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    true_pos, false_pos = positive.cumsum(), (1 - positive).cumsum()
    n_pos, n_neg = positive.sum(), len(positive) - positive.sum()
    return (
        scores[last_of_each_threshold],
        true_pos[last_of_each_threshold],
        false_pos[last_of_each_threshold],
        n_pos,
        n_neg,
    )


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> list[dict[str, float]]:
    """False and true positive rates as the threshold on `scores` (of class 1) falls."""
    thresholds, true_pos, false_pos, n_pos, n_neg = _counts_at_thresholds(labels, scores)
    points = [{"threshold": 1.0, "fpr": 0.0, "tpr": 0.0}]
    for threshold, tp, fp in zip(thresholds.tolist(), true_pos.tolist(), false_pos.tolist(), strict=True):
        points.append({"threshold": threshold, "fpr": fp / max(n_neg, 1), "tpr": tp / max(n_pos, 1)})
    return points


def roc_auc(points: list[dict[str, float]]) -> float:
    return sum((b["fpr"] - a["fpr"]) * (a["tpr"] + b["tpr"]) / 2 for a, b in zip(points, points[1:], strict=False))


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> list[dict[str, float]]:
    """Recall and precision as the threshold on `scores` (of class 1) falls: scikit-learn's
    precision_recall_curve with every threshold kept, from its end point (recall 0, precision 1), given
    threshold 1.0 as roc_curve's first point is. Precision is 0 where nothing is predicted positive."""
    thresholds, true_pos, false_pos, n_pos, _ = _counts_at_thresholds(labels, scores)
    points = [{"threshold": 1.0, "recall": 0.0, "precision": 1.0}]
    for threshold, tp, fp in zip(thresholds.tolist(), true_pos.tolist(), false_pos.tolist(), strict=True):
        points.append({"threshold": threshold, "recall": tp / max(n_pos, 1), "precision": tp / max(tp + fp, 1)})
    return points


def average_precision(points: list[dict[str, float]]) -> float:
    """The precision at each threshold weighted by the recall it adds: scikit-learn's
    average_precision_score (a step function, not interpolated)."""
    return max(0.0, sum((b["recall"] - a["recall"]) * b["precision"] for a, b in zip(points, points[1:], strict=False)))
