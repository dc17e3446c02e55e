"""PNG figures of the training curves and the confusion matrix (dvc plots draws the CSVs too)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .files import atomic_path  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_curves(rows: list[dict], x: str, ys: list[str], ylabel: str, path: str | os.PathLike) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for y in ys:
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o" if len(rows) < 20 else None, label=y)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: str | os.PathLike) -> None:
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("test set")
    _save(fig, path)
