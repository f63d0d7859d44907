"""The student's job at the course's scale: the pipeline on a course-format folder of the
course's size, timed against the estimate it printed before it started.

1. A stand-in for the course folder: train 50,000 / val 10,000 / test_public 2,000 (+ labels
   CSV) / test_private 8,000 pairs, ``x``, ``y`` and ``id`` only (no digit labels). Its pairs
   come from base scans the pretraining set never uses (``transfer_bench.user_pools``: the
   scans outside the default set's train and val pools), with a seed and a corruption
   severity of their own, so the tower meets handwriting and corruption it has not seen.
   Made once in ``--work`` and reused (same arguments, same bytes).
2. ``pipeline --plan`` on it: the estimate (``eta_seconds``, per step).
3. The pipeline itself, timed: in all, and per step from its child runs' start and end.

Usage: python bench/course_scale.py [--preset quick] [--pretrain default|none] [--work DIR]
The tracking server is ``MLFLOW_TRACKING_URI`` or pairnet's local one (started if needed);
the tower and its default set live in pairnet's data folder, so a second run reuses them.
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.data.generate import FILES, LABELS_CSV, GenConfig, base_scans, make_split
from pairnet.data.pairs import write_labels_csv, write_npz
from pairnet.paths import data_dir
from pairnet.device import pick_device
from pairnet.pipeline import PipelineRequest, run_pipeline
from transfer_bench import user_pools

COURSE = {"train": 50_000, "val": 10_000, "public": 2_000, "private": 8_000}
# The stand-in's splits and the user pool each draws its scans from (public and private share the test pool).
POOLS = {"train": "train", "val": "val", "public": "test", "private": "test"}


def make_standin(folder: Path, seed: int, severity: int, scale: float) -> dict[str, int]:
    """The course-format folder (made once per seed, severity and scale)."""
    sizes = {k: max(64, int(v * scale)) for k, v in COURSE.items()}
    stamp = folder / "standin.json"
    want = {"seed": seed, "severity": severity, "sizes": sizes}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return sizes
    folder.mkdir(parents=True, exist_ok=True)
    cfg = GenConfig(size="full", seed=seed, severity=severity)
    scans, targets = base_scans(cfg.bases)
    pools = user_pools(targets, seed)
    for split, n in sizes.items():
        # make_split seeds its stream by the generator's split name; each stand-in split has its own.
        pairs = make_split(split, n, scans, pools[POOLS[split]], cfg)
        ids = np.array([f"{split[:3].upper()}_{i:07d}" for i in range(n)])
        arrays = {"x": pairs.x, "id": ids} if split in ("public", "private") else \
            {"x": pairs.x, "y": pairs.y, "id": ids}
        write_npz(folder / FILES[split], arrays)
        if split == "public":
            write_labels_csv(folder / LABELS_CSV, ids, pairs.y)
    stamp.write_text(json.dumps(want))
    return sizes


def step_seconds(parent_id: str, client: MlflowClient) -> dict[str, float]:
    """Seconds of each child run of the pipeline run, by run name."""
    run = client.get_run(parent_id)
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.`{names.TAG_PARENT}` = '{parent_id}'",
                                  max_results=200)
    return {c.info.run_name: round((c.info.end_time - c.info.start_time) / 1000, 1) for c in children
            if c.info.end_time}


def machine() -> dict:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "avx512": " avx512f" in flags, "threads": torch.get_num_threads(),
            "cores": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick", help="the pipeline's preset (default quick)")
    ap.add_argument("--pretrain", default="default", choices=["default", "none"])
    ap.add_argument("--work", default="", help="folder for the stand-in (default <data>/bench/course_scale)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the stand-in's pairs (default 7)")
    ap.add_argument("--severity", type=int, default=7, help="corruption severity of the stand-in (default 7)")
    ap.add_argument("--scale", type=float, default=1.0, help="share of the course's size (1.0: 50,000 train)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    work = Path(args.work) if args.work else data_dir() / "bench" / "course_scale"
    folder = work / f"course-s{args.seed}-v{args.severity}-x{args.scale:g}"
    t0 = time.perf_counter()
    sizes = make_standin(folder, args.seed, args.severity, args.scale)
    make_s = time.perf_counter() - t0
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", f"course-scale-{args.preset}-{args.pretrain}")
    req = dict(preset=args.preset, data_dir=str(folder), device=args.device, pretrain=args.pretrain)

    t0 = time.perf_counter()
    planned = run_pipeline(PipelineRequest(**req, plan=True))
    plan_s = time.perf_counter() - t0
    print(planned["text"], flush=True)

    t0 = time.perf_counter()
    out = run_pipeline(PipelineRequest(**req))
    seconds = time.perf_counter() - t0
    steps = step_seconds(out["run_id"], MlflowClient())
    ladder = {r["model"]: {"val_acc": r["val_acc"], "test_public_acc": r["test_public_acc"], "ships": r["ships"]}
              for r in out["table"]}
    estimates = {s.label: round(s.cost, 1) for s in planned["plan"]}
    longest = max(steps, key=steps.get) if steps else ""
    print(json.dumps({
        "bench": "course_scale", "preset": args.preset, "pretrain": args.pretrain,
        "device": str(pick_device(args.device)),
        "pairs": sizes, "standin": {"seed": args.seed, "severity": args.severity, "folder": str(folder),
                                     "made_seconds": round(make_s, 1)},
        "machine": machine(), "seconds": round(seconds, 1), "eta_seconds": round(planned["eta_seconds"], 1),
        "eta_error": round(planned["eta_seconds"] / seconds - 1, 3) if seconds else None,
        "plan_seconds": round(plan_s, 1), "steps_seconds": steps, "steps_eta_seconds": estimates,
        "longest_step": longest, "longest_step_seconds": steps.get(longest),
        "longest_step_eta_seconds": estimates.get(longest), "reused": out["reused"], "ships": out["ships"],
        "ladder": ladder,
    }))


if __name__ == "__main__":
    main()
