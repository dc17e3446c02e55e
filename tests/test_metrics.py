import numpy as np
import pytest

from gpt2_classifier.metrics import bootstrap
from gpt2_classifier.metrics.calibration import (
    brier_score,
    calibration_report,
    expected_calibration_error,
    log_loss,
    reliability_bins,
)
from gpt2_classifier.metrics.classification import (
    average_precision,
    classification_report,
    confusion_matrix,
    per_class_report,
    precision_recall_curve,
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


def _scored(num_classes: int, n: int = 300, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """float32 probabilities in steps of 1/16 (exact sums; many ties; confidences 0.5 and 1 on the bins'
    edges), each row's label drawn from its probabilities sharpened: good but not calibrated."""
    rng = np.random.default_rng(seed)
    probs = (rng.multinomial(16, rng.dirichlet(np.ones(num_classes) * 0.5, n)) / 16).astype(np.float32)
    sharp = probs.astype(np.float64) ** 3 + 1e-9
    labels = np.array([rng.choice(num_classes, p=row / row.sum()) for row in sharp])
    return labels, probs


@pytest.mark.parametrize("num_classes", [2, 3])
def test_precision_recall_curve_and_average_precision_agree_with_scikit_learn(num_classes):
    from sklearn import metrics

    labels, probs = _scored(num_classes)
    aps = []
    for c in [1] if num_classes == 2 else range(num_classes):
        actual = (labels == c).astype(np.int64)
        precision, recall, thresholds = metrics.precision_recall_curve(actual, probs[:, c], drop_intermediate=False)
        points = precision_recall_curve(actual, probs[:, c])
        assert len(points) == len(thresholds) + 1 < len(labels)  # one point per distinct score (ties)
        assert [p["precision"] for p in points] == pytest.approx(precision[::-1].tolist(), rel=1e-12)
        assert [p["recall"] for p in points] == pytest.approx(recall[::-1].tolist(), rel=1e-12)
        assert [p["threshold"] for p in points[1:]] == thresholds[::-1].tolist()
        aps.append(average_precision(points))
        assert aps[-1] == pytest.approx(metrics.average_precision_score(actual, probs[:, c]), rel=1e-12)
    if num_classes > 2:  # scikit-learn's multi-class average precision: one-vs-rest, macro-averaged
        assert np.mean(aps) == pytest.approx(metrics.average_precision_score(labels, probs, average="macro"))


def test_average_precision_by_hand():
    # scores 0.9 (+), 0.8 (-), 0.7 (+), 0.7 (-): recall 1/2 at precision 1, then 1 at precision 2/4
    points = precision_recall_curve(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.7]))
    assert [(p["recall"], p["precision"]) for p in points] == [(0, 1), (0.5, 1), (0.5, 0.5), (1, 0.5)]
    assert average_precision(points) == pytest.approx(0.5 * 1 + 0.5 * 0.5)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_log_loss_and_brier_agree_with_scikit_learn(num_classes):
    from sklearn import metrics

    labels, probs = _scored(num_classes)
    probs[0] = np.eye(num_classes)[(labels[0] + 1) % num_classes]  # a sure mistake: clipped, as scikit-learn does
    assert (probs == 1).any()
    assert log_loss(labels, probs) == pytest.approx(metrics.log_loss(labels, probs), rel=1e-6)
    as_float64 = probs.astype(np.float64)
    assert log_loss(labels, as_float64) == pytest.approx(metrics.log_loss(labels, as_float64), rel=1e-12)
    assert brier_score(labels, probs) == pytest.approx(metrics.brier_score_loss(labels, as_float64), rel=1e-12)
    if num_classes == 2:  # of the positive class
        assert brier_score(labels, probs) == pytest.approx(metrics.brier_score_loss(labels, as_float64[:, 1]))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_reliability_bins_and_ece_agree_with_scikit_learns_calibration_curve(num_classes):
    from sklearn.calibration import calibration_curve

    labels, probs = _scored(num_classes)
    confidence, right = probs.max(1), (probs.argmax(1) == labels).astype(np.int64)
    accuracy, mean_confidence = calibration_curve(right, confidence, n_bins=10, strategy="uniform")
    rows = reliability_bins(labels, probs, 10)
    assert [r["accuracy"] for r in rows] == pytest.approx(accuracy.tolist(), rel=1e-12)
    assert [r["confidence"] for r in rows] == pytest.approx(mean_confidence.tolist(), rel=1e-12)
    # scikit-learn's bins: (lower, upper], the first also 0; a confidence on an edge joins the bin below
    edges = np.linspace(0, 1, 11)
    counts = [int(((confidence > lo) & (confidence <= hi) | (b == 0) & (confidence == 0)).sum()) for b, (lo, hi) in
              enumerate(zip(edges[:-1], edges[1:], strict=True))]  # fmt: skip
    assert [(r["bin"], r["count"]) for r in rows] == [(b, c) for b, c in enumerate(counts) if c]
    assert np.isin(confidence, np.float32(edges)).any()
    ece = sum(abs(a - m) * c for a, m, c in zip(accuracy, mean_confidence, [c for c in counts if c], strict=True))
    assert expected_calibration_error(labels, probs, 10) == pytest.approx(ece / len(labels), rel=1e-12)
    assert calibration_report(labels, probs, 10) == {
        "log_loss": log_loss(labels, probs),
        "brier": brier_score(labels, probs),
        "ece": expected_calibration_error(labels, probs, 10),
    }


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins 8 and 5 hold |0.9 - 1/2| * 2 and |0.6 - 1| * 1
    labels, probs = np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    assert reliability_bins(labels, probs, 10) == [
        {"bin": 5, "confidence": 0.6, "accuracy": 1.0, "count": 1},
        {"bin": 8, "confidence": 0.9, "accuracy": 0.5, "count": 2},
    ]
    assert expected_calibration_error(labels, probs, 10) == pytest.approx((0.4 * 2 + 0.4 * 1) / 3)
    assert expected_calibration_error(labels, probs, 1) == pytest.approx(abs(0.8 - 2 / 3))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_bootstrap_intervals_agree_with_scikit_learn_on_the_same_resamples(num_classes, monkeypatch):
    from sklearn import metrics

    labels, probs = _scored(num_classes, n=120)
    predicted, average = probs.argmax(1), "binary" if num_classes == 2 else "macro"
    monkeypatch.setattr(bootstrap, "CHUNK", 120 * 7)  # 7 resamples a chunk: the chunks join as one
    accuracy, f1 = [], []
    for chunk in bootstrap.resampled_rows(120, 50, seed=5):
        for rows in chunk:
            accuracy.append(metrics.accuracy_score(labels[rows], predicted[rows]))
            classes = range(num_classes)  # all of them, as classification_report, even where a resample lacks one
            f1.append(metrics.f1_score(labels[rows], predicted[rows], labels=classes, average=average, zero_division=0))
    assert len(accuracy) == 50
    got = bootstrap.bootstrap_intervals(labels, probs, 50, seed=5)
    assert got == {
        "accuracy_ci": pytest.approx(dict(zip(("low", "high"), np.percentile(accuracy, [2.5, 97.5]), strict=True))),
        "f1_ci": pytest.approx(dict(zip(("low", "high"), np.percentile(f1, [2.5, 97.5]), strict=True))),
    }


def test_bootstrap_intervals_are_seeded_and_hold_the_estimate():
    labels, probs = _scored(2)
    first = bootstrap.bootstrap_intervals(labels, probs, 1000, seed=123)
    assert bootstrap.bootstrap_intervals(labels, probs, 1000, seed=123) == first
    assert bootstrap.bootstrap_intervals(labels, probs, 1000, seed=124) != first
    report = classification_report(labels, probs)
    for name in ("accuracy", "f1"):
        low, high = first[f"{name}_ci"]["low"], first[f"{name}_ci"]["high"]
        assert low < report[name] < high and high - low < 0.2
    labels = np.arange(300) % 3
    right = np.eye(3, dtype=np.float32)[labels]  # every prediction right: every resample's scores are 1
    assert bootstrap.bootstrap_intervals(labels, right, 200, seed=1) == {
        "accuracy_ci": {"low": 1.0, "high": 1.0},
        "f1_ci": {"low": 1.0, "high": 1.0},
    }
    assert bootstrap.bootstrap_intervals(labels, probs, 0, seed=1) == {}


def write_card_inputs(project, classes: list[str]) -> None:
    """What the stages before evaluate write that the model card reads: the class counts, the classifier's
    config and the training summary."""
    import json

    from gpt2_classifier.core.config import GPTConfig

    counts = dict.fromkeys(classes, 100)
    files = {
        "data/balance.json": {"messages": 100 * len(classes), "parsed": counts, "balanced": counts, "labels": classes},
        "models/classifier/config.json": {
            "labels": classes, "pool": "last", "max_length": 64, "truncate": "head", "precision": "float32",
            "trainable_blocks": 1, "lora": None, "gpt": GPTConfig().to_dict(),
            "base": {"name": "gpt2-small", "weights": "random", "sha256": "0" * 64},
        },
        "reports/train/details.json": {"examples_seen": 100, "system/train_seconds": 1.0},
    }  # fmt: skip
    for name, content in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(json.dumps(content))


@pytest.mark.parametrize("classes", [["ham", "spam"], ["ham", "spam", "promo"]])
def test_evaluate_writes_the_trust_metrics_and_their_plots(classes, tmp_path, monkeypatch):
    import json

    import pandas as pd
    import yaml
    from conftest import PROJECT

    from gpt2_classifier.core.params import parse_params
    from gpt2_classifier.evaluate import evaluate
    from gpt2_classifier.metrics.decision import Decision, scaled
    from gpt2_classifier.metrics.names import flat_metrics
    from gpt2_classifier.metrics.predictions import Predictions, write_predictions

    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports/predictions").mkdir(parents=True)
    for seed, split in enumerate(("train", "validation", "test")):
        labels, probs = _scored(len(classes), seed=seed)
        write_predictions(tmp_path / f"reports/predictions/{split}.csv", Predictions(classes, labels, probs))
    Decision().write(tmp_path / "reports/predictions/decision.json")  # argmax, no temperature
    write_card_inputs(tmp_path, classes)
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["mlflow"]["enabled"] = False
    params = parse_params(raw)
    metrics = evaluate(params)
    details = json.loads((tmp_path / "reports/eval/details.json").read_text())
    assert (
        details == flat_metrics(metrics)
        and details["test/per_class/ham/support"] == metrics["test"]["per_class"]["ham"]["support"]
    )
    headline = ["test/accuracy", "test/f1", "test/roc_auc"] if len(classes) == 2 else ["test/accuracy", "test/f1"]
    assert json.loads((tmp_path / "reports/metrics.json").read_text()) == {k: details[k] for k in headline}

    test, positives = metrics["test"], [1] if len(classes) == 2 else range(len(classes))
    labels, probs = _scored(len(classes), seed=2)
    assert {k: test[k] for k in ("log_loss", "brier", "ece")} == calibration_report(labels, probs, 10)
    assert all(set(metrics[split]) >= {"log_loss", "brier", "ece"} for split in ("train", "validation"))
    curves = [precision_recall_curve((labels == c).astype(np.int64), probs[:, c]) for c in positives]
    assert test["average_precision"] == pytest.approx(np.mean([average_precision(points) for points in curves]))
    if len(classes) > 2:
        assert test["macro"]["average_precision"] == test["average_precision"]
        assert test["per_class"]["promo"]["average_precision"] == average_precision(curves[2])
    assert {k: test[k] for k in ("accuracy_ci", "f1_ci")} == bootstrap.bootstrap_intervals(labels, probs, 1000, 123)
    assert list(test)[-2:] == ["macro", "per_class"] and list(test)[-4:-2] == ["accuracy_ci", "f1_ci"]

    pr = pd.read_csv(tmp_path / "reports/eval/pr.csv")
    assert list(pr.columns) == ["class", "threshold", "recall", "precision"]
    assert list(pr["class"].unique()) == [classes[c] for c in positives]
    assert pr["recall"].tolist() == pytest.approx([p["recall"] for points in curves for p in points])
    reliability = pd.read_csv(tmp_path / "reports/eval/reliability.csv")
    assert list(reliability.columns) == ["bin", "confidence", "accuracy", "count"]
    assert reliability.to_dict("records") == reliability_bins(labels, probs, 10)  # written exactly
    assert (tmp_path / "reports/eval/reliability.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "reports/eval/pr.png").read_bytes().startswith(b"\x89PNG")

    fewer = parse_params(raw | {"evaluate": {"bootstrap": 0, "calibration_bins": 4}})
    test = evaluate(fewer)["test"]
    assert "accuracy_ci" not in test and test["ece"] == expected_calibration_error(labels, probs, 4)
    assert pd.read_csv(tmp_path / "reports/eval/reliability.csv")["bin"].max() <= 3

    # With a temperature, the calibration metrics are of the probabilities the classifier serves
    Decision(temperature=2.0).write(tmp_path / "reports/predictions/decision.json")
    test = evaluate(fewer)["test"]
    assert test["log_loss"] == log_loss(labels, scaled(probs, 2.0)) != log_loss(labels, probs)
    assert test["ece"] == expected_calibration_error(labels, scaled(probs, 2.0), 4)
    assert test["accuracy"] == classification_report(labels, probs)["accuracy"]
