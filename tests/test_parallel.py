"""``jobs``: independent members in worker processes, each its own child run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import user_env
from pairnet.cli import main
from pairnet.parallel import member_device

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MEMBERS = "compare_cnn:1,improved_v2:2"


def _stage3(tiny_data, experiment: str, *extra: str) -> int:
    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    try:
        return main(["stage3", "--preset", "tiny", "--data-dir", str(tiny_data), "--members", MEMBERS, *extra])
    finally:
        os.environ.pop("MLFLOW_EXPERIMENT_NAME")


def _family(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {(r.data.tags["pairnet.model"], int(r.data.tags["pairnet.seed"])): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return parent, children


def test_jobs_2_trains_the_same_members_as_one_process(mlflow_server, tiny_data):
    assert _stage3(tiny_data, "it-jobs1", "--jobs", "1") == 0
    assert _stage3(tiny_data, "it-jobs2", "--jobs", "2") == 0
    client = MlflowClient()
    one, serial = _family(client, "it-jobs1")
    two, parallel = _family(client, "it-jobs2")
    assert one.info.status == two.info.status == "FINISHED" and two.data.params["run.jobs"] == "2"
    assert serial.keys() == parallel.keys() == {("compare_cnn", 1), ("improved_v2", 2)}
    pids = {r.data.tags["pairnet.process.pid"] for r in parallel.values()}
    assert str(os.getpid()) not in pids  # trained in worker processes
    for member, run in parallel.items():
        assert run.info.status == "FINISHED"
        # Same seed, same initial weights, same training: the same model up to float reduction order
        # (1 thread per worker against 2 in one process).
        assert run.data.params["run.init_weights_digest"] == serial[member].data.params["run.init_weights_digest"]
        assert run.data.metrics["final_val_acc"] == pytest.approx(serial[member].data.metrics["final_val_acc"],
                                                                  abs=0.02)
        name = run.data.tags["pairnet.registered_name"]
        assert client.get_model_version(name, run.data.tags["pairnet.model_version"]).run_id == run.info.run_id


def test_a_failed_member_fails_alone(mlflow_server, tiny_data, monkeypatch, capsys):
    import pairnet.stages as stages

    real_fit = stages.fit

    def fit(model, train, val, cfg, **kw):
        if cfg.seed == 2:
            raise RuntimeError("CUDA out of memory (injected)")
        return real_fit(model, train, val, cfg, **kw)

    monkeypatch.setattr(stages, "fit", fit)
    assert _stage3(tiny_data, "it-jobs-fail", "--jobs", "1") == 1  # the work failed, the inputs were fine
    assert "1 of 2 stage 3 members failed (stage3/improved_v2/seed2)" in capsys.readouterr().err
    parent, children = _family(MlflowClient(), "it-jobs-fail")
    assert parent.info.status == "FAILED" and "injected" in parent.data.tags["pairnet.failed_members"]
    assert children[("improved_v2", 2)].info.status == "FAILED"
    ok = children[("compare_cnn", 1)]
    assert ok.info.status == "FINISHED" and ok.data.tags["pairnet.model_version"]


def test_a_killed_worker_takes_only_its_own_member(mlflow_server, tiny_data, tmp_path):
    """A real spawned worker SIGKILLed mid-training (as the OOM killer does): the members
    training beside it or still queued finish and register; its own run ends FAILED."""
    experiment = "it-jobs-sigkill"
    members = "improved_v2:2,compare_cnn:1,compare_cnn:3"  # jobs 2: the third waits for a free worker
    env = user_env(mlflow_server, experiment)
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "pairnet", "stage3", "--preset", "tiny", "--data-dir",
                                 str(tiny_data), "--members", members, "--jobs", "2", "--epochs", "30"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    try:
        client = MlflowClient()
        victim = None
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id]) if exp else []
            victim = next((r for r in runs if r.data.tags.get("pairnet.model") == "improved_v2"
                           and client.get_metric_history(r.info.run_id, "val_acc")), None)
            time.sleep(0.5)
        assert victim is not None, stderr.read_text()[-3000:]
        pid = int(victim.data.tags["pairnet.process.pid"])
        assert pid != proc.pid
        os.kill(pid, signal.SIGKILL)  # a worker process of this pool, mid-training
        assert proc.wait(timeout=900) == 1, stderr.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr.read_text()
    assert "1 of 3 stage 3 members failed (stage3/improved_v2/seed2)" in err, err[-3000:]
    assert f"its worker process died (signal {int(signal.SIGKILL)})" in err
    parent, children = _family(client, experiment)
    assert parent.info.status == "FAILED" and "worker process died" in parent.data.tags["pairnet.failed_members"]
    assert set(children) == {("improved_v2", 2), ("compare_cnn", 1), ("compare_cnn", 3)}
    killed = children[("improved_v2", 2)]
    assert killed.info.status == "FAILED" and "is gone" in killed.data.tags["pairnet.swept"]
    for member in (("compare_cnn", 1), ("compare_cnn", 3)):
        run = children[member]
        assert run.info.status == "FINISHED", member
        name, version = run.data.tags["pairnet.registered_name"], run.data.tags["pairnet.model_version"]
        assert client.get_model_version(name, version).run_id == run.info.run_id


def test_member_devices_and_bad_jobs(tiny_data, capsys):
    assert member_device("cpu", 3) == "cpu"
    assert _stage3(tiny_data, "it-jobs-bad", "--jobs", "0") == 2
    assert "jobs must be a whole number >= 1 (got 0)" in capsys.readouterr().err
