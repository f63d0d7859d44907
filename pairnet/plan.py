"""What a pipeline will do, before it does it: its steps, their sizes, which are reused, and
how long each will take on this machine.

Times come from a probe of this machine's throughput, not from a table: for each distinct
training config the probe runs ``fit()`` itself on random pairs for a few steps (full
steps, and frozen-tower steps where the step freezes it) and scores random pairs with the
model, so the estimate follows the device, the thread count, the width, the batch size and
AMP. A probed speed is kept in pairnet's state folder (``speeds.json``, per config, machine
and torch version) and read back by later plans; delete the file to probe again. What a
step adds around its epochs (logging figures, the model and its registration) is a fixed
allowance measured on the 2-core dev machine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from pairnet.data.generate import GenConfig, base_scans, make_split, split_pools
from pairnet.data.pairs import PairSet
from pairnet.device import amp_dtype
from pairnet.fsutil import LOCK_SUFFIX, file_lock, read_state_json, write_text
from pairnet.paths import state_dir
from pairnet.models import create_model
from pairnet.train.config import TrainConfig
from pairnet.train.loop import fit, predict_logits

log = logging.getLogger(__name__)

# Seconds a trained step spends outside its epochs on the CPU: the run's start, the figures,
# the test_public scoring's fixed part, logging and registering the model, the gate. Measured
# on the tiny pipeline (2-core dev machine), where epochs take almost nothing.
STEP_OVERHEAD_S = 8.0
# A step that loads registered models (zero-shot, stack, predict) pays this per model loaded.
LOAD_S = 2.0
PROBE_STEPS = (1, 4)  # the probe times fit() at these step counts; the slope is a step's cost
PROBE_PAIRS = 512  # pairs the generator probe makes
# Making a set also profiles the training split against the real statistics and writes
# compressed files: measured on the 2-core dev machine, about 1.3x the pairs' own time.
MAKE_WRITE_FACTOR = 1.3


@dataclass
class Step:
    """One step of the pipeline as the plan shows it and the run follows it."""

    label: str  # as in the logs and run names: stage2/resnet_optimized/seed42
    kind: str  # data | pretrain | zero_shot | train | stack | predict
    what: str  # in words
    pairs: int = 0  # pairs it trains on (data: pairs it makes; scoring steps: pairs scored)
    epochs: int = 0
    reused: bool | None = False  # None: decided once an earlier step has run
    seconds: float = 0.0  # the estimate

    @property
    def cost(self) -> float:
        """What the step will take: nothing when it is reused."""
        return 0.0 if self.reused else self.seconds


@dataclass(frozen=True)
class Speed:
    step_s: float  # one optimiser step at the config's batch size, tower training
    frozen_step_s: float  # one step with the tower frozen
    pair_s: float  # scoring one pair (evaluation batch)


_SPEEDS: dict[tuple, Speed] = {}
_KEPT: set[tuple] = set()  # speeds in the state folder's speeds.json


def _random_pairs(n: int, rng: np.random.Generator, digits: bool) -> PairSet:
    x = rng.integers(0, 256, size=(n, 28, 56), dtype=np.uint8)
    y = rng.integers(0, 2, size=n)
    extras = {"digit_a": rng.integers(0, 10, size=n), "digit_b": rng.integers(0, 10, size=n)} if digits else {}
    return PairSet(x=x, y=y, extras=extras)


def _fit_seconds(cfg: TrainConfig, steps: int, train: PairSet, val: PairSet, device: torch.device) -> float:
    model = create_model(cfg.model_name, digit_head=cfg.aux_digit_weight > 0, **cfg.model_overrides())
    loop_log = logging.getLogger(fit.__module__)
    level = loop_log.level
    loop_log.setLevel(logging.WARNING)  # the probe's epochs are not the user's
    try:
        t0 = time.perf_counter()
        fit(model, train, val, replace(cfg, epochs=1, max_steps_per_epoch=steps), device=device)
        return time.perf_counter() - t0
    finally:
        loop_log.setLevel(level)


def measure(cfg: TrainConfig, device: torch.device, keep: bool = True) -> Speed:
    """This machine's speed for ``cfg`` (cached per model, width, batch, AMP and device);
    ``keep``: store a fresh probe in the state folder (``--plan`` writes nothing)."""
    key = (cfg.model_name, cfg.width_mult, cfg.feat_dim, cfg.layers,
           cfg.batch_size, cfg.eval_batch_size, cfg.amp, cfg.aux_digit_weight > 0, cfg.augment, str(device),
           torch.get_num_threads())
    if key in _SPEEDS:
        if keep and key not in _KEPT:  # probed by a --plan in this process: kept now
            _store(_disk_key(key), _SPEEDS[key])
            _KEPT.add(key)
        return _SPEEDS[key]
    stored = _stored().get(_disk_key(key))
    if stored:
        _SPEEDS[key] = Speed(*stored)
        _KEPT.add(key)
        return _SPEEDS[key]
    rng = np.random.default_rng(0)
    aux = cfg.aux_digit_weight > 0
    train = _random_pairs(cfg.batch_size * max(PROBE_STEPS), rng, aux)
    val = _random_pairs(8, rng, aux)
    base = replace(cfg, init_from="", freeze_epochs=0, patience=0, scheduler="none", compile=False)
    lo, hi = PROBE_STEPS
    _fit_seconds(base, 1, train, val, device)  # warm-up: kernels, allocator, thread pool
    step_s = (_fit_seconds(base, hi, train, val, device) - _fit_seconds(base, lo, train, val, device)) / (hi - lo)
    frozen = replace(base, freeze_epochs=1)
    frozen_s = (_fit_seconds(frozen, hi, train, val, device) - _fit_seconds(frozen, lo, train, val, device)) / (hi - lo)
    model = create_model(cfg.model_name, digit_head=aux, **cfg.model_overrides()).to(device)
    if cfg.channels_last:  # as fit() leaves it for the scoring that follows
        model.to(memory_format=torch.channels_last)
    x = _random_pairs(max(cfg.eval_batch_size, 1024), rng, False).x
    score = dict(device=device, batch_size=cfg.eval_batch_size, amp=amp_dtype(cfg.amp, device))
    predict_logits(model, x[: cfg.eval_batch_size], **score)  # warm-up
    t0 = time.perf_counter()
    predict_logits(model, x, **score)
    pair_s = (time.perf_counter() - t0) / len(x)
    speed = Speed(max(step_s, 1e-4), max(frozen_s, 1e-4), max(pair_s, 1e-7))
    log.debug("probe %s: %.3f s a step, %.3f s frozen, %.2f ms a pair scored", key, speed.step_s, speed.frozen_step_s,
              speed.pair_s * 1e3)
    _SPEEDS[key] = speed
    if keep:
        _store(_disk_key(key), speed)
        _KEPT.add(key)
    return speed


# Probed speeds are kept in pairnet's state folder, per config, machine and library version: a
# later plan on this machine reads them instead of probing again.
SPEEDS_FILE = "speeds.json"


def _disk_key(key: tuple) -> str:
    return "|".join(map(str, (*key, torch.__version__, platform.node(), platform.processor(), os.cpu_count())))


def _stored() -> dict:
    return read_state_json(SPEEDS_FILE)


def _store(key: str, speed: Speed) -> None:
    record = state_dir() / SPEEDS_FILE
    try:
        with file_lock(record.with_name(SPEEDS_FILE + LOCK_SUFFIX), f"{record} is busy", wait_s=10):
            table = _stored()
            table[key] = [speed.step_s, speed.frozen_step_s, speed.pair_s]
            write_text(record, json.dumps(table, indent=1))
    except OSError as err:  # a read-only state folder costs a probe next time, nothing else
        log.debug("could not keep the probed speed: %s", err)


_MAKE: list[float] = []


def make_pair_seconds() -> float:
    """Seconds to make one pair of the default set here (rendering and corruption), measured once."""
    if not _MAKE:
        cfg = GenConfig(size="tiny")
        scans, targets = base_scans(cfg.bases)
        pools = split_pools(targets, cfg.seed)
        make_split("train", 64, scans, pools["train"], cfg)  # warm-up
        t0 = time.perf_counter()
        make_split("train", PROBE_PAIRS, scans, pools["train"], cfg)
        _MAKE.append((time.perf_counter() - t0) / PROBE_PAIRS * MAKE_WRITE_FACTOR)
    return _MAKE[0]


def train_seconds(cfg: TrainConfig, n_train: int, n_val: int, n_public: int, speed: Speed) -> float:
    """A training step's time at most (early stopping can end it sooner): its epochs, each
    scoring val, then test_public once, and the step's fixed overhead."""
    steps = n_train // cfg.batch_size if n_train >= cfg.batch_size else 1
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    frozen = min(cfg.freeze_epochs, cfg.epochs) if cfg.init_from else 0
    epochs = steps * (frozen * speed.frozen_step_s + (cfg.epochs - frozen) * speed.step_s)
    scoring = (cfg.epochs * n_val + n_val + n_public) * speed.pair_s
    return epochs + scoring + STEP_OVERHEAD_S


def clock(seconds: float) -> str:
    """``42 s``, ``7 min``, ``1 h 05 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def total(steps: list[Step]) -> float:
    return sum(s.cost for s in steps)


def render(steps: list[Step], header: str) -> str:
    """The plan as a table: every step, what it does, on how many pairs, reused or not, its estimate."""
    lines = [header, f"  {'step':42s} {'pairs':>7s} {'epochs':>6s} {'reused':>7s} {'estimate':>9s}  what"]
    for s in steps:
        reused = "yes" if s.reused else "no" if s.reused is False else "maybe"
        lines.append(f"  {s.label:42s} {s.pairs:7,d} {s.epochs or '-':>6} {reused:>7s} {clock(s.cost):>9s}  {s.what}")
    lines.append(f"  {'in all':42s} {'':7s} {'':6s} {'':7s} {clock(total(steps)):>9s}")
    return "\n".join(lines)
