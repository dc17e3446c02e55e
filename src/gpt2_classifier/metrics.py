"""Classification metrics from predicted probabilities: accuracy, precision, recall, F1, ROC."""

from __future__ import annotations

import torch


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are actual classes, columns predicted ones."""
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)


def classification_report(labels: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
    """Accuracy, and precision/recall/F1: of class 1 for two classes, macro-averaged for more."""
    num_classes = probs.shape[1]
    matrix = confusion_matrix(labels, probs.argmax(1), num_classes).double()
    true_positive = matrix.diag()
    precision = true_positive / matrix.sum(0).clamp(min=1)
    recall = true_positive / matrix.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    pick = (lambda t: t[1]) if num_classes == 2 else (lambda t: t.mean())
    return {
        "accuracy": (true_positive.sum() / matrix.sum()).item(),
        "precision": pick(precision).item(),
        "recall": pick(recall).item(),
        "f1": pick(f1).item(),
    }


def roc_curve(labels: torch.Tensor, scores: torch.Tensor) -> list[dict[str, float]]:
    """False and true positive rates as the threshold on `scores` (of class 1) falls."""
    order = torch.argsort(scores, descending=True, stable=True)
    scores, positive = scores[order], (labels[order] == 1).double()
    true_pos, false_pos = positive.cumsum(0), (1 - positive).cumsum(0)
    last_of_each_threshold = torch.cat([scores[1:] != scores[:-1], torch.tensor([True])])
    n_pos, n_neg = max(positive.sum().item(), 1), max((1 - positive).sum().item(), 1)
    points = [{"threshold": 1.0, "fpr": 0.0, "tpr": 0.0}]
    for i in torch.nonzero(last_of_each_threshold).flatten().tolist():
        points.append(
            {"threshold": scores[i].item(), "fpr": false_pos[i].item() / n_neg, "tpr": true_pos[i].item() / n_pos}
        )
    return points


def roc_auc(points: list[dict[str, float]]) -> float:
    return sum((b["fpr"] - a["fpr"]) * (a["tpr"] + b["tpr"]) / 2 for a, b in zip(points, points[1:], strict=False))
