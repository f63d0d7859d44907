"""Classification metrics from probabilities and labels."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from pairnet.data.pairs import to_labels


def accuracy(prob: np.ndarray, y: np.ndarray) -> float:
    return float((to_labels(prob) == np.asarray(y)).mean())


def binary_metrics(prob: np.ndarray, y: np.ndarray, prefix: str = "") -> dict[str, float]:
    pred = to_labels(prob)
    out = {
        "acc": float((pred == y).mean()),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "auc": float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else float("nan"),
    }
    return {prefix + k: v for k, v in out.items()}
