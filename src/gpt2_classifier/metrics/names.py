"""One name per number, the same string everywhere: MLflow's metric keys, the JSON files DVC reads
(`dvc metrics show`, `dvc exp show`), the curves' CSV columns (`dvc plots`) and the README.

- `<split>/<metric>`: a final value of the classifier kept (validation/accuracy, test/f1), logged to
  MLflow once, without a step (MLflow draws it as one bar per run);
- `<split>_<metric>`: a curve over training, logged at each optimizer step it was measured at
  (validation_loss and validation_accuracy after each epoch on the full validation set, the values
  finetune.early_stopping judges; train_loss_estimate every finetune.eval_freq steps, over
  finetune.eval_iter batches);
- `system/<metric>`: what depends on the machine and its load (training time, speed, GPU memory), as
  MLflow names its system metrics (mlflow.system_metrics); ours stay in details.json and out of MLflow's
  metrics, whose tables and compare page sort them before test/ and validation/ (the run's duration is
  MLflow's own column).

The headline is the handful a reader compares runs by; `dvc metrics show` prints it on one line of a
120-column terminal. Everything else is in the details files (reports/train/details.json,
reports/eval/details.json), which MLflow keeps as artifacts of the run.
"""

from __future__ import annotations

import math
import re

# finetune: of the epoch kept (finetune.keep), on the full validation set (reports/train/summary.json,
# where a training run in progress shows its latest epoch's)
VALIDATION_HEADLINE = ("epoch", "validation/accuracy", "validation/loss")
# evaluate: on the test set, of the probabilities served (reports/metrics.json); roc_auc for two classes
TEST_HEADLINE = ("test/accuracy", "test/f1", "test/roc_auc")


def tidy(value: float | int | str | None) -> float | int | str | None:
    """A float without the rounding noise of float arithmetic: 0.8749999999999999 (7 / 8 summed) is
    0.875, the nearest short decimal within a few units in the last place; any other value as given."""
    if not isinstance(value, float) or not math.isfinite(value):
        return value
    short = float(f"{value:.12g}")
    return short if abs(short - value) <= 4 * math.ulp(value) else value


def metric_key(*parts: str) -> str:
    """An MLflow metric name: test/accuracy, test/per_class/<class>/f1 (a class name's characters that
    MLflow refuses in names, '/' among them, become '_')."""
    return "/".join(re.sub(r"[^\w.\- :]", "_", part) for part in parts)


def flat_metrics(tree: dict, keys: tuple[str, ...] = ()) -> dict[str, float]:
    """{'test': {'accuracy': 0.9, 'per_class': {'spam': {'f1': 0.8}}}} ->
    {'test/accuracy': 0.9, 'test/per_class/spam/f1': 0.8}, each value tidied."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flat_metrics(value, (*keys, key))
        else:
            flat[metric_key(*keys, key)] = tidy(value)
    return flat


def headline(flat: dict, names: tuple[str, ...]) -> dict:
    """Those of `names` that `flat` holds, in that order."""
    return {name: flat[name] for name in names if name in flat}


def nested_metrics(flat: dict) -> dict:
    """flat_metrics' inverse: {'test/per_class/spam/f1': 0.8} -> {'test': {'per_class': {'spam': {'f1': 0.8}}}}."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, last = key.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return tree
