"""Run lifecycle: a run ends FINISHED, FAILED or KILLED — never left RUNNING.

SIGTERM is turned into :class:`Terminated` (SIGINT already raises KeyboardInterrupt),
so the training loop unwinds normally and the edge can log the last checkpoint before
ending the run KILLED.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Callable, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from pairnet.proc import TAG_PREFIX, ProcessId

log = logging.getLogger(__name__)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    def _handler(signum, frame):
        raise Terminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def managed_run(run_id: str, on_interrupt: Callable[[], None] | None = None) -> Iterator[str]:
    """End ``run_id`` FINISHED on success, KILLED on SIGINT/SIGTERM, FAILED on errors.

    ``on_interrupt`` runs before the run is marked KILLED (it logs the last checkpoint).
    """
    def end(status: str) -> None:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status=status)
        else:
            MlflowClient().set_terminated(run_id, status)

    try:
        with sigterm_raises():
            yield run_id
    except (KeyboardInterrupt, Terminated):
        # A second signal during clean-up must not leave the run RUNNING.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if on_interrupt is not None:
                on_interrupt()
        finally:
            end("KILLED")
            log.warning("run %s ended KILLED", run_id)
        raise
    except BaseException:
        end("FAILED")
        raise
    else:
        end("FINISHED")


def start_or_attach(run_name: str, tags: dict, nested: bool = False, parent_run_id: str | None = None) -> str:
    """Start a run (or attach to MLFLOW_RUN_ID inside ``mlflow run``); return its id.

    Children are attached with an explicit parent id so that nesting holds both inside
    and outside ``mlflow run``. Every run is tagged with the process that owns it (host,
    pid, start time), so that :func:`sweep_orphans` can end it if that process dies.
    """
    tags = {**tags, **ProcessId.current().as_tags()}
    if parent_run_id is not None:
        run = mlflow.start_run(run_name=run_name, tags=tags, nested=True, parent_run_id=parent_run_id,
                               log_system_metrics=True)
    else:
        run = mlflow.start_run(run_name=run_name, tags=tags, nested=nested, log_system_metrics=True)
        if run.info.run_name != run_name:
            MlflowClient().set_tag(run.info.run_id, "mlflow.runName", run_name)
        mark_training_experiment(run.info.experiment_id)
    return run.info.run_id


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


SWEPT_TAG = "pairnet.swept"


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
        client.set_tag(run.info.run_id, SWEPT_TAG, reason)
        client.set_terminated(run.info.run_id, "FAILED")
        log.warning("run %s (%s) was left RUNNING by a dead process: marked FAILED", run.info.run_id,
                    run.data.tags.get("mlflow.runName", "?"))
        swept.append((run.info.run_id, reason))
    return swept
