import numpy as np
import pytest

from gpt2_classifier.metrics.classification import (
    classification_report,
    confusion_matrix,
    per_class_report,
    roc_auc,
    roc_curve,
)


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


def _predictions(num_classes: int, n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities that are right about two times in three; with 3 classes or more, the
    last class is never predicted (its precision is 0 by convention)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    predicted = np.where(rng.random(n) < 0.65, labels, rng.integers(0, num_classes, n))
    if num_classes > 2:
        predicted = np.minimum(predicted, num_classes - 2)
    return labels, np.eye(num_classes, dtype=np.float32)[predicted]


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_both_reports_agree_with_scikit_learn(num_classes):
    from sklearn import metrics

    labels, probs = _predictions(num_classes)
    predicted = probs.argmax(1)
    average = "binary" if num_classes == 2 else "macro"
    expected = {
        "accuracy": metrics.accuracy_score(labels, predicted),
        "precision": metrics.precision_score(labels, predicted, average=average, zero_division=0),
        "recall": metrics.recall_score(labels, predicted, average=average, zero_division=0),
        "f1": metrics.f1_score(labels, predicted, average=average, zero_division=0),
    }
    assert classification_report(labels, probs) == pytest.approx(expected, rel=1e-12)

    classes = [f"c{i}" for i in range(num_classes)]
    report = per_class_report(labels, probs, classes)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(labels, predicted, zero_division=0)
    for c, name in enumerate(classes):
        got = report["per_class"][name]
        assert [got["precision"], got["recall"], got["f1"]] == pytest.approx([precision[c], recall[c], f1[c]])
        assert got["support"] == support[c]
    macro = metrics.precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)[:3]
    assert list(report["macro"].values()) == pytest.approx(list(macro), rel=1e-12)
    if num_classes > 2:
        assert report["per_class"][classes[-1]]["precision"] == 0.0  # never predicted


def test_roc_agrees_with_scikit_learn():
    from sklearn import metrics

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = np.round(np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1), 2)  # rounded: many ties
    fpr, tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    points = roc_curve(labels, scores)
    assert [p["fpr"] for p in points] == pytest.approx(fpr.tolist())
    assert [p["tpr"] for p in points] == pytest.approx(tpr.tolist())
    assert roc_auc(points) == pytest.approx(metrics.roc_auc_score(labels, scores))
