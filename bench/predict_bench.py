"""Peak memory and time of `pairnet predict` on a big pair file, for a pair model and a stack.

Writes N random pairs (200,000 by default: 313 MB of uint8 pixels) with ids, a pair
model folder (safetensors + spec, untrained: memory and speed do not depend on the
weights) and a two-model stack folder (the same files plus a LightGBM text model and
lineage), then runs `pairnet predict --model FOLDER` for each in a fresh process and
reads the child's peak RSS from the kernel (wait4). Target: peak RSS <= 3 GB.

Usage: python bench/predict_bench.py [--pairs 200000] [--model-name resnet_optimized] [--width-mult 1]
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pairnet.data.pairs import PairSet, save_pairs
from pairnet.models import create_model
from pairnet.serving import save_pair_dir, save_stack_dir
from pairnet.stacking import make_lgbm, meta_features

TARGET_MB = 3 * 1024


def make_stack(folder: Path, models: list) -> Path:
    """A stack folder over ``models`` with the stack stage's LightGBM meta-learner (default
    settings: as many trees as a real stack) fit on random meta-features: speed and memory do
    not depend on what it learned. bench/ensemble_bench.py uses it too."""
    p = np.random.default_rng(0).uniform(0.01, 0.99, (2000, len(models)))
    meta = make_lgbm(seed=0).fit(meta_features(list(p.T)), (p.mean(1) > 0.5).astype(int))
    return save_stack_dir({f"base-{i}": m for i, m in enumerate(models)}, meta.booster_, folder)


def seeded_models(names: list[str], width_mult: float) -> list:
    """Zoo models, the i-th built after torch.manual_seed(i): distinct, reproducible weights."""
    import torch

    models = []
    for i, name in enumerate(names):
        torch.manual_seed(i)
        models.append(create_model(name, width_mult=width_mult))
    return models


def run_predict(model: Path, data: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `pairnet predict` process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pairnet.cli", "predict", "--model", str(model), "--data",
                             str(data), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"predict failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--model-name", default="resnet_optimized")
    ap.add_argument("--width-mult", type=float, default=1.0, help="0.5: the width the quick preset trains")
    ap.add_argument("--kinds", default="pair,stack", help="which predictors to measure: pair, stack or both")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (args.pairs, 28, 56), dtype=np.uint8)
        ids = np.char.add("BIG_", np.char.zfill(np.arange(args.pairs).astype(str), 7))
        save_pairs(tmp / "big.npz", PairSet(x=x, ids=ids))
        del x
        save_pair_dir(create_model(args.model_name, width_mult=args.width_mult), tmp / "pair")
        make_stack(tmp / "stack", seeded_models([args.model_name] * 2, args.width_mult))
        figures = {"pairs": args.pairs, "model": args.model_name, "width_mult": args.width_mult,
                   "target_peak_rss_mb": TARGET_MB}
        for kind in kinds:
            seconds, peak = run_predict(tmp / kind, tmp / "big.npz", tmp / f"{kind}.csv")
            rows = sum(1 for _ in open(tmp / f"{kind}.csv")) - 1
            assert rows == args.pairs, rows
            figures[f"{kind}_seconds"] = round(seconds, 1)
            figures[f"{kind}_pairs_per_s"] = round(args.pairs / seconds)
            figures[f"{kind}_peak_rss_mb"] = round(peak)
            print(f"{kind:5s}: {args.pairs} pairs in {seconds:.1f} s ({args.pairs / seconds:.0f} pairs/s), "
                  f"peak RSS {peak:.0f} MB (target <= {TARGET_MB} MB)")
        figures["met"] = max(figures[f"{k}_peak_rss_mb"] for k in kinds) <= TARGET_MB
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
