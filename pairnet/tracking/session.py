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
    # As MLflow itself resolves it: MLFLOW_EXPERIMENT_NAME before MLFLOW_EXPERIMENT_ID (which
    # mlflow.set_experiment also exports, so an id left by an earlier call in this process
    # never hides the name a caller sets now); inside `mlflow run` the run fixes it.
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not os.environ.get("MLFLOW_RUN_ID") and (name or not os.environ.get("MLFLOW_EXPERIMENT_ID")):
        mlflow.set_experiment(name or DEFAULT_EXPERIMENT)
    return uri
