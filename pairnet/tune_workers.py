"""The tune worker supervisor: spawned worker processes that run a study's trials, one per
slot, watched by the parent, which buries a dead worker's runs and trials and replaces it.

The study side comes in as one callable, ``open_study(worker) -> (study, objective)`` (a
``functools.partial`` of a module-level function, so a spawned worker receives it by name):
this floor knows slots, processes and runs, never what a trial trains.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

import optuna
import torch
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.errors import PairnetError, PairnetRuntimeError
from pairnet.pool import usable_cpus
from pairnet.proc import ProcessId
from pairnet.tracking.lifecycle import Terminated, sigterm_raises, signals_ignored

log = logging.getLogger(__name__)

PROCESS_ATTR = "pairnet.process"  # trial user attr: ProcessId.as_tags() of the process running it
SWEPT_REASON = names.TAG_SWEPT  # the same tag the orphan sweep sets
STOP_WAIT_S = 20.0  # how long stopped workers get to end their trials KILLED before SIGKILL


def _end_child(client: MlflowClient, run_id: str | None, status: str, tags: dict[str, str]) -> None:
    """Tag and end a trial's child run; a failure here is logged, never hides the error being handled."""
    if run_id is None:
        return
    try:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        client.set_terminated(run_id, status)
    except Exception as err:  # the server may be what failed; the sweeper finds the run by its process tags
        log.warning("could not end trial run %s %s: %s", run_id, status, err)


class _Slots:
    """The trials this invocation still owes, shared by the parent and its spawned workers.

    A worker takes a slot before each trial and releases it once the trial has ended; the
    parent gives a dead worker's slot back, so a replacement runs that trial again.
    """

    def __init__(self, ctx, n_trials: int, n_workers: int):
        self.lock = ctx.Lock()
        self.left = ctx.Value("i", n_trials, lock=False)
        self.held = ctx.Array("b", n_workers, lock=False)

    def take(self, worker: int) -> bool:
        with self.lock:
            if self.left.value <= 0:
                return False
            self.left.value -= 1
            self.held[worker] = 1
            return True

    def release(self, worker: int) -> None:
        with self.lock:
            self.held[worker] = 0

    def give_back(self, worker: int) -> None:
        with self.lock:
            if self.held[worker]:
                self.held[worker] = 0
                self.left.value += 1

    def remaining(self) -> int:
        with self.lock:
            return self.left.value


def _worker(open_study: Callable, slots: _Slots, worker: int, n_workers: int, deadline: float | None) -> None:
    """One spawned worker: its own study (storage connection); one trial per slot until none is left."""
    torch.set_num_threads(max(1, usable_cpus() // n_workers))
    try:
        with sigterm_raises():
            study, objective = open_study(worker)
            while (deadline is None or time.time() < deadline) and slots.take(worker):
                study.optimize(objective, n_trials=1, catch=())
                slots.release(worker)
    except (KeyboardInterrupt, Terminated) as err:  # the trial already ended KILLED; no traceback
        sys.exit(128 + (signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal.SIGTERM))
    except PairnetError as err:  # one line, as the CLI would say it; the parent replaces this worker
        log.error("pairnet: error in tune worker pid %d: %s", os.getpid(), err)
        sys.exit(2)


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    who: ProcessId | None  # None when it died before we could read its start time


def _same_process(tags: dict | None, who: ProcessId) -> bool:
    other = ProcessId.from_tags(tags or {})
    return (other is not None and other.host == who.host and other.pid == who.pid
            and abs(other.started - who.started) < 0.5)


class Workers:
    """The parent's side of several worker processes: spawn, watch, bury, stop."""

    def __init__(self, req, storage, parent_run_id: str, experiment_id: str, open_study: Callable):
        """``req``: the study's request (n_workers, n_trials, timeout, study_name are read)."""
        self.req, self.storage, self.parent, self.experiment_id = req, storage, parent_run_id, experiment_id
        self.open_study = open_study
        self.ctx = mp.get_context("spawn")
        self.max_respawns = 2 * req.n_workers
        self.slots = _Slots(self.ctx, req.n_trials, req.n_workers + self.max_respawns + 1)
        self.deadline = time.time() + req.timeout if req.timeout else None
        self.live: dict[int, _Worker] = {}
        self.spawned = 0
        self.deaths = 0
        self.client = MlflowClient()

    def spawn(self) -> None:
        index = self.spawned
        p = self.ctx.Process(target=_worker, name=f"pairnet-tune-{index}", args=(
            self.open_study, self.slots, index, self.req.n_workers, self.deadline))
        p.start()
        self.live[index] = _Worker(p, ProcessId.of(p.pid))
        self.spawned += 1

    def run(self) -> None:
        for _ in range(min(self.req.n_workers, self.req.n_trials)):
            self.spawn()
        try:
            while self.live:
                mp.connection.wait([w.process.sentinel for w in self.live.values()], timeout=5)
                for index, w in list(self.live.items()):
                    if w.process.exitcode is None:
                        continue
                    del self.live[index]
                    if w.process.exitcode != 0:
                        self._replace(index, w)
        except BaseException as err:
            with signals_ignored():
                self.stop(f"tune stopped ({type(err).__name__})")
            raise

    def _replace(self, index: int, w: _Worker) -> None:
        self.deaths += 1
        pid, code = w.process.pid, w.process.exitcode
        log.warning("tune worker pid %d died (exit code %d)", pid, code)
        self.bury(w, f"tune worker pid {pid} died (exit code {code})", "FAILED", requeue=True)
        self.slots.give_back(index)
        if self.deaths > self.max_respawns:
            raise PairnetRuntimeError(f"tune workers died {self.deaths} times (last: pid {pid}, exit code {code}); "
                               f"gave up after {self.max_respawns} replacements")
        if self.slots.remaining() > 0 and (self.deadline is None or time.time() < self.deadline):
            self.spawn()

    def stop(self, reason: str) -> None:
        """SIGTERM every live worker (each ends its trial KILLED), SIGKILL those still there after a while."""
        for w in self.live.values():
            w.process.terminate()
        until = time.monotonic() + STOP_WAIT_S
        for w in self.live.values():
            w.process.join(max(0.0, until - time.monotonic()))
        for w in self.live.values():  # every straggler killed before any bookkeeping, which
            if w.process.is_alive():  # talks to the server and may be slow
                w.process.kill()
        for w in self.live.values():
            w.process.join()
            self.bury(w, f"{reason}: worker pid {w.process.pid}", "KILLED", requeue=False)
        self.live.clear()

    def bury(self, w: _Worker, reason: str, status: str, requeue: bool) -> None:
        """End what a dead worker left RUNNING: its child runs, and its trials (re-queued if asked)."""
        pid = w.process.pid
        found = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{self.parent}' and tags.`pairnet.process.pid` = '{pid}' "
            f"and attributes.status = 'RUNNING'"))
        for run in found:
            if w.who is None or _same_process(run.data.tags, w.who):
                _end_child(self.client, run.info.run_id, status, {SWEPT_REASON: reason, "optuna.state": "FAIL"})
        if w.who is None:
            return  # trials are matched by full identity only; the heartbeat fails any left over
        study = optuna.load_study(study_name=self.req.study_name, storage=self.storage)
        retry = self.storage.get_heartbeat_stale_trial_callback()
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if not _same_process(t.user_attrs.get(PROCESS_ATTR), w.who):
                continue
            try:
                failed = study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # the heartbeat got there first (and re-queued it)
            log.warning("trial %d failed: %s", t.number, reason)
            if requeue and retry is not None:
                retry(study, failed)
