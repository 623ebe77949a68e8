"""Classification metrics reported per site and for the federation."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["METRIC_NAMES", "classification_metrics", "confusion_matrix", "recall_by_class", "weighted_mean"]

METRIC_NAMES = ("loss", "accuracy", "precision", "recall", "f1", "auroc")


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Loss, accuracy, macro precision/recall/F1 and macro one-vs-rest AUROC.

    Macro averages run over the classes present in ``labels``; AUROC over the
    classes that have both positives and negatives here (NaN if none do).
    """
    if len(labels) == 0:
        return {name: float("nan") for name in METRIC_NAMES}
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score  # 1.5 s to import: only when used
    logits = logits.detach().float()
    y_true = labels.detach().cpu().numpy().astype(np.int64)
    loss = float(F.cross_entropy(logits, labels.long(), reduction="mean"))
    probs = torch.softmax(logits, dim=1).cpu().numpy()
    y_pred = probs.argmax(axis=1)
    present = np.unique(y_true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes never predicted give 0 precision, by definition
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=present, average="macro", zero_division=0
        )
    aucs = []
    for c in range(num_classes):
        positives = y_true == c
        if positives.any() and (~positives).any():
            aucs.append(roc_auc_score(positives, probs[:, c]))
    return {
        "loss": loss,
        "accuracy": float((y_pred == y_true).mean()),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auroc": float(np.mean(aucs)) if aucs else float("nan"),
    }


def weighted_mean(values: list[float], weights: list[float]) -> float:
    """Mean of ``values`` weighted by ``weights``, ignoring NaN entries."""
    pairs = [(v, w) for v, w in zip(values, weights) if v == v and w > 0]
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total) if total else float("nan")


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts of (true class, predicted class): row ``i`` holds the examples of class ``i`` by their prediction."""
    pairs = labels.detach().cpu().long() * num_classes + logits.detach().argmax(dim=1).cpu().long()
    counts = torch.bincount(pairs, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).tolist()


def recall_by_class(matrix: list[list[int]]) -> dict[int, float]:
    """Recall of each class that has examples in ``matrix`` (a :func:`confusion_matrix`); absent classes are left out."""
    return {c: row[c] / sum(row) for c, row in enumerate(matrix) if sum(row)}
