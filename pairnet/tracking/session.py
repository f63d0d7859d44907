"""Connecting to tracking: HTTP settings, MLflow's log routing, the server (started when
needed), the orphan sweep and the experiment."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.paths import is_own_data_dir
from pairnet.tracking import configure_http, registry, route_mlflow_logs
from pairnet.tracking.lifecycle import sweep_orphans
from pairnet.tracking.server import tracking_uri

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "pairnet"


def setup_tracking(data_dir: str | Path | None = None) -> str:
    """Resolve the tracking URI (starting the local server if needed), the experiment and the
    namespace of registered names (see ``resolve_namespace``). ``data_dir``: the folder a
    pipeline or submission works on; a folder of the user's names the experiment when none is
    given, and tags it with its namespace."""
    configure_http()
    route_mlflow_logs()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    sweep_orphans()  # runs left RUNNING by a killed process on this host end FAILED
    proposed = folder_namespace(data_dir) if data_dir is not None else None
    # As MLflow itself resolves it: MLFLOW_EXPERIMENT_NAME before MLFLOW_EXPERIMENT_ID (which
    # mlflow.set_experiment also exports, so an id left by an earlier call in this process
    # never hides the name a caller sets now); inside `mlflow run` the run fixes it.
    client = MlflowClient()
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if os.environ.get("MLFLOW_RUN_ID"):
        experiment = client.get_experiment(client.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id)
    elif name or not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        experiment = mlflow.set_experiment(name or (proposed if proposed and proposed != registry.DEFAULT_NAMESPACE
                                                    else DEFAULT_EXPERIMENT))
    else:
        experiment = client.get_experiment(os.environ["MLFLOW_EXPERIMENT_ID"])
    registry.set_namespace(resolve_namespace(experiment, proposed, client))
    return uri


def folder_namespace(data_dir: str | Path) -> str:
    """The namespace a data folder proposes: ``pairnet`` for the project's own data (the main
    job's), else the folder's name (``~/course`` → ``course``)."""
    if is_own_data_dir(data_dir):
        return registry.DEFAULT_NAMESPACE
    slug = re.sub(r"[^a-z0-9_.-]+", "-", Path(data_dir).resolve().name.lower()).strip("-._")
    return slug[:64] or "data"


def resolve_namespace(experiment, proposed: str | None, client: MlflowClient) -> str:
    """``PAIRNET_NAMESPACE`` when set; else the experiment's (its tag ``pairnet.namespace``,
    which the first pipeline on a folder sets); else the folder's; else ``pairnet``. One
    experiment keeps one namespace: a second folder in it shares its names (with a warning)."""
    own = (experiment.tags or {}).get(names.TAG_NAMESPACE)
    chosen = os.environ.get(registry.NAMESPACE_ENV) or own or proposed or registry.DEFAULT_NAMESPACE
    if proposed is not None and own is None:
        client.set_experiment_tag(experiment.experiment_id, names.TAG_NAMESPACE, chosen)
    elif proposed is not None and own != proposed and not os.environ.get(registry.NAMESPACE_ENV):
        log.warning("experiment '%s' holds the namespace '%s': the models trained here are registered as %s-* beside "
                    "its others (for names of this folder's own, use --experiment-name %s)",
                    experiment.name, own, own, proposed)
    return chosen


def use_current_namespace() -> str:
    """Set this process's namespace without creating anything (no experiment, no tag):
    ``PAIRNET_NAMESPACE``, else the tag of the experiment this process is in (the run's inside
    ``mlflow run``, else MLFLOW_EXPERIMENT_NAME's or MLFLOW_EXPERIMENT_ID's, else ``pairnet``'s),
    else ``pairnet``."""
    found = os.environ.get(registry.NAMESPACE_ENV)
    if not found:
        client = MlflowClient()
        if os.environ.get("MLFLOW_RUN_ID"):
            experiment = client.get_experiment(client.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id)
        elif os.environ.get("MLFLOW_EXPERIMENT_NAME") or not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            experiment = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
        else:
            experiment = client.get_experiment(os.environ["MLFLOW_EXPERIMENT_ID"])
        found = (experiment.tags or {}).get(names.TAG_NAMESPACE) if experiment is not None else None
    registry.set_namespace(found or registry.DEFAULT_NAMESPACE)
    return registry.namespace()
