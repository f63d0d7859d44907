"""Inference throughput of a whole ensemble on the current device.

Builds N zoo models (untrained: speed does not depend on the weights), runs every one
over the same pairs batched under torch.inference_mode with channels_last and AMP as
configured, and reports pairs/s for the ensemble. The target in the issue: 8,000 pairs
× 10 models in <= 0.5 s on an H200.

Usage: python bench/ensemble_bench.py [--pairs 8000] [--batch 2048]
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pairnet.models import create_model
from pairnet.train import pick_device, predict_proba
from pairnet.train.loop import amp_dtype

# The ten base models of the full recipe (stage 1, stage 2 variants, stage 3 members).
MEMBERS = ["improved_v2", "resnet_optimized_1.12", "resnet_fusion", "resnet_optimized", "resnet_optimized_1.12",
           "resnet_optimized_1.12", "resnet_optimized_1.12", "fpn_model", "improved_v2", "improved_v2"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = pick_device()
    dtype = amp_dtype(args.amp, dev)
    x = np.random.default_rng(0).integers(0, 256, (args.pairs, 28, 56), dtype=np.uint8)
    xs = torch.from_numpy(x).to(dev)  # data already on the device, as in stacking
    models = [create_model(n).to(dev).to(memory_format=torch.channels_last).eval() for n in MEMBERS]
    for m in models:  # warm-up: kernels, allocator
        predict_proba(m, xs[: args.batch], device=dev, batch_size=args.batch, amp=dtype)
    times = []
    for _ in range(args.repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        probs = [predict_proba(m, xs, device=dev, batch_size=args.batch, amp=dtype) for m in models]
        times.append(time.perf_counter() - t0)
    best = min(times)
    rate = args.pairs * len(models) / best
    print(f"device {dev}, amp {dtype}: {args.pairs} pairs x {len(models)} models in {best:.3f} s "
          f"({args.pairs / best:.0f} ensemble pairs/s, {rate:.0f} model-pairs/s); shape {np.stack(probs).shape}")
    print(json.dumps({"bench": "ensemble", "device": str(dev), "amp": str(dtype), "pairs": args.pairs,
                      "models": len(models), "seconds": round(best, 4),
                      "ensemble_pairs_per_s": round(args.pairs / best),
                      "model_pairs_per_s": round(rate)}))


if __name__ == "__main__":
    main()
