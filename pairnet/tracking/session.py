"""Connecting to tracking: HTTP settings, MLflow's log routing, the server (started when
needed), the orphan sweep and the experiment."""

from __future__ import annotations

import os

import mlflow

from pairnet.tracking import configure_http, route_mlflow_logs
from pairnet.tracking.lifecycle import sweep_orphans
from pairnet.tracking.server import tracking_uri

DEFAULT_EXPERIMENT = "pairnet"


def setup_tracking() -> str:
    """Resolve the tracking URI (starting the local server if needed) and the experiment."""
    configure_http()
    route_mlflow_logs()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    sweep_orphans()  # runs left RUNNING by a killed process on this host end FAILED
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; only an id the user (or `mlflow run`)
    # set pins the experiment, not the one an earlier call in this process left behind.
    user_id = os.environ.get("MLFLOW_EXPERIMENT_ID") not in (None, "", _exported[0])
    if not os.environ.get("MLFLOW_RUN_ID") and not user_id:
        exp = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
        _exported[0] = exp.experiment_id
    return uri


_exported: list[str | None] = [None]  # the experiment id set_experiment last exported here
