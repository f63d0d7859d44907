"""A user's own folder of pairs without digit labels: the pipeline end to end (pretraining on
the default set kept in pairnet's own folder, fine-tuning from that exact version), a champion
gate that compares figures measured on the same val data, and one-line refusals."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pairnet.cli import main
from pairnet.data.generate import GenConfig, make_dataset
from pairnet.data.pairs import load_pairs, write_npz
from pairnet.data.splits import load_splits, val_parts
from pairnet.paths import default_set_dir
from pairnet.pipeline import PipelineRequest, run_pipeline
from pairnet.presets import PRESETS
from pairnet.tracking.model import accuracies_on, accuracy_on
from pairnet.tracking.registry import champion_version, gate_margin, promote

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOWER = "pairnet-pretrain-resnet_optimized"
SEED = 7
STEPS = {"pretrain/resnet_optimized/seed42", "stage2/resnet_optimized/seed42", "stage3/resnet_fusion/seed42",
         "stage2/resnet_optimized/seed42/scratch", "stack", "predict"}


def user_folder(dst: Path, seed: int) -> Path:
    """A folder in the course format as users bring it: x, y and id only (no digit arrays)."""
    src = dst.parent / f"{dst.name}-made"
    make_dataset(src, GenConfig(size="tiny", seed=seed))
    dst.mkdir()
    for f in src.glob("*.npz"):
        with np.load(f, allow_pickle=False) as z:
            write_npz(dst / f.name, {k: z[k] for k in z.files if k in ("x", "y", "id")})
    (dst / "test_public_labels.csv").write_bytes((src / "test_public_labels.csv").read_bytes())
    return dst


@pytest.fixture(scope="module")
def user_run(mlflow_server, tmp_path_factory):
    """The tiny pipeline on a digitless folder, then again unchanged; pairnet's own data folder
    (where the default set for pretraining goes) is a temporary one."""
    root = tmp_path_factory.mktemp("realdata")
    user = user_folder(root / "mine", seed=11)
    before = sorted(p.name for p in user.iterdir())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAIRNET_DATA_DIR", str(root / "own"))
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "it-realdata")
        # Data seed 7: this folder's default set (and so its tower) is not the journey's (seed 42).
        # tta: the zero-shot rows and the predictions by the mean over test-time shifts.
        first = run_pipeline(PipelineRequest(preset="tiny", data_dir=str(user), device="cpu", seed=SEED, tta=True))
        second = run_pipeline(PipelineRequest(preset="tiny", data_dir=str(user), device="cpu", seed=SEED, tta=True))
        yield {"root": root, "user": user, "before": before, "first": first, "second": second, "mp": mp}


def _children(parent: str):
    client = MlflowClient()
    run = client.get_run(parent)
    return client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def _tower(out: dict) -> dict:
    """The pipeline's pretrain row: trained by it, or reused from any run with the same key."""
    (row,) = [r for r in out["table"] if r["stage"] == "pretrain" and "zero-shot" not in r["model"]]
    return row


def test_a_digitless_folder_runs_end_to_end_from_a_tower_pretrained_on_the_default_set(user_run):
    first, user, root = user_run["first"], user_run["user"], user_run["root"]
    own = root / "own" / "default" / "tiny"
    assert own.resolve() == default_set_dir("tiny").resolve()
    assert "digit_a" in load_pairs(own / "train.npz").extras  # the tower learned digits there
    # Its step key hashes the files, not their folder: a tower another pipeline made on the same
    # default set (byte-identical) is reused, else it is trained here, on that folder.
    version = _tower(first)["version"]
    pre = MlflowClient().get_run(MlflowClient().get_model_version(TOWER, version).run_id)
    splits = load_splits(own, "tiny")
    assert pre.data.tags["pairnet.data_digest"] == splits.digest()
    rows = {r["model"]: r for r in first["table"]}
    # The ladder: the tower on the user's data before any fine-tuning, then the fine-tuned models.
    zero = rows[f"{TOWER} (zero-shot, shifts)"]
    assert zero["version"] == version
    val = load_pairs(user / "val.npz")
    assert zero["val_acc"] == pytest.approx(accuracies_on(f"models:/{TOWER}/{version}", val, tta=True)[0])
    run = MlflowClient().get_run(first["run_id"])
    assert run.data.params["pipeline.tta"] == "True"
    (predict,) = [c for c in _children(first["run_id"]) if c.data.tags.get("pairnet.stage") == "predict"]
    assert predict.data.params["predict.tta"] == "True"
    # submit predicts as the pipeline that shipped the model did: with the shifts.
    sub = root / "submission.csv"
    assert main(["submit", "--data-dir", str(user), "--out", str(sub)]) == 0
    assert sub.read_text() == (user / "predictions_private.csv").read_text()
    finetuned = [c for c in _children(first["run_id"]) if c.data.tags.get("pairnet.init_from")]
    assert len(finetuned) == 2
    assert {c.data.tags["pairnet.init_from"] for c in finetuned} == {f"models:/{TOWER}/{version}"}
    assert all(c.data.params["data.dir"] == str(user) for c in finetuned)
    assert all(c.data.params["cfg.aux_digit_weight"] == "0.0" for c in finetuned)  # no digits there
    # Nothing of pairnet's lands in the user's folder but the predictions it asked for.
    assert sorted(p.name for p in user.iterdir()) == sorted(user_run["before"] + ["predictions_private.csv"])


def test_a_rerun_on_the_folder_reuses_every_step(user_run):
    second = user_run["second"]
    assert set(second["reused"]) == STEPS
    assert not [c for c in _children(second["run_id"]) if c.data.tags["pairnet.stage"] != "data"]


def test_finetuning_starts_from_the_exact_pretrained_version_not_the_alias(user_run, tiny_data):
    """Another tower version holds @champion; a rerun whose fine-tuning changed still starts
    from the version its own pretrain step reused."""
    from pairnet.stages import StageRequest, run_single

    mp, user = user_run["mp"], user_run["user"]
    ours = _tower(user_run["first"])["version"]
    other = run_single("pretrain", StageRequest(preset="tiny", data_dir=str(tiny_data),
                                                explicit={"model_name": "resnet_optimized", "seed": 9}))
    promote(TOWER, other["version"])
    assert champion_version(TOWER).version == other["version"] != ours
    mp.setitem(PRESETS["tiny"], "finetune", {**PRESETS["tiny"]["finetune"], "label_smoothing": 0.05})
    third = run_pipeline(PipelineRequest(preset="tiny", data_dir=str(user), device="cpu", seed=SEED))
    assert "pretrain/resnet_optimized/seed42" in third["reused"]
    rerun = [c for c in _children(third["run_id"]) if c.data.tags.get("pairnet.init_from")]
    assert len(rerun) == 2 and {c.data.tags["pairnet.init_from"] for c in rerun} == {f"models:/{TOWER}/{ours}"}


def test_the_champion_gate_compares_on_the_new_versions_gate_part(mlflow_server, tiny_data, tmp_path):
    """A model trained on data A is champion; a model trained on data B is judged against the
    champion's accuracy on the gate part of B's val (every 5th pair, which no training chose on),
    measured at the gate and recorded on both versions."""
    name = "pairnet-compare_cnn-seed77"
    other = user_folder(tmp_path / "b", seed=12)
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "it-fair-gate"
    try:
        for d in (tiny_data, other):
            assert main(["stage3", "--preset", "tiny", "--data-dir", str(d), "--members", "compare_cnn:77"]) == 0
    finally:
        os.environ.pop("MLFLOW_EXPERIMENT_NAME")
    client = MlflowClient()
    first, second = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))[-2:]
    val_b = load_pairs(other / "val.npz")
    gate_b = val_parts(val_b)[1]
    assert len(gate_b) == len(val_b) // 5 and np.array_equal(gate_b.x, val_b.x[4::5])
    assert first.tags["val_digest"] == load_pairs(tiny_data / "val.npz").digest()
    assert second.tags["val_digest"] == val_b.digest() != first.tags["val_digest"]
    assert second.tags["gate_digest"] == gate_b.digest() != first.tags["gate_digest"]
    champ = client.get_model_version(name, first.version)  # champion when the second was gated
    on_b = accuracy_on(f"models:/{name}/{first.version}", gate_b)
    assert float(champ.tags[f"gate_acc_on.{gate_b.digest()}"]) == pytest.approx(on_b, abs=1e-6)
    assert float(second.tags["champion_gate_acc"]) == pytest.approx(on_b, abs=1e-6)
    assert second.tags["champion_compared"] == f"v{first.version} (evaluated on this gate part)"
    # The newcomer's own figure there: its registered weights on the gate part, not its best epoch.
    mine = accuracy_on(f"models:/{name}/{second.version}", gate_b)
    assert float(second.tags["gate_acc"]) == pytest.approx(mine, abs=1e-6)
    promoted = mine > on_b + gate_margin(on_b, len(gate_b), 1.0)
    params = client.get_run(second.run_id).data.params  # fit chose on the other 4 pairs in 5
    assert int(params["data.n_val_gate"]) == len(gate_b)
    assert int(params["data.n_val_select"]) == len(val_b) - len(gate_b)
    assert champion_version(name).version == (second.version if promoted else first.version)
    decision = client.get_run(second.run_id).data.tags["pairnet.champion_decision"]
    assert decision == ("promoted" if promoted else "kept")


def test_a_mistyped_data_folder_is_one_line_and_nothing_is_made(mlflow_server, tmp_path, capsys):
    typo = tmp_path / "dta"
    assert main(["stage2", "--preset", "tiny", "--data-dir", str(typo), "--model-name", "compare_cnn"]) == 2
    assert main(["pipeline", "--preset", "tiny", "--data-dir", str(typo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"{typo} holds no pair files" in line for line in err)
    assert not typo.exists()


def test_one_init_from_names_the_stage3_members_it_fits(user_run, capsys):
    uri = f"models:/{TOWER}/{_tower(user_run['first'])['version']}"
    code = main(["stage3", "--preset", "tiny", "--data-dir", str(user_run["user"]), "--init-from", uri,
                 "--members", "resnet_fusion:1,compare_cnn:2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "does not fit the tower of compare_cnn:2" in err and "--members resnet_fusion:1" in err


def test_the_project_data_folder_holding_another_presets_set_gives_way_to_that_presets_folder(tmp_path,
                                                                                                monkeypatch):
    from pairnet.data.splits import preset_data_dir

    own = tmp_path / "data"
    monkeypatch.setenv("PAIRNET_DATA_DIR", str(own))
    own.mkdir()
    (own / "meta.json").write_text('{"size": "quick", "seed": 42}')  # what the quick main job leaves
    assert preset_data_dir(own, "quick") == own
    assert preset_data_dir(own, "full") == default_set_dir("full") == own.resolve() / "default" / "full"
    mine = tmp_path / "mine"
    shutil.copytree(own, mine)  # a folder of the user's is never swapped
    assert preset_data_dir(mine, "full") == mine


def test_init_from_pretrained_finds_the_tower_of_the_runs_preset(user_run, capsys):
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "it-realdata"
    try:
        out = main(["stage2", "--preset", "tiny", "--data-dir", str(user_run["user"]),
                              "--model-name", "resnet_fusion", "--init-from", "pretrained"])
        assert out == 0
        # No tower was pretrained at quick in this session: one line says how to make one.
        assert main(["stage2", "--preset", "quick", "--data-dir", str(user_run["user"]),
                               "--model-name", "resnet_fusion", "--init-from", "pretrained"]) == 2
    finally:
        os.environ.pop("MLFLOW_EXPERIMENT_NAME")
    err = capsys.readouterr().err
    assert "init_from=pretrained: no pretrained tower of preset quick fits" in err
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("it-realdata").experiment_id],
                                filter_string="tags.`pairnet.model` = 'resnet_fusion' and "
                                              "tags.`pairnet.stage` = 'stage2'")
    uri = run.data.tags["pairnet.init_from"]
    assert uri.startswith(f"models:/{TOWER}/") and run.data.params["cfg.init_from"] == uri
    name, version = uri.removeprefix("models:/").split("/")
    assert client.get_model_version(name, version).tags["preset"] == "tiny"
