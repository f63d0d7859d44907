"""Does digit-aware pretraining help a user who owns only a small labelled set?

1. Pretrain: the default quick set (seed 42, severity 6) with digit and pair losses,
   exactly as the ``pretrain`` stage's quick preset does.
2. A "user's" set: another default set (different seed and severity) with its digit
   labels dropped, cut to 1,600 training and 400 validation pairs.
3. Train the same variant on it twice, with the same epochs and batch: from scratch
   (the stage's quick settings), and started from the pretrained weights with the
   fine-tuning settings a stage gets with ``init_from`` (``copy_matching``: the same
   transfer ``init_from`` performs after fetching the registered checkpoint).

Usage: python bench/transfer_bench.py [--epochs 15] [--user-seed 7] [--user-severity 7]
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pairnet.data.generate import FILES, GenConfig, make_dataset
from pairnet.data.pairs import PairSet, load_pairs
from pairnet.models import create_model
from pairnet.models.transfer import copy_matching
from pairnet.presets import FINETUNE, build_config
from pairnet.train import fit, pick_device


def _first(pairs: PairSet, n: int, digits: bool) -> PairSet:
    extras = {k: v[:n] for k, v in pairs.extras.items()} if digits else {}
    return PairSet(x=pairs.x[:n], y=pairs.y[:n], extras=extras, source=f"{pairs.source}[:{n}]")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="resnet_optimized")
    ap.add_argument("--epochs", type=int, default=15, help="epochs of each small-set training")
    ap.add_argument("--pretrain-epochs", type=int, default=0, help="0: the quick preset's")
    ap.add_argument("--n-train", type=int, default=1600)
    ap.add_argument("--n-val", type=int, default=400)
    ap.add_argument("--user-seed", type=int, default=7)
    ap.add_argument("--user-severity", type=int, default=7)
    args = ap.parse_args()
    dev = pick_device()

    with tempfile.TemporaryDirectory() as tmp:
        base, user = Path(tmp, "default"), Path(tmp, "user")
        make_dataset(base, GenConfig(size="quick", seed=42, severity=6))
        make_dataset(user, GenConfig(size="quick", seed=args.user_seed, severity=args.user_severity))
        train, val = load_pairs(base / FILES["train"]), load_pairs(base / FILES["val"])
        utrain = _first(load_pairs(user / FILES["train"]), args.n_train, digits=False)
        uval = _first(load_pairs(user / FILES["val"]), args.n_val, digits=False)

    t0 = time.perf_counter()
    over = {"model_name": args.variant, **({"epochs": args.pretrain_epochs} if args.pretrain_epochs else {})}
    pcfg = build_config("pretrain", "quick", over)
    torch.manual_seed(pcfg.seed)
    pretrained = create_model(args.variant, digit_head=True, **pcfg.model_overrides())
    pre = fit(pretrained, train, val, pcfg, device=dev)
    pretrain_s = time.perf_counter() - t0
    print(f"pretrained {args.variant}: val acc {pre.best_val_acc:.4f} on the default set in {pretrain_s:.0f} s")

    # Same variant, epochs, batch and data for both; from scratch uses the stage's quick
    # settings, init_from the fine-tuning settings a stage gets with init_from set
    # (presets.FINETUNE: a frozen-tower first epoch, the tower at lr x 0.05).
    scratch_cfg = build_config("stage2", "quick", {"model_name": args.variant, "epochs": args.epochs, "patience": 0})
    configs = {"scratch": scratch_cfg, "init_from": replace(scratch_cfg, **FINETUNE)}
    results = {}
    for mode, cfg in configs.items():
        torch.manual_seed(cfg.seed)
        model = create_model(args.variant, **cfg.model_overrides())
        if mode == "init_from":
            copy_matching(model, pretrained.state_dict(), source_spec=pretrained.spec, source="pretrained")
        t = time.perf_counter()
        res = fit(model, utrain, uval, cfg, device=dev)
        results[mode] = {"best_val_acc": round(res.best_val_acc, 4), "seconds": round(time.perf_counter() - t, 1),
                         "val_acc_by_epoch": [round(h["val_acc"], 4) for h in res.history]}
        print(f"{mode:9s}: best val acc {res.best_val_acc:.4f} after {args.epochs} epochs on {len(utrain)} pairs")

    gain = results["init_from"]["best_val_acc"] - results["scratch"]["best_val_acc"]
    print(json.dumps({
        "bench": "transfer", "variant": args.variant, "device": str(dev), "n_train": len(utrain), "n_val": len(uval),
        "user_seed": args.user_seed, "user_severity": args.user_severity, "epochs": args.epochs,
        "pretrain_val_acc": round(pre.best_val_acc, 4), "pretrain_seconds": round(pretrain_s, 1),
        "finetune": {k: getattr(configs["init_from"], k) for k in FINETUNE},
        "scratch_val_acc": results["scratch"]["best_val_acc"],
        "init_from_val_acc": results["init_from"]["best_val_acc"],
        "gain_points": round(100 * gain, 1), "runs": results,
    }))


if __name__ == "__main__":
    main()
