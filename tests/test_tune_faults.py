"""Tuning under faults: a worker killed mid-trial, SIGTERM, weights kept with each trial, bad inputs, secrets.

Real tracking server, real SQLite Optuna storage, `pairnet tune` run as a user runs it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest
import torch
from safetensors.torch import load_file
from mlflow.tracking import MlflowClient

from conftest import user_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _tune(tiny_data, storage: str, study: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pairnet.cli", "tune", "--preset", "tiny", "--data-dir", str(tiny_data),
            "--storage", storage, "--study-name", study, "--model-name", "compare_cnn", *extra]


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _running_trials(client, experiment: str, proc: subprocess.Popen, want: int, timeout: float = 240) -> list:
    """Child runs RUNNING in ``experiment`` once at least ``want`` exist (fewer if time runs out)."""
    deadline = time.monotonic() + timeout
    found = []
    while time.monotonic() < deadline and proc.poll() is None:
        found = [r for r in _runs(client, experiment)
                 if r.info.status == "RUNNING" and "mlflow.parentRunId" in r.data.tags]
        if len(found) >= want:
            return found
        time.sleep(0.3)
    assert found, f"no trial started (exit code {proc.poll()})"
    return found


def _finish(proc: subprocess.Popen, log_path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout:.0f} s; its output:\n"
                             f"{Path(log_path).read_text()[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    return log_path.read_text()


def test_workers_that_keep_dying_end_in_one_line(mlflow_server, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    experiment = "it-tune-always-dies"
    err_path = tmp_path / "stderr.txt"
    cmd = _tune(tiny_data, storage, "d", "--epochs", "1", "--n-trials", "4", "--n-workers", "2")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=user_env(mlflow_server, experiment), stdout=subprocess.DEVNULL, stderr=err)
    killed: set[int] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # every worker dies as soon as it appears
        for child in psutil.Process(proc.pid).children():
            try:
                if child.pid not in killed and "spawn_main" in " ".join(child.cmdline()):
                    child.kill()
                    killed.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)
    lines = _finish(proc, err_path, timeout=60).strip().splitlines()
    assert proc.returncode == 1, lines[-20:]  # a runtime failure, not a usage error
    assert [line for line in lines if line.startswith("pairnet: error:")] == lines[-1:]
    assert lines[-1].startswith("pairnet: error: tune workers died 5 times") and len(killed) >= 5
    runs = _runs(MlflowClient(), experiment)
    assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["FAILED"]
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, 1), (signal.SIGTERM, 2), (signal.SIGINT, 2)])
def test_signal_ends_every_run_killed(mlflow_server, tiny_data, tmp_path, sig, workers):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    experiment = f"it-tune-signal-{sig}-{workers}"
    client = MlflowClient()
    log_path = tmp_path / "tune.log"
    # Trials far longer than any wait for them to start: the signal always lands mid-trial, however
    # loaded the cores are (at 200 epochs a loaded CI run once finished both trials first). The
    # tiny ResNet's epochs, not compare_cnn's (a few a second), so that per-epoch metrics from two
    # workers do not swamp a loaded server that the stop then needs.
    cmd = _tune(tiny_data, storage, "t", "--epochs", "20000", "--n-trials", "2", "--n-workers", str(workers),
                "--model-name", "resnet_optimized")  # the later --model-name wins
    with open(log_path, "w") as log:
        # SIGINT at its default, as in a terminal: a suite started in the background by a shell
        # without job control inherits SIGINT ignored, and Python then leaves it ignored.
        proc = subprocess.Popen(cmd, env=user_env(mlflow_server, experiment), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _running_trials(client, experiment, proc, want=workers)
    family = psutil.Process(proc.pid).children(recursive=True)
    started = time.monotonic()
    proc.send_signal(sig)  # to the parent alone: with several workers it must pass the signal on
    try:
        out = _finish(proc, log_path, timeout=60)
        assert proc.returncode == 128 + sig and time.monotonic() - started < 40, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert not psutil.wait_procs(family, timeout=10)[1]  # workers (and their helpers) are gone
    finally:  # a failure here must not leave 20,000-epoch workers training under the rest of the suite
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    runs = _runs(client, experiment)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "KILLED"
    assert children and all(r.info.status == "KILLED" and r.data.tags["optuna.state"] == "FAIL" for r in children)
    study = optuna.load_study(study_name="t", storage=storage)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def _in_process(monkeypatch, experiment: str) -> None:
    """Run pairnet in this process as the CLI would; mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID, undone here."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)


def test_best_weights_live_with_the_trial_run(mlflow_server, tiny_data, tmp_path, monkeypatch):
    """Registration needs only the best trial's artifact, not the process that ran the trial."""
    from pairnet.tune import TuneRequest, _summarise, load_trial_weights

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    experiment = "it-tune-weights"
    proc = subprocess.run(_tune(tiny_data, storage, "b", "--epochs", "1", "--n-trials", "2"),
                          env=user_env(mlflow_server, experiment), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    study = optuna.load_study(study_name="b", storage=storage)
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            folder = mlflow.artifacts.download_artifacts(run_id=t.user_attrs["mlflow_run_id"], artifact_path="weights",
                                                         dst_path=str(tmp_path / str(t.number)))
            saved = load_file(str(Path(folder) / "weights.safetensors"))  # tensors only, no pickle
            model = load_trial_weights(t.user_attrs["mlflow_run_id"])
            assert json.loads((Path(folder) / "spec.json").read_text())["name"] == "compare_cnn"
            assert saved and all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())

    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    versions = client.search_model_versions(f"name = 'pairnet-compare_cnn' and tags.optuna_trial_run = '{best_run}'")
    assert len(versions) == 1
    # As if the trial had run on another machine that never registered it: this process registers it
    # from the artifact alone; a second summary finds that version instead of adding another.
    client.delete_model_version("pairnet-compare_cnn", versions[0].version)
    req = TuneRequest(model_name="compare_cnn", preset="tiny", study_name="b", storage=storage,
                      data_dir=str(tiny_data))
    _in_process(monkeypatch, experiment)
    mlflow.set_experiment(experiment)
    with mlflow.start_run():
        first = _summarise(study, len(study.trials), req)
    with mlflow.start_run():
        again = _summarise(study, len(study.trials), req)
    assert first["registered"] == "pairnet-compare_cnn" and first["promoted"] is not None
    assert again["version"] == first["version"] and again["promoted"] is None
    mv = client.get_model_version("pairnet-compare_cnn", first["version"])
    assert mv.tags["optuna_trial_run"] == best_run and mv.tags["optuna_trial"] == str(study.best_trial.number)


@pytest.mark.parametrize("extra, text", [
    (["--lr-low", "nan"], "'nan' is not a finite number"),
    (["--n-trials", "inf"], "'inf' is not a finite number"),
    (["--n-workers", "4096"], "n_workers 4096 exceeds the"),
])
def test_bad_numbers_refused_before_any_run(mlflow_server, tiny_data, tmp_path, extra, text):
    experiment = "it-tune-bad-numbers"
    cmd = _tune(tiny_data, f"sqlite:///{tmp_path / 'optuna.db'}", "bad", "--n-trials", "1", *extra)
    proc = subprocess.run(cmd, env=user_env(mlflow_server, experiment), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and text in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not _runs(MlflowClient(), experiment)
    assert not (tmp_path / "optuna.db").exists()


def test_storage_password_never_logged(mlflow_server, tiny_data, tmp_path, monkeypatch):
    url = "postgresql://bob:s3cret@127.0.0.1:9/optuna"
    proc = subprocess.run(_tune(tiny_data, url, "pw", "--n-trials", "1"), env=user_env(mlflow_server, "it-tune-pw"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "s3cret" not in proc.stderr, proc.stderr
    assert "postgresql://bob:***@127.0.0.1:9/optuna" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    # A storage that takes the password (SQLite stands in for the database server).
    from pairnet import tune

    sqlite = f"sqlite:///{tmp_path / 'optuna.db'}"
    real_open = tune.open_storage
    monkeypatch.setattr(tune, "open_storage", lambda req: real_open(tune.TuneRequest(storage=sqlite)))
    _in_process(monkeypatch, "it-tune-pw")
    tune.run_tune(tune.TuneRequest(model_name="compare_cnn", preset="tiny", data_dir=str(tiny_data), storage=url,
                                   study_name="pw", n_trials=1, epochs=1))
    runs = _runs(MlflowClient(), "it-tune-pw")
    assert len(runs) == 2
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["tune.storage"] == "postgresql://bob:***@127.0.0.1:9/optuna"
    assert parent.data.tags["optuna.storage"] == "postgresql://bob:***@127.0.0.1:9/optuna"
    for run in runs:
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if "s3cret" in v]
