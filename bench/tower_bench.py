"""The pretraining budget and tower ensembles, read zero-shot on real pairs.

Each ``--tower FILE`` is a pretrained model saved by ``bench/real_bench.py --tower FILE`` (made
there with ``--pretrain-size``, ``--pretrain-epochs`` and ``--pt seed=N``; the file records how,
and how long it took). On the chosen half of the dev pairs (``--half``, the fixed halves of their
README), cut into the same stratified folds as real_bench, the bench reports:

- each tower: zero-shot accuracy, plain and with test-time shifts (``pairnet.tta``), and its
  pretraining minutes;
- the ensemble curve: the mean probability of the first K towers, for K = 1..n, plain and with
  shifts, against the minutes those K towers cost;
- ``--bn-adapt``: each tower also with its BatchNorm statistics estimated afresh on the half's
  own images (no labels used), the cheapest adaptation to new handwriting.

Nothing is trained here. Usage:
    python bench/tower_bench.py --pairs ../shared/realdev/real_dev.npz --half choose \\
        --tower data/bench/towers/full-e8-s42.pt --tower data/bench/towers/full-e8-s43.pt
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from pairnet.data.pairs import load_pairs, to_labels
from pairnet.train import pick_device, predict_proba
from pairnet.train.loop import amp_dtype
from pairnet.tta import mean_over_shifts
from real_bench import half_rows, saved_tower  # bench/ is on the path when this script runs


def bn_adapted(model: torch.nn.Module, x: np.ndarray, batch: int = 100) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the plain average over ``x``."""
    adapted = copy.deepcopy(model).eval()
    norms = [m for m in adapted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
        m.train()
    with torch.no_grad():
        for start in range(0, len(x), batch):
            adapted(torch.from_numpy(x[start:start + batch]).float().div_(255))
    return adapted.eval()


def fold_accs(prob: np.ndarray, y: np.ndarray, folds: list[np.ndarray]) -> list[float]:
    return [round(float(np.mean(to_labels(prob[idx]) == y[idx])), 4) for idx in folds]


def summary(values: list[float]) -> dict:
    return {"acc": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4), "per_fold": values}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", required=True, help="real labelled pairs (.npz), read by path")
    ap.add_argument("--half", default="choose", choices=("choose", "report", "all"),
                    help="choose: the even rows; report: the odd rows; all: every row (default choose)")
    ap.add_argument("--tower", action="append", required=True, help="a tower saved by real_bench.py (repeatable; "
                                                                     "the ensemble takes them in this order)")
    ap.add_argument("--bn-adapt", action="store_true", help="also read each tower with BatchNorm statistics "
                                                             "estimated on the half's images")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fold-seed", type=int, default=0)
    args = ap.parse_args()
    dev = pick_device()
    amp = amp_dtype("auto", dev)
    every = load_pairs(args.pairs)
    rows = half_rows(len(every), args.half)
    x, y = every.x[rows], every.require_labels()[rows]
    folds = [test for _, test in StratifiedKFold(n_splits=args.folds, shuffle=True,
                                                 random_state=args.fold_seed).split(x, y)]
    towers, plain, shifted = [], [], []
    for path in args.tower:
        model, info = saved_tower(Path(path))
        predict = lambda v, m=model: predict_proba(m, v, device=dev, amp=amp)  # noqa: E731
        plain.append(predict(x))
        shifted.append(mean_over_shifts(predict, x))
        minutes = round(float(info.get("seconds") or 0.0) / 60, 1)
        towers.append({"tower": path, "epochs": info.get("settings", {}).get("epochs"),
                       "seed": info.get("settings", {}).get("seed"),
                       "width_mult": info.get("settings", {}).get("width_mult"),
                       "default_data_val_acc": info.get("val_acc"), "pretrain_minutes": minutes,
                       "zero_shot": summary(fold_accs(plain[-1], y, folds)),
                       "zero_shot_tta": summary(fold_accs(shifted[-1], y, folds))})
        if args.bn_adapt:
            prob = predict_proba(bn_adapted(model, x), x, device=dev, amp=amp)
            towers[-1]["zero_shot_bn_adapted"] = summary(fold_accs(prob, y, folds))
        print(f"{path}: zero-shot {towers[-1]['zero_shot']['acc']:.4f}, with shifts "
              f"{towers[-1]['zero_shot_tta']['acc']:.4f}, {minutes} min to pretrain")
    curve = []
    for k in range(1, len(towers) + 1):
        curve.append({"k": k, "pretrain_minutes": round(sum(t["pretrain_minutes"] for t in towers[:k]), 1),
                      "zero_shot": summary(fold_accs(np.mean(plain[:k], axis=0), y, folds)),
                      "zero_shot_tta": summary(fold_accs(np.mean(shifted[:k], axis=0), y, folds))})
        print(f"K={k}: mean of {k} towers {curve[-1]['zero_shot']['acc']:.4f}, with shifts "
              f"{curve[-1]['zero_shot_tta']['acc']:.4f} ({curve[-1]['pretrain_minutes']} min)")
    print(json.dumps({"bench": "tower", "pairs": args.pairs, "half": args.half, "n_pairs": len(y),
                      "folds": args.folds, "fold_seed": args.fold_seed, "device": str(dev),
                      "towers": towers, "ensemble": curve}))


if __name__ == "__main__":
    main()
