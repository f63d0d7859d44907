"""How well does the pretrained tower read real handwriting, and how much do real labels add?

1. The tower: pretrained on the default data exactly as the pipeline's quick pretrain step
   does (``build_config("pretrain", "quick", ...)``, the default quick set at seed 42, a digit
   head, ``fit``), or fetched with ``--init-from models:/...`` (needs MLFLOW_TRACKING_URI).
   ``--tower PATH`` saves it (pretrained or fetched) and reuses it on later calls.
2. Real pairs (``--pairs``, e.g. ../shared/realdev/real_dev.npz), read by path only, split
   into stratified folds. On each held-out fold three figures:
   - zero_shot: the pretrained model's pair output, no training on real pairs;
   - finetuned: the tower copied (``copy_matching``) into a fresh model, trained on the other
     folds with the settings a stage gets with ``init_from`` at the quick preset;
   - scratch: the same model from random weights, same epochs, batch and seed.
   Nothing is selected on the held-out fold: ``--select last`` (default) reports the last
   epoch of a fixed number of epochs; ``--select inner`` picks the best epoch on an inner
   stratified split cut from the training folds.
3. ``--half``: the dev pairs' fixed halves (their README): ``choose`` (the even rows) is where
   settings are compared and picked; ``report`` (the odd rows) is run once per finished recipe
   and gives the headline; ``all`` is every row (figures chosen on them are selection
   figures). The folds are cut within the half. ``--train-from``: the trained arms learn from
   the other folds of the same half (``folds``, default) or, on the reporting half, from the
   whole choosing half (``choose-half``: one model per arm, scored on each reporting fold).
   The JSON says which half was scored and where the labels came from.
4. ``--pseudo-digits TAU`` (self-training): the fine-tuned arm also learns digits, from the
   tower's own digit calls on its training pairs, kept where they agree with the pair's label
   (the joint digit distribution restricted to the digit pairs the label allows) and the
   half's posterior is at least TAU.

Usage: python bench/real_bench.py --pairs ../shared/realdev/real_dev.npz [--folds 5]
       [--half choose|report|all] [--train-from folds|choose-half]
       [--init-from URI | --tower PATH] [--epochs N] [--select last|inner] [--ft key=value] [--tta]
       [--pseudo-digits TAU]
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from pairnet.data.generate import FILES, SIZES, GenConfig, base_scans, make_dataset, make_split, split_pools
from pairnet.data.pairs import PairSet, load_pairs, to_labels
from pairnet.models import create_model
from pairnet.models.transfer import copy_matching
from pairnet.pipeline import FINETUNE_DIGIT_WEIGHT
from pairnet.presets import build_config
from pairnet.tta import mean_over_shifts
from pairnet.train import fit, pick_device, predict_proba
from pairnet.train.loop import Callback, amp_dtype, evaluate, predict_with_digits

# The settings each arm reports in the JSON.
REPORTED = ("model_name", "width_mult", "feat_dim", "epochs", "batch_size", "lr", "tower_lr_mult", "freeze_epochs",
            "augment", "aug", "scheduler", "patience", "seed", "aux_digit_weight", "loss")


def settings(cfg) -> dict:
    return {k: asdict(getattr(cfg, k)) if k == "aug" else getattr(cfg, k) for k in REPORTED}


class LastEpoch(Callback):
    """Keeps the weights of the last epoch run (``fit`` restores the best-validation ones)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.state = model, None

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}


def subset(pairs: PairSet, idx: np.ndarray, name: str) -> PairSet:
    return PairSet(x=pairs.x[idx], y=pairs.y[idx], source=f"{pairs.source}[{name}]")


def parse_gen(items: list[str]) -> dict:
    """``--gen key=value`` overrides of GenConfig fields (for generator experiments)."""
    types = {f.name: f.type for f in fields(GenConfig)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--gen {item}: GenConfig has no field '{key}' (fields: {', '.join(types)})")
        default = getattr(GenConfig(), key)
        out[key] = tuple(float(v) for v in value.split(",")) if isinstance(default, tuple) else type(default)(value)
    return out


def pretrain(args, dev: torch.device) -> tuple[torch.nn.Module, dict]:
    """The quick pretrain step on a freshly made default set."""
    over = {"model_name": args.variant, **({"epochs": args.pretrain_epochs} if args.pretrain_epochs else {})}
    cfg = build_config("pretrain", "quick", over)
    cfg = cfg.updated(parse_overrides(args.pt, cfg.flat())).validate() if args.pt else cfg
    gen = GenConfig(size=args.pretrain_size, seed=42, **parse_gen(args.gen))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(tmp, gen)
        train, val = load_pairs(Path(tmp, FILES["train"])), load_pairs(Path(tmp, FILES["val"]))
    if args.pretrain_pairs:  # a train split of another size, from the same scans and settings
        scans, targets = base_scans(gen.bases)
        pool = split_pools(targets, gen.seed, gen.train_scans)["train"]
        train = make_split("train", args.pretrain_pairs, scans, pool, gen)
    if args.pretrain_train:
        train = PairSet(x=train.x[:args.pretrain_train], y=train.y[:args.pretrain_train],
                        extras={k: v[:args.pretrain_train] for k, v in train.extras.items()}, source=train.source)
    data_s = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)  # as the stage does: initial weights follow the seed alone
    model = create_model(cfg.model_name, digit_head=True, **cfg.model_overrides())
    t1 = time.perf_counter()
    res = fit(model, train, val, cfg, device=dev)
    info = {"source": "pretrained here", "val_acc": round(res.best_val_acc, 4), "best_epoch": res.best_epoch,
            "seconds": round(time.perf_counter() - t1, 1), "data_seconds": round(data_s, 1),
            "train_pairs": len(train), "gen": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in asdict(gen).items()},
            "settings": settings(cfg)}
    return model, info


def saved_tower(path: Path) -> tuple[torch.nn.Module, dict]:
    """A tower this bench saved with ``--tower``, and the record of how it was made."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    kwargs = {k: v for k, v in saved["spec"].items() if k not in ("name", "builder")}
    model = create_model(saved["spec"]["name"], **kwargs)
    model.load_state_dict(saved["state"])
    return model, json.loads(saved["info"])


def half_rows(n: int, half: str) -> np.ndarray:
    """The dev pairs' fixed halves (their README): choose = the even rows, report = the odd rows."""
    return {"choose": np.arange(0, n, 2), "report": np.arange(1, n, 2), "all": np.arange(n)}[half]


def load_tower(args, dev: torch.device) -> tuple[torch.nn.Module, dict]:
    """From --init-from, from a saved --tower file, or pretrained here; saved to --tower when it
    came from elsewhere."""
    tower = Path(args.tower) if args.tower else None
    if args.init_from:
        from pairnet.tracking.init_from import fetch_init_source

        source = fetch_init_source(args.init_from)
        kwargs = {k: v for k, v in source.spec.items() if k not in ("name", "builder")}
        model = create_model(source.spec["name"], **kwargs)
        model.load_state_dict(source.state)
        info = {"source": source.uri, "run_id": source.run_id, "val_acc": None, "seconds": 0.0}
    elif tower is not None and tower.exists():
        model, info = saved_tower(tower)
        return model, {**info, "source": f"{tower} (saved earlier)"}
    else:
        model, info = pretrain(args, dev)
    if tower is not None:
        tower.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "spec": model.spec,
                    "info": json.dumps(info)}, tower)
    return model, info


def parse_overrides(items: list[str], current: dict) -> dict:
    """``--ft key=value`` TrainConfig overrides of the fine-tuned arm, typed as the current values."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        kind = type(current.get(key))
        out[key] = value.lower() == "true" if kind is bool else kind(value) if kind in (int, float) else value
    return out


def arm_configs(variant: str, epochs: int | None, ft_over: list[str], digit_loss: bool = False):
    """Fine-tuning: the settings a stage gets with init_from at quick (then any --ft values; the
    digit loss on with ``digit_loss``); scratch: the stage's quick settings with the same epochs
    and no early stop."""
    ft = build_config("stage2", "quick", {"model_name": variant, "init_from": "models:/real-bench@tower",
                                          **({"epochs": epochs} if epochs else {}),
                                          **({"aux_digit_weight": FINETUNE_DIGIT_WEIGHT} if digit_loss else {})})
    ft = ft.updated(parse_overrides(ft_over, ft.flat())).validate() if ft_over else ft
    ft = replace(ft, init_from="", patience=0)
    scratch = build_config("stage2", "quick", {"model_name": variant, "epochs": ft.epochs, "patience": 0})
    return {"finetuned": ft, "scratch": scratch}


def train_arm(cfg, source: torch.nn.Module | None, train: PairSet, select: str, seed: int, dev) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model_name, digit_head=cfg.aux_digit_weight > 0, **cfg.model_overrides())
    if source is not None:
        copy_matching(model, source.state_dict(), source_spec=source.spec, source="pretrained tower")
    if select == "inner":  # best epoch on an inner split of the training folds
        fit_idx, sel_idx = train_test_split(np.arange(len(train)), test_size=0.2, stratify=train.y, random_state=seed)
        fit(model, subset(train, fit_idx, "inner-train"), subset(train, sel_idx, "inner-val"), cfg, device=dev)
        return model
    # last epoch: fit needs a val set; the training folds serve (bookkeeping only, nothing is chosen on it)
    last = LastEpoch(model)
    fit(model, train, train, cfg, device=dev, callbacks=[last])
    model.load_state_dict(last.state)
    return model


IGNORE = -100  # cross_entropy's default ignore_index: a half without a kept pseudo-label


def consistent_digits(tower: torch.nn.Module, pairs: PairSet, tau: float, dev, amp) -> np.ndarray:
    """(N, 2) digit pseudo-labels: the tower's joint digit distribution of each pair kept on the
    digit pairs its label allows (left > right for label 1, else left <= right), each half's
    most likely digit under it where that half's posterior is >= tau, else IGNORE."""
    _, logits = predict_with_digits(tower, pairs.x, device=dev, amp=amp)
    p = torch.softmax(logits.float(), -1).numpy()
    joint = p[:, 0, :, None] * p[:, 1, None, :]  # [n, left digit, right digit]
    greater = np.tril(np.ones((10, 10), dtype=bool), -1)
    allowed = np.where(pairs.require_labels()[:, None, None] == 1, greater, ~greater)
    post = joint * allowed
    post /= post.sum(axis=(1, 2), keepdims=True) + 1e-12
    halves = np.stack([post.sum(2), post.sum(1)], axis=1)  # (n, 2, 10)
    return np.where(halves.max(-1) >= tau, halves.argmax(-1), IGNORE)


def with_digits(pairs: PairSet, digits: np.ndarray) -> PairSet:
    return PairSet(pairs.x, pairs.y, extras={"digit_a": digits[:, 0], "digit_b": digits[:, 1]}, source=pairs.source)


def acc(model, pairs: PairSet, dev, amp, tta: bool = False) -> float:
    """Pair accuracy; ``tta``: of the mean probability over the test-time shifts (pairnet.tta)."""
    if not tta:
        return float(evaluate(model, pairs.x, pairs.y, device=dev, amp=amp)["val_acc"])
    prob = mean_over_shifts(lambda x: predict_proba(model, x, device=dev, amp=amp), pairs.x)
    return float(np.mean(to_labels(prob) == pairs.y))


def summary(values: list[float]) -> tuple[float, float]:
    return round(float(np.mean(values)), 4), round(float(np.std(values)), 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", required=True, help="real labelled pairs (.npz), read by path")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fold-seed", type=int, default=0, help="StratifiedKFold shuffle seed")
    ap.add_argument("--init-from", default="", help="registry URI of a pretrained model (skips pretraining)")
    ap.add_argument("--tower", default="", help="file: save the pretrained model there, reuse it when it exists "
                    "(the pretrain flags are then ignored; the JSON's pretrain block says how it was made)")
    ap.add_argument("--variant", default="resnet_optimized")
    ap.add_argument("--epochs", type=int, default=0, help="epochs of both trained arms (0: the quick finetune's)")
    ap.add_argument("--select", default="last", choices=("last", "inner"))
    ap.add_argument("--pretrain-size", default="quick", choices=sorted(SIZES))
    ap.add_argument("--pretrain-train", type=int, default=0, help="cut the pretrain train split to N pairs (0: all)")
    ap.add_argument("--pretrain-pairs", type=int, default=0,
                    help="make the pretrain train split N pairs (same scans and settings; 0: the size's)")
    ap.add_argument("--pretrain-epochs", type=int, default=0, help="0: the quick preset's")
    ap.add_argument("--gen", action="append", default=[], help="GenConfig override key=value (repeatable)")
    ap.add_argument("--zero-shot-only", action="store_true", help="only the zero-shot figures (a cheap filter)")
    ap.add_argument("--pt", action="append", default=[], help="TrainConfig override key=value of the pretraining")
    ap.add_argument("--ft", action="append", default=[], help="TrainConfig override key=value of the fine-tuned arm")
    ap.add_argument("--tta", action="store_true", help="also score every arm by the mean over test-time shifts "
                    "(pairnet.tta): the figures *_tta_acc beside the plain ones")
    ap.add_argument("--pseudo-digits", type=float, default=None, metavar="TAU",
                    help="fine-tuned arm: the digit loss on the tower's digit pseudo-labels, consistent with each "
                         "pair's label, for the halves whose posterior is >= TAU (self-training)")
    ap.add_argument("--arms", default="finetuned,scratch", help="trained arms to run (comma-separated)")
    ap.add_argument("--half", default="all", choices=("choose", "report", "all"),
                    help="choose: the even rows; report: the odd rows; all: every row (default all)")
    ap.add_argument("--train-from", default="folds", choices=("folds", "choose-half"),
                    help="where the trained arms' labels come from: the other folds of the scored half, or (with "
                         "--half report) the whole choosing half")
    args = ap.parse_args()
    if args.train_from == "choose-half" and args.half != "report":
        raise SystemExit("--train-from choose-half scores the reporting half: add --half report")
    dev = pick_device()
    t0 = time.perf_counter()
    every = load_pairs(args.pairs)
    every.require_labels()
    real = subset(every, half_rows(len(every), args.half), f"{args.half} half")
    outside = (subset(every, half_rows(len(every), "choose"), "choose half") if args.train_from == "choose-half"
               else None)

    pretrained, info = load_tower(args, dev)
    amp = amp_dtype("auto", dev)
    print(f"tower: {info['source']}, default-data val acc {info['val_acc']}, {info['seconds']} s")
    configs = arm_configs(args.variant, args.epochs, args.ft, digit_loss=args.pseudo_digits is not None)
    configs = {arm: cfg for arm, cfg in configs.items() if arm in args.arms.split(",")}
    folds = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.fold_seed)
    per_fold: dict[str, list[float]] = {"zero_shot": [], "finetuned": [], "scratch": []}
    if args.tta:
        per_fold.update({"zero_shot_tta": [], "finetuned_tta": [], "scratch_tta": []})
    arm_seconds = {"finetuned": 0.0, "scratch": 0.0}
    trained_once = {}  # --train-from choose-half: one model per arm, from the choosing half
    kept = []  # --pseudo-digits: the share of halves that got a pseudo-label, per training set

    def labelled(arm: str, pairs: PairSet) -> PairSet:
        """--pseudo-digits: the fine-tuned arm's pairs with the tower's pair-consistent digits."""
        if arm != "finetuned" or args.pseudo_digits is None:
            return pairs
        digits = consistent_digits(pretrained, pairs, args.pseudo_digits, dev, amp)
        kept.append(float(np.mean(digits != IGNORE)))
        return with_digits(pairs, digits)

    for k, (train_idx, test_idx) in enumerate(folds.split(real.x, real.y)):
        train, test = subset(real, train_idx, f"fold{k}-train"), subset(real, test_idx, f"fold{k}-test")
        per_fold["zero_shot"].append(round(acc(pretrained, test, dev, amp), 4))
        if args.tta:
            per_fold["zero_shot_tta"].append(round(acc(pretrained, test, dev, amp, tta=True), 4))
        if not args.zero_shot_only:
            for arm, cfg in configs.items():
                t = time.perf_counter()
                source = pretrained if arm == "finetuned" else None
                if outside is None:
                    model = train_arm(cfg, source, labelled(arm, train), args.select, k, dev)
                else:
                    if arm not in trained_once:
                        trained_once[arm] = train_arm(cfg, source, labelled(arm, outside), args.select, 0, dev)
                    model = trained_once[arm]
                per_fold[arm].append(round(acc(model, test, dev, amp), 4))
                if args.tta:
                    per_fold[f"{arm}_tta"].append(round(acc(model, test, dev, amp, tta=True), 4))
                arm_seconds[arm] += time.perf_counter() - t
        print(f"fold {k}: " + "  ".join(f"{arm} {v[-1]:.4f}" for arm, v in per_fold.items() if v))

    out = {"bench": "real", "pairs": args.pairs, "half": args.half, "n_pairs": len(real), "folds": args.folds,
           "trained_on": ("the whole choosing half (the even rows)" if outside is not None
                          else f"the other folds of the {args.half} half"),
           "fold_seed": args.fold_seed, "select": args.select, "device": str(dev),
           "zero_shot_all_acc": round(acc(pretrained, real, dev, amp), 4), "tta": args.tta,
           "pseudo_digits": args.pseudo_digits, **({"pseudo_kept": round(float(np.mean(kept)), 4)} if kept else {})}
    for arm, values in per_fold.items():
        if values:
            out[f"{arm}_acc"], out[f"{arm}_std"] = summary(values)
    out.update({"per_fold": per_fold, "seconds": round(time.perf_counter() - t0, 1),
                "arm_seconds": {k: round(v, 1) for k, v in arm_seconds.items()},
                "pretrain_val_acc": info["val_acc"], "pretrain_seconds": info["seconds"], "pretrain": info,
                "settings": {"zero_shot": {"model": pretrained.spec, "training": "none"},
                             **{arm: settings(cfg) | {"from": "pretrained tower"
                                if arm == "finetuned" else "random weights"} for arm, cfg in configs.items()}}})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
