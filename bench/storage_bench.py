"""Does an Optuna storage lose or repeat trials when several processes share one study?

Each process opens the storage as ``pairnet tune`` does (``pairnet.tune.open_storage``),
enqueues a few trials (as re-queued trials are), then runs fast trials that report
intermediate values. Afterwards: trials kept vs asked for, trial numbers without gaps,
enqueued trials run exactly once, and the processes that died.

Usage: python bench/storage_bench.py [--storage journal|sqlite|URL] [--workers 4] [--trials 150] [--enqueued 10]
Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import tempfile
import time
import traceback
from pathlib import Path

import optuna

from pairnet.tune import TuneRequest, open_storage

STUDY = "storage-bench"


def _objective(worker: int):
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        x = trial.suggest_float("x", 0.0, 10.0)
        for step in range(3):
            trial.report(x + step, step)
            trial.should_prune()
        return x

    return objective


def _work(req: TuneRequest, worker: int, n_trials: int, n_enqueued: int, out) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name=STUDY, storage=open_storage(req),
                                  sampler=optuna.samplers.TPESampler(seed=worker))
        for k in range(n_enqueued):
            study.enqueue_trial({"x": 0.001 * (1000 * worker + k)}, user_attrs={"enqueued": f"{worker}-{k}"})
        study.optimize(_objective(worker), n_trials=n_trials, catch=())
        out.put((worker, ""))
    except Exception:  # the point is to see what kills a worker
        out.put((worker, traceback.format_exc().strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", default="journal", help="journal, sqlite, or an RDB URL (e.g. postgresql://...)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--trials", type=int, default=150, help="per worker")
    ap.add_argument("--enqueued", type=int, default=10, help="per worker")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        storage = {"journal": str(Path(tmp) / "bench.journal"),
                   "sqlite": f"sqlite:///{Path(tmp) / 'bench.db'}"}.get(args.storage, args.storage)
        req = TuneRequest(storage=storage, study_name=STUDY)
        # Made here first, as `pairnet tune`'s parent does before it spawns workers.
        optuna.create_study(study_name=STUDY, storage=open_storage(req), direction="maximize", load_if_exists=True)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        t0 = time.perf_counter()
        procs = [ctx.Process(target=_work, args=(req, w, args.trials, args.enqueued, out))
                 for w in range(args.workers)]
        for p in procs:
            p.start()
        errors = dict(out.get() for _ in procs)
        for p in procs:
            p.join()
        seconds = time.perf_counter() - t0
        trials = optuna.load_study(study_name=STUDY, storage=open_storage(req)).get_trials(deepcopy=False)
    states = collections.Counter(t.state.name for t in trials)
    enqueued = collections.Counter(t.user_attrs["enqueued"] for t in trials if "enqueued" in t.user_attrs)
    died = {w: e for w, e in errors.items() if e}
    print(f"{args.storage}: {len(trials)} trials kept of {args.workers * args.trials} asked for in {seconds:.1f} s; "
          f"states {dict(states)}; {len(died)} of {args.workers} workers died")
    for w, e in died.items():
        print(f"  worker {w}: {e}")
    print(json.dumps({
        "bench": "storage", "storage": args.storage if args.storage in ("journal", "sqlite") else "url",
        "workers": args.workers, "asked": args.workers * args.trials, "kept": len(trials),
        "numbers_without_gaps": sorted(t.number for t in trials) == list(range(len(trials))),
        "enqueued_run": len(enqueued), "enqueued_asked": args.workers * args.enqueued,
        "workers_died": len(died), "seconds": round(seconds, 1),
    }))


if __name__ == "__main__":
    main()
