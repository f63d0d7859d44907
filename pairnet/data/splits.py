"""A data folder's splits: train and val (and the labelled public test when present),
loaded and checked, with the default set made when the folder has no pair files at all."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pairnet.data.generate import FILES, LABELS_CSV, ensure_dataset
from pairnet.data.pairs import PairSet, load_pairs
from pairnet.errors import PairnetError
from pairnet.paths import data_dir as default_data_dir
from pairnet.paths import default_set_dir
from pairnet.presets import check_preset

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: PairSet
    val: PairSet
    public: PairSet | None
    data_dir: Path

    def digest(self) -> str:
        return self.train.digest()[:8] + self.val.digest()[:8]


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
