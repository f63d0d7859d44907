"""Evaluation a person can read, logged on a run for each labelled split (val, test_public):
why a model errs, not only how often.

Under ``eval/<split>/``: ``curves.png`` (ROC with AUC, precision-recall with average
precision, reliability diagram), ``confusion_matrix.png``, ``most_confident_errors.png`` (the
pairs it got wrong with the most confidence), ``predictions.json`` (an MLflow table: id,
label, probability, predicted) and, where the data carries each half's digit (the default
set does), ``digit_pair_errors.json`` (an MLflow table: left, right, pairs, errors,
error_rate) with its 10×10 heatmap ``digit_pair_errors.png``.
"""

from __future__ import annotations


import mlflow
import numpy as np
import pandas as pd

from pairnet import plots
from pairnet.data.pairs import PairSet, to_labels
from pairnet.train.loop import digit_labels

EVAL_DIR = "eval"
GALLERY = 12  # most confidently wrong pairs shown


def digit_pair_errors(pairs: PairSet, prob: np.ndarray) -> pd.DataFrame | None:
    """Pairs and errors per (left digit, right digit), the pairs that occur; None without digits."""
    digits = digit_labels(pairs)
    if digits is None:
        return None
    wrong = to_labels(prob) != pairs.y
    count, errors = np.zeros((10, 10), dtype=int), np.zeros((10, 10), dtype=int)
    np.add.at(count, (digits[:, 0], digits[:, 1]), 1)
    np.add.at(errors, (digits[:, 0], digits[:, 1]), wrong.astype(int))
    left, right = np.nonzero(count)
    return pd.DataFrame({"left": left, "right": right, "pairs": count[left, right], "errors": errors[left, right],
                         "error_rate": errors[left, right] / count[left, right]})


def confident_errors(pairs: PairSet, prob: np.ndarray, k: int = GALLERY) -> np.ndarray:
    """Indices of the wrong predictions, the most confident first (at most ``k``)."""
    wrong = np.flatnonzero(to_labels(prob) != pairs.y)
    return wrong[np.argsort(-np.abs(prob[wrong] - 0.5), kind="stable")][:k]


def log_evaluation(split: str, pairs: PairSet, prob: np.ndarray) -> None:
    """Every evaluation artifact of ``split`` on the active run (see the module docstring)."""
    prob = np.asarray(prob, dtype=np.float64)
    folder = f"{EVAL_DIR}/{split}"
    mlflow.log_figure(plots.curves(pairs.y, prob, title=f"{split}: {len(pairs)} pairs"), f"{folder}/curves.png")
    mlflow.log_figure(plots.confusion(pairs.y, prob, title=f"{split} confusion matrix"),
                      f"{folder}/confusion_matrix.png")
    worst = confident_errors(pairs, prob)
    mlflow.log_figure(plots.gallery(pairs.x[worst], pairs.y[worst], prob[worst],
                                    title=f"{split}: the {len(worst)} most confidently wrong pairs",
                                    ids=pairs.ids_or_index()[worst]), f"{folder}/most_confident_errors.png")
    table = digit_pair_errors(pairs, prob)
    if table is not None:
        errors, count = np.zeros((10, 10), dtype=int), np.zeros((10, 10), dtype=int)
        errors[table.left, table.right], count[table.left, table.right] = table.errors, table.pairs
        mlflow.log_figure(plots.digit_pair_heatmap(errors, count, title=f"{split}: error rate per (left, right) digit"),
                          f"{folder}/digit_pair_errors.png")
    if table is not None:
        mlflow.log_table(table, f"{folder}/digit_pair_errors.json")
    mlflow.log_table(pd.DataFrame({"id": pairs.ids_or_index().astype(str), "label": pairs.y.astype(int),
                                   "probability": prob, "predicted": to_labels(prob)}), f"{folder}/predictions.json")
