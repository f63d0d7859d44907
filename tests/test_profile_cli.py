"""`pairnet data profile`: a user checks whether their data looks like the default set."""

from __future__ import annotations

import json

from pairnet.cli import main


def test_profile_cli_prints_gaps_and_one_json_line(tiny_data, capsys):
    assert main(["data", "profile", str(tiny_data / "val.npz"), "--against", str(tiny_data / "val.npz")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["realism_gap"] == 0


def test_profile_cli_against_real_statistics(tiny_data, capsys):
    assert main(["data", "profile", str(tiny_data / "train.npz")]) == 0  # the profile alone
    assert "pixel_mean" in capsys.readouterr().out
    assert main(["data", "profile", str(tiny_data / "train.npz"), "--against", "real"]) == 0
    out = capsys.readouterr().out
    assert "realism_gap" in out and 0 < json.loads(out.strip().splitlines()[-1])["realism_gap"] < 1


def test_profile_cli_bad_reference(tiny_data, tmp_path, capsys):
    bad = tmp_path / "ref.json"
    bad.write_text("{not json")
    assert main(["data", "profile", str(tiny_data / "train.npz"), "--against", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ref.json" in err
