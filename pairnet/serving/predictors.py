"""Predictors over pickle-free model folders, batched so memory stays bounded.

Serving runs as the benchmarks do: under ``torch.inference_mode``, the weights in
channels_last, on the device ``pick_device`` chooses (CUDA when present), with the
autocast dtype the training loop's ``amp_dtype`` picks for that device (bf16 on CUDA and
on CPUs with AMX bf16 units, else fp32). Each batch of pairs is converted and uploaded
once (:func:`upload`); the stack feeds all its base models from that one tensor.
"""

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
from pairnet.device import amp_dtype, autocast, pick_device, to_device

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
    """(N, 28, 56) view of the input in its own dtype; each batch becomes uint8 in :func:`upload`,
    so a wide input dtype (int64 from JSON) is never copied whole."""
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    return np.asarray(x).reshape(-1, *IMAGE_SHAPE)


def upload(xb: np.ndarray, device: torch.device) -> torch.Tensor:
    """One batch of pairs → float32 in [0, 1] on the device: the one host→device copy per
    batch (uint8 crosses the bus, a quarter of the float bytes; the scaling runs on the device)."""
    return to_device(torch.from_numpy(np.ascontiguousarray(xb, dtype=np.uint8)), device).float().div_(255)


def _batches(x: np.ndarray, device: torch.device, size: int):
    for start in range(0, len(x), size):
        yield start, upload(x[start:start + size], device)


def _device(device: str | torch.device | None) -> torch.device:
    return pick_device() if device is None else torch.device(device)


class PairPredictor:
    """uint8 pairs (N, 28, 56) → probabilities (N,) of label 1, in batches.

    The model is moved to the device in channels_last (in place: pass a copy to keep yours).
    ``amp`` takes the training config's values: ``auto``, ``bf16``, ``fp16`` or ``off``.
    """

    def __init__(self, model: PairModel, batch: int = BATCH, *, device: str | torch.device | None = None,
                 amp: str = "auto"):
        self.device = _device(device)
        self.amp = amp_dtype(amp, self.device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.batch = batch

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device | None = None,
             amp: str = "auto") -> "PairPredictor":
        return cls(load_pair_dir(folder), device=device, amp=amp)

    def predict_batch(self, xb: torch.Tensor) -> torch.Tensor:
        """Probabilities (B,) in fp32, on the device, of one batch from :func:`upload`."""
        with autocast(self.device, self.amp):
            return torch.sigmoid(self.model(xb).float())

    @torch.inference_mode()
    def predict(self, x) -> np.ndarray:
        x = _as_pairs(x)
        out = np.empty(len(x), dtype=np.float32)
        for start, xb in _batches(x, self.device, self.batch):
            out[start:start + len(xb)] = self.predict_batch(xb).cpu().numpy()
        return out


class StackPredictor:
    """Base models' probabilities → LightGBM meta-learner → DataFrame(label, probability)."""

    def __init__(self, bases: list[PairPredictor], booster, batch: int = BATCH):
        if not bases:
            raise ValueError("a stack needs at least one base model")
        devices = {b.device for b in bases}
        if len(devices) > 1:
            raise ValueError(f"a stack's base models must share one device, got {sorted(map(str, devices))}")
        self.device = bases[0].device
        self.bases = bases
        self.booster = booster
        self.batch = batch

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device | None = None,
             amp: str = "auto") -> "StackPredictor":
        import lightgbm

        folder = Path(folder)
        try:
            lineage = json.loads((folder / LINEAGE).read_text())
            keys = [b["key"] for b in lineage["base_models"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PairnetError(f"{folder}: not a pairnet stack ({LINEAGE} unreadable: {err})") from None
        if not keys:
            raise PairnetError(f"{folder}: not a pairnet stack ({LINEAGE} names no base models)")
        device = _device(device)
        bases = [PairPredictor.load(folder / "bases" / key, device=device, amp=amp) for key in keys]
        # LightGBM's own text format: a model description, not executable.
        return cls(bases, lightgbm.Booster(model_file=str(folder / META_MODEL)))

    @torch.inference_mode()
    def probabilities(self, x) -> np.ndarray:
        x = _as_pairs(x)
        out = np.empty(len(x), dtype=np.float64)
        for start, xb in _batches(x, self.device, self.batch):
            # Every base model reads the same uploaded batch; one copy back for all of them.
            probs = torch.stack([b.predict_batch(xb) for b in self.bases]).cpu().numpy()
            out[start:start + len(xb)] = self.booster.predict(meta_features(list(probs)))
        return out

    def predict(self, x) -> pd.DataFrame:
        p = self.probabilities(x)
        return pd.DataFrame({"label": to_labels(p), "probability": p})
