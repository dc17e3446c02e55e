"""The deployable model: the decision chosen on validation (temperature scaling and the operating threshold,
metrics/decision.py), stored in the classifier, applied by classify, the MLflow model and evaluate; and the
model card evaluate writes and logs with the MLflow model (metrics/card.py)."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import eval_details, made_zip, make_project, run, tiny_params
from scipy.optimize import minimize_scalar
from sklearn.metrics import f1_score, log_loss, precision_recall_curve, precision_score, recall_score

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.params import DecisionParams
from gpt2_classifier.metrics.decision import Decision, choose_threshold, decide, fit_temperature, scaled


def scores(n: int = 400, seed: int = 0, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Labels and overconfident, partly wrong probabilities, with ties (rounded logits)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes)).round(1)
    logits[np.arange(n), labels] += 1.5
    logits *= 4  # overconfident: the fitted temperature is well above 1
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs.astype(np.float32)


def exact(probs: np.ndarray) -> np.ndarray:
    """float32 probabilities as float64 rows summing to 1, as scikit-learn's log_loss wants them."""
    probs = probs.astype(np.float64)
    return probs / probs.sum(1, keepdims=True)


@pytest.mark.parametrize("classes", [2, 3])
def test_fitted_temperature_minimises_the_log_loss(classes):
    labels, probs = scores(classes=classes)
    fitted = fit_temperature(probs, labels)
    best = minimize_scalar(
        lambda t: log_loss(labels, exact(scaled(probs, t)), labels=range(classes)),
        bounds=(0.01, 100),
        method="bounded",
        options={"xatol": 1e-8},
    )
    assert fitted == pytest.approx(best.x, rel=1e-4) and fitted > 1.5
    calibrated = Decision(fitted).calibrate(probs)
    assert log_loss(labels, exact(calibrated)) < log_loss(labels, exact(probs)) - 0.1
    assert (calibrated.argmax(1) == probs.argmax(1)).all()  # scaling never changes the most probable class


def candidates(labels, p):
    """Every threshold sklearn's precision-recall curve considers, with its precision and recall."""
    precision, recall, thresholds = precision_recall_curve(labels, p)
    return thresholds, precision[:-1], recall[:-1]


def test_f1_threshold_is_the_best_f1_of_every_candidate():
    labels, probs = scores()
    p = probs[:, 1]
    threshold, reached = choose_threshold(labels, p, "f1", 0.99)
    best = max(f1_score(labels, p >= t) for t in np.unique(p))
    assert reached and f1_score(labels, p >= threshold) == pytest.approx(best)
    assert threshold == max(t for t in np.unique(p) if f1_score(labels, p >= t) == pytest.approx(best))


@pytest.mark.parametrize("target", [0.8, 0.9, 0.97])
def test_precision_threshold_is_the_lowest_reaching_the_target(target):
    labels, probs = scores()
    p = probs[:, 1]
    threshold, reached = choose_threshold(labels, p, "precision", target)
    thresholds, precision, _ = candidates(labels, p)
    assert reached and threshold == thresholds[precision >= target].min()
    assert precision_score(labels, p >= threshold) >= target
    below = thresholds[thresholds < threshold]
    assert all(precision_score(labels, p >= t) < target for t in below)


def test_an_unreachable_precision_takes_the_most_precise_threshold():
    labels = np.array([0, 1, 0, 1])
    p = np.array([0.9, 0.8, 0.7, 0.2])  # the top score is a false positive: precision 0.99 is out of reach
    threshold, reached = choose_threshold(labels, p, "precision", 0.99)
    assert not reached and threshold == pytest.approx(0.2)  # 2 of 4 (precision 0.5) beats 0/1, 1/2, 1/3


@pytest.mark.parametrize("target", [0.5, 0.9, 1.0])
def test_recall_threshold_is_the_highest_keeping_the_target(target):
    labels, probs = scores()
    p = probs[:, 1]
    threshold, reached = choose_threshold(labels, p, "recall", target)
    thresholds, _, recall = candidates(labels, p)
    assert reached and threshold == thresholds[recall >= target].max()
    assert recall_score(labels, p >= threshold) >= target


def test_decide_fits_temperature_then_thresholds_the_calibrated_probabilities():
    labels, probs = scores()
    chose = decide(DecisionParams(calibration="temperature", threshold="precision", target=0.95), probs, labels)
    assert chose.temperature == pytest.approx(fit_temperature(probs, labels))
    calibrated = chose.calibrate(probs)
    assert chose.threshold == choose_threshold(labels, calibrated[:, 1], "precision", 0.95)[0]
    assert (chose.predict(calibrated) == (calibrated[:, 1] >= chose.threshold)).all()
    plain = decide(DecisionParams(), probs, labels)
    assert plain == Decision() and (plain.predict(plain.calibrate(probs)) == probs.argmax(1)).all()


def test_a_threshold_needs_both_classes_in_validation():
    labels, probs = scores()
    with pytest.raises(PipelineError, match="no message of class 1.*split.validation"):
        decide(DecisionParams(threshold="f1"), probs, np.zeros_like(labels))


def test_decision_params_are_checked():
    from gpt2_classifier.core.errors import ParamsError
    from gpt2_classifier.core.params import parse_params

    data = {"url": "https://example.com/d.zip"}
    with pytest.raises(ParamsError, match=r"decision.target: .*less than or equal to 1"):
        parse_params({"data": data, "decision": {"target": 1.5}})
    with pytest.raises(ParamsError, match=r"decision.threshold: Input should be 'argmax', 'f1'"):
        parse_params({"data": data, "decision": {"threshold": "youden"}})


@pytest.fixture(scope="module")
def decided(tmp_path_factory):
    """A tiny project trained with temperature scaling and a threshold at a target precision."""
    tmp = tmp_path_factory.mktemp("decided")
    decision = {"calibration": "temperature", "threshold": "precision", "target": 0.9}
    params = tiny_params(*made_zip(tmp, 90, 30, seed=5), decision=decision)
    project = make_project(tmp / "p", params)
    result = run(["dvc", "repro"], project)
    return project, result.stdout


@pytest.mark.slow
def test_finetune_stores_the_decision_and_evaluate_reports_it_beside_argmax(decided):
    project, out = decided
    config = json.loads((project / "models/classifier/config.json").read_text())
    stored = json.loads((project / "reports/predictions/decision.json").read_text())
    assert config["temperature"] == stored["temperature"] != 1.0 and config["threshold"] == stored["threshold"]
    assert f"spam when its probability is at least {stored['threshold']:.4f}" in out

    predictions = {s: pd.read_csv(project / f"reports/predictions/{s}.csv") for s in ("validation", "test")}
    decision = Decision(stored["temperature"], stored["threshold"])
    validation = predictions["validation"]
    labels = (validation.actual == "spam").to_numpy().astype(int)
    probs = decision.calibrate(validation[["prob_ham", "prob_spam"]].to_numpy(np.float32))
    assert stored["threshold"] == choose_threshold(labels, probs[:, 1], "precision", 0.9)[0]  # on validation

    metrics = eval_details(project)
    test = predictions["test"]
    actual = (test.actual == "spam").to_numpy().astype(int)
    raw = test[["prob_ham", "prob_spam"]].to_numpy(np.float32)
    at = decision.predict(decision.calibrate(raw))
    reported = metrics["test"]["at_threshold"]
    assert reported["threshold"] == stored["threshold"]
    assert reported["precision"] == pytest.approx(precision_score(actual, at, zero_division=0))
    assert reported["recall"] == pytest.approx(recall_score(actual, at))
    assert metrics["test"]["recall"] == pytest.approx(recall_score(actual, raw.argmax(1)))  # argmax's, beside
    confusion = pd.read_csv(project / "reports/eval/confusion.csv")
    assert (confusion.predicted == np.where(at == 1, "spam", "ham")).all()  # the deployed decision


@pytest.mark.slow
def test_classify_and_the_pyfunc_model_decide_by_the_stored_threshold(decided):
    from gpt2_classifier.serve.predict import TextClassifier

    project, _ = decided
    config = json.loads((project / "models/classifier/config.json").read_text())
    classifier = TextClassifier.from_folder(project / "models/classifier")
    texts = pd.read_csv(project / "data/split/test.csv").text.tolist()
    results = classifier.predict(texts)
    spam = np.array([r["p_spam"] for r in results])
    labels = [r["label"] for r in results]
    assert labels == ["spam" if p >= config["threshold"] else "ham" for p in spam]
    assert labels != ["spam" if p > 0.5 else "ham" for p in spam]  # the threshold, not argmax, decided
    # The probabilities it gives are the model's, scaled by the stored temperature.
    plain = TextClassifier(classifier.model, classifier.config.model_copy(update={"temperature": 1.0}))
    assert np.allclose(scaled(plain.predict_proba(texts).numpy(), config["temperature"])[:, 1], spam, atol=1e-6)

    out = run([sys.executable, "-m", "gpt2_classifier.serve.cli", "classify", *texts[:6]], project).stdout
    assert [line.split("\t")[0] for line in out.splitlines()] == [r["label"] for r in results[:6]]

    from gpt2_classifier.serve.pyfunc_model import ClassifierModel

    model = ClassifierModel()
    model.classifier = classifier  # what load_context builds from the logged folder
    assert model.predict(None, texts)["label"].tolist() == [r["label"] for r in results]


@pytest.mark.slow
def test_the_model_card_says_what_the_pipeline_wrote_and_travels_with_the_mlflow_model(decided):
    import mlflow

    project, _ = decided
    card = (project / "reports/model_card.md").read_text()
    metrics = eval_details(project)
    counts = json.loads((project / "data/balance.json").read_text())
    base = json.loads((project / "models/base/config.json").read_text())
    config = json.loads((project / "models/classifier/config.json").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    test = metrics["test"]
    assert card.startswith("# Model card: ham / spam classifier on gpt2-custom-2L-32d-2h\n")
    assert f"SHA-256 `{params['data']['sha256']}` (checked on download)" in card
    assert f"random weights (SHA-256 `{base['sha256']}`)" in card
    assert f"as read: ham {counts['parsed']['ham']}, spam {counts['parsed']['spam']}" in card
    for split in ("train", "validation", "test"):
        rows = pd.read_csv(project / f"reports/predictions/{split}.csv")
        ham, spam = (rows.actual == "ham").sum(), (rows.actual == "spam").sum()
        assert f"| {split} | {len(rows)} | {ham} | {spam} |" in card
        assert f"| {split} | {metrics[split]['accuracy']:.2%} | {metrics[split]['precision']:.2%} |" in card
    ci = test["accuracy_ci"]
    assert f"Test accuracy {test['accuracy']:.2%}, 95 % bootstrap interval {ci['low']:.2%} to {ci['high']:.2%}" in card
    assert f"spam when its probability is at least {config['threshold']:.4f}: the precision rule, target 0.9" in card
    assert f"temperature {config['temperature']:.4f}, fitted to the validation log loss" in card
    at = test["at_threshold"]
    assert f"test precision {at['precision']:.2%} and recall {at['recall']:.2%}" in card
    assert "- Random base weights: not a pretrained model." in card
    summary = json.loads((project / "reports/train/details.json").read_text())
    assert f"- Weights of epoch {summary['epoch']} (finetune.keep: last); the best validation_loss" in card
    assert f"{summary['best_validation_loss']:.4f}, at epoch {summary['best_epoch']}; every epoch ran" in card
    assert f"- {len(rows)} test messages: one message moves test accuracy by {1 / len(rows):.2%}" in card

    run_info = json.loads((project / "reports/train/mlflow_run.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    location = client.get_logged_model(run_info["model_id"]).artifact_location
    assert (Path(location.removeprefix("file://")) / "model_card.md").read_text() == card
    assert f'load_model("{run_info["model_uri"]}")' in card

    again = run([sys.executable, "stages/evaluate.py"], project)  # the same inputs write the same card
    assert again.returncode == 0 and (project / "reports/model_card.md").read_text() == card


def test_the_card_of_a_pretrained_three_class_model_without_intervals():
    from gpt2_classifier.core.params import parse_params
    from gpt2_classifier.metrics.card import CardInputs, model_card

    labels = ["account", "billing", "shipping"]
    report = {"accuracy": 0.9, "precision": 0.8, "recall": 0.7, "f1": 0.75, "log_loss": 0.3, "brier": 0.1, "ece": 0.05}
    gpt = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
           "drop_rate": 0.0, "qkv_bias": True}  # fmt: skip
    card = model_card(
        CardInputs(
            params=parse_params(
                {
                    "data": {"url": "https://user:secret@example.com/t.csv", "format": "csv", "member": None},
                    "split": {"stratify": True},
                }
            ),  # fmt: skip
            balance={"parsed": dict.fromkeys(labels, 10), "balanced": dict.fromkeys(labels, 10), "labels": labels},
            classifier={
                "labels": labels,
                "base": {"name": "gpt2-small", "weights": "pretrained", "sha256": "ab"},
                "gpt": gpt,
                "lora": None,
                "trainable_blocks": "all",
                "max_length": 120,
                "truncate": "tail",
                "pool": "last",
                "precision": "float32",
            },  # fmt: skip
            training={"examples_seen": 48, "system/train_seconds": 3.0},
            split_counts={
                "train": dict.fromkeys(labels, 7),
                "validation": dict.fromkeys(labels, 1),
                "test": dict.fromkeys(labels, 2),
            },  # fmt: skip
            decision=Decision(),
            metrics={"train": report, "validation": report, "test": report},
        )
    )
    assert card.startswith("# Model card: account / billing / shipping classifier on gpt2-small\n")
    assert "secret" not in card and "https://***@example.com/t.csv (csv)" in card
    assert "Random base weights" not in card and "pretrained weights" in card
    assert "- Fine-tuned: every parameter and a new head of 3 classes" in card
    assert "- The most probable class (argmax)" in card and "Calibration of the probabilities: none" in card
    assert card.count("95 % bootstrap interval not computed (evaluate.bootstrap: 0)") == 2  # accuracy and F1
    assert "ROC AUC" not in card and "At the threshold" not in card and "macro-averaged, by argmax" in card
    assert "stratified by class" in card and "- 6 test messages: one message moves test accuracy by 16.67%" in card
