"""The training engine: one ``fit()`` owns AMP, clipping, scheduling, early stopping
and checkpoints; ``evaluate()`` and ``predict_proba()`` are separate and reused by
training, stacking and prediction. Tracking plugs in through callbacks.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pairnet.data.augment import augment_batch
from pairnet.data.pairs import PairSet
# Device choice lives in its own leaf; its names stay importable from here.
from pairnet.device import (NATIVE_BF16_FLAGS, amp_dtype, autocast, cpu_flags, enable_cuda_speedups,  # noqa: F401
                            pick_device, sync, to_device)
from pairnet.errors import PairnetError
from pairnet.fsutil import atomic_path
from pairnet.train import distributed
from pairnet.train.config import TrainConfig
from pairnet.train.losses import make_loss
from pairnet.train.metrics import binary_metrics

log = logging.getLogger(__name__)


class Callback:
    """Hooks the loop calls; tracking, pruning and progress bars implement these."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, path: Path, epoch: int) -> None: ...

    def on_fit_end(self, result: "FitResult") -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_acc: float
    stopped_early: bool
    final: dict[str, float] = field(default_factory=dict)  # val metrics of the restored best weights
    val_prob: np.ndarray | None = None  # val probabilities of the restored best weights


# ------------------------------------------------------------------ compilation
def compile_backend() -> str:
    """inductor where it can build its kernels: it compiles C++ (CPU kernels, and Triton's
    launchers on CUDA) against Python's headers. Without a compiler or the headers, e.g. a
    slim CI image, aot_eager: the same graph capture with eager kernels, so compile=true
    still trains, only without the speed-up."""
    cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")  # inductor's own default
    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    if shutil.which(cxx) and headers:
        return "inductor"
    log.warning("torch.compile falls back to the aot_eager backend (no speed-up): inductor needs a C++ compiler "
                "(%s: %s) and Python's headers (%s); install them, e.g. build-essential and python3-dev",
                cxx, "found" if shutil.which(cxx) else "missing", "found" if headers else "missing")
    return "aot_eager"


# ------------------------------------------------------------------ inference
@torch.inference_mode()
def predict_logits(model: torch.nn.Module, x: torch.Tensor | np.ndarray, *, device: torch.device,
                   batch_size: int = 1024, amp: torch.dtype | None = None, method: str = "forward") -> torch.Tensor:
    """Logits (N,) for uint8 pairs, batched; x may already live on the device. ``method``
    names another model output, e.g. ``forward_per_head`` for (N, heads) per-head logits."""
    model.eval()
    xs = torch.as_tensor(x)
    forward = getattr(model, method)
    out = []
    for start in range(0, xs.shape[0], batch_size):
        xb = to_device(xs[start:start + batch_size], device).float().div_(255)
        with autocast(device, amp):
            out.append(forward(xb).float())
    return torch.cat(out).cpu()


@torch.inference_mode()
def predict_with_digits(model: torch.nn.Module, x: torch.Tensor | np.ndarray, *, device: torch.device,
                        batch_size: int = 1024, amp: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair logits (N,) and digit logits (N, 2, 10) in one batched pass (models with a digit head)."""
    model.eval()
    xs = torch.as_tensor(x)
    pair, digit = [], []
    for start in range(0, xs.shape[0], batch_size):
        xb = to_device(xs[start:start + batch_size], device).float().div_(255)
        with autocast(device, amp):
            logits, dlog = model.forward_with_digits(xb)
        pair.append(logits.float())
        digit.append(dlog.float().view(2, -1, dlog.shape[-1]).transpose(0, 1))
    return torch.cat(pair).cpu(), torch.cat(digit).cpu()


def digit_labels(pairs: PairSet) -> np.ndarray | None:
    """(N, 2) digit classes of the left and right halves, or None when the file has none."""
    if "digit_a" not in pairs.extras or "digit_b" not in pairs.extras:
        return None
    return np.stack([pairs.extras["digit_a"], pairs.extras["digit_b"]], axis=1).astype(np.int64)


def digit_targets(cfg: TrainConfig, train: PairSet) -> np.ndarray | None:
    """The training file's digit labels when the digit loss is on (None when it is off);
    a clear error when it is on and the file has none."""
    if cfg.aux_digit_weight <= 0:
        return None
    digits = digit_labels(train)
    if digits is None:
        raise PairnetError(f"aux_digit_weight {cfg.aux_digit_weight} needs digit labels (digit_a, digit_b arrays), "
                           f"and {train.source} has none: set aux_digit_weight 0")
    return digits


def predict_proba(model: torch.nn.Module, x: np.ndarray, *, device: torch.device, batch_size: int = 1024,
                  amp: torch.dtype | None = None) -> np.ndarray:
    return torch.sigmoid(predict_logits(model, x, device=device, batch_size=batch_size, amp=amp)).numpy()


def evaluate(model: torch.nn.Module, x, y: np.ndarray, *, device: torch.device, loss_fn=None,
             batch_size: int = 1024, amp: torch.dtype | None = None, prefix: str = "val_") -> dict[str, float]:
    """Loss, accuracy, F1, precision, recall and ROC AUC on labelled pairs."""
    logits = predict_logits(model, x, device=device, batch_size=batch_size, amp=amp)
    return metrics_from_logits(logits, y, loss_fn=loss_fn, prefix=prefix)


def metrics_from_logits(logits: torch.Tensor, y: np.ndarray, *, loss_fn=None, prefix: str = "val_") -> dict[str, float]:
    y = np.asarray(y)
    metrics = binary_metrics(torch.sigmoid(logits).numpy(), y, prefix=prefix)
    if loss_fn is not None:
        metrics[prefix + "loss"] = float(loss_fn(logits, torch.as_tensor(y, dtype=torch.float32)))
    return metrics


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise PairnetError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad files
        raise PairnetError(f"{path}: not a readable pairnet checkpoint ({type(err).__name__})") from None


def _rng_state(gen: torch.Generator) -> dict:
    # gen draws the data order and augmentation on the training device; its state is
    # a small CPU tensor whatever the device.
    state = {"torch": torch.get_rng_state(), "gen": gen.get_state(), "gen_device": gen.device.type}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    saved_on = state.get("gen_device", "cpu")  # checkpoints before device generators drew on the CPU
    if saved_on == gen.device.type:
        gen.set_state(state["gen"])
    else:
        # A CPU and a CUDA generator keep different states: the resumed run stays valid but
        # draws a different order and augmentation from here on.
        log.warning("the checkpoint's data-order generator ran on %s and this run draws on %s: the resumed epochs "
                    "draw from a generator seeded with the run's seed, not the interrupted run's sequence",
                    saved_on, gen.device.type)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ fit
def eta(seconds: float) -> str:
    """``ETA 3 min`` for the epochs left (an upper bound when early stopping may end sooner)."""
    if seconds <= 0:
        return "done"
    if seconds < 90:
        return f"ETA {seconds:.0f} s"
    if seconds < 5400:
        return f"ETA {seconds / 60:.0f} min"
    return f"ETA {seconds / 3600:.1f} h"


def _make_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.sched.cosine_min_lr)
        return sched, "epoch"
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.sched.plateau_factor,
                                                          patience=cfg.sched.plateau_patience), "plateau"
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], epochs=cfg.epochs,
                                                   steps_per_epoch=steps_per_epoch,
                                                   pct_start=cfg.sched.onecycle_pct_start), "step"
    return None, "none"


@dataclass
class _Setup:
    """What the epochs share: the data on the device, the (DDP-wrapped) network, optimiser,
    scheduler and scaler, the generator that draws order and augmentation."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    sched_kind: str  # "step", "epoch", "plateau" or "none"
    scaler: torch.amp.GradScaler
    gen: torch.Generator
    dtype: torch.dtype | None
    loss_fn: object
    me: distributed.Rank
    xs: torch.Tensor
    ys: torch.Tensor
    ds: torch.Tensor | None  # digit targets when the digit loss is on
    xv: torch.Tensor
    yv: np.ndarray
    digits_val: np.ndarray | None
    steps: int

    @property
    def aux(self) -> bool:
        return self.ds is not None


@dataclass
class _Progress:
    """Where training stands: what a checkpoint saves and a resume restores."""

    start_epoch: int = 1
    best_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict | None = None
    history: list = field(default_factory=list)
    stopped_early: bool = False
    spent: float = 0.0  # seconds of the epochs run in this call, for the ETA


def _set_up(model: torch.nn.Module, train: PairSet, val: PairSet, cfg: TrainConfig, device: torch.device) -> _Setup:
    """Seeds, the data uploaded once, the model on the device (compiled, DDP-wrapped), the
    optimiser with its tower group, the scheduler and the scaler."""
    if device.type == "cuda":
        enable_cuda_speedups()
    torch.manual_seed(cfg.seed)
    # Data order and augmentation draw on the device: a step copies nothing from the host.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    dtype = amp_dtype(cfg.amp, device)
    loss_fn = make_loss(cfg)
    digits_train = digit_targets(cfg, train)
    aux = digits_train is not None
    if aux and getattr(model, "digit_head", None) is None:
        raise PairnetError("aux_digit_weight > 0 needs a model built with a digit head "
                           "(create_model(..., digit_head=True))")
    # Each split lives on the device as one uint8 tensor, uploaded once; batches are taken by index.
    xs = to_device(torch.from_numpy(np.ascontiguousarray(train.x)), device)
    ys = to_device(torch.from_numpy(train.require_labels().astype(np.float32)), device)
    xv = to_device(torch.from_numpy(np.ascontiguousarray(val.x)), device)
    yv = val.require_labels()
    ds = to_device(torch.from_numpy(digits_train), device) if aux else None
    n = xs.shape[0]
    steps = n // cfg.batch_size if n >= cfg.batch_size else 1
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    net, me = _place(model, cfg, device)
    opt = _optimizer(model, cfg, device)
    sched, sched_kind = _make_scheduler(opt, cfg, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
    return _Setup(net, opt, sched, sched_kind, scaler, gen, dtype, loss_fn, me, xs, ys, ds, xv, yv,
                  digit_labels(val) if aux else None, steps)


def _place(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, distributed.Rank]:
    """The model on the device (channels_last, compiled as asked) and the network that trains
    it: the model itself, or its DDP wrapper under torchrun."""
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        # In place: parameters and state-dict keys stay the module's own (no _orig_mod.
        # prefix), so checkpoints and saved models load into an uncompiled model.
        model.compile(backend=compile_backend())
    # Several processes (torchrun): each trains on its shard of every batch, gradients averaged.
    me = distributed.current()
    if not me.distributed:
        return model, me
    from torch.nn.parallel import DistributedDataParallel

    # A frozen tower gets no gradients in the first epochs: DDP must not wait for them.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=cfg.freeze_epochs > 0), me


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel updates every parameter tensor in one pass instead of a Python
    # loop over ~100 small tensors (BatchNorm, SE, biases).
    # Two parameter groups: the tower at lr × tower_lr_mult (fine-tuning), the rest at lr.
    tower = list(model.tower.parameters()) if hasattr(model, "tower") else []
    in_tower = {id(q) for q in tower}
    groups = [{"params": [q for q in model.parameters() if id(q) not in in_tower], "lr": cfg.lr}]
    if tower:
        groups.append({"params": tower, "lr": cfg.lr * cfg.tower_lr_mult})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))


def _resume(model: torch.nn.Module, s: _Setup, resume: dict | None) -> _Progress:
    """A fresh start, or the interrupted run's weights, optimiser, scheduler, scaler, RNG and progress."""
    if resume is None:
        return _Progress()
    model.load_state_dict(resume["model"])
    s.opt.load_state_dict(resume["optimizer"])
    if s.sched is not None and resume.get("scheduler") is not None:
        s.sched.load_state_dict(resume["scheduler"])
    if resume.get("scaler"):
        s.scaler.load_state_dict(resume["scaler"])
    _set_rng_state(resume["rng"], s.gen)
    p = _Progress(start_epoch=int(resume["epoch"]) + 1, best_acc=float(resume["best_val_acc"]),
                  best_epoch=int(resume["best_epoch"]), bad_epochs=int(resume["bad_epochs"]),
                  best_state=resume["best_state"], history=list(resume["history"]))
    log.info("resuming at epoch %d (best val acc %.4f at epoch %d)", p.start_epoch, p.best_acc, p.best_epoch)
    return p


def _step(model: torch.nn.Module, s: _Setup, cfg: TrainConfig, idx: torch.Tensor, device: torch.device):
    """One optimiser step on the batch ``idx``: its loss, logits, targets (after augmentation),
    gradient norm, and right digit calls (0 without the digit loss)."""
    xb = s.xs[idx].float().div_(255)
    yb = s.ys[idx]
    db = s.ds[idx] if s.aux else None
    if cfg.augment:
        xb, yb, db = augment_batch(xb, yb, s.gen, cfg.aug, digits=db)
    with autocast(device, s.dtype):
        if s.aux:
            logits, dlog = s.net(xb, with_digits=True)
        else:
            logits = s.net(xb)
    loss = s.loss_fn(logits, yb)
    digit_right = 0
    if s.aux:
        # Rows of dlog: every left half, then every right half.
        dtarget = torch.cat([db[:, 0], db[:, 1]])
        loss = loss + cfg.aux_digit_weight * torch.nn.functional.cross_entropy(dlog.float(), dtarget)
        digit_right = (dlog.detach().argmax(1) == dtarget).sum()
    s.opt.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.unscale_(s.opt)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    s.scaler.step(s.opt)
    s.scaler.update()
    if s.sched_kind == "step":
        s.sched.step()
    return loss, logits, yb, norm, digit_right


def _train_epoch(model: torch.nn.Module, s: _Setup, cfg: TrainConfig, epoch: int,
                 device: torch.device) -> tuple[dict[str, float], int]:
    """One pass over this rank's shard of the training set: the epoch's training figures
    (whole-batch under torchrun) and the pairs seen."""
    model.train()
    frozen = epoch <= cfg.freeze_epochs
    if hasattr(model, "tower"):
        # A frozen tower is a fixed feature extractor: no gradients, BatchNorm statistics kept.
        model.tower.requires_grad_(not frozen)
        model.tower.train(not frozen)
    perm = torch.randperm(s.xs.shape[0], generator=s.gen, device=device)
    loss_sum, correct, digit_correct, norm_sum = (torch.zeros((), device=device) for _ in range(4))
    seen = 0
    for step in range(s.steps):
        idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        if s.me.distributed:  # equal shards, so every rank draws the same random numbers
            idx = idx[s.me.rank::s.me.world][:idx.numel() // s.me.world]
        loss, logits, yb, norm, digit_right = _step(model, s, cfg, idx, device)
        # Accumulate on the device: no host sync per step.
        digit_correct += digit_right
        norm_sum += norm
        loss_sum += loss.detach() * idx.numel()
        correct += ((logits.detach() > 0).float() == (yb > 0.5).float()).sum()
        seen += idx.numel()
    if s.me.distributed:  # whole-batch training figures; rank 0's BatchNorm statistics everywhere
        totals = torch.stack([loss_sum, correct, digit_correct, torch.tensor(float(seen), device=device)])
        torch.distributed.all_reduce(totals)
        loss_sum, correct, digit_correct, seen = totals[0], totals[1], totals[2], int(totals[3])
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    metrics = {"train_loss": float(loss_sum) / seen, "train_acc": float(correct) / seen,
               "grad_norm": float(norm_sum) / s.steps, "lr": s.opt.param_groups[0]["lr"]}
    if s.aux:
        metrics["train_digit_acc"] = float(digit_correct) / (2 * seen)
    return metrics, seen


def _evaluate_epoch(model: torch.nn.Module, s: _Setup, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Validation figures after an epoch (and the digit accuracy when the model reads digits)."""
    if s.digits_val is None:
        return evaluate(model, s.xv, s.yv, device=device, loss_fn=s.loss_fn, batch_size=cfg.eval_batch_size,
                        amp=s.dtype)
    vlogits, vdigits = predict_with_digits(model, s.xv, device=device, batch_size=cfg.eval_batch_size, amp=s.dtype)
    metrics = metrics_from_logits(vlogits, s.yv, loss_fn=s.loss_fn)
    metrics["val_digit_acc"] = float((vdigits.argmax(-1).numpy() == s.digits_val).mean())
    return metrics


def _decide(model: torch.nn.Module, s: _Setup, p: _Progress, epoch: int, metrics: dict[str, float]) -> None:
    """The scheduler's epoch step, and the best weights kept or a bad epoch counted."""
    if s.sched_kind == "epoch":
        s.sched.step()
    elif s.sched_kind == "plateau":
        s.sched.step(metrics["val_acc"])
    if metrics["val_acc"] > p.best_acc:
        p.best_acc, p.best_epoch, p.bad_epochs = metrics["val_acc"], epoch, 0
        p.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    else:
        p.bad_epochs += 1
    metrics["best_val_acc"] = p.best_acc
    p.history.append({"epoch": epoch, **metrics})


def _checkpoint(path: Path, model: torch.nn.Module, s: _Setup, cfg: TrainConfig, p: _Progress, epoch: int) -> None:
    """Everything a resume needs to continue bit for bit."""
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": s.opt.state_dict(),
        "scheduler": s.sched.state_dict() if s.sched is not None else None,
        "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else None,
        "rng": _rng_state(s.gen), "epoch": epoch, "best_val_acc": p.best_acc, "best_epoch": p.best_epoch,
        "bad_epochs": p.bad_epochs, "best_state": p.best_state, "history": p.history,
        "config": cfg.to_dict(), "spec": getattr(model, "spec", {}),
    })


def _wrap_up(model: torch.nn.Module, s: _Setup, cfg: TrainConfig, p: _Progress, device: torch.device) -> FitResult:
    """The best weights restored; one inference pass over val gives both the final metrics and
    the probabilities that callers plot (confusion matrix) without predicting again."""
    if p.best_state is not None:
        model.load_state_dict(p.best_state)
    logits = predict_logits(model, s.xv, device=device, batch_size=cfg.eval_batch_size, amp=s.dtype)
    final = metrics_from_logits(logits, s.yv, loss_fn=s.loss_fn)
    return FitResult(history=p.history, best_epoch=p.best_epoch, best_val_acc=p.best_acc,
                     stopped_early=p.stopped_early, final=final, val_prob=torch.sigmoid(logits).numpy())


def fit(
    model: torch.nn.Module,
    train: PairSet,
    val: PairSet,
    cfg: TrainConfig,
    *,
    device: torch.device,
    callbacks: list[Callback] = (),
    checkpoint_path: str | Path | None = None,
    resume: dict | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best-validation weights."""
    cfg.validate()
    s = _set_up(model, train, val, cfg, device)
    p = _resume(model, s, resume)
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    for epoch in range(p.start_epoch, cfg.epochs + 1):
        if cfg.patience and p.bad_epochs >= cfg.patience:
            p.stopped_early = True
            break
        sync(device)
        t0 = time.perf_counter()
        metrics, seen = _train_epoch(model, s, cfg, epoch, device)
        sync(device)
        train_seconds = time.perf_counter() - t0
        metrics.update(_evaluate_epoch(model, s, cfg, device))
        sync(device)
        metrics["epoch_seconds"] = time.perf_counter() - t0
        metrics["pairs_per_s"] = seen / train_seconds
        metrics = distributed.share(metrics, s.me)  # every rank takes rank 0's decisions from here on
        _decide(model, s, p, epoch, metrics)
        p.spent += metrics["epoch_seconds"]
        if s.me.main:
            log.info("epoch %d/%d  train loss %.4f acc %.4f  val acc %.4f  %.1fs  %s", epoch, cfg.epochs,
                     metrics["train_loss"], metrics["train_acc"], metrics["val_acc"], metrics["epoch_seconds"],
                     eta(p.spent / (epoch - p.start_epoch + 1) * (cfg.epochs - epoch)))
        if ckpt is not None:
            _checkpoint(ckpt, model, s, cfg, p, epoch)
        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics)
        if ckpt is not None:
            for cb in callbacks:
                cb.on_checkpoint(ckpt, epoch)
    result = _wrap_up(model, s, cfg, p, device)
    for cb in callbacks:
        cb.on_fit_end(result)
    return result
