"""Predictions files (``id,label``) from any registered model, and submission checks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from pairnet.data.pairs import load_pairs
from pairnet.errors import PairnetError

DEFAULT_MODEL = "models:/pairnet-stack@champion"


def load_model(uri: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        first = str(err).strip().splitlines()[0]
        raise PairnetError(f"cannot load model '{uri}': {first}") from None


def probabilities(model, x: np.ndarray) -> np.ndarray:
    """Probability of label 1 from a base model (array) or the stack (DataFrame)."""
    out = model.predict(x)
    if isinstance(out, pd.DataFrame):
        return out["probability"].to_numpy(dtype=np.float64)
    return np.asarray(out, dtype=np.float64).reshape(-1)


def predict_file(model_uri: str, data: str | Path, out: str | Path) -> int:
    pairs = load_pairs(data)
    prob = probabilities(load_model(model_uri), pairs.x)
    labels = (prob >= 0.5).astype(int)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": pairs.ids_or_index(), "label": labels}).to_csv(out, index=False)
    return len(labels)


def check_submission(data: str | Path, pred: str | Path) -> list[str]:
    """Every problem of a predictions CSV against a pair file, one line each."""
    pairs = load_pairs(data)
    expected = pairs.ids_or_index().tolist()
    pred = Path(pred)
    if not pred.exists():
        return [f"{pred}: no such file"]
    problems = []
    with open(pred, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or [h.strip() for h in rows[0]] != ["id", "label"]:
        return [f"{pred}: header is {rows[0] if rows else None!r}, expected 'id,label'"]
    seen: dict[str, int] = {}
    known = set(expected)
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            problems.append(f"{pred}: line {line} has {len(row)} fields, expected 2")
            continue
        key, label = row[0].strip(), row[1].strip()
        if key in seen:
            problems.append(f"{pred}: line {line}: duplicate id '{key}' (first on line {seen[key]})")
        else:
            seen[key] = line
        if key not in known:
            problems.append(f"{pred}: line {line}: id '{key}' is not in {data}")
        if label not in ("0", "1"):
            problems.append(f"{pred}: line {line}: label {label!r} is not 0 or 1")
    missing = [i for i in expected if i not in seen]
    if missing:
        problems.append(f"{pred}: {len(missing)} ids of {data} have no prediction, e.g. '{missing[0]}'")
    return problems
