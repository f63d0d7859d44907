"""Pair files: the data contract (README, "Your own folder"), loading, validation and writing.

A pair file is an ``.npz`` read with ``allow_pickle=False``:
``x`` uint8 (N, 28, 56) — left half image A, right half image B; optional ``y`` in
{0, 1}; optional unique string ``id``. Extra arrays (``digit_a``, ``digit_b`` in the
default dataset) are kept but never required.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pairnet.errors import PairnetError
from pairnet.fsutil import atomic_path

IMAGE_SHAPE = (28, 56)
# A probability of label 1 at or above this is predicted as label 1, everywhere.
THRESHOLD = 0.5
# Fixed zip timestamps make files written from the same arrays byte-identical.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass
class PairSet:
    """N image pairs with optional labels, ids and extra per-pair arrays."""

    x: np.ndarray
    y: np.ndarray | None = None
    ids: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "<memory>"
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def require_labels(self) -> np.ndarray:
        if self.y is None:
            raise PairnetError(f"{self.source}: has no labels (no 'y' array and no labels CSV given)")
        return self.y

    def subset(self, rows: np.ndarray, name: str) -> PairSet:
        """The pairs at ``rows`` (indices or a boolean mask), every array cut alike."""
        cut = lambda a: None if a is None else a[rows]  # noqa: E731
        return PairSet(x=self.x[rows], y=cut(self.y), ids=cut(self.ids),
                       extras={k: v[rows] for k, v in self.extras.items()}, source=f"{self.source} [{name}]")

    def ids_or_index(self) -> np.ndarray:
        """The ids, or ``0..N-1`` as strings for files without ids."""
        if self.ids is not None:
            return self.ids
        return np.array([str(i) for i in range(len(self))])

    def digest(self) -> str:
        """A short content hash of x and y, used to tag runs with the data they saw.

        Computed once per object: hashing the full training set (78 MB) each time a run
        is tagged would repeat the same work.
        """
        if self._digest is None:
            h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
            if self.y is not None:
                h.update(np.ascontiguousarray(self.y).tobytes())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def summary(self) -> dict:
        out = {"file": self.source, "n": len(self)}
        if self.y is not None:
            out["label_1_share"] = round(float(self.y.mean()), 4)
        if self.ids is not None:
            out["id_pattern"] = id_pattern(self.ids)
        out["extras"] = sorted(self.extras)
        return out


def to_labels(prob) -> np.ndarray:
    """0/1 labels from probabilities of label 1."""
    return (np.asarray(prob) >= THRESHOLD).astype(np.int64)


def id_pattern(ids: np.ndarray) -> str:
    """Describe ids like ``PUB_0000000`` as ``PUB_ + 7 digits``; mixed ids as ``mixed``."""
    first = str(ids[0])
    prefix = first.rstrip("0123456789")
    width = len(first) - len(prefix)
    same = all(str(i).startswith(prefix) and len(str(i)) == len(first) for i in ids[:1000])
    if width and same:
        return f"{prefix} + {width} digits"
    return "mixed"


def _fail(path: Path | str, problem: str) -> PairnetError:
    return PairnetError(f"{path}: {problem}")


def load_pairs(path: str | Path, labels: str | Path | None = None) -> PairSet:
    """Load and validate a pair file; join a labels CSV (``id,label``) when given."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a folder, expected an .npz pair file")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise _fail(path, "not a readable .npz file (no zip header)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise _fail(path, "holds object (pickled) arrays; refused without unpickling") from None
        raise _fail(path, f"not a readable .npz file ({err})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise _fail(path, f"not a readable .npz file ({type(err).__name__}: {err})") from None
    pairs = validate_arrays(arrays, source=str(path))
    if labels is not None:
        pairs = join_labels(pairs, labels)
    return pairs


def validate_arrays(arrays: dict[str, np.ndarray], source: str) -> PairSet:
    """Check the data contract and build a PairSet; every violation names the file."""
    if "x" not in arrays:
        raise _fail(source, f"no 'x' array (found: {', '.join(sorted(arrays)) or 'none'})")
    x = arrays["x"]
    if x.dtype != np.uint8:
        raise _fail(source, f"'x' has dtype {x.dtype}, expected uint8")
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
        raise _fail(source, f"'x' has shape {x.shape}, expected (N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]})")
    n = x.shape[0]
    if n == 0:
        raise _fail(source, "is empty (N = 0 pairs)")

    y = arrays.get("y")
    if y is not None:
        y = _validate_labels(y, n, source)

    ids = arrays.get("id")
    if ids is not None:
        if ids.dtype.kind not in "US":
            raise _fail(source, f"'id' has dtype {ids.dtype}, expected strings")
        if ids.shape != (n,):
            raise _fail(source, f"'id' has shape {ids.shape}, expected ({n},)")
        ids = ids.astype(str)
        _check_unique(ids, source)

    extras = {k: v for k, v in arrays.items() if k not in ("x", "y", "id")}
    for name, arr in extras.items():
        if arr.shape[:1] != (n,):
            raise _fail(source, f"extra array '{name}' has shape {arr.shape}, expected length {n}")
    return PairSet(x=x, y=y, ids=ids, extras=extras, source=source)


def _validate_labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n:
        raise _fail(source, f"'y' has shape {y.shape}, expected ({n},) to match 'x'")
    if y.dtype.kind == "f":
        if np.isnan(y).any():
            raise _fail(source, f"'y' holds NaN at index {int(np.flatnonzero(np.isnan(y))[0])}")
        if not np.all(y == np.round(y)):
            raise _fail(source, "'y' holds non-integer values, expected 0 or 1")
    elif y.dtype.kind not in "iub":
        raise _fail(source, f"'y' has dtype {y.dtype}, expected integers 0/1")
    bad = np.flatnonzero((y != 0) & (y != 1))
    if bad.size:
        raise _fail(source, f"'y' holds {y[bad[0]].item()!r} at index {int(bad[0])}, expected 0 or 1")
    return y.astype(np.int64)


def _check_unique(ids: np.ndarray, source: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size != ids.size:
        dup = uniq[counts > 1]
        raise _fail(source, f"duplicate ids ({dup.size} repeated, e.g. '{dup[0]}')")


def read_labels_csv(path: str | Path) -> dict[str, int]:
    """Read an ``id,label`` CSV into a dict; problems name the file and the row."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise _fail(path, f"not a readable CSV ({err})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ["id", "label"]:
        raise _fail(path, f"header is {header!r}, expected 'id,label'")
    out: dict[str, int] = {}
    for row_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 2:
            raise _fail(path, f"row {row_no} has {len(row)} fields, expected 2")
        key, raw = row[0].strip(), row[1].strip()
        try:
            label = int(raw)
        except ValueError:
            raise _fail(path, f"row {row_no}: label {raw!r} is not an integer") from None
        if label not in (0, 1):
            raise _fail(path, f"row {row_no}: label {label} is not 0 or 1")
        if key in out:
            raise _fail(path, f"row {row_no}: duplicate id '{key}'")
        out[key] = label
    if not out:
        raise _fail(path, "has no rows")
    return out


def join_labels(pairs: PairSet, labels_path: str | Path) -> PairSet:
    """Attach labels from a CSV to a pair file with ids; ids must match exactly."""
    if pairs.ids is None:
        raise _fail(pairs.source, "has no 'id' array, so a labels CSV cannot be joined")
    table = read_labels_csv(labels_path)
    missing = [i for i in pairs.ids if i not in table]
    if missing:
        raise _fail(labels_path, f"{len(missing)} ids of {pairs.source} have no label, e.g. '{missing[0]}'")
    known = set(pairs.ids.tolist())
    unknown = [k for k in table if k not in known]
    if unknown:
        raise _fail(labels_path, f"{len(unknown)} ids are not in {pairs.source}, e.g. '{unknown[0]}'")
    y = np.array([table[i] for i in pairs.ids], dtype=np.int64)
    if pairs.y is not None and not np.array_equal(pairs.y, y):
        raise _fail(labels_path, f"labels disagree with the 'y' array of {pairs.source}")
    return PairSet(x=pairs.x, y=y, ids=pairs.ids, extras=pairs.extras, source=pairs.source)


def save_pairs(path: str | Path, pairs: PairSet) -> None:
    """Write a pair file deterministically (same arrays → same bytes)."""
    arrays = {"x": pairs.x}
    if pairs.y is not None:
        arrays["y"] = pairs.y
    if pairs.ids is not None:
        arrays["id"] = pairs.ids
    arrays.update(pairs.extras)
    write_npz(path, arrays)


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but with fixed zip timestamps, written atomically."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, buf.getvalue())


def write_labels_csv(path: str | Path, ids: np.ndarray, labels: np.ndarray) -> None:
    """An ``id,label`` CSV (labels files and predictions), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "label"])
        for key, label in zip(ids, labels, strict=True):
            w.writerow([key, int(label)])
