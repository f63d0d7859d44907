"""One model across processes: torchrun, DistributedDataParallel on CPU (gloo), 2 ranks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import mlflow_run, user_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
DIGESTS = re.compile(r"rank (\d) of 2: final weights (\w+)")


def _torchrun(tiny_data, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pairnet",
            "stage2", "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name", "compare_cnn",
            "--device", "cpu", *extra]


def _one_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def _same_weights_on_both_ranks(stderr: str) -> None:
    found = dict(DIGESTS.findall(stderr))
    assert found.keys() == {"0", "1"} and len(set(found.values())) == 1, stderr[-3000:]


def test_torchrun_trains_one_model_on_two_ranks(mlflow_server, tiny_data):
    env = user_env(mlflow_server, "it-ddp")
    proc = subprocess.run(_torchrun(tiny_data, "--epochs", "3"), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_weights_on_both_ranks(proc.stderr)
    client = MlflowClient()
    (run,) = _one_run(client, "it-ddp")  # rank 1 opened no run
    assert run.info.status == "FINISHED" and run.data.params["run.world_size"] == "2"
    for key in ("val_acc", "train_loss"):  # every epoch logged once
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
    versions = client.search_model_versions(f"name = 'pairnet-compare_cnn' and run_id = '{run.info.run_id}'")
    assert len(versions) == 1
    assert proc.stdout.count("pairnet-compare_cnn v") == 1  # one summary line: rank 0's


def test_sigterm_then_resume_under_torchrun(mlflow_server, tiny_data):
    env = user_env(mlflow_server, "it-ddp-resume")
    proc = subprocess.Popen(_torchrun(tiny_data, "--epochs", "20"), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    client = MlflowClient()
    run_id, deadline = None, time.monotonic() + 240
    while time.monotonic() < deadline and run_id is None:
        runs = _one_run(client, "it-ddp-resume") if client.get_experiment_by_name("it-ddp-resume") else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val_acc")) >= 2:
            run_id = runs[0].info.run_id
        time.sleep(0.3)
    assert run_id, "training never reached epoch 2"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    for _ in range(120):
        if client.get_run(run_id).info.status != "RUNNING":
            break
        time.sleep(0.5)
    assert client.get_run(run_id).info.status == "KILLED", proc.stderr.read().decode()[-3000:]
    done = len(client.get_metric_history(run_id, "val_acc"))
    assert done < 20

    # The MLproject entry point's way: -P nproc_per_node=2 starts torchrun itself.
    res = mlflow_run("stage2", {"preset": "tiny", "data_dir": tiny_data, "model_name": "compare_cnn",
                                "device": "cpu", "resume": run_id, "nproc_per_node": 2}, env)
    assert res.returncode == 0, res.stderr[-3000:]
    _same_weights_on_both_ranks(res.stderr)
    resumed = next(r for r in _one_run(client, "it-ddp-resume") if r.info.run_id != run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["pairnet.resumed_from"] == run_id
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "val_acc")] == list(range(1, 21))
