"""Stage 0 and fine-tuning through `mlflow run` against a real tracking server and registry."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import mlflow_run, user_env
from pairnet.data.pairs import load_pairs, save_pairs
from pairnet.tracking.init_from import fetch_init_source

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXPERIMENT = "it-pretrain"
PRETRAINED = "pairnet-pretrain-resnet_optimized"


@pytest.fixture(scope="module")
def pretrained(mlflow_server, tiny_data):
    env = user_env(mlflow_server, EXPERIMENT)
    proc = mlflow_run("pretrain", {"preset": "tiny", "data_dir": tiny_data}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`pairnet.stage` = 'pretrain'")
    return env, run


def test_mlflow_run_pretrain_registers_a_digit_aware_model(pretrained):
    _, run = pretrained
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    assert run.data.params["cfg.aux_digit_weight"] == "1.0" and run.data.params["model.digit_head"] == "True"
    for key in ("train_digit_acc", "val_digit_acc", "val_acc"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    versions = client.search_model_versions(f"name='{PRETRAINED}'")
    assert run.info.run_id in {v.run_id for v in versions}
    assert client.get_model_version_by_alias(PRETRAINED, "champion") is not None


def test_stage2_init_from_copies_weights_and_tags_lineage(pretrained, tiny_data):
    env, pre = pretrained
    client = MlflowClient()
    mv = next(v for v in client.search_model_versions(f"name='{PRETRAINED}'") if v.run_id == pre.info.run_id)
    exact = f"models:/{PRETRAINED}/{mv.version}"
    # The weights init_from fetches are the registered run's best weights, bit for bit.
    source = fetch_init_source(exact)
    ckpt_dir = client.download_artifacts(pre.info.run_id, "checkpoint/last.pt")
    best = torch.load(ckpt_dir, map_location="cpu", weights_only=True)["best_state"]
    assert source.uri == exact and all(torch.equal(source.state[k], best[k]) for k in best)

    proc = mlflow_run("stage2", {"preset": "tiny", "data_dir": tiny_data, "model_name": "resnet_fusion",
                                 "init_from": exact}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`pairnet.stage` = 'stage2'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["pairnet.init_from"] == exact and run.data.tags["pairnet.init_from_run"] == pre.info.run_id
    assert int(run.data.params["init.tower_tensors"]) > 0 and int(run.data.params["init.fresh_tensors"]) > 0
    assert run.data.params["cfg.init_from"] == exact
    version = client.get_model_version("pairnet-resnet_fusion", run.data.tags["pairnet.model_version"])
    assert version.tags["init_from"] == exact


def test_bad_init_from_and_digitless_pretrain_fail_in_one_line(pretrained, tiny_data, tmp_path):
    env, _ = pretrained
    py = [sys.executable, "-m", "pairnet.cli"]
    common = ["--preset", "tiny", "--data-dir", str(tiny_data)]
    # Another architecture: one line naming both.
    bad = subprocess.run(py + ["stage2", *common, "--init-from", f"models:/{PRETRAINED}@champion"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "does not match resnet_optimized_1.12" in bad.stderr and "resnet_optimized (resnet" in bad.stderr
    # A missing alias.
    bad = subprocess.run(py + ["stage1", *common, "--init-from", f"models:/{PRETRAINED}@nope"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "has no alias 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    # Pretraining needs digit labels: a user's folder without them is refused before any run.
    user = tmp_path / "user"
    user.mkdir()
    for name in ("train.npz", "val.npz"):
        p = load_pairs(tiny_data / name)
        save_pairs(user / name, type(p)(x=p.x, y=p.y, ids=p.ids, source=p.source))
    bad = subprocess.run(py + ["pretrain", "--preset", "tiny", "--data-dir", str(user)], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "needs digit labels" in bad.stderr and "train.npz" in bad.stderr
    exp = MlflowClient().get_experiment_by_name(EXPERIMENT)
    assert not MlflowClient().search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
    assert np.all(load_pairs(user / "train.npz").x == load_pairs(tiny_data / "train.npz").x)  # user data untouched
