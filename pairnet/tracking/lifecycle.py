"""Run lifecycle: a run ends FINISHED, FAILED or KILLED — never left RUNNING.

SIGTERM is turned into :class:`Terminated` (SIGINT already raises KeyboardInterrupt),
so the training loop unwinds normally and the edge can log the last checkpoint before
ending the run KILLED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.proc import TAG_PREFIX, ProcessId

log = logging.getLogger(__name__)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM."""


def _redeliver_swallowed(unraisable, _default=sys.unraisablehook) -> None:
    """A signal's exception raised inside a garbage-collection callback or ``__del__`` is
    swallowed by Python (printed as "Exception ignored"), and the process would go on as if
    never signalled. Such a signal is sent again a moment later, from another thread, so
    that it lands in ordinary code and stops the process as it should."""
    err = unraisable.exc_value
    if isinstance(err, (Terminated, KeyboardInterrupt)):
        signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
        threading.Timer(0.05, os.kill, args=(os.getpid(), signum)).start()
        return
    _default(unraisable)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    def _handler(signum, frame):
        raise Terminated(f"received signal {signum}")

    sys.unraisablehook = _redeliver_swallowed
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Clean-up after a signal must not be cut short by a second one."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class TrackedRun:
    """The handle ``tracked_run`` yields: the run id, and what to do before the run ends
    other than FINISHED (``on_abort``: flush metrics, log the last checkpoint)."""

    run_id: str
    client: MlflowClient
    on_abort: list[Callable[[BaseException], None]] = field(default_factory=list)


@contextlib.contextmanager
def tracked_run(run_name: str, tags: dict, *, parent_run_id: str | None = None, description: str | None = None,
                experiment_id: str | None = None, client: MlflowClient | None = None,
                finished_by: tuple[type[BaseException], ...] = (),
                end_tags: Callable[[BaseException | None], dict] | None = None) -> Iterator[TrackedRun]:
    """Every pairnet run's one lifecycle: open, describe, and end it FINISHED on success (or on
    an exception in ``finished_by``, an expected end such as a pruned trial, which is re-raised),
    KILLED on SIGINT/SIGTERM, FAILED on any other error: never left RUNNING.

    Without ``experiment_id`` the run is MLflow's active run (attached to MLFLOW_RUN_ID inside
    ``mlflow run``); with it the run is created through ``client`` and never becomes active,
    as a trial in a worker process needs. Every run is tagged with its owning process so that
    :func:`sweep_orphans` can end it if that process dies. ``end_tags(error)`` gives tags
    logged just before the run ends; ``on_abort`` callbacks run first when it ends on an
    exception, with further signals ignored.
    """
    client = client or MlflowClient()
    if description:  # the run's description in the UI, set with the other tags as the run opens
        tags = {**tags, names.TAG_NOTE: description}
    active = experiment_id is None
    if active:
        run_id = start_or_attach(run_name, tags, parent_run_id=parent_run_id)
    else:
        tags = {**tags, **ProcessId.current().as_tags(),
                **({names.TAG_PARENT: parent_run_id} if parent_run_id else {})}
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    handle = TrackedRun(run_id, client)

    def end(status: str, error: BaseException | None) -> None:
        try:
            if error is not None:
                for fn in handle.on_abort:
                    fn(error)
            extra = end_tags(error) if end_tags else {}
            if extra:
                client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in extra.items()], synchronous=True)
        finally:
            current = mlflow.active_run()
            if current is not None and current.info.run_id == run_id:
                mlflow.end_run(status=status)
            else:
                try:
                    client.set_terminated(run_id, status)
                except Exception as err:  # the server may be what failed; the sweeper finds the run later
                    if active:
                        raise
                    log.warning("could not end run %s %s: %s", run_id, status, err)

    try:
        with sigterm_raises():
            yield handle
    except finished_by as err:  # an expected end that is not a failure (a pruned trial): FINISHED, tagged
        with signals_ignored():
            end("FINISHED", err)
        raise
    except (KeyboardInterrupt, Terminated) as err:
        with signals_ignored():
            end("KILLED", err)
        if isinstance(err, (KeyboardInterrupt, Terminated)):
            log.warning("run %s ended KILLED", run_id)
        raise
    except BaseException as err:
        end("FAILED", err)
        raise
    else:
        end("FINISHED", None)


def start_or_attach(run_name: str, tags: dict, parent_run_id: str | None = None) -> str:
    """Start the active run (or attach to MLFLOW_RUN_ID inside ``mlflow run``); return its id.

    Children are attached with an explicit parent id so that nesting holds both inside
    and outside ``mlflow run``. Every run is tagged with the process that owns it (host,
    pid, start time), so that :func:`sweep_orphans` can end it if that process dies.
    """
    tags = {**tags, **ProcessId.current().as_tags()}
    if parent_run_id is not None:
        run = mlflow.start_run(run_name=run_name, tags=tags, nested=True, parent_run_id=parent_run_id,
                               log_system_metrics=True)
    else:
        # The user's name wins: `pairnet ... --run-name` (PAIRNET_RUN_NAME), or the name
        # `mlflow run --run-name` gave the run this process attaches to; else pairnet's own.
        given = os.environ.get(RUN_NAME_ENV, "").strip()
        attach = os.environ.get("MLFLOW_RUN_ID")
        if not given and attach:  # read before start_run, which would rename the run
            named = MlflowClient().get_run(attach).info.run_name
            given = "" if generated_name(named) else named
        run = mlflow.start_run(run_name=given or run_name, tags={**tags, **user_tags()}, log_system_metrics=True)
        if run.info.run_name != (given or run_name):
            MlflowClient().set_tag(run.info.run_id, "mlflow.runName", given or run_name)
        mark_training_experiment(run.info.experiment_id)
    return run.info.run_id


RUN_NAME_ENV = "PAIRNET_RUN_NAME"  # the top-level run's name (`pairnet --run-name`)
RUN_TAGS_ENV = "PAIRNET_RUN_TAGS"  # tags of the top-level run, a JSON object (`pairnet --tag k=v`)


def user_tags() -> dict[str, str]:
    text = os.environ.get(RUN_TAGS_ENV, "").strip()
    return {str(k): str(v) for k, v in json.loads(text).items()} if text else {}


def generated_name(name: str | None) -> bool:
    """A name MLflow made up (``predicate-noun-123`` from its own word lists), not one a user gave."""
    from mlflow.utils import name_utils

    parts = (name or "").split("-")
    if len(parts) != 3 or not parts[2].isdigit():
        return False
    predicates = getattr(name_utils, "_GENERATOR_PREDICATES", None)
    nouns = getattr(name_utils, "_GENERATOR_NOUNS", None)
    if predicates is None or nouns is None:  # another MLflow: the shape alone decides
        return parts[0].isalpha() and parts[1].isalpha()
    return parts[0] in predicates and parts[1] in nouns


EXPERIMENT_KIND = "mlflow.experimentKind"


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs in the MLflow UI. MLflow 3.17's UI opens an experiment on an
    (empty) GenAI overview unless the link asks for the machine-learning view."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def mark_training_experiment(experiment_id: str, client: MlflowClient | None = None) -> None:
    """Tag the experiment's kind as model training (``mlflow.experimentKind``), as MLflow's
    UI records it; a kind the user chose is kept."""
    client = client or MlflowClient()
    if EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")


def sweep_orphans(client: MlflowClient | None = None) -> list[tuple[str, str]]:
    """End FAILED every RUNNING run of this host whose owning process is gone.

    A run hit by SIGKILL, the OOM killer or a reboot cannot end itself; its tags name
    the process (host, pid, start time), and a pid now dead, or reused by another
    process, means nobody will ever end it. Runs owned by other hosts are left alone.
    Returns (run id, reason) for each run swept.
    """
    client = client or MlflowClient()
    me = ProcessId.current()
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    runs = client.search_runs(exp_ids, filter_string=(f"attributes.status = 'RUNNING' and "
                                                      f"tags.`{TAG_PREFIX}host` = '{me.host}'"), max_results=1000)
    swept = []
    for run in runs:
        owner = ProcessId.from_tags(run.data.tags)
        if owner is None or owner.alive():
            continue
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.started))
        reason = (f"process {owner.describe()} (started {started}) "
                  f"is gone; swept by pid {me.pid} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        client.set_tag(run.info.run_id, names.TAG_SWEPT, reason)
        client.set_terminated(run.info.run_id, "FAILED")
        log.warning("run %s (%s) was left RUNNING by a dead process: marked FAILED", run.info.run_id,
                    run.data.tags.get("mlflow.runName", "?"))
        swept.append((run.info.run_id, reason))
    return swept


CONFIG_ARTIFACT = "config.yaml"


def log_config_file(text: str) -> None:
    """The ``--config`` file a run was started with, as given, on the active run."""
    if text:
        mlflow.log_text(text, CONFIG_ARTIFACT)
