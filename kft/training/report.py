"""The run report: history.csv, metrics.json and plots."""

import json
import os
import platform

import numpy as np

from kft._keras_internals import distribute_strategy

__all__ = [
    "classification_report",
    "confusion_matrix",
    "figure",
    "plot_confusion_matrix",
    "plot_curves",
    "versions",
    "write_metrics",
]


def versions():
    import keras
    import tensorflow as tf

    import kft

    return {
        "kft": kft.__version__,
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "backend": keras.backend.backend(),
        "python": platform.python_version(),
    }


def write_metrics(path, metrics):
    """Writes `metrics` as JSON (atomically, so a crash leaves no half file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=False, default=float)
    os.replace(tmp, path)


def figure(**kwargs):
    """A matplotlib `Figure` outside pyplot: no global backend switch (a
    notebook keeps its inline plots) and nothing to close."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def plot_curves(rows, path):
    """Loss and accuracy per epoch, train and validation, stages marked.

    Args:
        rows: `history.csv` rows (dicts with `stage`, `epoch`, metrics).
    """
    epochs = [r["epoch"] for r in rows]
    metric = next(
        (m for m in ("accuracy", "mae", "auc") if any(m in r for r in rows)), None
    )
    panels = ["loss"] + ([metric] if metric else [])
    fig = figure(figsize=(5.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels))
    axes = np.atleast_1d(axes)
    boundaries = [
        (r["epoch"] - 1, r["stage"]) for i, r in enumerate(rows)
        if i == 0 or r["stage"] != rows[i - 1]["stage"]
    ]
    for ax, key in zip(axes, panels):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            values = [r.get(prefix + key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, markersize=3,
                        label=("validation" if prefix else "train"))
        for epoch, name in boundaries:
            ax.axvline(epoch + 0.5, color="gray", linestyle="--", linewidth=0.8)
            ax.text(epoch + 0.6, 1.0, name, transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8, color="gray")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def confusion_matrix(model, dataset, num_classes):
    """Counts `[true, predicted]` over a dataset of `(x, y)` batches."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    # predict_on_batch does not split a batch across tf.distribute replicas.
    distributed = distribute_strategy(model) is not None
    for x, y in dataset:
        probs = (model.predict(x, verbose=0) if distributed
                 else model.predict_on_batch(x))
        predicted = (
            np.argmax(probs, axis=-1)
            if probs.shape[-1] > 1
            else (probs[:, 0] > 0.5).astype(int)
        )
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[-1] > 1:
            y = np.argmax(y, axis=-1)
        np.add.at(matrix, (y.reshape(-1).astype(int), predicted), 1)
    return matrix


def plot_confusion_matrix(matrix, class_names, path):
    """Saves the confusion matrix with counts in each cell."""
    n = len(class_names)
    fig = figure(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    high = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > high / 2 else "black",
                    fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def classification_report(matrix, class_names):
    """Per-class precision, recall, F1 and support from a confusion matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    report = {}
    for i, name in enumerate(class_names):
        tp = matrix[i, i]
        predicted, actual = matrix[:, i].sum(), matrix[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        report[name] = {"precision": round(float(precision), 4),
                        "recall": round(float(recall), 4),
                        "f1": round(float(f1), 4), "support": int(actual)}
    return report
