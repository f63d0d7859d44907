"""The embedded default dataset, made offline from scikit-learn's bundled digits.

DATA.md describes the target: 28×28 digits framed like MNIST, jittered by random
affine maps and stroke-width changes, each half corrupted independently (blur,
dimming, occluding rectangles, scratch lines, faint noise), disjoint base-scan pools
per split, label 1 iff left digit > right digit. All randomness comes from one NumPy
``Generator`` per split and chunk, so the same seed gives byte-identical files; image
operations run in torch on the CPU in fixed-size chunks to bound memory.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pairnet.data.pairs import PairSet, save_pairs, write_labels_csv
from pairnet.errors import PairnetError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "public", "private")
FILES = {"train": "train.npz", "val": "val.npz", "public": "test_public.npz", "private": "test_private.npz"}
ID_PREFIX = {"train": "TRN", "val": "VAL", "public": "PUB", "private": "PRV"}
# Share of each class's base scans given to each split (disjoint pools).
POOL_SHARE = {"train": 0.60, "val": 0.15, "public": 0.10, "private": 0.15}
SIZES = {
    "tiny": {"train": 512, "val": 256, "public": 128, "private": 128},
    "quick": {"train": 6000, "val": 1500, "public": 1000, "private": 1000},
    "full": {"train": 50_000, "val": 10_000, "public": 2_000, "private": 8_000},
}
CHUNK = 8192  # half-images processed at once: bounds peak memory, not the result


@dataclass(frozen=True)
class GenConfig:
    size: str = "full"
    severity: int = 6
    seed: int = 42
    neighbour_share: float = 0.8  # share of |a-b| = 1 pairs ("weight_diff1" in the real meta.json)
    # Affine jitter of each digit (degrees, scale factor, shear, pixels).
    rotation_deg: float = 15.0
    scale_min: float = 0.85
    scale_max: float = 1.30
    shear: float = 0.2
    shift_px: float = 2.5

    def validate(self) -> None:
        if self.size not in SIZES:
            raise PairnetError(f"unknown size '{self.size}'; choose one of {', '.join(SIZES)}")
        if not 0 <= self.severity <= 10:
            raise PairnetError(f"severity {self.severity} is outside 0..10")
        if not 0.0 <= self.neighbour_share <= 1.0:
            raise PairnetError(f"neighbour share {self.neighbour_share} is outside [0, 1]")


def _base_scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def split_pools(targets: np.ndarray, seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Disjoint scan indices per split and class, so no scan appears in two splits."""
    rng = np.random.default_rng([seed, 7919])
    pools: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    for cls in range(10):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        bounds = np.cumsum([round(POOL_SHARE[s] * idx.size) for s in SPLITS[:-1]])
        for split, part in zip(SPLITS, np.split(idx, bounds), strict=True):
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


def _gaussian_kernels(sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur as a weighted sum of shifted copies.

    Elementwise sums keep the result bit-identical from run to run; a grouped
    convolution here was not (oneDNN's threaded reductions changed a few pixels).
    """
    k = _gaussian_kernels(sigma)
    r = k.shape[1] // 2
    for dim in (1, 2):
        pad = (r, r, 0, 0) if dim == 2 else (0, 0, r, r)
        padded = F.pad(img[:, None], pad, mode="replicate")[:, 0]
        out = torch.zeros_like(img)
        for t in range(2 * r + 1):
            out += k[:, t, None, None] * padded.narrow(dim, t, img.shape[dim])
        img = out
    return img


def render(scans: np.ndarray, cfg: GenConfig, rng: np.random.Generator) -> torch.Tensor:
    """8×8 scans → jittered 28×28 digits in [0, 1] (20×20 box centred, like MNIST)."""
    m = scans.shape[0]
    img = F.interpolate(torch.from_numpy(scans)[:, None], size=(20, 20), mode="bilinear", align_corners=False)
    img = F.pad(img, (4, 4, 4, 4))
    rot = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, m))
    scale = rng.uniform(cfg.scale_min, cfg.scale_max, m)
    shear = rng.uniform(-cfg.shear, cfg.shear, m)
    shift = rng.uniform(-cfg.shift_px, cfg.shift_px, (m, 2)) * 2 / 28  # normalised coords
    cos, sin = np.cos(rot) / scale, np.sin(rot) / scale
    # Inverse map (output → input) for affine_grid: rotation·shear, scaled by 1/scale.
    theta = np.stack(
        [np.stack([cos, -sin + cos * shear, shift[:, 0]], 1), np.stack([sin, cos + sin * shear, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(torch.from_numpy(theta).float(), [m, 1, 28, 28], align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Stroke width: blend towards a 3×3 dilation (thicker) or erosion (thinner).
    w = torch.from_numpy(rng.uniform(-1.0, 0.3, m)).float()[:, None, None, None]
    thick = F.max_pool2d(img, 3, 1, 1)
    thin = -F.max_pool2d(-img, 3, 1, 1)
    img = torch.where(w > 0, img + w * (thick - img), img + (-w) * (thin - img))
    img = img[:, 0]
    return img / img.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)


def corrupt(img: torch.Tensor, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Corrupt each 28×28 image independently; severity 0 leaves it clean."""
    m = img.shape[0]
    f = severity / 10.0
    if f == 0:
        return (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    sigma = torch.from_numpy(rng.uniform(0.5, 0.5 + 1.6 * f, m)).float()
    img = _blur(img, sigma)
    peak = rng.uniform(1.0 - 1.6 * f, 0.9, m).clip(0.08, 1.0)
    img = img * torch.from_numpy(peak).float()[:, None, None] * 255.0
    # Faint grey background noise; its per-image offset varies the share of exact zeros.
    noise_sd = 13.0 * f
    offset = rng.uniform(-0.35, 1.25, m) * noise_sd
    noise = rng.standard_normal((m, 28, 28), dtype=np.float32) * noise_sd + offset[:, None, None]
    img = (img + torch.from_numpy(noise)).clamp_min(0)

    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    keep = torch.ones(m, 28, 28, dtype=torch.bool)
    # Occluding rectangles: at severity 6, 2–5 per half, 5–16 px a side.
    lo, hi = max(1, round(f / 0.3)), max(1, round(f * 5 / 0.6))
    count = rng.integers(lo, hi + 1, m)
    s_lo, s_hi = max(2.0, 5 * f / 0.6), max(3.0, 16 * f / 0.6)
    for k in range(hi):
        on = torch.from_numpy(count > k)
        w = torch.from_numpy(rng.uniform(s_lo, s_hi, m)).float()
        h = torch.from_numpy(rng.uniform(s_lo, s_hi, m)).float()
        x0 = torch.from_numpy(rng.uniform(-4, 28, m)).float()
        y0 = torch.from_numpy(rng.uniform(-4, 28, m)).float()
        box = (
            (xx >= x0[:, None, None])
            & (xx < (x0 + w)[:, None, None])
            & (yy >= y0[:, None, None])
            & (yy < (y0 + h)[:, None, None])
        )
        keep &= ~(box & on[:, None, None])
    # Thin dark scratch lines through a random point at a random angle.
    scratched = torch.from_numpy(rng.random(m) < min(1.0, 0.6 * f))
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
    extras = {"digit_a": left.astype(np.int8), "digit_b": right.astype(np.int8), "scan_a": scan_idx[:n], "scan_b": scan_idx[n:]}
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


def make_dataset(out: str | Path, cfg: GenConfig, progress=None) -> dict:
    """Write the standard set (train, val, public/private tests, labels CSV, meta.json)."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scans, targets = _base_scans()
    pools = split_pools(targets, cfg.seed)
    meta = {
        "generator": "pairnet.data.generate",
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "size": cfg.size,
        "severity": {s: cfg.severity for s in SPLITS},
        "weight_diff1": cfg.neighbour_share,
        "config": asdict(cfg),
        "counts": dict(SIZES[cfg.size]),
        "base_scans_per_split": {s: int(sum(p.size for p in pools[s].values())) for s in SPLITS},
        "label": "1 iff left digit > right digit",
        "stats": {},
    }
    for split in SPLITS:
        pairs = make_split(split, SIZES[cfg.size][split], scans, pools[split], cfg)
        meta["stats"][split] = image_stats(pairs.x)
        if split in ("public", "private"):
            if split == "public":
                write_labels_csv(out / "test_public_labels.csv", pairs.ids, pairs.y)
            pairs = PairSet(x=pairs.x, ids=pairs.ids, source=pairs.source)
        save_pairs(out / FILES[split], pairs)
        log.info("wrote %s (%d pairs)", out / FILES[split], len(pairs))
        if progress is not None:
            progress(split)
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def has_pair_files(data_dir: str | Path) -> bool:
    d = Path(data_dir)
    return (d / FILES["train"]).exists() and (d / FILES["val"]).exists()


def ensure_dataset(data_dir: str | Path, size: str = "quick", seed: int = 42, severity: int = 6) -> bool:
    """Make the default set in ``data_dir`` when it holds no pair files; True if made."""
    if has_pair_files(data_dir):
        return False
    log.warning("no pair files in %s: making the default %s dataset there (seed %d)", data_dir, size, seed)
    make_dataset(data_dir, GenConfig(size=size, seed=seed, severity=severity))
    return True
