"""PNG figures of a training run: curves, confusion matrix, misclassified digits."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """counts[t, p]: how many images of class t were predicted as p."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (true, predicted), 1)
    return counts


def plot_training_curves(history: dict[str, list[float]], path: Path) -> None:
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history["loss"]) + 1)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.plot(epochs, history[metric], "o-", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=metric, title=metric.capitalize())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(counts: np.ndarray, class_names: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(np.log1p(counts), cmap="Blues")
    ax.set(
        xticks=range(len(class_names)),
        yticks=range(len(class_names)),
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="true",
        title=f"Test confusion matrix ({counts.trace()} / {counts.sum()} correct)",
    )
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    threshold = counts.max() / 2
    for (t, p), n in np.ndenumerate(counts):
        ax.text(
            p,
            t,
            str(n),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if n > threshold else "black",
        )
    fig.colorbar(image, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_misclassified(
    images: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    class_names: list[str],
    path: Path,
    limit: int = 36,
) -> None:
    wrong = np.flatnonzero(true != predicted)[:limit]
    columns = 6
    rows = max(1, -(-len(wrong) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong):
        ax.imshow(images[index].squeeze(), cmap="gray")
        ax.set_title(
            f"#{index}\ntrue {class_names[true[index]]} → {class_names[predicted[index]]}",
            fontsize=7,
        )
    fig.suptitle(
        f"Misclassified test images ({len(np.flatnonzero(true != predicted))} in all, first {len(wrong)})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
