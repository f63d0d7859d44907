"""Training and inference throughput on the current device.

Trains ``resnet_optimized`` (2,2,2, width 1.0) for a fixed number of steps two ways:
pairnet's ``fit()`` (data on the device, batched augmentation, one tower call for both
halves, channels_last, AMP as configured) and a reference loop written the way the
original scripts work (a torch DataLoader over per-sample transforms, batch 64, fp32,
one tower call per image). Then inference pairs/s for every zoo model. On CUDA it also
prints the seconds a 50,000-pair training epoch takes, extrapolated from the timed steps.

Usage: python bench/train_bench.py [--steps 30] [--batch 64] [--amp auto] [--compile]
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from pairnet.data.generate import GenConfig, make_dataset
from pairnet.data.pairs import PairSet, load_pairs
from pairnet.models import create_model, list_models
from pairnet.train import TrainConfig, fit, pick_device, predict_proba
from pairnet.train.loop import amp_dtype
from pairnet.train.losses import focal_loss


class PerSampleDataset(Dataset):
    """The original scripts' style: one pair at a time, transforms per sample."""

    def __init__(self, pairs: PairSet, seed: int = 0):
        self.x, self.y = pairs.x, pairs.y
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.x)

    def _affine(self, img: torch.Tensor) -> torch.Tensor:
        rot = math.radians(self.rng.uniform(-10, 10))
        s = self.rng.uniform(0.9, 1.1)
        tx, ty = self.rng.uniform(-2, 2, 2) * 2 / 28
        theta = torch.tensor([[[math.cos(rot) / s, -math.sin(rot) / s, tx],
                               [math.sin(rot) / s, math.cos(rot) / s, ty]]],
                             dtype=torch.float32)
        grid = F.affine_grid(theta, [1, 1, 28, 28], align_corners=False)
        out = F.grid_sample(img[None, None], grid, align_corners=False)[0]
        if self.rng.random() < 0.5:  # random erasing
            x0, y0 = self.rng.integers(0, 24, 2)
            w, h = self.rng.integers(4, 12, 2)
            out[:, y0:y0 + h, x0:x0 + w] = 0
        return out

    def __getitem__(self, i):
        img = torch.from_numpy(self.x[i].astype(np.float32) / 255.0)
        a, b = self._affine(img[:, :28]), self._affine(img[:, 28:])
        return a, b, torch.tensor(float(self.y[i]))


def reference_loop(model, pairs: PairSet, steps: int, batch: int) -> float:
    """pairs/s of the reference loop (fp32, DataLoader, per-image tower calls)."""
    from pairnet.models.pair import PIXEL_MEAN, PIXEL_STD

    loader = DataLoader(PerSampleDataset(pairs), batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    model.train()
    it = iter(loader)
    seen, t0 = 0, None
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            t0, seen = time.perf_counter(), 0
        a, b, y = next(it)
        fa = model.tower((a - PIXEL_MEAN) / PIXEL_STD)
        fb = model.tower((b - PIXEL_MEAN) / PIXEL_STD)
        loss = focal_loss(model.head(fa, fb), y, smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += y.numel()
    return seen / (time.perf_counter() - t0)


def train_flops_per_pair(model, batch: int, device) -> float:
    x = torch.rand(batch, 28, 56, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (the untimed first epoch compiles)")
    ap.add_argument("--infer-pairs", type=int, default=4096)
    args = ap.parse_args()
    dev = pick_device()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(tmp, GenConfig(size="quick", seed=1))
        train, val = load_pairs(f"{tmp}/train.npz"), load_pairs(f"{tmp}/val.npz")
    small_val = PairSet(x=val.x[:256], y=val.y[:256], source="val")

    # pairnet's loop: two epochs of `steps` steps; the second is timed (the first warms
    # up kernels, e.g. oneDNN's bf16 primitives).
    cfg = TrainConfig(model_name="resnet_optimized", width_mult=1.0, epochs=2, batch_size=args.batch, patience=0,
                      max_steps_per_epoch=args.steps, amp=args.amp, scheduler="none", compile=args.compile)
    model = create_model("resnet_optimized", width_mult=1.0)
    result = fit(model, train, small_val, cfg, device=dev)
    ours = result.history[-1]["pairs_per_s"]
    epoch_50k = 50_000 / ours  # training steps only; validation comes on top

    ref_model = create_model("resnet_optimized", width_mult=1.0).to(dev)
    ref = reference_loop(ref_model, train, args.steps, args.batch) if dev.type == "cpu" else float("nan")

    flops = train_flops_per_pair(create_model("resnet_optimized", width_mult=1.0).to(dev), 16, dev)
    gflops = flops * ours / 1e9

    infer = {}
    dtype = amp_dtype(args.amp, dev)
    xs = np.concatenate([val.x] * (args.infer_pairs // len(val.x) + 1))[:args.infer_pairs]
    for name in list_models():
        m = create_model(name).to(dev).to(memory_format=torch.channels_last).eval()
        predict_proba(m, xs[:1024], device=dev, amp=dtype)  # warm-up
        t0 = time.perf_counter()
        predict_proba(m, xs, device=dev, amp=dtype)
        infer[name] = round(len(xs) / (time.perf_counter() - t0))

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"device {dev}, amp {dtype}, compile {args.compile}, threads {torch.get_num_threads()}")
    if dev.type == "cuda":
        print(f"train epoch of 50,000 pairs: {epoch_50k:.1f} s (extrapolated from {args.steps} timed steps of "
              f"{args.batch}, validation not included)")
    print(f"train resnet_optimized: pairnet {ours:.0f} pairs/s, reference {ref:.0f} pairs/s, ratio {ours / ref:.2f}")
    print(f"train FLOPs/pair {flops / 1e6:.1f} MFLOP, achieved {gflops:.1f} GFLOP/s; peak RSS {peak_mb:.0f} MB")
    for name, v in infer.items():
        print(f"inference {name:24s} {v:8d} pairs/s")
    print(json.dumps({
        "bench": "train", "device": str(dev), "amp": str(dtype), "compile": args.compile, "steps": args.steps,
        "batch": args.batch, "seconds_per_50k_epoch": round(epoch_50k, 2),
        "pairnet_pairs_per_s": round(ours, 1), "reference_pairs_per_s": round(ref, 1),
        "ratio": round(ours / ref, 2), "train_mflops_per_pair": round(flops / 1e6, 2),
        "achieved_gflops": round(gflops, 1), "peak_rss_mb": round(peak_mb), "inference_pairs_per_s": infer,
    }))


if __name__ == "__main__":
    main()
