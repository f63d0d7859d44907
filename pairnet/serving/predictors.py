"""Predictors over pickle-free model folders, batched so memory stays bounded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from pairnet.data.pairs import IMAGE_SHAPE, to_labels
from pairnet.errors import PairnetError
from pairnet.models import PairModel, model_from_spec
from pairnet.stacking import meta_features

WEIGHTS = "weights.safetensors"
SPEC = "spec.json"
LINEAGE = "lineage.json"
META_MODEL = "meta_model.txt"
# Pairs per forward pass. The first activations of a full-width tower are ~200 MB for
# 1,024 pairs (2,048 half-images), so memory stays bounded whatever the input size.
BATCH = 1024


def save_pair_dir(model: PairModel, folder: str | Path) -> Path:
    """Write ``weights.safetensors`` + ``spec.json``: every tensor (the digit head included,
    which serving ignores and fine-tuning with ``init_from`` reuses) and the zoo spec."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = dict(model.spec)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return folder


def read_pair_dir(folder: str | Path) -> tuple[dict, dict]:
    """(spec, tensors) of a model folder; safetensors holds tensors only, nothing to unpickle."""
    folder = Path(folder)
    try:
        return json.loads((folder / SPEC).read_text()), load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as err:
        raise PairnetError(f"{folder}: not a pairnet model folder ({WEIGHTS} + {SPEC}): {err}") from None


def load_pair_dir(folder: str | Path) -> PairModel:
    spec, state = read_pair_dir(folder)
    try:
        model = model_from_spec(spec)
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise PairnetError(f"{folder}: weights do not fit the model its spec names ({first})") from None
    return model.eval()


def save_stack_dir(bases: dict[str, PairModel], booster, folder: str | Path) -> Path:
    """The folder :meth:`StackPredictor.load` reads: ``bases/<key>/`` per base model, the booster's
    text model and a ``lineage.json`` naming the keys in feature order (the stack stage writes
    the same files from registry versions, with names, versions and run ids in the lineage)."""
    folder = Path(folder)
    for key, model in bases.items():
        save_pair_dir(model, folder / "bases" / key)
    booster.save_model(str(folder / META_MODEL))
    (folder / LINEAGE).write_text(json.dumps({"base_models": [{"key": k} for k in bases]}, indent=2))
    return folder


def _as_pairs(x) -> np.ndarray:
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8:
        x = x.astype(np.uint8)
    return x.reshape(-1, *IMAGE_SHAPE)


class PairPredictor:
    """uint8 pairs (N, 28, 56) → probabilities (N,) of label 1, in batches."""

    def __init__(self, model: PairModel, batch: int = BATCH):
        self.model = model.eval()
        self.batch = batch

    @classmethod
    def load(cls, folder: str | Path) -> "PairPredictor":
        return cls(load_pair_dir(folder))

    @torch.inference_mode()
    def predict(self, x) -> np.ndarray:
        x = _as_pairs(x)
        out = np.empty(len(x), dtype=np.float32)
        for start in range(0, len(x), self.batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + self.batch])).float().div_(255)
            out[start:start + len(xb)] = torch.sigmoid(self.model(xb).float()).numpy()
        return out


class StackPredictor:
    """Base models' probabilities → LightGBM meta-learner → DataFrame(label, probability)."""

    def __init__(self, bases: list[PairPredictor], booster, batch: int = BATCH):
        self.bases = bases
        self.booster = booster
        self.batch = batch

    @classmethod
    def load(cls, folder: str | Path) -> "StackPredictor":
        import lightgbm

        folder = Path(folder)
        try:
            lineage = json.loads((folder / LINEAGE).read_text())
            keys = [b["key"] for b in lineage["base_models"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PairnetError(f"{folder}: not a pairnet stack ({LINEAGE} unreadable: {err})") from None
        bases = [PairPredictor.load(folder / "bases" / key) for key in keys]
        # LightGBM's own text format: a model description, not executable.
        return cls(bases, lightgbm.Booster(model_file=str(folder / META_MODEL)))

    def probabilities(self, x) -> np.ndarray:
        x = _as_pairs(x)
        out = np.empty(len(x), dtype=np.float64)
        for start in range(0, len(x), self.batch):
            xb = x[start:start + self.batch]
            out[start:start + len(xb)] = self.booster.predict(meta_features([b.predict(xb) for b in self.bases]))
        return out

    def predict(self, x) -> pd.DataFrame:
        p = self.probabilities(x)
        return pd.DataFrame({"label": to_labels(p), "probability": p})
