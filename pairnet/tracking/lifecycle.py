"""Run lifecycle: a run ends FINISHED, FAILED or KILLED — never left RUNNING.

SIGTERM is turned into :class:`Terminated` (SIGINT already raises KeyboardInterrupt),
so the training loop unwinds normally and the edge can log the last checkpoint before
ending the run KILLED.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Callable, Iterator

import mlflow
from mlflow.tracking import MlflowClient

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
    and outside ``mlflow run``.
    """
    if parent_run_id is not None:
        run = mlflow.start_run(run_name=run_name, tags=tags, nested=True, parent_run_id=parent_run_id,
                               log_system_metrics=True)
    else:
        run = mlflow.start_run(run_name=run_name, tags=tags, nested=nested, log_system_metrics=True)
        if run.info.run_name != run_name:
            MlflowClient().set_tag(run.info.run_id, "mlflow.runName", run_name)
    return run.info.run_id
