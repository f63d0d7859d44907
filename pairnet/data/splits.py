"""A data folder's splits: train and val (and the labelled public test when present),
loaded and checked, with the default set made when the folder has no pair files at all."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pairnet.data.generate import FILES, LABELS_CSV, ensure_dataset
from pairnet.data.pairs import PairSet, load_pairs
from pairnet.errors import PairnetError
from pairnet.paths import data_dir as default_data_dir
from pairnet.paths import default_set_dir
from pairnet.presets import check_preset

log = logging.getLogger(__name__)


GATE_EVERY = 5  # every 5th val pair (rows 4, 9, 14, ...) is the gate part


def gate_mask(n: int) -> np.ndarray:
    """The gate part's rows of a val set of ``n`` pairs: every 5th (4, 9, 14, ...)."""
    return np.arange(n) % GATE_EVERY == GATE_EVERY - 1


def val_parts(val: PairSet) -> tuple[PairSet, PairSet]:
    """``val`` cut in two by row: the selection part (4 rows in 5), on which training picks its best
    epoch, stops early and Optuna compares trials, and the gate part (every 5th row), which
    nothing is chosen on: the champion gate judges every model there."""
    gate = gate_mask(len(val))
    return val.subset(~gate, "selection part"), val.subset(gate, "gate part")


@dataclass
class Splits:
    train: PairSet
    val: PairSet
    public: PairSet | None
    data_dir: Path

    def digest(self) -> str:
        return self.train.digest()[:8] + self.val.digest()[:8]

    @cached_property
    def _parts(self) -> tuple[PairSet, PairSet]:
        return val_parts(self.val)

    @property
    def select(self) -> PairSet:
        """The val rows training chooses on (``val_parts``)."""
        return self._parts[0]

    @property
    def gate(self) -> PairSet:
        """The val rows the champion gate judges on, chosen on by nothing (``val_parts``)."""
        return self._parts[1]


def check_data_dir(data_dir: str | Path | None) -> Path:
    """The data folder, refused in one line when it names a file (before any data or run)."""
    d = Path(data_dir) if data_dir else default_data_dir()
    if d.exists() and not d.is_dir():
        raise PairnetError(f"--data-dir {d} is a file; give the folder that holds train.npz and val.npz")
    return d


def preset_data_dir(d: Path, preset: str) -> Path:
    """The folder a preset trains on: ``d``, except that the project's own data folder holding
    the default set of another size (the quick set the main job left there, under the full
    preset) gives way to the preset's own default-set folder, ``data/default/<size>``."""
    if d.resolve() != default_data_dir().resolve():
        return d
    try:
        made = json.loads((d / "meta.json").read_text()).get("size")
    except (OSError, ValueError, AttributeError):
        return d
    want = check_preset(preset)["data_size"]
    if made in (None, want):
        return d
    log.info("%s holds the %s default set; preset %s trains on the %s set in %s", d, made, preset, want,
             default_set_dir(want))
    return default_set_dir(want)


def load_splits(data_dir: str | Path | None, preset: str) -> Splits:
    """Train/val (and labelled public test, when present); make the default set if absent."""
    d = preset_data_dir(check_data_dir(data_dir), preset)
    ensure_dataset(d, size=check_preset(preset)["data_size"])  # says so when it makes one
    train, val = load_pairs(d / FILES["train"]), load_pairs(d / FILES["val"])
    train.require_labels(), val.require_labels()
    public = None
    labels = d / LABELS_CSV
    if (d / FILES["public"]).exists() and labels.exists():
        public = load_pairs(d / FILES["public"], labels=labels)
    return Splits(train, val, public, d)
