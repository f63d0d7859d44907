"""The user's first hour: the pipeline entry point, step reuse, the notebook, the UI in a browser."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import JOURNEY_EXPERIMENT as EXPERIMENT
from conftest import ROOT, user_env
from pairnet.cli import main
from pairnet.data.pairs import PairSet, load_pairs, save_pairs
from pairnet.tracking.lifecycle import experiment_url

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_pipeline_children_and_reuse(pipeline_runs):
    first, second, data = pipeline_runs
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    pipelines = client.search_runs([exp.experiment_id], filter_string="tags.`pairnet.stage` = 'pipeline'",
                                   order_by=["attributes.start_time ASC"])[:2]  # test_faults may add more later
    assert len(pipelines) == 2 and all(p.info.status == "FINISHED" for p in pipelines)
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{pipelines[0].info.run_id}'")
    stages = sorted(c.data.tags["pairnet.stage"] for c in children)
    assert stages == ["data", "predict", "pretrain", "stack", "stage2", "stage2", "stage3"]
    assert all(c.info.status == "FINISHED" for c in children)
    # Stage 0 feeds the fine-tuned models; the from-scratch twin has no init_from.
    (pre,) = [c for c in children if c.data.tags["pairnet.stage"] == "pretrain"]
    assert pre.data.tags["pairnet.registered_name"] == "pairnet-pretrain-resnet_optimized"
    inits = sorted(c.data.tags.get("pairnet.init_from", "") for c in children if c.data.tags["pairnet.stage"]
                   in ("stage2", "stage3"))
    assert inits[0] == "" and all(i.startswith("models:/pairnet-pretrain-resnet_optimized/") for i in inits[1:])
    assert len(inits) == 3 and "(from scratch)" in first.stdout
    # The second run reused every step and says so.
    assert "reused 7 finished steps" in second.stdout
    assert not client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{pipelines[1].info.run_id}'")
    assert "MLflow UI: http://127.0.0.1" in first.stdout and "pairnet-stack" in first.stdout
    assert (Path(data) / "predictions_private.csv").exists()


def test_notebook_runs_against_tracked_pipeline(pipeline_runs, mlflow_server):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "tracked_runs.ipynb", as_version=4)
    # The notebook is stored with the outputs of a tiny run, so it reads on GitHub before anyone runs it.
    assert any(c.outputs for c in nb.cells if c.cell_type == "code")
    os.environ["MLFLOW_EXPERIMENT_NAME"] = EXPERIMENT
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.pop("MLFLOW_EXPERIMENT_NAME")
    outputs = "".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", ""))
                      for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "pairnet-stack" in outputs and "lightgbm_stack" in outputs and "champion" in outputs
    assert "val pairs wrong" in outputs and "hardest digit pairs:" in outputs  # the error-analysis section
    assert "best_so_far" in outputs or "no finished tune study yet" in outputs  # the Optuna section


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


# On the tests, not on the helper: a mark on a plain function is never read.
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and importlib.util.find_spec("selenium")) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver and pip install '.[ci]' (.ci/run installs them)")


def _chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@needs_chromium
def test_mlflow_ui_in_headless_chromium(pipeline_runs, mlflow_server, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chromium(tmp_path)
    try:
        exp = MlflowClient().get_experiment_by_name(EXPERIMENT)
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        # The link the pipeline prints opens the experiment on its runs, not on the GenAI overview.
        first, _, _ = pipeline_runs
        link = next(ln for ln in first.stdout.splitlines() if ln.startswith("MLflow UI: ")).split()[2]
        assert link == experiment_url(mlflow_server, exp.experiment_id)
        driver.get(link)
        WebDriverWait(driver, 90).until(lambda d: "pipeline/tiny" in d.find_element("tag name", "body").text)
        body = driver.find_element("tag name", "body").text
        assert "pipeline/tiny" in body and "matching runs" in body
        shots = ROOT / "data" / "screenshots"  # git-ignored; kept for a person to look at
        shots.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shots / "ui_experiment.png"))
        driver.get(f"{mlflow_server}/#/models")
        WebDriverWait(driver, 90).until(lambda d: "pairnet-stack" in d.find_element("tag name", "body").text)
        body = driver.find_element("tag name", "body").text
        assert "pairnet-pretrain-resnet_optimized" in body and "pairnet-stack" in body
        shot = shots / "ui_models.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()


@needs_chromium
def test_tune_history_chart_and_offline_plot_in_chromium(mlflow_server, tiny_data, tmp_path):
    """The study's parent run charts trial_value in the MLflow UI, and Optuna's own plot opens
    from a file with no network at all (plotly.js inside the page)."""
    from selenium.webdriver.support.ui import WebDriverWait

    from pairnet.cli import main

    os.environ["MLFLOW_EXPERIMENT_NAME"] = "it-tune-ui"
    try:
        assert main(["tune", "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name", "compare_cnn",
                     "--epochs", "1", "--n-trials", "3", "--storage", str(tmp_path / "study.journal")]) == 0
    finally:
        os.environ.pop("MLFLOW_EXPERIMENT_NAME")
    client = MlflowClient()
    exp = client.get_experiment_by_name("it-tune-ui")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # One point per COMPLETE trial, at its number; the third may be pruned (the first two never
    # are: MedianPruner's start-up trials), whichever the tiny figures make it.
    complete = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs
                      if r.data.tags.get("optuna.state") == "COMPLETE")
    assert complete[:2] == [0, 1]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "trial_value")] == complete
    page = client.download_artifacts(parent.info.run_id, "optuna/optimization_history.html", str(tmp_path))
    driver = _chromium(tmp_path)
    try:
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/model-metrics")
        WebDriverWait(driver, 90).until(lambda d: "best_value_so_far" in d.find_element("tag name", "body").text)
        assert "trial_value" in driver.find_element("tag name", "body").text
        shots = ROOT / "data" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shots / "ui_tune_history.png"))
        driver.get(Path(page).as_uri())  # a file, no server, no CDN: plotly.js must be in the page
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return document.querySelectorAll('.plotly .main-svg').length") > 0)
        assert driver.execute_script("return typeof Plotly") == "object"
    finally:
        driver.quit()


# Last in this module: it changes the journey's data and deletes one of its versions.
def test_changed_test_file_and_deleted_version_rerun_their_steps(pipeline_runs, mlflow_server):
    """The journey's pipeline, run a third time after a user replaced test_private.npz and
    deleted one registered version: exactly the steps that depend on them rerun."""
    _, _, data = pipeline_runs
    data = Path(data)
    private = load_pairs(data / "test_private.npz")
    keep = np.arange(len(private))[::-2]  # another file: half the pairs, in another order
    save_pairs(data / "test_private.npz", PairSet(x=private.x[keep], ids=np.char.add("NEW_", private.ids[keep])))
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    (scratch,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name LIKE '%/scratch'",
                                    max_results=1)
    tags = scratch.data.tags
    client.delete_model_version(tags["pairnet.registered_name"], tags["pairnet.model_version"])

    res = subprocess.run([sys.executable, "-m", "pairnet.cli", "pipeline", "--preset", "tiny", "--data-dir", str(data)],
                         env=user_env(mlflow_server, EXPERIMENT), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    reused_line = next(ln for ln in res.stdout.splitlines() if ln.startswith("reused "))
    assert "stage2/resnet_optimized/seed42," in reused_line + "," and "pretrain/" in reused_line
    for rerun in ("/scratch", "stack", "predict"):
        assert rerun not in reused_line, reused_line
    # The predictions match the new file, so check-submission passes for it.
    pred = data / "predictions_private.csv"
    assert main(["check-submission", "--data", str(data / "test_private.npz"), "--pred", str(pred)]) == 0
    assert pred.read_text().splitlines()[1].startswith("NEW_")
