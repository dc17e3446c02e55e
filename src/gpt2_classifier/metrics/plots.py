"""The confusion matrix as a PNG, for MLflow (dvc plots draws it from the CSV too; the training curves
are MLflow metrics and CSVs that dvc plots draws, so they need no figure)."""

from __future__ import annotations

import os

from matplotlib.figure import Figure  # drawn by Agg on savefig; no pyplot, no GUI backend, no global state

from gpt2_classifier.core.files import atomic_path


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})


def plot_confusion(matrix: list[list[int]], labels: list[str], path: str | os.PathLike) -> None:
    size = max(3.4, 0.6 * len(labels) + 2.2)  # room for every class's name and counts
    fig = Figure(figsize=(size + 0.4, size))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set_xticks(
        range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center"
    )
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("test set")
    _save(fig, path)
