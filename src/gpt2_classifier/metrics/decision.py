"""How the trained classifier decides, chosen on the validation set (never on test): an optional
temperature that calibrates its probabilities, and for two classes an operating threshold on the
positive class (class 1, balance.labels[1]). finetune chooses them and stores them with the model;
`classify`, the MLflow model and evaluate apply them. numpy, no torch."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.files import write_json
from gpt2_classifier.core.params import DecisionParams

DECISION_FILE = "decision.json"  # in reports/predictions/, beside the probabilities it applies to
TINY = np.finfo(np.float32).tiny  # a probability that underflowed to 0 still has a (very negative) log


@dataclass(frozen=True)
class Decision:
    """`threshold` None: the most probable class (argmax); else class 1 when its calibrated probability
    is at least `threshold` (two classes only). `reached`: whether the validation set met decision.target."""

    temperature: float = 1.0
    threshold: float | None = None
    reached: bool = True

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """(n, classes) probabilities as the temperature scales them: softmax(log p / T), which is
        softmax(logits / T) (log p differs from the logits by one constant per row)."""
        return probs if self.temperature == 1.0 else scaled(probs, self.temperature)

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """(n,) class indices from (n, classes) calibrated probabilities."""
        if self.threshold is None:
            return probs.argmax(1)
        return (probs[:, 1] >= self.threshold).astype(np.int64)

    def write(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: str | os.PathLike) -> Decision:
        try:
            with open(path, encoding="utf-8") as f:
                return cls(**json.load(f))
        except (OSError, ValueError, TypeError) as exc:
            raise PipelineError(f"{path}: not the decision finetune writes ({exc}); run `dvc repro finetune`") from None


def scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.log(np.clip(probs.astype(np.float64), TINY, 1.0)) / temperature
    logits -= logits.max(1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(1, keepdims=True)).astype(probs.dtype)


def nll(probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` under the probabilities scaled by `temperature`."""
    logits = np.log(np.clip(probs.astype(np.float64), TINY, 1.0)) / temperature
    top = logits.max(1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return float(np.mean(log_norm - logits[np.arange(len(labels)), labels]))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, iterations: int = 100) -> float:
    """The temperature that minimises the validation log loss (Guo et al. 2017, temperature scaling).
    The loss is convex in 1/T, hence unimodal in log T: a golden-section search over T in [0.01, 100]
    finds it (to about 1e-9 relative), deterministically."""
    golden = (math.sqrt(5) - 1) / 2
    lo, hi = math.log(0.01), math.log(100.0)
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = nll(probs, labels, math.exp(a)), nll(probs, labels, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = nll(probs, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = nll(probs, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


def precision_recall_at(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every distinct score as a threshold (class 1 when score >= it), ascending, with the precision,
    recall and F1 it gives (each threshold predicts at least its own row positive)."""
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], (labels[order] == 1)
    true_pos, predicted = np.cumsum(positive), np.arange(1, len(scores) + 1)
    last = np.append(scores[1:] != scores[:-1], True)  # the last row of each distinct score
    thresholds, true_pos, predicted = scores[last], true_pos[last], predicted[last]
    precision = true_pos / predicted
    recall = true_pos / max(int(positive.sum()), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return thresholds[::-1], precision[::-1], recall[::-1], f1[::-1]


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: str, target: float) -> tuple[float, bool]:
    """The threshold on class 1's probability by `rule`, from validation labels and scores, and
    whether the target was reached:
    - f1: the best F1 (of ties, the highest threshold: fewer false positives);
    - precision: the lowest threshold whose precision reaches `target` (unreachable: the most precise);
    - recall: the highest threshold whose recall reaches `target`."""
    thresholds, precision, recall, f1 = precision_recall_at(labels, scores)
    if rule == "f1":
        return float(thresholds[np.flatnonzero(f1 == f1.max())[-1]]), True
    if rule == "precision":
        reaching = np.flatnonzero(precision >= target)
        if len(reaching):
            return float(thresholds[reaching[0]]), True
        return float(thresholds[np.flatnonzero(precision == precision.max())[0]]), False
    if rule == "recall":
        return float(thresholds[np.flatnonzero(recall >= target)[-1]]), True
    raise ValueError(f"unknown threshold rule {rule!r}")


def decide(params: DecisionParams, probs: np.ndarray, labels: np.ndarray) -> Decision:
    """The decision params choose, fitted on the validation set's (n, classes) probabilities and labels."""
    temperature = fit_temperature(probs, labels) if params.calibration == "temperature" else 1.0
    if params.threshold == "argmax":
        return Decision(temperature)
    present = np.bincount(labels, minlength=2)
    if present[0] == 0 or present[1] == 0:
        raise PipelineError(
            f"decision.threshold={params.threshold}: the validation set holds no message of class "
            f"{int(np.argmin(present))}, so no threshold can be chosen on it; give split.validation more data "
            "(or split.stratify: true), or set decision.threshold: argmax"
        )
    calibrated = Decision(temperature).calibrate(probs)
    threshold, reached = choose_threshold(labels, calibrated[:, 1], params.threshold, params.target)
    return Decision(temperature, threshold, reached)
