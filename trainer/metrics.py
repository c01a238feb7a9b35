"""Classification metrics as plain JSON-ready dicts: what metrics.json, the eval log lines and the gate read."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> float:
    """Macro-F1 over all labels (a class never predicted and never seen counts as 0, as it should: the
    selection metric must not reward ignoring a class)."""
    return float(f1_score(y_true, y_pred, labels=list(range(n_labels)), average="macro", zero_division=0))


def summary(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> dict:
    """Accuracy and macro-F1: the per-evaluation numbers."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} references but {len(y_pred)} predictions")
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": macro_f1(y_true, y_pred, n_labels),
        "n": len(y_true),
    }


def report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """The full report: summary, per-class precision/recall/F1/support, and the confusion matrix
    (``confusion_matrix[i][j]`` = examples of ``labels[i]`` predicted as ``labels[j]``)."""
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    per_class = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    return {
        **summary(y_true, y_pred, len(labels)),
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }
