"""Optuna studies as nested MLflow runs, with real RDB storage and a real tracking server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from conftest import mlflow_run, user_env
from pairnet.paths import folder_key, state_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _children(client, experiment, parent_id):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def test_tune_nested_trials_resumable_study(mlflow_server, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = user_env(mlflow_server, "it-tune")
    common = {"preset": "tiny", "data_dir": tiny_data, "storage": storage, "study_name": "s1",
              "model_name": "compare_cnn", "epochs": 3}
    proc = mlflow_run("tune", {**common, "n_trials": 4}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("it-tune")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = _children(client, "it-tune", parent.info.run_id)
    assert len(children) == 4
    for child in children:
        assert {"lr", "weight_decay", "trial_number"} <= set(child.data.params)
        assert 1e-4 <= float(child.data.params["lr"]) <= 1e-2
        # A pruned trial is an ordinary end: FINISHED, with Optuna's state as a tag.
        assert child.info.status == "FINISHED"
        assert child.data.tags["optuna.state"] in ("COMPLETE", "PRUNED")
        assert (child.data.tags["optuna.state"] == "PRUNED") == (child.data.tags.get("pruned") == "true")
    assert {"best_lr", "best_weight_decay"} <= set(parent.data.params) and "best_value" in parent.data.metrics
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    # One interactive page; the other plots as PNG; the study's artifacts stay small.
    assert {"optuna/optimization_history.html", "optuna/parallel_coordinate.png",
            "optuna/contour_lr_weight_decay.png", "optuna/param_importances.png"} <= plots
    assert not [p for p in plots if p.endswith(".html") and p != "optuna/optimization_history.html"]
    sizes = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert sum(sizes.values()) < 6_000_000, sizes
    # The optimisation history as metrics of the parent, at step = trial number, which the UI charts.
    study = optuna.load_study(study_name="s1", storage=storage)
    done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.number)
    history = client.get_metric_history(parent.info.run_id, "trial_value")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(t.number, t.value) for t in done]
    best = [m.value for m in sorted(client.get_metric_history(parent.info.run_id, "best_value_so_far"),
                                    key=lambda m: m.step)]
    assert best == [max(t.value for t in done[:i + 1]) for i in range(len(done))] and done
    # The plots carry plotly.js themselves: no CDN script, so they open offline.
    page = Path(client.download_artifacts(parent.info.run_id, "optuna/optimization_history.html", str(tmp_path)))
    html = page.read_text()
    assert not re.search(r"<script[^>]*src=\"https?://", html) and len(html) > 1_000_000

    # The same study again: 2 more trials, 6 in storage, nothing lost.
    proc = mlflow_run("tune", {**common, "n_trials": 2}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="s1", storage=storage)
    assert len(study.trials) == 6 and sorted(t.number for t in study.trials) == list(range(6))
    assert len({(t.params["lr"], t.params["weight_decay"]) for t in study.trials}) == 6


@pytest.mark.parametrize("where", ["sqlite", "default"])
def test_two_workers_share_one_study(mlflow_server, tiny_data, tmp_path, where):
    if where == "default":  # no --storage: a journal file of the data folder's, in pairnet's state folder
        data = shutil.copytree(tiny_data, tmp_path / "data")
        storage, given = str(state_dir() / "optuna" / f"{folder_key(data)}.journal"), []
    else:
        data = tiny_data
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        given = ["--storage", storage]
    env = user_env(mlflow_server, f"it-tune-workers-{where}")
    cmd = [sys.executable, "-m", "pairnet.cli", "tune", "--preset", "tiny", "--data-dir", str(data), *given,
           "--study-name", "w", "--model-name", "compare_cnn", "--epochs", "2", "--n-trials", "4", "--n-workers", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name(env["MLFLOW_EXPERIMENT_NAME"])
                                                 .experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["tune.storage"] == storage
    journal = JournalStorage(JournalFileBackend(storage)) if where == "default" else storage
    study = optuna.load_study(study_name="w", storage=journal)
    assert len(study.trials) == 4
    params = {(t.params["lr"], t.params["weight_decay"]) for t in study.trials}
    assert len(params) == 4 and sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    run_ids = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert len(run_ids) == 4


@pytest.mark.parametrize("extra, text", [
    (["--storage", "notadb://nowhere"], "Optuna storage 'notadb://nowhere' is not usable"),
    (["--lr-low", "0.1", "--lr-high", "0.001"], "lr bounds [0.1, 0.001]"),
])
def test_bad_tune_inputs(mlflow_server, tiny_data, extra, text):
    env = user_env(mlflow_server, "it-tune-bad")
    cmd = [sys.executable, "-m", "pairnet.cli", "tune", "--preset", "tiny", "--data-dir", str(tiny_data),
           "--n-trials", "1", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and text in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    exp = MlflowClient().get_experiment_by_name("it-tune-bad")
    if exp is not None:
        assert not MlflowClient().search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
