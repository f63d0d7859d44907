"""Does digit-aware pretraining help a user who owns only a small labelled set?

1. Pretrain: the default quick set (seed 42, severity 6) with digit and pair losses,
   exactly as the ``pretrain`` stage's quick preset does.
2. A "user's" set made only from base scans the pretraining never saw: the scans outside
   the pretraining set's train and val pools (``split_pools``), split again per class into
   user train / val / test pools (disjoint), paired with another seed and severity, digit
   labels dropped: 1,600 training, 400 validation and 1,000 test pairs. (Before, the user
   set was another default set cut from the same 5,000 scans, so ~70% of its scans had
   been seen with digit labels in pretraining, which overstated the gain.)
3. Train the same variant on it twice, with the same epochs and batch: from scratch
   (the stage's quick settings), and started from the pretrained weights with the
   fine-tuning settings a stage gets with ``init_from`` (``copy_matching``: the same
   transfer ``init_from`` performs after fetching the registered checkpoint).
   ``*_val_acc`` is the best epoch's accuracy on the user's val split (it chose that epoch);
   ``*_test_acc`` is those weights' accuracy on the user's test split, chosen on nothing.

Usage: python bench/transfer_bench.py [--epochs 15] [--user-seed 7] [--user-severity 7] [--n-test 1000]
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pairnet.data.generate import FILES, GenConfig, base_scans, make_dataset, make_split, split_pools
from pairnet.data.pairs import PairSet, load_pairs
from pairnet.models import create_model
from pairnet.models.transfer import copy_matching
from pairnet.presets import FINETUNE, build_config
from pairnet.train import fit, pick_device
from pairnet.train.loop import amp_dtype, evaluate

PRETRAIN_SEED = 42
# Shares of the held-out scans (per class) given to the user's train / val / test pools.
USER_POOL_SHARE = {"train": 0.6, "val": 0.2, "test": 0.2}
REPORTED = ("model_name", "width_mult", "feat_dim", "epochs", "batch_size", "lr", "tower_lr_mult", "freeze_epochs",
            "augment", "scheduler", "patience", "seed")


def user_pools(targets: np.ndarray, seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Per class, the scans outside the pretraining set's train and val pools, split into
    disjoint user train / val / test pools."""
    pre = split_pools(targets, PRETRAIN_SEED)
    rng = np.random.default_rng([seed, 104729])
    pools: dict[str, dict[int, np.ndarray]] = {s: {} for s in USER_POOL_SHARE}
    for cls in range(10):
        unseen = rng.permutation(np.concatenate([pre["public"][cls], pre["private"][cls]]))
        bounds = np.cumsum([round(share * unseen.size) for share in list(USER_POOL_SHARE.values())[:-1]])
        for split, part in zip(USER_POOL_SHARE, np.split(unseen, bounds), strict=True):
            pools[split][cls] = part
    return pools


def user_set(cfg: GenConfig, sizes: dict[str, int]) -> tuple[dict[str, PairSet], dict]:
    """The user's splits, from scans the pretraining never saw; digit labels dropped."""
    scans, targets = base_scans(cfg.bases)
    pools = user_pools(targets, cfg.seed)
    pre = split_pools(targets, PRETRAIN_SEED)
    seen = np.concatenate([p for split in ("train", "val") for p in pre[split].values()])
    out = {}
    # make_split names the generator's splits; each user split draws from its own pool and seed stream.
    for split, gen_split in zip(USER_POOL_SHARE, ("train", "val", "public"), strict=True):
        pairs = make_split(gen_split, sizes[split], scans, pools[split], cfg)
        used = np.concatenate([pairs.extras["scan_a"], pairs.extras["scan_b"]])
        if np.isin(used, seen).any():
            raise RuntimeError(f"user {split} split uses a scan of the pretraining set")
        out[split] = PairSet(x=pairs.x, y=pairs.y, source=f"user-{split}")
    info = {f"user_scans_{s}": int(sum(p.size for p in pools[s].values())) for s in USER_POOL_SHARE}
    info["pretrain_scans_seen"] = int(seen.size)
    return out, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="resnet_optimized")
    ap.add_argument("--epochs", type=int, default=15, help="epochs of each small-set training")
    ap.add_argument("--pretrain-epochs", type=int, default=0, help="0: the quick preset's")
    ap.add_argument("--n-train", type=int, default=1600)
    ap.add_argument("--n-val", type=int, default=400)
    ap.add_argument("--user-seed", type=int, default=7)
    ap.add_argument("--user-severity", type=int, default=7)
    ap.add_argument("--n-test", type=int, default=1000)
    args = ap.parse_args()
    dev = pick_device()

    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(tmp, GenConfig(size="quick", seed=PRETRAIN_SEED, severity=6))
        train, val = load_pairs(Path(tmp, FILES["train"])), load_pairs(Path(tmp, FILES["val"]))
    user, scan_info = user_set(GenConfig(size="quick", seed=args.user_seed, severity=args.user_severity),
                               {"train": args.n_train, "val": args.n_val, "test": args.n_test})
    utrain, uval, utest = user["train"], user["val"], user["test"]

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
        test = evaluate(model, utest.x, utest.y, device=dev, amp=amp_dtype(cfg.amp, dev))["val_acc"]
        results[mode] = {"best_val_acc": round(res.best_val_acc, 4), "best_epoch": res.best_epoch,
                         "test_acc": round(float(test), 4), "seconds": round(time.perf_counter() - t, 1),
                         "val_acc_by_epoch": [round(h["val_acc"], 4) for h in res.history],
                         "settings": {k: getattr(cfg, k) for k in REPORTED}}
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
        "n_test": len(utest), "scratch_test_acc": results["scratch"]["test_acc"],
        "init_from_test_acc": results["init_from"]["test_acc"],
        "test_gain_points": round(100 * (results["init_from"]["test_acc"] - results["scratch"]["test_acc"]), 1),
        "user_scans": "disjoint from the pretraining set's train and val scans", **scan_info,
    }))


if __name__ == "__main__":
    main()
