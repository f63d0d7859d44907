"""Pipeline step keys: change one parameter, the data or the code, and exactly the steps
that depend on it get a new key (and so rerun); every other step keeps its key (reused).

A step whose key changes registers a new version when it reruns, and the steps started
from that version (fine-tuned models, the stack, the predictions) name it in their own
keys; ``plan`` follows that chain the way a rerun would. The pipeline does the same: it hands
each fine-tuning step the exact version its own pretrain step registered or reused, never
whichever version holds ``@champion`` (``test_realdata.py::
test_finetuning_starts_from_the_exact_pretrained_version_not_the_alias`` checks that on a real
pipeline while another version is champion), so what ``plan`` assumes is what a rerun does.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pairnet.data.generate import GenConfig, make_dataset
from pairnet.data.pairs import write_npz
from pairnet.data.splits import load_splits
from pairnet.pipeline import PLANS, PRETRAIN, PipelineRequest, predict_key, stack_key, train_key
from pairnet.presets import PRESETS

ENV = {"torch": "2.13.0", "mlflow": "3.17.2", "lightgbm": "4.6.0", "scikit-learn": "1.7.0"}


def plan(d, *, code: str = "code-1", env: dict = ENV, base: dict | None = None) -> dict[str, str]:
    """Every step's key for the tiny pipeline on data folder ``d``. A step whose key differs
    from ``base`` is taken to have registered version 2 on its rerun, version 1 otherwise."""
    req = PipelineRequest(preset="tiny", data_dir=str(d), device="cpu")
    splits = load_splits(d, "tiny")
    keys: dict[str, str] = {}

    def version(label: str, name: str) -> str:
        return f"models:/{name}/{1 if base is None or base[label] == keys[label] else 2}"

    pretrained = {}
    for variant in PRETRAIN["tiny"]:
        _, name, label, keys[label] = train_key("pretrain", variant, 42, None, req, splits, code, env)
        pretrained[variant] = version(label, name)
    bases = []
    for stage, variant, seed, init in PLANS["tiny"]:
        _, name, label, keys[label] = train_key(stage, variant, seed, pretrained[init] if init else None, req,
                                                splits, code, env)
        bases.append(version(label, name))
    keys["stack"] = stack_key(",".join(bases[:-1]), d, code, env)  # the last is the from-scratch twin
    keys["predict"] = predict_key(version("stack", "pairnet-stack"), d, code, env)
    return keys


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {step for step in before if before[step] != after[step]}


PRETRAIN_STEP = "pretrain/resnet_optimized/seed42"
FINETUNED = {"stage2/resnet_optimized/seed42", "stage3/resnet_fusion/seed42"}
SCRATCH = "stage2/resnet_optimized/seed42/scratch"


@pytest.fixture(scope="module")
def base(tiny_data):
    keys = plan(tiny_data)
    assert keys == plan(tiny_data)  # nothing changed: every step is reused
    assert keys.keys() == {PRETRAIN_STEP, *FINETUNED, SCRATCH, "stack", "predict"}
    return keys


def test_a_finetuning_parameter_reruns_the_finetuned_steps_and_what_follows(base, tiny_data, monkeypatch):
    monkeypatch.setitem(PRESETS["tiny"], "finetune", {"epochs": 3})
    assert changed(base, plan(tiny_data, base=base)) == FINETUNED | {"stack", "predict"}


def test_a_pretraining_parameter_reruns_pretrain_and_everything_started_from_it(base, tiny_data, monkeypatch):
    monkeypatch.setitem(PRESETS["tiny"], "pretrain", {"lr": 0.01})
    # The from-scratch twin neither reads the pretrained tower nor feeds the stack.
    assert changed(base, plan(tiny_data, base=base)) == {PRETRAIN_STEP} | FINETUNED | {"stack", "predict"}


def test_a_scratch_only_parameter_reruns_the_scratch_twin_alone(base, tiny_data, monkeypatch):
    monkeypatch.setitem(PRESETS["tiny"], "train", {**PRESETS["tiny"]["train"], "patience": 1})
    monkeypatch.setitem(PRESETS["tiny"], "pretrain", {"patience": 0})
    monkeypatch.setitem(PRESETS["tiny"], "finetune", {"patience": 0})
    assert changed(base, plan(tiny_data, base=base)) == {SCRATCH}


def test_the_private_test_file_reruns_only_stack_and_predict(base, tiny_data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(tiny_data, d)
    with np.load(d / "test_private.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["x"][0, 0, 0] ^= 1  # one pixel
    write_npz(d / "test_private.npz", arrays)
    assert changed(base, plan(d, base=base)) == {"stack", "predict"}


def test_another_data_seed_reruns_every_step(base, tmp_path):
    d = tmp_path / "seed4"
    make_dataset(d, GenConfig(size="tiny", seed=4))  # the fixture's data uses seed 3
    assert changed(base, plan(d, base=base)) == set(base)


def test_new_code_or_library_versions_rerun_every_step(base, tiny_data):
    assert changed(base, plan(tiny_data, code="code-2", base=base)) == set(base)
    assert changed(base, plan(tiny_data, env={**ENV, "torch": "2.14.0"}, base=base)) == set(base)


def test_a_folder_without_digits_pretrains_with_the_presets_default_pretrain_values(tiny_data):
    """At quick, the towers for a folder without digit labels pretrain on the full default set for
    8 epochs (bench/real_bench.py: 0.859 zero-shot on real pairs against the quick set's 0.792);
    those values are in the pretrain step's config and key."""
    assert PRESETS["quick"]["default_pretrain"] == {"data_size": "full", "pretrain": {"epochs": 8}}
    req = PipelineRequest(preset="quick", data_dir=str(tiny_data), device="cpu")
    splits = load_splits(tiny_data, "tiny")
    plain = train_key("pretrain", "resnet_optimized", 42, None, req, splits, "code-1", ENV)
    beside = train_key("pretrain", "resnet_optimized", 42, None, req, splits, "code-1", ENV,
                       PRESETS["quick"]["default_pretrain"]["pretrain"])
    assert (plain[0].epochs, beside[0].epochs) == (10, 8) and plain[3] != beside[3]
    assert {k: v for k, v in plain[0].to_dict().items() if k != "epochs"} == {
        k: v for k, v in beside[0].to_dict().items() if k != "epochs"}


def test_the_default_pretrain_path_makes_the_presets_default_set_beside_a_digitless_folder(tmp_path, monkeypatch):
    """``decide`` and ``pretrain_splits`` with a patched ``default_pretrain``: a folder without
    digit labels gets its towers pretrained on the default set of the size the preset names, in
    pairnet's own folder, with the preset's values; a folder with digit labels pretrains on itself."""
    from pairnet.paths import default_set_dir
    from pairnet.pipeline import decide, pretrain_splits

    monkeypatch.setenv("PAIRNET_DATA_DIR", str(tmp_path / "own"))
    monkeypatch.setitem(PRESETS["tiny"], "default_pretrain", {"data_size": "tiny", "pretrain": {"epochs": 3}})
    made = tmp_path / "made"
    make_dataset(made, GenConfig(size="tiny", seed=4))
    mine = tmp_path / "mine"
    mine.mkdir()
    for f in made.glob("*.npz"):
        with np.load(f, allow_pickle=False) as z:
            write_npz(mine / f.name, {k: z[k] for k in z.files if k in ("x", "y", "id")})
    shutil.copy(made / "test_public_labels.csv", mine)
    req = PipelineRequest(preset="tiny", data_dir=str(mine), device="cpu", seed=4)
    recipe = decide(req, PRESETS["tiny"], mine)
    assert recipe.beside and recipe.tower_dir == default_set_dir("tiny") and recipe.tower_values == {"epochs": 3}
    assert not recipe.tower_dir.exists()  # deciding makes nothing
    pre, values = pretrain_splits(recipe, req, load_splits(mine, "tiny"))
    assert values == {"epochs": 3} and pre.data_dir.resolve() == default_set_dir("tiny").resolve()
    assert "digit_a" in pre.train.extras and pre.train.digest() == load_splits(made, "tiny").train.digest()
    # A folder that carries digit labels pretrains on itself, with no values added.
    own = decide(PipelineRequest(preset="tiny", data_dir=str(made), device="cpu"), PRESETS["tiny"], made)
    assert not own.beside and own.tower_dir == made and pretrain_splits(own, req, pre)[1] == {}
    # Course rules: no tower at all.
    none = decide(PipelineRequest(preset="tiny", data_dir=str(mine), pretrain="none"), PRESETS["tiny"], mine)
    assert none.towers == () and none.twin is None and all(init is None for *_, init in none.models)
