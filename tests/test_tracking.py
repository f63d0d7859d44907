"""Stages as MLflow Project entry points against a real tracking server and registry."""

from __future__ import annotations


import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, mlflow_run, user_env
from pairnet import report
from pairnet.data.pairs import load_pairs
from pairnet.data.splits import val_parts
from pairnet.train import TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _runs(client, experiment, filter_string=""):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client.search_runs([exp.experiment_id], filter_string=filter_string)


def test_stage2_mlflow_run_tracks_registers_and_serves(mlflow_server, tiny_data):
    env = user_env(mlflow_server, "it-stage2")
    proc = mlflow_run("stage2", {"preset": "tiny", "data_dir": tiny_data}, env, run_name="mine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = _runs(client, "it-stage2")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "mine"  # `mlflow run --run-name` is the user's; pairnet keeps it
    # Per-epoch metrics at steps 1..epochs (tiny preset: 2 epochs).
    for key in ("train_loss", "val_acc", "val_auc", "lr", "grad_norm", "pairs_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [1, 2], (key, steps)
    # The whole config as params, preset applied, recipe defaults kept where the preset is silent.
    p = run.data.params
    assert p["cfg.model_name"] == "resnet_optimized_1.12" and p["cfg.epochs"] == "2" and p["cfg.lr"] == "0.001"
    assert p["cfg.weight_decay"] == "0.0005" and p["run.preset"] == "tiny" and p["model.layers"] == "[3, 3, 3]"
    assert set(TrainConfig().as_params()) <= set(p)
    assert p["cfg.aug.rotation_deg"] == "10.0" and p["cfg.sched.plateau_factor"] == "0.5"  # nested settings
    # The raw entry-point parameter that mlflow run logs itself, left at "" = not given
    # (MLflow logs it shell-quoted).
    assert p["epochs"] in ("", "''")
    tags = run.data.tags
    assert tags["pairnet.stage"] == "stage2" and tags["pairnet.seed"] == "42" and tags["pairnet.data_digest"]
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learning_curves.png", "confusion_matrix.png", "final_metrics.json", "checkpoint"} <= arts
    assert tags["mlflow.source.git.commit"] == tags["pairnet.git_commit"]
    inputs = {d.dataset.name: [t.value for t in d.tags if t.key == "mlflow.data.context"]
              for d in run.inputs.dataset_inputs}
    assert inputs == {"train": ["training"], "val": ["validation"], "test_public": ["evaluation"]}
    # Evaluation a person can read, for val and test_public.
    for split, file in (("val", "val.npz"), ("test_public", "test_public.npz")):
        files = {a.path.removeprefix(f"eval/{split}/") for a in client.list_artifacts(run.info.run_id, f"eval/{split}")}
        digits = "digit_a" in load_pairs(tiny_data / file).extras  # the default set hides test_public's digits
        assert files == {"curves.png", "confusion_matrix.png", "most_confident_errors.png", "predictions.json"} | (
            {"digit_pair_errors.json", "digit_pair_errors.png"} if digits else set()), (split, files)
        assert digits == (split == "val")
    val = val_parts(load_pairs(tiny_data / "val.npz"))[0]  # the selection part, which fit scores each epoch
    assert int(p["data.n_val_select"]) == len(val)
    table = report.digit_pair_errors(run.info.run_id)
    errors = round((1 - run.data.metrics["final_val_acc"]) * len(val))
    assert table["errors"].sum() == errors and table["pairs"].sum() == len(val) and len(table) <= 90
    assert (table["left"] != table["right"]).all()  # a pair's digits always differ
    predictions = report.predictions(run.info.run_id)
    assert len(predictions) == len(val) and (predictions["predicted"] != predictions["label"]).sum() == errors
    # The registry: a version with val metrics as tags and the champion alias.
    mv = client.get_model_version_by_alias("pairnet-resnet_optimized_1.12", "champion")
    # Descriptions the UI shows: the run's, the version's and the registered model's.
    assert run.data.tags["mlflow.note.content"].startswith("stage2: resnet_optimized_1.12, seed 42, preset tiny")
    assert "val acc" in mv.description and run.info.run_id in mv.description
    assert "siamese CNN" in client.get_registered_model("pairnet-resnet_optimized_1.12").description
    assert mv.run_id == run.info.run_id
    assert float(mv.tags["val_acc"]) == pytest.approx(run.data.metrics["final_val_acc"])
    # The final metrics are linked to the logged model (MLflow 3) and to the val dataset.
    (logged,) = client.search_logged_models([run.info.experiment_id],
                                            filter_string=f"source_run_id = '{run.info.run_id}'")
    linked = {m.key: m for m in logged.metrics}
    assert linked["final_val_acc"].value == pytest.approx(run.data.metrics["final_val_acc"])
    assert linked["final_val_acc"].dataset_name == "val" and "best_epoch" in linked
    # pyfunc: uint8 (N, 28, 56) without labels → probabilities.
    private = load_pairs(tiny_data / "test_private.npz")
    assert private.y is None
    model = mlflow.pyfunc.load_model("models:/pairnet-resnet_optimized_1.12@champion")
    prob = np.asarray(model.predict(private.x))
    assert prob.shape == (len(private),) and np.all((prob >= 0) & (prob <= 1))
    from pairnet.tracking.model import load_trusted

    direct = load_trusted("models:/pairnet-resnet_optimized_1.12@champion").predict(private.x)
    np.testing.assert_allclose(prob, direct, rtol=0, atol=1e-6)  # the served model is the trained one


def test_mlflow_run_explicit_value_wins_over_the_preset(mlflow_server, tiny_data, tmp_path):
    # tiny's epochs is 2: -P epochs=3 trains 3, and the run shows one value for it. The experiment
    # file sits between the preset and the flags: its epochs loses to -P, its rotation wins.
    config = tmp_path / "experiment.yaml"
    config.write_text("epochs: 9\naug:\n  rotation_deg: 5\nlabel_smoothing: 0.05\n")
    env = user_env(mlflow_server, "it-explicit")
    proc = mlflow_run("stage1", {"preset": "tiny", "data_dir": tiny_data, "model_name": "compare_cnn",
                                 "epochs": 3, "config": config}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = _runs(MlflowClient(), "it-explicit")
    p = run.data.params
    assert p["epochs"] == "3" and p["cfg.epochs"] == "3"
    assert p["cfg.width_mult"] == "0.25" and p["cfg.patience"] == "0"  # the rest from the preset
    assert p["cfg.aug.rotation_deg"] == "5.0" and p["cfg.label_smoothing"] == "0.05"  # from the file
    logged = MlflowClient().download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "got"))
    assert Path(logged).read_text() == config.read_text()
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]


def test_champion_gate_and_manual_promote(mlflow_server, tiny_data):
    from pairnet.cli import main
    from pairnet.tracking.registry import GateFigure, champion_gate, champion_version, gate_margin

    # Another test may already have registered (and crowned) a compare_cnn version.
    before = champion_version("pairnet-compare_cnn")
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "it-gate"
    try:
        assert main(["stage2", "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name", "compare_cnn"]) == 0
        assert main(["stage2", "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name", "compare_cnn",
                     "--seed", "7"]) == 0
    finally:
        os.environ.pop("MLFLOW_EXPERIMENT_NAME")
    client = MlflowClient()
    versions = sorted(int(v.version) for v in client.search_model_versions("name='pairnet-compare_cnn'"))
    assert versions[-2:] == [versions[-2], versions[-2] + 1]
    champ = champion_version("pairnet-compare_cnn")
    first = client.get_model_version("pairnet-compare_cnn", str(versions[-2]))
    second = client.get_model_version("pairnet-compare_cnn", str(versions[-1]))
    # The gate, replayed from the figures it recorded: a version takes the alias only by beating
    # the champion it was compared with by more than one standard error of that val set.
    expected = before.version if before is not None else None
    for mv in (first, second):
        decision = client.get_run(mv.run_id).data.tags["pairnet.champion_decision"]
        if "champion_gate_acc" in mv.tags:
            old = float(mv.tags["champion_gate_acc"])
            wins = float(mv.tags["gate_acc"]) > old + gate_margin(old, int(mv.tags["gate_n"]), 1.0)
            assert mv.tags["champion_compared"].startswith(f"v{expected} ")
        else:
            wins = expected is None
        assert decision == ("promoted" if wins else "kept") and mv.tags["gate_reason"]
        expected = mv.version if wins else expected
    assert champ.version == expected
    # The gate keeps a champion that is better than a newcomer, which becomes the challenger.
    loser = first if first.version != champ.version else second
    decision = champion_gate("pairnet-compare_cnn", loser.version, GateFigure(-1.0, loser.tags["gate_digest"], 10))
    assert not decision.promoted and champion_version("pairnet-compare_cnn").version == champ.version
    assert client.get_model_version_by_alias("pairnet-compare_cnn", "challenger").version == loser.version
    # Manual promotion through the CLI, and a clear error for a missing version.
    assert main(["promote", "pairnet-compare_cnn", str(versions[-2])]) == 0
    assert champion_version("pairnet-compare_cnn").version == str(versions[-2])
    assert main(["promote", "pairnet-compare_cnn", "999"]) == 2
    assert main(["models"]) == 0


def test_stage3_parent_with_registered_children(mlflow_server, tiny_data):
    from pairnet.presets import parse_members

    # The recipe's eight members by default; two of them trained here (test_parallel trains more).
    assert sorted(parse_members("")) == sorted([("resnet_optimized_1.12", s) for s in (42, 2023, 2024, 2025)]
                                               + [("fpn_model", 42)] + [("improved_v2", s) for s in (42, 123, 456)])
    env = user_env(mlflow_server, "it-stage3")
    proc = mlflow_run("stage3", {"preset": "tiny", "data_dir": tiny_data,
                                 "members": "resnet_optimized_1.12:2023,improved_v2:123"}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = _runs(client, "it-stage3")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    members = sorted((r.data.tags["pairnet.model"], int(r.data.tags["pairnet.seed"])) for r in children)
    assert members == [("improved_v2", 123), ("resnet_optimized_1.12", 2023)]
    assert all(r.info.status == "FINISHED" for r in children)
    for r in children:
        name = r.data.tags["pairnet.registered_name"]
        assert name == f"pairnet-{r.data.tags['pairnet.model']}-seed{r.data.tags['pairnet.seed']}"
        assert client.get_model_version(name, r.data.tags["pairnet.model_version"]).run_id == r.info.run_id
    fusion = next(r for r in children if r.data.tags["pairnet.model"] == "improved_v2")
    heads = ("abs_diff", "concat", "product", "cosine", "l2", "diff")
    assert {f"head_weight_{n}" for n in heads} <= set(fusion.data.metrics)


def test_sigterm_kills_run_and_resume_finishes(mlflow_server, tiny_data):
    env = user_env(mlflow_server, "it-sigterm")
    cmd = ["mlflow", "run", str(ROOT), "-e", "stage2", "--env-manager", "local", "--experiment-name", "it-sigterm",
           "-P", "preset=tiny", "-P", f"data_dir={tiny_data}", "-P", "epochs=20", "-P", "model_name=compare_cnn"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    client = MlflowClient()
    deadline = time.monotonic() + 180
    run_id = None
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name("it-sigterm")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val_acc")) >= 2:
            run_id = runs[0].info.run_id
            break
        time.sleep(0.3)
    assert run_id, "training never reached epoch 2"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    # The training process outlives `mlflow run` by the moment it takes to log its checkpoint.
    for _ in range(120):
        killed = client.get_run(run_id)
        if killed.info.status != "RUNNING":
            break
        time.sleep(0.5)
    assert killed.info.status == "KILLED", proc.stderr.read().decode()[-3000:]
    assert "checkpoint/last.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    done = len(client.get_metric_history(run_id, "val_acc"))
    assert done < 20

    res = mlflow_run("stage2", {"preset": "tiny", "data_dir": tiny_data, "model_name": "compare_cnn",
                                "resume": "true"}, env)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [r for r in _runs(client, "it-sigterm") if r.info.run_id != run_id]
    (resumed,) = runs
    assert resumed.info.status == "FINISHED" and resumed.data.tags["pairnet.resumed_from"] == run_id
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_acc")]
    assert steps == list(range(1, 21))


def test_bad_inputs_fail_cleanly(mlflow_server, tiny_data, tmp_path):
    env = user_env(mlflow_server, "it-bad")
    py = [sys.executable, "-m", "pairnet.cli"]
    bad = subprocess.run(py + ["stage2", "--preset", "huge", "--data-dir", str(tiny_data)], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown preset 'huge'" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(py + ["stage2", "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name", "nope"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr
    # An unreachable server: one line, well within 10 s.
    env_down = dict(env, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    t0 = time.monotonic()
    down = subprocess.run(py + ["models"], env=env_down, capture_output=True, text=True, timeout=60)
    assert down.returncode == 2 and "unreachable" in down.stderr and len(down.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 10
    # A bad parameter through `mlflow run`: the run MLflow created ends FAILED.
    res = mlflow_run("stage2", {"preset": "tiny", "data_dir": tiny_data, "epochs": "abc"}, env)
    assert res.returncode != 0 and "'abc' is not a number" in res.stderr
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("it-bad").experiment_id])
    assert runs and all(r.info.status == "FAILED" for r in runs)
    # Nothing was left RUNNING by any of the above.
    exp = MlflowClient().get_experiment_by_name("it-bad")
    if exp is not None:
        assert not MlflowClient().search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
