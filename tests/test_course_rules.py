"""Course rules (no outside data), tuning inside the pipeline, and a pipeline SIGKILLed
mid-step that resumes from its checkpoint: a folder of the user's each time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import user_env
from pairnet import names
from pairnet.cli import main
from pairnet.pipeline import PipelineRequest, run_pipeline
from test_course import _runs
from test_realdata import user_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_course_rules_and_tuning_feed_the_base_models_and_are_reused(mlflow_server, tmp_path, monkeypatch, capsys):
    folder = user_folder(tmp_path / "tuned", seed=41)
    monkeypatch.setenv("PAIRNET_DATA_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "it-tuned")
    req = dict(preset="tiny", data_dir=str(folder), device="cpu", pretrain="none")
    first = run_pipeline(PipelineRequest(**req, tune_trials=2))
    client = MlflowClient()
    runs = _runs("it-tuned")
    # Course rules: no default set made or read, no tower, every model from scratch, tagged.
    assert not (tmp_path / "own" / "default").exists()
    assert not [r for r in runs if r.data.tags.get(names.TAG_STAGE) == "pretrain"]
    parent = client.get_run(first["run_id"])
    assert parent.data.tags[names.TAG_OUTSIDE_DATA] == "none" and parent.data.params["pipeline.pretrain"] == "none"
    models = [r for r in first["table"] if r["stage"] != "stack"]
    assert [r["model"] for r in models] == ["tuned-resnet_optimized (from scratch)",
                                            "tuned-resnet_fusion-seed42 (from scratch)"]
    assert not any(r["init_from"] for r in models) and sum(r["ships"] for r in first["table"]) == 1
    (study,) = [r for r in runs if r.data.tags.get(names.TAG_STAGE) == "tune" and names.TAG_PARENT in r.data.tags
                and r.data.tags[names.TAG_PARENT] == first["run_id"]]
    assert names.TAG_STEP_KEY in study.data.tags and study.info.status == "FINISHED"
    best_lr, best_wd = float(study.data.params["best_lr"]), float(study.data.params["best_weight_decay"])
    bases = [r for r in runs if r.data.tags.get(names.TAG_PARENT) == first["run_id"]
             and r.data.tags.get(names.TAG_STAGE) in ("stage2", "stage3")]
    assert len(bases) == 2
    assert all(float(r.data.params["cfg.lr"]) == pytest.approx(best_lr) for r in bases)
    assert all(float(r.data.params["cfg.weight_decay"]) == pytest.approx(best_wd) for r in bases)
    again = run_pipeline(PipelineRequest(**req, tune_trials=2))
    assert "tune/tuned-pipeline-tiny" in again["reused"] and "stack" in again["reused"]
    # An existing study: its best trial, no new trial; a missing one is one line.
    run_pipeline(PipelineRequest(**req, from_study="tuned-pipeline-tiny"))
    assert len([r for r in _runs("it-tuned") if r.data.tags.get(names.TAG_STAGE) == "tune"
                and "optuna.trial_number" in r.data.tags]) == 2
    assert client.get_run(first["run_id"]).data.params["pipeline.tuned_lr"] == study.data.params["best_lr"]
    assert main(["pipeline", "--preset", "tiny", "--data-dir", str(folder), "--pretrain", "none",
                 "--from-study", "nosuch"]) == 2
    assert "no Optuna study 'nosuch'" in capsys.readouterr().err


KILLABLE = textwrap.dedent("""
    import sys
    from pairnet.presets import PRESETS
    PRESETS["tiny"]["train"] = {**PRESETS["tiny"]["train"], "epochs": 40}  # long enough to be killed mid-step
    from pairnet.cli import main
    sys.exit(main(["pipeline", "--preset", "tiny", "--data-dir", sys.argv[1], "--pretrain", "none"]))
""")


def test_a_pipeline_sigkilled_mid_step_resumes_from_its_checkpoint(mlflow_server, tmp_path, monkeypatch):
    from pairnet.presets import PRESETS

    folder = user_folder(tmp_path / "laptop", seed=31)
    env = user_env(mlflow_server, "it-sleep")
    env["PAIRNET_DATA_DIR"] = str(tmp_path / "own")
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(folder)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    client = MlflowClient()

    def checkpointed():
        for r in _runs("it-sleep"):
            if names.TAG_STEP_KEY in r.data.tags and len(client.get_metric_history(r.info.run_id, "val_acc")) >= 3 \
                    and client.list_artifacts(r.info.run_id, "checkpoint"):
                return r
        return None

    deadline, killed = time.monotonic() + 300, None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        killed = checkpointed()
        time.sleep(0.3)
    assert killed is not None, "no step reached a checkpointed third epoch"
    os.killpg(proc.pid, signal.SIGKILL)  # as a laptop's battery would: no handler runs
    proc.wait(timeout=30)
    done = len(client.get_metric_history(killed.info.run_id, "val_acc"))
    assert done < 40

    monkeypatch.setitem(PRESETS["tiny"], "train", {**PRESETS["tiny"]["train"], "epochs": 40})
    monkeypatch.setenv("PAIRNET_DATA_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "it-sleep")
    run_pipeline(PipelineRequest(preset="tiny", data_dir=str(folder), device="cpu", pretrain="none"))
    assert client.get_run(killed.info.run_id).info.status == "FAILED"  # swept as the pipeline started
    (resumed,) = [r for r in _runs("it-sleep") if r.data.tags.get(names.TAG_RESUMED_FROM) == killed.info.run_id]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags[names.TAG_STEP_KEY] == killed.data.tags[names.TAG_STEP_KEY]
    steps = sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "val_acc"))
    assert steps == list(range(1, 41))  # the killed run's epochs carried over, the rest trained here
