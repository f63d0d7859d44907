"""Inference throughput of a whole ensemble: the served path beside the raw path.

raw: N zoo models (untrained: speed does not depend on the weights), each a plain torch
forward over the same pairs, already on the device, batched under torch.inference_mode
with channels_last and the autocast dtype ``amp=auto`` picks.
served: the same weights as the stack pairnet logs (base model folders + a LightGBM
booster), saved with ``mlflow.pyfunc.save_model`` as the same models-from-code pyfunc
(no tracking server needed: the class and artifacts are those of a logged model), loaded
with ``mlflow.pyfunc.load_model`` and called with uint8 pairs on the host, as a user does.

Targets in the issue: served >= 0.9 x raw throughput; on a GPU, 8,000 pairs x 10 models
served in <= 0.5 s (printed when CUDA is present).

Usage: python bench/ensemble_bench.py [--pairs 8000] [--models 10] [--width-mult 1] [--batch 1024]
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch

from predict_bench import make_stack, seeded_models  # bench/ is the script's folder, first on sys.path
from pairnet.serving.predictors import BATCH
from pairnet.tracking.model import PYFUNC_CODE, STACK_SIGNATURE, requirements, stack_artifacts
from pairnet.train import pick_device, predict_proba
from pairnet.train.loop import amp_dtype

# The ten base models of the full recipe (stage 1, stage 2 variants, stage 3 members).
MEMBERS = ["improved_v2", "resnet_optimized_1.12", "resnet_fusion", "resnet_optimized", "resnet_optimized_1.12",
           "resnet_optimized_1.12", "resnet_optimized_1.12", "fpn_model", "improved_v2", "improved_v2"]
TARGET_RATIO = 0.9
GPU_TARGET_S = 0.5  # 8,000 pairs x 10 models


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8000)
    ap.add_argument("--models", type=int, default=len(MEMBERS), help=f"the first N of the {len(MEMBERS)} members")
    ap.add_argument("--width-mult", type=float, default=1.0, help="0.5: the width the quick preset trains")
    ap.add_argument("--batch", type=int, default=BATCH, help="pairs per forward pass, both paths")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved; the best of each path counts")
    args = ap.parse_args()
    dev = pick_device()
    dtype = amp_dtype("auto", dev)  # what the served pyfunc picks on this device
    x = np.random.default_rng(0).integers(0, 256, (args.pairs, 28, 56), dtype=np.uint8)
    names = (MEMBERS * (args.models // len(MEMBERS) + 1))[:args.models]
    models = seeded_models(names, args.width_mult)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_stack(Path(tmp) / "stack", models)
        mlflow.pyfunc.save_model(path=str(Path(tmp) / "model"), python_model=str(PYFUNC_CODE),
                                 artifacts=stack_artifacts(folder), signature=STACK_SIGNATURE, input_example=x[:2],
                                 pip_requirements=requirements("lightgbm", "pandas"))
        served = mlflow.pyfunc.load_model(str(Path(tmp) / "model"))
    served.unwrap_python_model().predictor.batch = args.batch  # the same batches as raw
    models = [m.to(dev).to(memory_format=torch.channels_last).eval() for m in models]
    xs = torch.from_numpy(x).to(dev)  # raw: data already on the device, as in stacking

    def raw():
        return [predict_proba(m, xs, device=dev, batch_size=args.batch, amp=dtype) for m in models]

    raw(), served.predict(x[: args.batch])  # warm-up: kernels, allocator
    raw_times, served_times = [], []
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        raw_times.append(_timed(raw))
        served_times.append(_timed(lambda: served.predict(x)))
    best, served_best = min(raw_times), min(served_times)
    rate, served_rate = args.pairs * len(models) / best, args.pairs * len(models) / served_best
    ratio = served_rate / rate
    # Each repeat's raw and served ran back to back under the same load from other processes:
    # the median of their ratios is the steadier figure on a shared machine.
    paired = float(np.median([r / s for r, s in zip(raw_times, served_times, strict=True)]))
    per_8000x10 = served_best * (8000 * 10) / (args.pairs * len(models))
    print(f"device {dev}, amp {dtype}, width {args.width_mult}, batch {args.batch}: "
          f"{args.pairs} pairs x {len(models)} models")
    print(f"raw   : {best:.3f} s ({args.pairs / best:.0f} ensemble pairs/s, {rate:.0f} model-pairs/s)")
    print(f"served: {served_best:.3f} s ({args.pairs / served_best:.0f} ensemble pairs/s, "
          f"{served_rate:.0f} model-pairs/s); served/raw {ratio:.3f} (target >= {TARGET_RATIO}), "
          f"median of paired repeats {paired:.3f}")
    figures = {"bench": "ensemble", "device": str(dev), "amp": str(dtype), "pairs": args.pairs,
               "models": len(models), "seconds": round(best, 4), "ensemble_pairs_per_s": round(args.pairs / best),
               "model_pairs_per_s": round(rate), "width_mult": args.width_mult, "batch": args.batch,
               "served_seconds": round(served_best, 4), "served_ensemble_pairs_per_s": round(args.pairs / served_best),
               "served_model_pairs_per_s": round(served_rate), "served_over_raw": round(ratio, 3),
               "served_over_raw_paired_median": round(paired, 3), "target_served_over_raw": TARGET_RATIO,
               "met_ratio": ratio >= TARGET_RATIO,
               "raw_seconds_each": [round(t, 4) for t in raw_times],
               "served_seconds_each": [round(t, 4) for t in served_times]}
    if dev.type == "cuda":
        print(f"served 8,000 pairs x 10 models: {per_8000x10:.3f} s (target <= {GPU_TARGET_S} s)")
        figures.update({"served_seconds_8000x10": round(per_8000x10, 4), "target_gpu_seconds": GPU_TARGET_S,
                        "met_gpu": per_8000x10 <= GPU_TARGET_S})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
