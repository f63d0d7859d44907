"""Pair files: the data contract, every bad input a user can give, the default dataset."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from pairnet.cli import main
from pairnet.data.generate import (
    GENERATOR_VERSION,
    POOL_SHARE,
    SIZES,
    GenConfig,
    base_scans,
    make_dataset,
    split_pools,
)
from pairnet.data.pairs import load_pairs, write_npz
from pairnet.data.profile import (
    REAL_PROFILE,
    compare,
    load_reference,
    profile,
    profile_report,
)
from pairnet.errors import PairnetError


def _good(n=8, **over):
    arrays = {
        "x": np.zeros((n, 28, 56), np.uint8),
        "y": np.arange(n) % 2,
        "id": np.array([f"PUB_{i:07d}" for i in range(n)]),
    }
    arrays.update(over)
    return {k: v for k, v in arrays.items() if v is not None}


def _write(tmp_path, name="pairs.npz", **over):
    path = tmp_path / name
    write_npz(path, _good(**over))
    return path


def _run_check(capsys, *argv):
    code = main(["data", "check", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return code, err


def test_good_file_summary(tmp_path, capsys):
    path = _write(tmp_path)
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "N=8" in out and "label 1 share 0.500" in out and "PUB_ + 7 digits" in out


BAD_ARRAYS = {
    "x_float32": dict(x=np.zeros((4, 28, 56), np.float32)),
    "x_int64": dict(x=np.zeros((4, 28, 56), np.int64)),
    "x_28x28": dict(x=np.zeros((4, 28, 28), np.uint8)),
    "x_56x28": dict(x=np.zeros((4, 56, 28), np.uint8)),
    "x_4d": dict(x=np.zeros((4, 1, 28, 56), np.uint8)),
    "no_x": dict(x=None),
    "empty": dict(x=np.zeros((0, 28, 56), np.uint8), y=np.zeros(0, np.int64), id=np.array([], dtype="<U11")),
    "y_length": dict(y=np.zeros(5, np.int64)),
    "y_values": dict(y=np.array([0, 1, 2, 0, 1, 0, 1, 0])),
    "y_nan": dict(y=np.array([0, 1, np.nan, 0, 1, 0, 1, 0])),
    "dup_ids": dict(id=np.array(["A"] * 8)),
}
EXPECTED = {
    "x_float32": "dtype float32",
    "x_int64": "dtype int64",
    "x_28x28": "shape (4, 28, 28)",
    "x_56x28": "shape (4, 56, 28)",
    "x_4d": "shape (4, 1, 28, 56)",
    "no_x": "no 'x' array",
    "empty": "empty",
    "y_length": "'y' has shape (5,)",
    "y_values": "'y' holds 2",
    "y_nan": "NaN",
    "dup_ids": "duplicate ids",
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_arrays_one_line_exit_2(tmp_path, capsys, case):
    over = dict(BAD_ARRAYS[case])
    n = over.get("x").shape[0] if over.get("x") is not None else 8
    if case.startswith("x_"):
        over.setdefault("y", np.arange(n) % 2)
        over.setdefault("id", np.array([f"P{i}" for i in range(n)]))
    path = _write(tmp_path, **over)
    code, err = _run_check(capsys, path)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert str(path) in err and EXPECTED[case] in err


def test_missing_file(tmp_path, capsys):
    code, err = _run_check(capsys, tmp_path / "nope.npz")
    assert code == 2 and "nope.npz: no such file" in err


def test_not_an_npz(tmp_path, capsys):
    path = tmp_path / "text.npz"
    path.write_text("hello")
    code, err = _run_check(capsys, path)
    assert code == 2 and "not a readable .npz" in err and str(path) in err


def test_truncated_zip(tmp_path, capsys):
    good = _write(tmp_path)
    path = tmp_path / "cut.npz"
    path.write_bytes(good.read_bytes()[:300])
    code, err = _run_check(capsys, path)
    assert code == 2 and "not a readable .npz" in err and len(err.splitlines()) == 1


def test_pickled_arrays_refused_without_unpickling(tmp_path, capsys):
    path = tmp_path / "pickled.npz"
    sentinel = tmp_path / "was_unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    np.savez(path, x=np.zeros((2, 28, 56), np.uint8), id=np.array([Boom(), Boom()], dtype=object))
    code, err = _run_check(capsys, path)
    assert code == 2 and "object (pickled) arrays" in err
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "csv_text, expected",
    [
        ("name,value\nPUB_0000000,1\n", "header"),
        ("id,label\nPUB_0000000,1\n", "have no label"),
        ("id,label\n" + "".join(f"PUB_{i:07d},{i % 2}\n" for i in range(8)) + "ZZZ,1\n", "not in"),
        ("id,label\n" + "".join(f"PUB_{i:07d},x\n" for i in range(8)), "not an integer"),
    ],
    ids=["wrong_header", "missing_ids", "unknown_ids", "non_integer"],
)
def test_bad_labels_csv(tmp_path, capsys, csv_text, expected):
    path = _write(tmp_path, y=None)
    labels = tmp_path / "labels.csv"
    labels.write_text(csv_text)
    code, err = _run_check(capsys, path, "--labels", labels)
    assert code == 2 and expected in err and "labels.csv" in err and len(err.splitlines()) == 1


def test_labels_csv_joined_by_id(tmp_path):
    path = _write(tmp_path, y=None)
    labels = tmp_path / "labels.csv"
    rows = [f"PUB_{i:07d},{(i * 7) % 2}" for i in reversed(range(8))]
    labels.write_text("id,label\n" + "\n".join(rows) + "\n")
    pairs = load_pairs(path, labels=labels)
    assert pairs.y.tolist() == [(i * 7) % 2 for i in range(8)]


def test_cli_subprocess_prints_one_line_no_traceback(tmp_path):
    path = _write(tmp_path, x=np.zeros((4, 28, 28), np.uint8), y=None, id=None)
    proc = subprocess.run([sys.executable, "-m", "pairnet.cli", "data", "check", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr and str(path) in proc.stderr


# ------------------------------------------------------------- default dataset
def test_default_dataset_contract(tiny_data):
    sizes = SIZES["tiny"]
    for name, split in [("train", "train"), ("val", "val")]:
        pairs = load_pairs(tiny_data / f"{name}.npz")
        assert pairs.x.shape == (sizes[split], 28, 56) and pairs.x.dtype == np.uint8
        assert pairs.y.mean() == 0.5
        assert set(pairs.extras) >= {"digit_a", "digit_b"}
        assert np.all((pairs.extras["digit_a"] > pairs.extras["digit_b"]) == (pairs.y == 1))
    public = np.load(tiny_data / "test_public.npz")
    assert sorted(public.files) == ["id", "x"] and public["id"][0] == "PUB_0000000"
    private = np.load(tiny_data / "test_private.npz")
    assert sorted(private.files) == ["id", "x"] and private["id"][0] == "PRV_0000000"
    joined = load_pairs(tiny_data / "test_public.npz", labels=tiny_data / "test_public_labels.csv")
    assert joined.y.mean() == 0.5
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["severity"]["train"] == 6 and meta["weight_diff1"] == 0.8
    assert 0.3 < meta["stats"]["train"]["zero_share"] < 0.6


def test_neighbour_share(tiny_data):
    pairs = load_pairs(tiny_data / "train.npz")
    diff = np.abs(pairs.extras["digit_a"].astype(int) - pairs.extras["digit_b"])
    assert diff.min() >= 1
    assert 0.7 < (diff == 1).mean() < 0.9


def test_no_base_scan_shared_between_splits(tiny_data):
    scans = {}
    for name in ("train", "val"):
        p = load_pairs(tiny_data / f"{name}.npz")
        scans[name] = set(p.extras["scan_a"].tolist()) | set(p.extras["scan_b"].tolist())
    assert scans["train"].isdisjoint(scans["val"])


@pytest.mark.parametrize("bases, per_class", [("mnist", 500), ("sklearn", None)])
def test_pools_disjoint_and_cover_every_scan(bases, per_class):
    _, targets = base_scans(bases)
    pools = split_pools(targets, seed=3)
    seen = set()
    for split in pools.values():
        ids = set(np.concatenate(list(split.values())).tolist())
        assert seen.isdisjoint(ids)
        seen |= ids
    assert len(seen) == targets.size
    if per_class:  # MNIST: 500 scans per class, ~350 of them in the train pool
        assert {p.size for p in pools["train"].values()} == {round(POOL_SHARE["train"] * per_class)} == {350}


def test_a_larger_train_scan_share_grows_the_train_pool_and_keeps_pools_disjoint(tmp_path):
    _, targets = base_scans("mnist")
    small, large = split_pools(targets, seed=3), split_pools(targets, seed=3, train_scans=0.88)
    for cls in range(10):
        assert set(small["train"][cls]) < set(large["train"][cls])  # the same scans and more
        assert large["train"][cls].size == 440 and large["val"][cls].size == 24
        ids = np.concatenate([large[s][cls] for s in large])
        assert np.unique(ids).size == ids.size == 500
    meta = make_dataset(tmp_path, GenConfig(size="tiny", seed=3, train_scans=0.88))
    assert meta["base_scans_per_class"]["train"] == [440] and meta["config"]["train_scans"] == 0.88


def test_a_train_scan_share_that_empties_a_split_is_refused(tmp_path):
    with pytest.raises(PairnetError, match=r"train scan share 0.99 is outside \[0.1, 0.94\]"):
        make_dataset(tmp_path, GenConfig(size="tiny", train_scans=0.99))
    _, targets = base_scans("sklearn")  # ~180 scans per class: 0.99 leaves the public pool none
    with pytest.raises(PairnetError, match="leaves the public split no scan of digit"):
        split_pools(targets, seed=3, train_scans=0.99)


@pytest.mark.parametrize("bases", ["mnist", "sklearn"])
def test_both_bases_make_a_valid_set(tmp_path, bases):
    meta = make_dataset(tmp_path, GenConfig(size="tiny", seed=5, bases=bases))
    saved = json.loads((tmp_path / "meta.json").read_text())
    assert saved["bases"] == meta["bases"] == bases and saved["generator_version"] == GENERATOR_VERSION == 2
    assert saved["config"]["bases"] == bases
    train = load_pairs(tmp_path / "train.npz")
    assert train.x.shape == (SIZES["tiny"]["train"], 28, 56) and train.y.mean() == 0.5
    assert np.all((train.extras["digit_a"] > train.extras["digit_b"]) == (train.y == 1))
    realism = saved["realism"]
    assert realism["split"] == "train" and REAL_PROFILE.name in realism["gap_vs"]
    assert realism["realism_gap"] == round(compare(profile(train.x), load_reference(REAL_PROFILE))[0], 4)


def test_unknown_bases_names_the_choices(tmp_path):
    with pytest.raises(PairnetError, match="unknown bases 'emnist'; choose one of mnist, sklearn"):
        make_dataset(tmp_path, GenConfig(size="tiny", bases="emnist"))


def test_severity_zero_is_clean_and_severity_raises_the_corruption(tmp_path):
    zero, stats = {}, {}
    for sev in (0, 6, 10):
        meta = make_dataset(tmp_path / str(sev), GenConfig(size="tiny", seed=2, severity=sev))
        stats[sev] = meta["stats"]["train"]
        zero[sev] = stats[sev]["zero_share"]
    assert zero[0] > 0.6  # clean digits on a black ground: no haze
    assert 0.3 < zero[6] < 0.6
    # At 10 the strokes fade into the dark (measured: 0.81 zero, mean pixel 4 against 16 at 6):
    # black comes back because the signal is going, not the haze.
    assert zero[10] > 0.6
    means = [stats[s]["mean_pixel"] for s in (0, 6, 10)]
    bright = [stats[s]["over_200_share"] for s in (0, 6, 10)]
    assert means == sorted(means, reverse=True) and means[2] < means[1] / 2
    assert bright == sorted(bright, reverse=True) and bright[2] < 0.005  # hardly a full stroke left


# ------------------------------------------------------------------ profiling
def test_profile_of_a_file_against_itself_is_zero(tiny_data):
    text, figures = profile_report(tiny_data / "train.npz", against=tiny_data / "train.npz")
    assert figures["realism_gap"] == 0.0 and figures["statistics"] > 100
    assert "realism_gap 0.0000" in text


def test_profile_report_against_the_shipped_real_profile(tiny_data, tmp_path):
    text, figures = profile_report(tiny_data / "train.npz", against=REAL_PROFILE, top=5)
    assert 0 < figures["realism_gap"] < 1 and len(figures["largest_gaps"]) == 5
    assert len(text.splitlines()) == 1 + 5 + 1
    # A profile written as JSON is a reference too, and gives the same gap as the file.
    saved = tmp_path / "train_profile.json"
    saved.write_text(json.dumps(figures["profile"]))
    assert profile_report(tiny_data / "val.npz", against=saved)[1]["realism_gap"] == \
        profile_report(tiny_data / "val.npz", against=tiny_data / "train.npz")[1]["realism_gap"]
    plain, figures = profile_report(tiny_data / "val.npz")
    assert "realism_gap" not in figures and "pixels_0_0" in plain


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        ("not json {", "not a pair .npz and not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"pixel_mean": "high"}', "statistic 'pixel_mean' is not a number"),
        ('{"colour": 3}', "shares no statistic"),
    ],
    ids=["missing", "bad_json", "not_object", "not_number", "no_common_statistic"],
)
def test_profile_report_bad_reference_is_one_line(tiny_data, tmp_path, content, expected):
    ref = tmp_path / "ref.json"
    if content is not None:
        ref.write_text(content)
    with pytest.raises(PairnetError, match=expected) as exc:
        profile_report(tiny_data / "train.npz", against=ref)
    assert len(str(exc.value).splitlines()) == 1


def test_profile_report_bad_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("hello")
    with pytest.raises(PairnetError, match="not a readable .npz"):
        profile_report(bad)


def test_same_seed_byte_identical(tmp_path):
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        make_dataset(out, GenConfig(size="tiny", seed=11))
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())
                        if not f.name.startswith(".")})  # not the folder lock
    assert digests[0] == digests[1]
    assert len(digests[0]) == 6


def test_preview_png(tiny_data, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["data", "preview", str(tiny_data), "--out", str(out), "-n", "4"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_zip_is_real_npz(tiny_data):
    with zipfile.ZipFile(tiny_data / "train.npz") as zf:
        assert {"x.npy", "y.npy", "id.npy"} <= set(zf.namelist())


def test_bad_cli_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "make", "--out", "x", "--size", "huge"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "invalid choice: 'huge'" in err


def test_a_default_set_of_another_train_scan_share_is_not_taken_for_the_default(tmp_path):
    from pairnet.pipeline import _meta_matches

    meta = make_dataset(tmp_path, GenConfig(size="tiny", seed=3, train_scans=0.88))
    assert _meta_matches(tmp_path, GenConfig(size="tiny", seed=3, train_scans=0.88))
    assert not _meta_matches(tmp_path, GenConfig(size="tiny", seed=3))
    del meta["config"]["train_scans"]  # a set made before the knob existed: the default share
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert _meta_matches(tmp_path, GenConfig(size="tiny", seed=3))
