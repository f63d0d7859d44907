"""Time, peak memory and realism for making the full default dataset.

Usage: python bench/data_bench.py [--size full] [--out DIR]
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

from pairnet.data.generate import SIZES, GenConfig, make_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=sorted(SIZES))
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        t0 = time.perf_counter()
        meta = make_dataset(out, GenConfig(size=args.size, seed=1))
        seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pairs = sum(meta["counts"].values())
    print(f"made {pairs} pairs ({args.size}) in {seconds:.1f} s; peak RSS {peak_mb:.0f} MB")
    print(f"severity 6 train stats: {meta['stats']['train']}")
    realism = meta.get("realism", {})
    print(f"realism gap of the train split vs the real data's profile: {realism.get('realism_gap')} "
          f"(largest: {realism.get('largest_gaps')})")
    print(json.dumps({
        "bench": "data", "size": args.size, "pairs": pairs, "seconds": round(seconds, 2),
        "pairs_per_s": round(pairs / seconds), "peak_rss_mb": round(peak_mb),
        "zero_share": meta["stats"]["train"]["zero_share"], "mean_pixel": meta["stats"]["train"]["mean_pixel"],
        "realism_gap": realism.get("realism_gap"), "bases": meta["bases"],
    }))


if __name__ == "__main__":
    main()
