"""How far predicted probabilities can be trusted: log loss, Brier score, and the reliability diagram
with its expected calibration error (numpy; tests/test_metrics.py checks them against scikit-learn)."""

from __future__ import annotations

import numpy as np


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """The mean of -ln(probability of the actual class), each probability clipped to [eps, 1 - eps] of
    its float type as scikit-learn's log_loss does (float32: eps 1.2e-7, so a sure mistake costs 15.9
    rather than infinity)."""
    eps = np.finfo(probs.dtype).eps
    actual = np.clip(probs[np.arange(len(labels)), labels], eps, 1 - eps)
    return float(-np.log(actual.astype(np.float64)).mean())


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Two classes: the mean squared difference between class 1's probability and 1 for class 1, 0 for
    class 0 (0 to 1). More classes: the mean over rows of the squared differences summed over the
    classes (the multi-class Brier score, 0 to 2). Both are scikit-learn's brier_score_loss of all
    the columns (>= 1.7, which halves the sum for two classes)."""
    probs = probs.astype(np.float64)
    if probs.shape[1] == 2:
        return float(((probs[:, 1] - (labels == 1)) ** 2).mean())
    actual = np.eye(probs.shape[1])[labels]
    return float(((probs - actual) ** 2).sum(1).mean())


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int) -> list[dict[str, float]]:
    """The top-label reliability diagram: the rows grouped by their confidence (the predicted class's
    probability, the largest) into `bins` equal bins of [0, 1], each bin (lower, upper] and the first
    also 0, as scikit-learn's calibration_curve(strategy="uniform") groups them; for each bin that
    holds rows, its index, mean confidence, accuracy (the fraction of its rows predicted right) and
    number of rows."""
    confidence = probs.max(1).astype(np.float64)  # (n,)
    right = (probs.argmax(1) == labels).astype(np.float64)
    index = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], confidence)
    count = np.bincount(index, minlength=bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    right_sum = np.bincount(index, weights=right, minlength=bins)
    return [
        {
            "bin": int(b),
            "confidence": float(confidence_sum[b] / count[b]),
            "accuracy": float(right_sum[b] / count[b]),
            "count": int(count[b]),
        }
        for b in np.flatnonzero(count)
    ]


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """The gap between confidence and accuracy in each bin of `reliability_bins`, weighted by the bin's
    share of the rows: the top-label ECE (for two classes too, whose confidences lie in 0.5 to 1)."""
    rows = reliability_bins(labels, probs, bins)
    return sum(abs(row["confidence"] - row["accuracy"]) * row["count"] for row in rows) / len(labels)


def calibration_report(labels: np.ndarray, probs: np.ndarray, bins: int) -> dict[str, float]:
    return {
        "log_loss": log_loss(labels, probs),
        "brier": brier_score(labels, probs),
        "ece": expected_calibration_error(labels, probs, bins),
    }
