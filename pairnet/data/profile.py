"""Image statistics of a pair file, and how far they sit from a reference profile.

The yardstick for the default dataset's realism: every statistic is computed per
28×28 half-image (left and right halves pooled) — pixel histogram, per-half
brightness / zero / ink / gradient percentiles, smoothness, the mean image on a 7×7
grid, ink centre and radius. ``compare`` scores a profile against a reference as the
mean of ``|value - reference| / max(|reference|, floor)`` over the reference's
statistics: 0 means the same statistics, not the same images. The definitions match
the course's ``realism/profile.py`` so figures agree with it.

``real_profile.json`` next to this module holds the statistics (no images) of the
real course data's 2,000 public-test pairs: the calibration target of the generator.
Figures are accumulated over fixed-size chunks with exact integer sums, so profiling
the full training set (100,000 halves) takes ~5 s and ~0.3 GB on top of the images.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from pairnet.data.pairs import IMAGE_SHAPE, load_pairs
from pairnet.errors import PairnetError

REAL_PROFILE = Path(__file__).with_name("real_profile.json")
BINS = (0, 1, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256)
PERCENTILES = (5, 25, 50, 75, 95)
INK = 64  # a pixel above this counts as ink
SHARP = 80  # |dx| + |dy| above this counts as a sharp edge
LAGS = (1, 3)  # horizontal lags of the neighbour correlation
CHUNK = 2048  # pairs profiled at once: bounds memory, not the result

_ROWS, _COLS = np.mgrid[0:28, 0:28].astype(np.float64)


def _halves(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[:, :, :28], x[:, :, 28:]])


def _percentiles(name: str, values: np.ndarray, out: dict) -> None:
    for p, q in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
        out[f"{name}_p{p}"] = float(q)


def profile(x: np.ndarray) -> dict:
    """The statistics of pair images ``x`` (uint8, N×28×56)."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE or x.shape[0] == 0:
        raise PairnetError(f"cannot profile {x.dtype} images of shape {x.shape}, expected uint8 (N, 28, 56) with N > 0")
    counts = np.zeros(256, dtype=np.int64)
    image_sum = np.zeros((28, 28), dtype=np.int64)
    sharp = speckle = 0
    lag_sums = {lag: [0, 0, 0, 0, 0] for lag in LAGS}  # Σa, Σb, Σa², Σb², Σab (exact integers)
    keys = ("mean", "max", "zero", "ink", "grad", "row", "col", "radius")
    per_half: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, x.shape[0], CHUNK):
        h8 = _halves(x[start:start + CHUNK])
        h = h8.astype(np.int64)
        counts += np.bincount(h8.ravel(), minlength=256)
        image_sum += h.sum(axis=0)
        per_half["mean"].append(h.mean(axis=(1, 2)))
        per_half["max"].append(h.max(axis=(1, 2)))
        per_half["zero"].append((h == 0).mean(axis=(1, 2)))
        per_half["ink"].append((h > INK).mean(axis=(1, 2)))
        g = np.abs(np.diff(h, axis=2))[:, :-1, :] + np.abs(np.diff(h, axis=1))[:, :, :-1]
        per_half["grad"].append(g.mean(axis=(1, 2)))
        sharp += int((g > SHARP).sum())
        centre = h[:, 1:-1, 1:-1]
        alone = ((centre > 0) & (h[:, :-2, 1:-1] == 0) & (h[:, 2:, 1:-1] == 0)
                 & (h[:, 1:-1, :-2] == 0) & (h[:, 1:-1, 2:] == 0))
        speckle += int(alone.sum())
        for lag in LAGS:
            a, b = h[:, :, :-lag], h[:, :, lag:]
            for i, v in enumerate((a.sum(), b.sum(), (a * a).sum(), (b * b).sum(), (a * b).sum())):
                lag_sums[lag][i] += int(v)
        mass = h.sum(axis=(1, 2)) + 1e-6
        row = (h * _ROWS).sum(axis=(1, 2)) / mass
        col = (h * _COLS).sum(axis=(1, 2)) / mass
        spread = (_ROWS - row[:, None, None]) ** 2 + (_COLS - col[:, None, None]) ** 2
        per_half["row"].append(row)
        per_half["col"].append(col)
        per_half["radius"].append(np.sqrt((h * spread).sum(axis=(1, 2)) / mass))
    v = {k: np.concatenate(parts) for k, parts in per_half.items()}
    n_halves = v["mean"].size
    n_pixels = n_halves * 28 * 28

    out: dict = {"halves": int(n_halves)}
    for lo, hi in itertools.pairwise(BINS):
        out[f"pixels_{lo}_{hi - 1}"] = float(counts[lo:hi].sum() / n_pixels)
    levels = np.arange(256, dtype=np.float64)
    mean = float((counts * levels).sum() / n_pixels)
    out["pixel_mean"] = mean
    out["pixel_std"] = math.sqrt(max(0.0, float((counts * (levels - mean) ** 2).sum() / n_pixels)))
    for name, key in (("half_mean", "mean"), ("half_max", "max"), ("half_zero_share", "zero"),
                      ("half_ink_share", "ink"), ("half_mean_gradient", "grad")):
        _percentiles(name, v[key], out)
    out["sharp_edge_share"] = sharp / (n_halves * 27 * 27)
    out["isolated_speckle_share"] = speckle / (n_halves * 26 * 26)
    for lag in LAGS:
        sa, sb, saa, sbb, sab = lag_sums[lag]
        n = n_halves * 28 * (28 - lag)
        denom = math.sqrt(max(0, n * saa - sa * sa)) * math.sqrt(max(0, n * sbb - sb * sb))
        out[f"neighbour_corr_lag{lag}"] = (n * sab - sa * sb) / denom if denom else 0.0
    grid = (image_sum / n_halves).reshape(7, 4, 7, 4).mean(axis=(1, 3))
    for i in range(7):
        for j in range(7):
            out[f"mean_image_7x7_r{i}c{j}"] = float(grid[i, j])
    _percentiles("ink_centre_row", v["row"], out)
    _percentiles("ink_centre_col", v["col"], out)
    _percentiles("ink_radius", v["radius"], out)
    return out


def _floor(name: str) -> float:
    """Shares and correlations live near 0..1: a relative gap needs a small floor."""
    return 0.02 if ("share" in name or name.startswith("pixels_") or "corr" in name) else 1.0


def compare(prof: dict, reference: dict) -> tuple[float, list[tuple[float, str, float, float]]]:
    """(realism gap, rows of (gap, statistic, value, reference value), largest gap first)."""
    rows = []
    for name, ref in reference.items():
        if name == "halves" or name not in prof:
            continue
        rows.append((abs(prof[name] - ref) / max(abs(ref), _floor(name)), name, float(prof[name]), float(ref)))
    if not rows:
        raise PairnetError("the reference profile shares no statistic with this profile")
    rows.sort(key=lambda r: (-r[0], r[1]))
    return float(np.mean([r[0] for r in rows])), rows


def load_profile_json(path: str | Path) -> dict:
    """A profile saved as JSON: an object of statistic name → number."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise PairnetError(f"{path}: not readable ({err})") from None
    except ValueError as err:
        raise PairnetError(f"{path}: not a pair .npz and not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise PairnetError(f"{path}: expected a JSON object of statistic name to number (a profile)")
    bad = [k for k, val in data.items() if isinstance(val, bool) or not isinstance(val, (int, float))]
    if bad:
        raise PairnetError(f"{path}: statistic '{bad[0]}' is not a number; "
                           "expected a profile as written by 'pairnet data profile'")
    return {k: float(val) for k, val in data.items()}


def load_reference(path: str | Path) -> dict:
    """A reference profile from either a pair .npz (profiled now) or a profile JSON."""
    path = Path(path)
    if not path.exists():
        raise PairnetError(f"{path}: no such file (give a pair .npz or a profile .json)")
    if path.is_dir():
        raise PairnetError(f"{path}: is a folder, expected a pair .npz or a profile .json")
    with open(path, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"
    if is_zip:
        return profile(load_pairs(path).x)
    return load_profile_json(path)


def real_profile() -> dict:
    """The statistics of the real course data's public-test pairs (the calibration target)."""
    return load_profile_json(REAL_PROFILE)


def realism_gap(x: np.ndarray, reference: dict | None = None) -> float:
    """How far images ``x`` sit from the reference (default: the real data)."""
    return compare(profile(x), reference if reference is not None else real_profile())[0]


def profile_report(file: str | Path, against: str | Path | None = None, top: int = 15) -> tuple[str, dict]:
    """Printable text and figures for ``pairnet data profile FILE [--against REF]``.

    Without ``against`` the text lists every statistic; with it, the ``top`` largest
    gaps and one ``realism_gap`` line. Bad files raise PairnetError naming the file.
    """
    pairs = load_pairs(file)
    prof = profile(pairs.x)
    result: dict = {"file": str(file), "halves": prof["halves"], "profile": prof}
    if against is None:
        width = max(map(len, prof))
        lines = [f"{name:{width}s} {value:12.4f}" for name, value in prof.items()]
        return "\n".join([f"{file}: {prof['halves']} half-images", *lines]), result
    gap, rows = compare(prof, load_reference(against))
    result.update(against=str(against), realism_gap=round(gap, 4), statistics=len(rows),
                  largest_gaps=[{"statistic": k, "value": v, "reference": r, "gap": round(g, 4)}
                                for g, k, v, r in rows[:top]])
    lines = [f"{'statistic':32s} {'this':>10s} {'reference':>10s} {'rel. gap':>9s}"]
    lines += [f"{k:32s} {v:10.4f} {r:10.4f} {g:9.3f}" for g, k, v, r in rows[:top]]
    lines.append(f"realism_gap {gap:.4f} over {len(rows)} statistics ({file} against {against}; 0 = same statistics)")
    return "\n".join(lines), result
