"""Independent trainings in worker processes (``jobs``): stage 3's members, the pipeline's
base models. Each member is its own nested child run of the caller's parent run. The caller
passes the training callable in (``stages.train_tracked``): this floor knows no stage.

Workers are spawned (a fresh interpreter: no CUDA state or threads inherited). On CUDA,
member ``i`` trains on visible GPU ``i mod n``, so several workers share a GPU when
``jobs`` exceeds the GPUs; on the CPU the cores are split, ``cores // jobs`` threads each.
A member that fails ends its own run FAILED and is reported; its siblings carry on. Each
member has a process of its own, so a worker that dies (OOM killer, SIGKILL) takes only its
member: that run is swept FAILED, and the members training beside it or queued finish and
register.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
from dataclasses import dataclass
from typing import Callable

from pairnet.errors import PairnetError, PairnetRuntimeError

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def member_device(device: str, index: int) -> str:
    """The device member ``index`` trains on: round-robin over the visible GPUs."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


@dataclass
class Member:
    """One independent training: the training callable's arguments, all picklable."""

    cfg: object  # TrainConfig
    stage: str
    registered: str
    run_name: str
    preset: str
    device: str = "auto"
    init_source: object | None = None  # InitSource, fetched once by the caller
    tags: dict | None = None  # tags the member's run carries from its start
    resume_run_id: str | None = None  # an interrupted run of this member to continue


@dataclass
class Context:
    """What every worker needs to reach the same data, server, experiment and parent run."""

    data_dir: str
    preset: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    threads: int
    namespace: str = ""  # registered names' prefix (tracking.registry), as the caller resolved it


def _init_worker(ctx: Context) -> None:
    import mlflow
    import torch

    # Inside `mlflow run`, MLFLOW_RUN_ID names the parent; a worker that kept it would
    # attach its first start_run to the parent instead of opening a child.
    os.environ.pop("MLFLOW_RUN_ID", None)
    torch.set_num_threads(ctx.threads)
    from pairnet.tracking import configure_http, route_mlflow_logs

    configure_http()
    route_mlflow_logs()
    if ctx.namespace:
        from pairnet.tracking import registry

        registry.set_namespace(ctx.namespace)
    mlflow.set_tracking_uri(ctx.tracking_uri)
    mlflow.set_experiment(experiment_id=ctx.experiment_id)


def _train_member(ctx: Context, member: Member, train: Callable[..., dict], splits=None) -> dict:
    """One member: its summary, or its error as one line (an error does not propagate)."""
    from pairnet.data.splits import load_splits

    try:
        splits = splits if splits is not None else load_splits(ctx.data_dir, ctx.preset)
        return train(member.cfg, stage=member.stage, splits=splits, registered=member.registered,
                     run_name=member.run_name, device=member.device, preset=member.preset,
                     parent_run_id=ctx.parent_run_id, init_source=member.init_source,
                     resume_run_id=member.resume_run_id, extra_tags=member.tags)
    except Exception as err:  # the member's run already ended FAILED; siblings go on
        log.error("member %s failed: %s", member.run_name, err)
        return {"error": f"{type(err).__name__}: {err}", "run_name": member.run_name}


def train_members(members: list[Member], jobs: int, *, train: Callable[..., dict], parent_run_id: str,
                  data_dir: str, preset: str, splits=None) -> list[dict]:
    """Train ``members`` (``jobs`` at a time) as children of ``parent_run_id``, each through
    ``train`` (a module-level function: workers receive it by name); results in member order.
    A failed member's entry holds ``error`` instead of a summary; the caller decides what
    the parent run says about it. ``jobs=1`` trains in this process."""
    import mlflow

    if jobs == 1 or len(members) == 1:
        return [_train_member(Context(data_dir, preset, "", "", parent_run_id, 0), m, train, splits) for m in members]
    threads = max(1, usable_cpus() // jobs)
    from pairnet.tracking import registry

    ctx = Context(data_dir, preset, mlflow.get_tracking_uri(),
                  mlflow.get_run(parent_run_id).info.experiment_id, parent_run_id, threads, registry.namespace())
    log.info("training %d members in %d worker processes (%d threads each)", len(members), jobs, threads)
    return _in_workers(members, jobs, ctx, train)


def _member_process(ctx: Context, member: Member, train: Callable[..., dict], conn) -> None:
    """A spawned worker's whole life: one member, its result sent back through ``conn``."""
    _init_worker(ctx)
    conn.send(_train_member(ctx, member, train))
    conn.close()


def _in_workers(members: list[Member], jobs: int, ctx: Context, train: Callable[..., dict]) -> list[dict]:
    """One spawned process per member, ``jobs`` alive at a time. A process that dies (OOM
    killer, SIGKILL) takes only its own member: the run it left RUNNING is swept FAILED and
    the members queued or training elsewhere go on."""
    spawn = mp.get_context("spawn")
    results: list[dict | None] = [None] * len(members)
    queue = list(reversed(range(len(members))))
    live: dict = {}  # the parent's end of each worker's pipe -> (member index, process)
    try:
        while queue or live:
            while queue and len(live) < jobs:
                i = queue.pop()
                recv, send = spawn.Pipe(duplex=False)
                p = spawn.Process(target=_member_process, args=(ctx, members[i], train, send),
                                  name=f"pairnet-member-{i}")
                p.start()
                send.close()  # the worker holds the only writer: its death reads as EOF here
                live[recv] = (i, p)
            for conn in mp.connection.wait(list(live)):
                i, p = live.pop(conn)
                results[i] = _collect(conn, p, members[i])
    finally:
        for conn, (_, p) in live.items():  # interrupted: no worker outlives the caller
            p.terminate()
            p.join()
            conn.close()
    return results


def _collect(conn, p, member: Member) -> dict:
    """A finished worker's result, or its death as the member's error (its run swept FAILED)."""
    try:
        result = conn.recv()
    except EOFError:
        result = None
    conn.close()
    p.join()
    if result is not None:
        return result
    how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
    log.error("member %s: its worker process died (%s)", member.run_name, how)
    from pairnet.tracking.lifecycle import sweep_orphans

    sweep_orphans()  # the run the dead worker left RUNNING ends FAILED now, not at the next start
    return {"error": f"its worker process died ({how})", "run_name": member.run_name}


def check_jobs(jobs: int) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise PairnetError(f"jobs must be a whole number >= 1 (got {jobs!r})")
    return jobs


def report_failures(results: list[dict], what: str) -> list[dict]:
    """The members that trained; when some failed, tag the active (parent) run with their
    names and errors and raise one line naming them."""
    import mlflow

    failed = [r for r in results if "error" in r]
    if failed:
        mlflow.set_tag("pairnet.failed_members", "; ".join(f"{r['run_name']}: {r['error']}" for r in failed)[:5000])
        names = ", ".join(r["run_name"] for r in failed)
        raise PairnetRuntimeError(f"{len(failed)} of {len(results)} {what} failed ({names}); the others are "
                                  "registered")
    return results
