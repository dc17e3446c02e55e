"""Seeded percentile-bootstrap 95 % intervals of accuracy and F1: the rows resampled with replacement
(numpy's default_rng(seed)), each resample's confusion matrix counted at once for all of them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 2**22  # row indices drawn at a time (32 MiB): a large test set's resamples are counted in chunks


def resampled_rows(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The rows of each resample, (resamples in this chunk, n) indices into the n rows."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, CHUNK // n)
    for start in range(0, resamples, per_chunk):
        yield rng.integers(0, n, (min(per_chunk, resamples - start), n))


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, resamples: int, seed: int) -> dict:
    """The 2.5th and 97.5th percentiles over `resamples` resamples of the rows of accuracy and of F1
    (of class 1 for two classes, macro-averaged for more, as classification_report's), as
    {"accuracy_ci": {"low", "high"}, "f1_ci": {...}}; nothing for 0 resamples."""
    if resamples == 0:
        return {}
    num_classes = probs.shape[1]
    cells = labels * num_classes + probs.argmax(1)  # (n,) the confusion matrix's cell of each row
    accuracy, f1 = [], []
    for rows in resampled_rows(len(labels), resamples, seed):
        offsets = np.arange(len(rows))[:, None] * num_classes**2  # one matrix per resample
        counts = np.bincount((cells[rows] + offsets).ravel(), minlength=len(rows) * num_classes**2)
        matrices = counts.reshape(len(rows), num_classes, num_classes).astype(np.float64)
        true_pos = np.diagonal(matrices, axis1=1, axis2=2)  # (resamples, classes)
        accuracy.append(true_pos.sum(1) / len(labels))
        # 2 precision recall / (precision + recall) = 2 tp / (predicted + actual); 0 for a class in neither
        per_class = 2 * true_pos / np.maximum(matrices.sum(1) + matrices.sum(2), 1)
        f1.append(per_class[:, 1] if num_classes == 2 else per_class.mean(1))
    return {
        f"{name}_ci": dict(
            zip(("low", "high"), np.percentile(np.concatenate(values), [2.5, 97.5]).tolist(), strict=True)
        )
        for name, values in (("accuracy", accuracy), ("f1", f1))
    }
