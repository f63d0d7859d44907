"""Does one SQLite-backed tracking server keep up when several trainings log at once?

Starts a ``pairnet server`` (SQLite backend, local artifacts) on loopback in a temporary
folder, then N processes (default 8) each train a tiny model for a few hundred steps and log
per-step metrics through pairnet's own path: a ``tracked_run`` and the buffering
``MlflowCallback``. Afterwards the server is asked what it holds: every value sent found,
no run left RUNNING. Bounded in count (``--procs``, ``--steps``) and time (``--max-seconds``:
processes still running then are killed and counted).

``--backend-store-uri postgresql://user@host:5432/db`` runs the same load against a server
on that database instead (the password in PGPASSWORD; the database empty or pairnet's own).

Usage: python bench/tracking_load.py [--procs 8] [--steps 300] [--max-seconds 600] [--backend-store-uri URL]
Last line: a JSON object with runs, metrics_sent, metrics_found, lost, running_left,
p95_log_ms (95th percentile of the log_batch requests the callbacks sent, in ms), seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

EXPERIMENT = "tracking-load"
KEYS = ("train_loss", "train_acc")  # logged at every step


class _TimedClient:
    """An MlflowClient whose log_batch requests are timed (the callback's only metrics call)."""

    def __init__(self, client):
        self._client, self.ms = client, []

    def log_batch(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return self._client.log_batch(*args, **kw)
        finally:
            self.ms.append((time.perf_counter() - t0) * 1000)

    def __getattr__(self, name):
        return getattr(self._client, name)


def _train(url: str, experiment_id: str, worker: int, steps: int, flush_s: float, out) -> None:
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from pairnet.models import create_model
    from pairnet.tracking import configure_http
    from pairnet.tracking.callback import MlflowCallback
    from pairnet.tracking.lifecycle import tracked_run

    torch.set_num_threads(1)
    configure_http()
    mlflow.set_tracking_uri(url)
    client = _TimedClient(MlflowClient(url))
    torch.manual_seed(worker)
    model = create_model("compare_cnn", width_mult=0.25, feat_dim=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(worker)
    sent, lost, run_id = 0, 0, None
    with tracked_run(f"load/worker{worker}", {"pairnet.stage": "bench"}, experiment_id=experiment_id,
                     client=client) as run:
        run_id = run.run_id
        callback = MlflowCallback(run.run_id, client, checkpoint_every=0, final_metrics=False)
        for step in range(1, steps + 1):
            x = torch.randint(0, 256, (32, 28, 56), generator=gen).float().div_(255)
            y = (x[:, :, :28].mean((1, 2)) > x[:, :, 28:].mean((1, 2))).float()
            logits = model(x)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc = float(((logits.detach() > 0).float() == y).float().mean())
            callback.log_metrics({"train_loss": float(loss), "train_acc": acc}, step)
            sent += len(KEYS)
        if not callback.close(flush_s):
            lost = callback.give_up()
    out.put({"worker": worker, "run_id": run_id, "sent": sent, "lost_client": lost, "ms": client.ms})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=8, help="training processes logging at once (default 8)")
    ap.add_argument("--steps", type=int, default=300, help="training steps per process, each logging "
                    f"{len(KEYS)} metrics (default 300)")
    ap.add_argument("--max-seconds", type=float, default=600, help="bound on the whole bench (default 600)")
    ap.add_argument("--backend-store-uri", default="", help="the server's store (default: SQLite in a temporary "
                    "folder); e.g. postgresql://user@host:5432/db")
    args = ap.parse_args()
    from mlflow.tracking import MlflowClient

    from pairnet.tracking import server

    with tempfile.TemporaryDirectory() as tmp:
        root, port = Path(tmp) / "server", _free_port()
        # SQLite backend and local artifacts, the zero-setup default, unless a store is named.
        info = server.start(port=port, root=root, backend_store_uri=args.backend_store_uri or None)
        try:
            client = MlflowClient(info.url)
            experiment_id = client.create_experiment(f"{EXPERIMENT}-{int(time.time())}")
            ctx = mp.get_context("spawn")
            results = ctx.Queue()
            t0 = time.perf_counter()
            deadline = time.monotonic() + args.max_seconds
            # The callback's own flush limit: what is left when the bench's time is up is lost.
            flush_s = max(1.0, args.max_seconds / 2)
            procs = [ctx.Process(target=_train, args=(info.url, experiment_id, w, args.steps, flush_s, results))
                     for w in range(args.procs)]
            for p in procs:
                p.start()
            got = []
            while len(got) < len(procs) and time.monotonic() < deadline:
                try:
                    got.append(results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic()))))
                except Exception:  # queue.Empty: check the clock and whether everyone died
                    if not any(p.is_alive() for p in procs) and results.empty():
                        break
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join()
            seconds = time.perf_counter() - t0
            runs = client.search_runs([experiment_id], max_results=1000)
            found = sum(len(client.get_metric_history(r.info.run_id, k)) for r in runs for k in KEYS)
            running = sum(r.info.status == "RUNNING" for r in runs)
        finally:
            server.stop(port=port, root=root)
    sent = args.procs * args.steps * len(KEYS)  # what every process was to log, finished or not
    ms = np.concatenate([np.asarray(g["ms"], dtype=float) for g in got]) if got else np.zeros(0)
    p95 = round(float(np.percentile(ms, 95)), 1) if ms.size else None
    print(f"{args.procs} processes x {args.steps} steps: {found} of {sent} metric values on the server, "
          f"{running} runs left RUNNING, {len(got)} processes reported, {seconds:.1f} s")
    print(json.dumps({"store": "postgresql" if args.backend_store_uri.startswith("postgresql") else "sqlite",
                      "procs": args.procs, "runs": len(runs), "metrics_sent": sent, "metrics_found": found,
                      "lost": sent - found, "running_left": running, "p95_log_ms": p95,
                      "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
