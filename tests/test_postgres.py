"""Many machines, one tracking server, one study: MLflow's backend store and Optuna's storage
on a real PostgreSQL that the tests start themselves (tests/pg.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import tracking_server, user_env
from pairnet.models import create_model
from pairnet.tracking.model import log_pair_model
from pairnet.tune import PROCESS_ATTR

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture(scope="module")
def pg_server(postgres, tmp_path_factory):
    """`pairnet server start --backend-store-uri postgresql://user:password@host:port/mlflow`, in-process."""
    store = postgres.create_database("mlflow")
    with tracking_server(tmp_path_factory.mktemp("pg_server"), backend_store_uri=store) as info:
        yield info


def test_tracking_server_on_postgres(postgres, pg_server):
    assert pg_server.store == postgres.url("mlflow", driver="psycopg").replace(postgres.password, "***")
    client = MlflowClient()
    experiment = client.create_experiment("it-pg")
    import mlflow

    with mlflow.start_run(experiment_id=experiment, run_name="pg-check") as run:
        mlflow.log_param("where", "postgresql")
        mlflow.log_metric("val_acc", 0.5, step=1)
        info = log_pair_model(create_model("compare_cnn", width_mult=0.25, feat_dim=16),
                              np.zeros((2, 28, 56), np.uint8), registered_name="pairnet-pg-check")
    assert str(info.registered_model_version) == "1"
    assert client.get_model_version("pairnet-pg-check", "1").run_id == run.info.run_id
    # The rows live in PostgreSQL (not in a SQLite file next to the server).
    assert postgres.query("mlflow", "SELECT status FROM runs WHERE run_uuid = %s", run.info.run_id) == [("FINISHED",)]
    assert postgres.query("mlflow", "SELECT name, version FROM model_versions") == [("pairnet-pg-check", 1)]


OPEN_TOGETHER = """
import os, sys, time
from pathlib import Path
from pairnet.tune import TuneRequest, open_storage
ready = Path(sys.argv[2])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < int(sys.argv[3]):  # imports done everywhere: open at once
    time.sleep(0.005)
open_storage(TuneRequest(storage=sys.argv[1]))
"""


def test_machines_opening_a_new_database_at_once(postgres, tmp_path):
    """They race to create Optuna's tables, and without a retry one of them fails; with it, both open."""
    url = postgres.create_database("fresh")
    machines = 2
    opens = [subprocess.Popen([sys.executable, "-c", OPEN_TOGETHER, url, str(tmp_path), str(machines)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(machines)]
    for proc in opens:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    assert postgres.query("fresh", "SELECT count(*) FROM alembic_version") == [(1,)]


def test_two_machines_share_one_study(postgres, pg_server, tiny_data):
    """Two `pairnet tune` processes started at once on one PostgreSQL study and one tracking server.

    The password travels in PGPASSWORD, not in the URL (libpq reads it), as the README advises.
    """
    postgres.create_database("optuna")
    storage = postgres.url("optuna", password=False)
    env = {**user_env(pg_server.url, "it-pg-tune"), "PGPASSWORD": postgres.password}
    per_process = 2
    cmd = [sys.executable, "-m", "pairnet.cli", "tune", "--preset", "tiny", "--data-dir", str(tiny_data),
           "--storage", storage, "--study-name", "shared", "--model-name", "compare_cnn", "--epochs", "2",
           "--n-trials", str(per_process)]
    t0 = time.monotonic()
    machines = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    outs = [m.communicate(timeout=600) for m in machines]
    print(f"two tune processes on PostgreSQL: {time.monotonic() - t0:.1f} s")
    for m, (_, err) in zip(machines, outs, strict=True):
        assert m.returncode == 0, err[-3000:]
    pids = {str(m.pid) for m in machines}

    # Every trial asked for is in the study once, run by the process that asked for it.
    study = optuna.load_study(study_name="shared", storage=postgres.url("optuna", driver="psycopg"))
    trials = study.trials
    assert len(trials) == 2 * per_process and sorted(t.number for t in trials) == list(range(2 * per_process))
    assert all(t.state in FINISHED for t in trials), [t.state for t in trials]
    by_pid = [t.user_attrs[PROCESS_ATTR]["pairnet.process.pid"] for t in trials]
    assert sorted(by_pid) == sorted(list(pids) * per_process)
    trial_runs = {t.user_attrs["mlflow_run_id"] for t in trials}
    assert len(trial_runs) == len(trials)

    # One parent run per process; each trial's run nested under its own process's parent.
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("it-pg-tune").experiment_id])
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(p.data.tags["pairnet.process.pid"] for p in parents.values()) == sorted(pids)
    assert all(p.info.status == "FINISHED" for p in parents.values())
    assert {c.info.run_id for c in children} == trial_runs
    for child in children:
        parent = parents[child.data.tags["mlflow.parentRunId"]]
        assert child.data.tags["pairnet.process.pid"] == parent.data.tags["pairnet.process.pid"]
    assert sorted(len([c for c in children if c.data.tags["mlflow.parentRunId"] == p]) for p in parents) == [
        per_process, per_process]

    # The study's best model is registered once, whichever process finished last.
    best = study.best_trial
    versions = client.search_model_versions("name = 'pairnet-compare_cnn'")
    of_best = [v for v in versions if v.tags.get("optuna_trial_run") == best.user_attrs["mlflow_run_id"]]
    print(json.dumps({"trials": len(trials), "parents": len(parents), "children": len(children),
                      "versions": len(versions), "versions_of_best": len(of_best)}))
    assert len(of_best) == 1, [(v.version, v.tags.get("optuna_trial")) for v in versions]
