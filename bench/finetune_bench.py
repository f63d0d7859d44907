"""Does fine-tuning use the labels it gets? Fine-tuning schedules against the folder's size.

On the course-scale stand-in (``bench/course_scale.py`` makes it: pairs from base scans the
pretraining never used, corruption severity 7, no digit labels) each arm starts from the same
saved tower (``--tower``, a file ``bench/real_bench.py --tower`` wrote), fine-tunes it on the
first ``--n-train`` training pairs and keeps its best epoch on the val selection part, as a
pipeline step does. Arms are the quick preset's fine-tuning (the settings a stage gets with
``init_from``) with some values changed, ``NAME:key=value,key=value``:

- any TrainConfig value, e.g. ``e6:epochs=6`` or ``lr03:tower_lr_mult=0.3``;
- ``digits=pseudo@TAU``: digit pseudo-labels from the tower, consistent with each pair's label
  (the tower's two digit distributions, restricted to the digit pairs the label allows), a
  half kept where its posterior is at least TAU, the digit loss on for the kept halves;
- ``digits=truth``: the stand-in's true digits (made again from its seed), the digit loss on
  for every half: what the best possible digit labels would buy in the same schedule.

Each arm prints val (selection part) and test_public accuracy and its seconds; the tower's
zero-shot row comes first. Usage:
    python bench/finetune_bench.py --tower data/bench/towers/full-e8-s42.pt \\
        --arm today: --arm e6:epochs=6 --arm pseudo:digits=pseudo@0.9 --arm truth:digits=truth
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pairnet.data.generate import FILES, LABELS_CSV, GenConfig, base_scans, make_split
from pairnet.data.pairs import PairSet, load_pairs, to_labels
from pairnet.data.splits import val_parts
from pairnet.models import create_model
from pairnet.models.transfer import copy_matching
from pairnet.paths import data_dir
from pairnet.pipeline import FINETUNE_DIGIT_WEIGHT
from pairnet.presets import build_config
from pairnet.train import fit, pick_device, predict_proba
from pairnet.train.loop import amp_dtype
# bench/ is on the path when this script runs
from real_bench import IGNORE, consistent_digits, parse_overrides, saved_tower, with_digits
from transfer_bench import user_pools


def true_digits(args, n: int, train: PairSet) -> np.ndarray | None:
    """The stand-in's digits, made again exactly as course_scale made its train split (None when
    the folder's pairs are not the ones that seed and severity make, e.g. a real folder)."""
    scans, targets = base_scans(GenConfig().bases)
    made = make_split("train", n, scans, user_pools(targets, args.seed)["train"],
                      GenConfig(size="full", seed=args.seed, severity=args.severity))
    if not np.array_equal(made.x[:len(train)], train.x):
        return None
    return np.stack([made.extras["digit_a"], made.extras["digit_b"]], axis=1)[:len(train)]


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    values = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name or "today", values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tower", required=True, help="a tower saved by bench/real_bench.py --tower")
    ap.add_argument("--folder", default="", help="the stand-in (default: course_scale's for --seed/--severity)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--severity", type=int, default=7)
    ap.add_argument("--n-train", type=int, default=0, help="fine-tune on the first N training pairs (0: all)")
    ap.add_argument("--variant", default="resnet_optimized")
    ap.add_argument("--arm", action="append", default=[], help="NAME:key=value,... (repeatable; default: today's)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dev = pick_device(args.device)
    amp = amp_dtype("auto", dev)
    folder = Path(args.folder) if args.folder else \
        data_dir() / "bench" / "course_scale" / f"course-s{args.seed}-v{args.severity}-x1"
    full = load_pairs(folder / FILES["train"])
    n = args.n_train or len(full)
    train = PairSet(full.x[:n], full.require_labels()[:n], source=f"{folder.name}/train[:{n}]")
    select, _ = val_parts(load_pairs(folder / FILES["val"]))
    public = load_pairs(folder / FILES["public"], labels=folder / LABELS_CSV)
    tower, info = saved_tower(Path(args.tower))

    def scores(model) -> dict:
        return {split: round(float(np.mean(to_labels(predict_proba(model, p.x, device=dev, amp=amp)) == p.y)), 4)
                for split, p in (("val_acc", select), ("test_public_acc", public))}

    @functools.cache
    def stand_in_digits() -> np.ndarray | None:
        return true_digits(args, len(full), train)

    rows = [{"arm": "zero-shot", **scores(tower), "seconds": 0.0}]
    print(f"zero-shot: {rows[0]}", flush=True)
    for name, values in map(parse_arm, args.arm or ["today:"]):
        digits = values.pop("digits", "none")
        explicit = {"model_name": args.variant, "init_from": "models:/finetune-bench/1"}
        if digits != "none":
            explicit["aux_digit_weight"] = FINETUNE_DIGIT_WEIGHT
        cfg = build_config("stage2", "quick", explicit)
        cfg = replace(cfg.updated(parse_overrides([f"{k}={v}" for k, v in values.items()], cfg.flat())).validate(),
                      init_from="")
        truth = stand_in_digits() if digits != "none" else None  # made once, outside the arm's seconds
        t0 = time.perf_counter()
        kept, right = None, None
        if digits != "none":
            if digits == "truth":
                if truth is None:
                    raise SystemExit(f"arm {name}: {folder} is not the stand-in its --seed and --severity make, "
                                     "so its true digits are unknown")
                labels = truth
            elif digits.startswith("pseudo@"):
                labels = consistent_digits(tower, train, float(digits.split("@", 1)[1]), dev, amp)
                mask = labels != IGNORE
                kept = round(float(mask.mean()), 4)
                right = round(float((labels[mask] == truth[mask]).mean()), 4) if truth is not None else None
            else:
                raise SystemExit(f"arm {name}: digits must be none, truth or pseudo@TAU (got {digits!r})")
        data = train if digits == "none" else with_digits(train, labels)
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model_name, digit_head=cfg.aux_digit_weight > 0, **cfg.model_overrides())
        copy_matching(model, tower.state_dict(), source_spec=tower.spec, source="saved tower")
        result = fit(model, data, select, cfg, device=dev)
        row = {"arm": name, "settings": {**values, "digits": digits}, **scores(model),
               "best_epoch": result.best_epoch, "epochs": cfg.epochs, "seconds": round(time.perf_counter() - t0, 1)}
        if kept is not None:
            row |= {"pseudo_kept": kept, "pseudo_right": right}  # right: None where the digits are unknown
        rows.append(row)
        print(f"{name}: {row}", flush=True)
    print(json.dumps({"bench": "finetune", "folder": str(folder), "n_train": n, "n_val_select": len(select),
                      "n_public": len(public), "tower": args.tower, "tower_val_acc": info.get("val_acc"),
                      "device": str(dev), "threads": torch.get_num_threads(), "arms": rows}))


if __name__ == "__main__":
    main()
