import numpy as np
import pytest

from gpt2_classifier.metrics.classification import classification_report, confusion_matrix, roc_auc, roc_curve


def test_report_against_hand_counts():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    predicted = np.array([1, 1, 0, 0, 0, 1, 0, 1])  # tp 3, fn 1, fp 1, tn 3
    probs = np.eye(2, dtype=np.float32)[predicted]
    assert confusion_matrix(labels, predicted, 2).tolist() == [[3, 1], [1, 3]]
    report = classification_report(labels, probs)
    assert report == pytest.approx({"accuracy": 6 / 8, "precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4})


def test_roc_auc_equals_the_rank_statistic():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9])
    pairs = [(p, n) for p in scores[labels == 1] for n in scores[labels == 0]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    points = roc_curve(labels, scores)
    assert points[0] == {"threshold": 1.0, "fpr": 0.0, "tpr": 0.0} and points[-1]["fpr"] == points[-1]["tpr"] == 1.0
    assert roc_auc(points) == pytest.approx(expected)
