"""Predictions files (``id,label``) from any registered model, and submission checks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from pairnet.data.pairs import load_pairs, to_labels, write_labels_csv
from pairnet.errors import PairnetError
from pairnet.tta import mean_over_shifts

def default_model() -> str:
    """The namespace's champion stack (``models:/<namespace>-stack@champion``)."""
    from pairnet.tracking.registry import stack_name

    return f"models:/{stack_name()}@champion"


def load_model(uri: str):
    """A pairnet model (pair or stack) loaded without pickle; see tracking.model.load_trusted."""
    from pairnet.tracking.model import load_trusted

    return load_trusted(uri)


def probabilities(model, x: np.ndarray, tta: bool = False) -> np.ndarray:
    """Probability of label 1 from a base model (array) or the stack (DataFrame); ``tta``: the
    mean over the test-time shifts of each half (``pairnet.tta``)."""
    if tta:
        return mean_over_shifts(lambda shifted: probabilities(model, shifted), x)
    out = model.predict(x)
    if isinstance(out, pd.DataFrame):
        return out["probability"].to_numpy(dtype=np.float64)
    return np.asarray(out, dtype=np.float64).reshape(-1)


def check_out_path(out: str | Path, *inputs: str | Path | None) -> Path:
    """Refuse an output path that would overwrite an input or a pair file."""
    out = Path(out)
    if out.suffix.lower() == ".npz":
        raise PairnetError(f"--out {out} ends in .npz: predictions are a CSV; refusing to write over a pair file "
                           "(use e.g. --out pred.csv)")
    if out.is_dir():
        raise PairnetError(f"--out {out} is a folder; give a CSV file path")
    for item in inputs:
        if item is not None and Path(item).exists() and out.exists() and out.resolve() == Path(item).resolve():
            raise PairnetError(f"--out {out} is one of the inputs; refusing to overwrite it")
    return out


def predict_file(model_uri: str, data: str | Path, out: str | Path, tta: bool = False) -> int:
    """Predict every pair of ``data`` (in batches; ``tta``: the mean over test-time shifts) and
    write ``id,label`` to ``out`` atomically."""
    out = check_out_path(out, data)
    model = load_model(model_uri)  # a bad URI fails before the data is read
    pairs = load_pairs(data)
    labels = to_labels(probabilities(model, pairs.x, tta))
    write_labels_csv(out, pairs.ids_or_index(), labels)
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
