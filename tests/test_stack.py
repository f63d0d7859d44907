"""Stage 4 against a real server: registry-pulled base models, LightGBM, baselines, serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, _free_port, mlflow_run, user_env
from pairnet.cli import main
from pairnet.tracking.registry import gate_margin
from pairnet.data.pairs import load_pairs, to_labels
from pairnet.tta import SHIFTS, shift_halves

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BASES = ["compare_cnn", "resnet_optimized", "resnet_fusion"]


@pytest.fixture(scope="module")
def stacked(mlflow_server, tiny_data):
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "it-stack"
    try:
        for variant in BASES:
            assert main(["stage2", "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name", variant]) == 0
    finally:
        os.environ.pop("MLFLOW_EXPERIMENT_NAME")
    uris = ",".join(f"models:/pairnet-{v}@champion" for v in BASES)
    env = user_env(mlflow_server, "it-stack")
    # lgbm.* is not declared in MLproject: mlflow run passes it on as --lgbm.num_leaves 4.
    proc = mlflow_run("stack", {"models": uris, "data_dir": tiny_data, "n_folds": 5, "lgbm.num_leaves": 4}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uris


def test_stack_run_metrics_baselines_lineage(stacked, tiny_data):
    client = MlflowClient()
    exp = client.get_experiment_by_name("it-stack")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`pairnet.stage` = 'stack'")
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert 0 <= m["cv_oof_acc"] <= 1 and len(client.get_metric_history(run.info.run_id, "cv_fold_acc")) == 5
    for key in ("lightgbm_stack", "best_single", "mean_probability", "majority_vote", "logistic_regression_stack"):
        assert 0 <= m[f"test_public_acc_{key}"] <= 1
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"comparison.csv", "comparison.png", "lineage.json", "meta_model.txt", "submission_private.csv"} <= arts
    for split in ("val", "test_public"):  # val: the out-of-fold probabilities
        files = {a.path for a in client.list_artifacts(run.info.run_id, f"eval/{split}")}
        assert {f"eval/{split}/{f}" for f in ("curves.png", "confusion_matrix.png", "predictions.json")} <= files
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["test_public"]
    lineage = json.loads(open(client.download_artifacts(run.info.run_id, "lineage.json")).read())
    assert run.data.params["stack.lgbm.num_leaves"] == "4" and lineage["lgbm"]["num_leaves"] == 4
    assert run.data.params["stack.lgbm.min_child_samples"] == "50"  # the defaults are logged too
    # the tiny val split (256 pairs, 204 a round): 50 per leaf lowered to a fifth for 4 leaves
    n_val = len(load_pairs(tiny_data / "val.npz"))
    assert run.data.params["stack.lgbm.min_child_samples_used"] == str(int(n_val * 0.8) // 5) == "40"
    assert lineage["lgbm"]["min_child_samples_used"] == 40
    assert sorted(b["name"] for b in lineage["base_models"]) == sorted(f"pairnet-{v}" for v in BASES)
    for b in lineage["base_models"]:
        assert client.get_model_version(b["name"], b["version"]).run_id == b["run_id"]
        # Each base model's predictions are cached on its own run, keyed by version.
        cached = [a.path for a in client.list_artifacts(b["run_id"], "stack_cache")]
        assert any(p.startswith(f"stack_cache/{b['key']}-") for p in cached)
    mv = client.get_model_version("pairnet-stack", run.data.tags["pairnet.model_version"])
    assert mv.run_id == run.info.run_id and float(mv.tags["val_acc"]) == pytest.approx(m["cv_oof_acc"], abs=1e-6)
    # The gate keeps the best on this val data: another module's stack (another folder's val) may
    # be champion, and then its figure on this val, measured at the gate, is what counts.
    champion = client.get_model_version_by_alias("pairnet-stack", "champion")
    before = mv.tags.get("champion_gate_acc")  # absent when there was no champion to compare
    margin = gate_margin(float(before), int(mv.tags["gate_n"]), 1.0) if before is not None else 0.0
    # The stack's gate figure: its out-of-fold accuracy on the gate part of val (every 5th pair).
    gate = np.arange(len(load_pairs(tiny_data / "val.npz"))) % 5 == 4
    assert int(mv.tags["gate_n"]) == gate.sum() and float(mv.tags["gate_acc"]) == pytest.approx(m["gate_acc"], abs=1e-6)
    if champion.version == mv.version:
        assert before is None or float(mv.tags["gate_acc"]) > float(before) + margin
    else:
        assert mv.tags["champion_compared"].startswith(f"v{champion.version} ")
        assert float(before) + margin >= float(mv.tags["gate_acc"])
    # The stack's figures belong to its logged model too, under the base models' key.
    (output,) = run.outputs.model_outputs
    linked = {x.key: x.value for x in mlflow.get_logged_model(output.model_id).metrics}
    assert linked["final_val_acc"] == pytest.approx(m["cv_oof_acc"])
    assert linked["test_public_acc"] == pytest.approx(m["test_public_acc_lightgbm_stack"])
    # The baselines, computed here from the base models' own probabilities.
    expected = _baselines(lineage["base_models"], tiny_data)
    for key, acc in expected.items():
        assert m[f"test_public_acc_{key}"] == pytest.approx(acc, abs=1e-9), key


def _baselines(bases: list[dict], data) -> dict[str, float]:
    """best single (chosen on val), mean probability, majority vote and logistic regression,
    from each registered base model's predictions in this process."""
    from sklearn.linear_model import LogisticRegression

    from pairnet.stacking import meta_features
    from pairnet.tracking.model import load_trusted

    val = load_pairs(data / "val.npz")
    pub = load_pairs(data / "test_public.npz", labels=data / "test_public_labels.csv")

    def acc(p, y) -> float:
        return float(((np.asarray(p) >= 0.5).astype(int) == np.asarray(y)).mean())

    models = [load_trusted(f"models:/{b['name']}/{b['version']}") for b in bases]
    p_val, p_pub = [m.predict(val.x) for m in models], [m.predict(pub.x) for m in models]
    val_accs = [acc(p, val.y) for p in p_val]
    for b, a in zip(bases, val_accs, strict=True):
        assert b["val_acc"] == pytest.approx(a, abs=1e-9), b["name"]
    best = int(np.argmax(val_accs))  # the first of equals, as max() over the bases in order
    votes = np.mean([np.asarray(p) >= 0.5 for p in p_pub], axis=0) > 0.5
    lr = LogisticRegression(max_iter=1000).fit(meta_features(p_val), val.y)
    return {"best_single": acc(p_pub[best], pub.y), "mean_probability": acc(np.mean(p_pub, axis=0), pub.y),
            "majority_vote": acc(votes, pub.y),
            "logistic_regression_stack": acc(lr.predict_proba(meta_features(p_pub))[:, 1], pub.y)}


def test_stack_pyfunc_predict_and_check_submission(stacked, tiny_data, tmp_path, capsys):
    private = load_pairs(tiny_data / "test_private.npz")
    client = MlflowClient()
    exp = client.get_experiment_by_name("it-stack")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`pairnet.stage` = 'stack'")
    model = mlflow.pyfunc.load_model(f"models:/pairnet-stack/{run.data.tags['pairnet.model_version']}")
    out = model.predict(private.x[:5])
    assert list(out.columns) == ["label", "probability"] and len(out) == 5
    assert set(out["label"]) <= {0, 1} and out["probability"].between(0, 1).all()

    pred = tmp_path / "pred.csv"
    assert main(["predict", "--data", str(tiny_data / "test_private.npz"), "--out", str(pred)]) == 0
    df = pd.read_csv(pred)
    assert list(df.columns) == ["id", "label"] and len(df) == len(private)
    assert main(["check-submission", "--data", str(tiny_data / "test_private.npz"), "--pred", str(pred)]) == 0
    # --tta: the labels of the mean stack probability over the five shifted views.
    shifted = tmp_path / "pred_tta.csv"
    uri = f"models:/pairnet-stack/{run.data.tags['pairnet.model_version']}"  # the champion may be another module's
    assert main(["predict", "--tta", "--model", uri, "--data", str(tiny_data / "test_private.npz"),
                 "--out", str(shifted)]) == 0
    assert "test-time shifts" in capsys.readouterr().out
    views = [model.predict(shift_halves(private.x, dy, dx))["probability"].to_numpy() for dy, dx in SHIFTS]
    expected = to_labels(np.mean(views, axis=0))
    assert pd.read_csv(shifted)["label"].tolist() == expected.tolist()

    bad = {
        "missing": df.iloc[1:],
        "duplicate": pd.concat([df, df.iloc[:1]]),
        "label2": df.assign(label=[2] + df["label"].tolist()[1:]),
    }
    expected = {"missing": "have no prediction", "duplicate": "duplicate id", "label2": "label '2' is not 0 or 1"}
    for name, frame in bad.items():
        path = tmp_path / f"{name}.csv"
        frame.to_csv(path, index=False)
        capsys.readouterr()
        assert main(["check-submission", "--data", str(tiny_data / "test_private.npz"), "--pred", str(path)]) == 2
        err = capsys.readouterr().err
        assert expected[name] in err, (name, err)


def test_missing_model_or_alias_is_one_line(stacked, mlflow_server, tiny_data):
    env = user_env(mlflow_server, "it-stack-bad")
    py = [sys.executable, "-m", "pairnet.cli", "stack", "--data-dir", str(tiny_data)]
    for models, text in ((stacked + ",models:/pairnet-nope@champion", "registered model 'pairnet-nope' has no alias"),
                         ("models:/pairnet-compare_cnn@gold,models:/pairnet-resnet_fusion/1", "has no alias 'gold'")):
        proc = subprocess.run(py + ["--models", models], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and text in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_mlflow_models_serve_answers(stacked, mlflow_server, tiny_data):
    port = _free_port()
    env = user_env(mlflow_server, "it-stack")
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/pairnet-stack@champion", "-p", str(port),
                             "-h", "127.0.0.1", "--env-manager", "local"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("model server did not answer /ping")
        x = load_pairs(tiny_data / "test_private.npz").x[:2]
        body = json.dumps({"inputs": x.tolist()}).encode()
        req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        rows = answer["predictions"]
        assert len(rows) == 2 and {"label", "probability"} <= set(rows[0])
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


# A Python that cannot import pairnet: the editable install's finder and every path that holds a
# pairnet folder (the checkout) are dropped before anything is imported (the venv's site-packages,
# which may live inside the checkout, stays); MLflow must bring pairnet with the model.
FRESH = r"""
import importlib.util, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "pairnet"))]
assert importlib.util.find_spec("pairnet") is None, "pairnet importable before loading"
import mlflow, numpy as np
x = np.load(sys.argv[3])
out = {}
for i, uri in enumerate(sys.argv[4:]):
    pred = mlflow.pyfunc.load_model(uri).predict(x)
    out[f"m{i}"] = np.asarray(pred["probability"] if hasattr(pred, "columns") else pred, dtype=np.float64)
import pairnet
out["pairnet_file"] = np.array(pairnet.__file__)
np.savez(sys.argv[2], **out)
"""


def test_registered_models_load_where_pairnet_is_not_installed(stacked, mlflow_server, tiny_data, tmp_path):
    import numpy as np

    from pairnet.tracking.model import load_trusted

    client = MlflowClient()
    stack = client.get_model_version_by_alias("pairnet-stack", "champion")
    base = client.get_model_version_by_alias("pairnet-resnet_optimized", "champion")
    uris = [f"models:/{base.name}/{base.version}", f"models:/{stack.name}/{stack.version}"]
    x = load_pairs(tiny_data / "test_private.npz").x[:64]
    np.save(tmp_path / "x.npy", x)
    env = user_env(mlflow_server, "it-stack")
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH, str(ROOT), str(tmp_path / "out.npz"),
                           str(tmp_path / "x.npy"), *uris], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as got:
        assert not str(got["pairnet_file"]).startswith(str(ROOT))  # the copy that travelled with the model
        in_process = [load_trusted(uris[0]).predict(x), load_trusted(uris[1]).probabilities(x)]
        for i, expected in enumerate(in_process):
            np.testing.assert_array_equal(got[f"m{i}"], np.asarray(expected, dtype=np.float64))
    for mv in (base, stack):  # requirements name only public packages, each pinned
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}",
                                                          dst_path=str(tmp_path / mv.name)))
        lines = [line for line in (folder / "requirements.txt").read_text().splitlines() if line.strip()]
        assert (folder / "code" / "pairnet" / "serving" / "pyfunc.py").exists()
        assert "pairnet" not in " ".join(lines) and all("==" in line for line in lines), lines
