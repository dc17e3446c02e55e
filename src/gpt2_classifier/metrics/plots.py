"""The confusion matrix, the precision-recall curves and the reliability diagram as PNGs, for MLflow
(dvc plots draws them from the CSVs too; the training curves are MLflow metrics and CSVs that dvc
plots draws, so they need no figure)."""

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


def plot_reliability(rows: list[dict[str, float]], bins: int, ece: float, path: str | os.PathLike) -> None:
    """The accuracy of each confidence bin (calibration.reliability_bins) as a bar over the bin, with
    its number of rows above it and a dot at its mean confidence, against the diagonal where
    confidence equals accuracy (no legend: it would cost the stage 15 ms)."""
    fig = Figure(figsize=(4.4, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, zorder=3)
    lower = [row["bin"] / bins for row in rows]
    bars = ax.bar(
        lower,
        [row["accuracy"] for row in rows],
        width=1 / bins,
        align="edge",
        edgecolor="black",
        alpha=0.8,
    )
    ax.bar_label(bars, [str(row["count"]) for row in rows], fontsize=7)
    ax.plot(
        [row["confidence"] for row in rows],
        [row["accuracy"] for row in rows],
        "o",
        color="black",
        markersize=3,
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence (the predicted class's probability; dots: each bin's mean)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (test set; ECE {ece:.3f})")
    _save(fig, path)


def plot_precision_recall(curves: dict[str, list[dict[str, float]]], precision: dict[str, float], path) -> None:
    """Each class's precision against recall as the threshold falls (classification.precision_recall_curve:
    of class 1 alone for two classes), a step at every threshold, its average precision in the title or,
    for several classes, beside each curve's name."""
    fig = Figure(figsize=(4.4, 4.2))
    ax = fig.subplots()
    for name, points in curves.items():
        ax.step([p["recall"] for p in points], [p["precision"] for p in points], where="post", label=f"{name} "
                f"(AP {precision[name]:.3f})")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    if len(curves) == 1:
        ((name, ap),) = precision.items()
        ax.set_title(f"precision-recall of {name} (test set; AP {ap:.3f})")
    else:
        ax.set_title("precision-recall, one class against the rest (test set)")
        ax.legend(fontsize=7, loc="lower left")
    _save(fig, path)
