"""The student's job on a folder of their own: the plan before the work, one namespace per
dataset, what ships, a submission, the ladder again, and the run's name and tags from the
command line. (Course rules, tuning and resume: test_course_rules.py.)"""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.cli import main
from pairnet.data.pairs import load_pairs
from pairnet.data.splits import val_parts
from pairnet.pipeline import PipelineRequest, run_pipeline
from pairnet.predict import check_submission
from test_realdata import user_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOWERS = "pairnet-pretrain-"


def _runs(experiment: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _names_made_by(experiment: str) -> set[str]:
    return {r.data.tags[names.TAG_REGISTERED_NAME] for r in _runs(experiment)
            if names.TAG_REGISTERED_NAME in r.data.tags and r.info.status == "FINISHED"}


def test_the_plan_trains_nothing_and_writes_nothing(mlflow_server, tmp_path, monkeypatch, capsys):
    own, state = tmp_path / "own", tmp_path / "state"
    monkeypatch.setenv("PAIRNET_DATA_DIR", str(own))
    monkeypatch.setenv("PAIRNET_STATE_DIR", str(state))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "it-plan")
    assert main(["pipeline", "--preset", "tiny", "--plan"]) == 0
    out = capsys.readouterr().out
    for label in ("data", "pretrain/resnet_optimized/seed42", "stage2/resnet_optimized/seed42",
                  "stage3/resnet_fusion/seed42", "stage2/resnet_optimized/seed42/scratch", "stack", "predict",
                  "in all"):
        assert f"  {label} " in out, label
    assert "estimates from this machine's measured throughput" in out
    assert not own.exists() and not state.exists()  # no data made, no lock taken, the probed speeds not kept
    assert MlflowClient().get_experiment_by_name("it-plan") is None  # no experiment, so no run


def test_the_main_job_then_a_folder_share_only_the_towers(mlflow_server, tmp_path, monkeypatch, capsys):
    own = tmp_path / "own"
    monkeypatch.setenv("PAIRNET_DATA_DIR", str(own))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "it-ns-main")
    main_job = run_pipeline(PipelineRequest(preset="tiny", device="cpu"))
    folder = user_folder(tmp_path / "Course 2026", seed=23)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # left by the first run's set_experiment
    course = run_pipeline(PipelineRequest(preset="tiny", data_dir=str(folder), device="cpu", seed=5))
    demo, mine = _names_made_by("it-ns-main"), _names_made_by("course-2026")
    assert all(n.startswith(("pairnet-", TOWERS)) for n in demo)
    assert mine and all(n.startswith(("course-2026-", TOWERS)) for n in mine)
    assert not {n for n in demo & mine if not n.startswith(TOWERS)}
    client = MlflowClient()
    assert client.get_experiment_by_name("course-2026").tags[names.TAG_NAMESPACE] == "course-2026"
    # Each namespace's champions were judged on that namespace's own val data: the folder's are
    # its own versions; the demo's may be older versions from other data (other tests on this
    # server), which then carry their figure on this val, measured at the gate.
    for name, d in [(n, folder) for n in mine if not n.startswith(TOWERS)] + \
                   [(n, own) for n in demo if not n.startswith(TOWERS)]:
        champion = client.get_model_version_by_alias(name, "champion")
        digest = val_parts(load_pairs(d / "val.npz"))[1].digest()  # the gate part of its val
        assert champion.tags["gate_digest"] == digest or f"gate_acc_on.{digest}" in champion.tags, name
        if d == folder:
            assert champion.tags["gate_digest"] == digest, name
    # A plain stack in the folder's experiment takes that namespace's champions.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "course-2026")
    assert main(["stack", "--data-dir", str(folder), "--preset", "tiny"]) == 0
    assert "course-2026-stack v" in capsys.readouterr().out

    # What ships: the stack only when its out-of-fold val is above every base model's val (the
    # zero-shot tower included); else the best of those. The ladder marks it, the run names it.
    bases = [r for r in course["table"] if " (zero-shot" in r["model"]
             or (r["stage"] in ("stage1", "stage2", "stage3") and not r["model"].endswith(" (from scratch)"))]
    stack = course["table"][-1]
    top = max(r["val_acc"] for r in bases)
    shipped = [r for r in course["table"] if r["ships"]]
    if stack["val_acc"] > top:
        assert shipped == [stack]
    else:  # one of the best (tiny models tie often)
        assert len(shipped) == 1 and shipped[0] in bases and shipped[0]["val_acc"] == top
    assert client.get_run(course["run_id"]).data.tags["pairnet.ships"] == course["ships"]

    # The submission: the model the pipeline shipped, checked, and never over a file it did not write.
    sub = tmp_path / "submission.csv"
    assert main(["submit", "--data-dir", str(folder), "--out", str(sub)]) == 0
    said = capsys.readouterr().out
    assert f"made by {course['ships']}" in said and check_submission(folder / "test_private.npz", sub) == []
    assert main(["submit", "--data-dir", str(folder), "--out", str(sub)]) == 0  # its own output: replaced
    theirs = tmp_path / "notes.csv"
    theirs.write_text("id,label\nmine,1\n")
    assert main(["submit", "--data-dir", str(folder), "--out", str(theirs)]) == 2
    assert theirs.read_text() == "id,label\nmine,1\n"
    assert "refusing to overwrite" in capsys.readouterr().err

    # The ladder again, and as one page with the figures inlined.
    page = tmp_path / "ladder.html"
    assert main(["report", "--experiment-name", "course-2026", "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    shipped = [r["model"] for r in course["table"] if r["ships"]]
    assert len(shipped) == 1 and f"* {shipped[0]}" in printed
    text = page.read_text()
    assert "<table>" in text and "data:image/png;base64," in text and "pipeline plan:" in text
    assert main_job["table"][-1]["model"] == "pairnet-stack"


def test_experiment_run_name_and_tags_from_the_command_line(mlflow_server, tiny_data, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert main(["stage2", "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name", "compare_cnn",
                 "--experiment-name", "it-cli-names", "--run-name", "my first cnn", "--tag", "course=ml101",
                 "--tag", "week=3"]) == 0
    (run,) = _runs("it-cli-names")
    assert run.info.run_name == "my first cnn" and run.info.status == "FINISHED"
    assert run.data.tags["course"] == "ml101" and run.data.tags["week"] == "3"
    assert "MLFLOW_EXPERIMENT_NAME" not in os.environ and "PAIRNET_RUN_NAME" not in os.environ  # put back
    assert main(["stage2", "--preset", "tiny", "--data-dir", str(tiny_data), "--tag", "no-equals-sign"]) == 2
    assert "--tag 'no-equals-sign' must look like KEY=VALUE" in capsys.readouterr().err
