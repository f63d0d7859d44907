"""The champion gate against a real registry: versions registered by hand with the gate figures
their tags carry, so every decision is known before the gate makes it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pairnet.errors import PairnetError
from pairnet.tracking import registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _versions(name: str, figures: list[tuple[float, str]]) -> list[str]:
    """Register one version per (gate_acc, gate_digest) under ``name``, tagged as a stage would."""
    client = MlflowClient()
    client.create_registered_model(name)
    mlflow.set_experiment("it-gate-unit")
    out = []
    for acc, digest in figures:
        with mlflow.start_run() as run:
            mlflow.log_text("weights", "model/placeholder.txt")
        mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        registry.tag_version(name, mv.version, {registry.GATE_ACC: f"{acc:.6f}", registry.GATE_DIGEST: digest}, client)
        out.append(str(mv.version))
    return out


def _alias(name: str, alias: str) -> str | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias).version
    except mlflow.exceptions.MlflowException:
        return None


def test_a_champion_that_cannot_be_evaluated_stays_champion(mlflow_server):
    name = "pairnet-gate-nan"
    v1, v2 = _versions(name, [(0.70, "A"), (0.99, "B")])
    registry.promote(name, v1)

    def broken(uri):
        raise PairnetError(f"{uri}: the server hiccuped")

    d = registry.champion_gate(name, v2, registry.GateFigure(0.99, "B", 1000, broken))
    assert not d.promoted and d.measured == "unloadable" and "could not be had" in d.reason
    assert _alias(name, "champion") == v1 and _alias(name, "challenger") == v2
    # A newcomer whose own figure is NaN never takes the alias either.
    assert not registry.champion_gate(name, v2, registry.GateFigure(float("nan"), "A", 1000)).promoted
    assert _alias(name, "champion") == v1


def test_a_gain_inside_one_standard_error_keeps_the_champion(mlflow_server, monkeypatch):
    name = "pairnet-gate-margin"
    v1, v2, v3 = _versions(name, [(0.80, "A"), (0.81, "A"), (0.83, "A")])
    registry.promote(name, v1)
    se = (0.8 * 0.2 / 1000) ** 0.5  # 0.0126 on 1,000 pairs
    assert registry.gate_margin(0.80, 1000, 1.0) == pytest.approx(se)
    d = registry.champion_gate(name, v2, registry.GateFigure(0.81, "A", 1000))
    assert not d.promoted and d.margin == pytest.approx(se) and d.champion_acc == pytest.approx(0.80)
    assert _alias(name, "champion") == v1 and _alias(name, "challenger") == v2
    d = registry.champion_gate(name, v3, registry.GateFigure(0.83, "A", 1000))  # 3 points: 2.4 SE
    assert d.promoted and _alias(name, "champion") == v3
    # The margin is the user's to set: 0 standard errors promotes any strict gain.
    monkeypatch.setenv(registry.MARGIN_SE_ENV, "0")
    registry.promote(name, v1)
    assert registry.champion_gate(name, v2, registry.GateFigure(0.81, "A", 1000)).promoted
    monkeypatch.setenv(registry.MARGIN_SE_ENV, "lots")
    with pytest.raises(PairnetError, match="PAIRNET_GATE_MARGIN_SE='lots' must be a number"):
        registry.champion_gate(name, v3, registry.GateFigure(0.83, "A", 1000))


def test_the_gate_judges_on_the_gate_part_not_on_the_figure_chosen_on(mlflow_server):
    """A newcomer's val_acc is its best epoch on the val selection part (chosen on it); the gate
    ignores it and compares figures on the gate part, where nothing was chosen."""
    name = "pairnet-gate-selection"
    client = MlflowClient()
    (v1,) = _versions(name, [(0.80, "G")])
    registry.promote(name, v1)
    mlflow.set_experiment("it-gate-unit")
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model/placeholder.txt")
    v2 = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version
    with mlflow.start_run(run_id=run.info.run_id):
        # A selected figure 15 points up, a gate figure one point down: the champion stays.
        d = registry.register_and_gate(name, v2, 0.95, run.info.run_id, {}, gate=registry.GateFigure(0.79, "G", 2000),
                                       val_digest="V")
    assert not d.promoted and d.new_acc == 0.79 and d.champion_acc == pytest.approx(0.80)
    mv = client.get_model_version(name, v2)
    assert mv.tags["val_acc"] == "0.950000" and mv.tags[registry.GATE_ACC] == "0.790000"
    assert mv.tags[registry.GATE_N] == "2000" and mv.tags[registry.CHAMPION_GATE_ACC] == "0.800000"
    assert "gate part: 0.7900 <= champion" in mv.tags[registry.GATE_REASON]
    assert _alias(name, "champion") == v1 and _alias(name, "challenger") == v2


GATE_ONE = textwrap.dedent("""
    import sys, time
    from pairnet.tracking import registry
    from pathlib import Path
    name, version, acc, ready, go = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
    ready.touch()
    while not go.exists():  # both gates start together, whatever their imports took
        time.sleep(0.02)
    # The champion was judged on other val data: the gate evaluates it here, slowly, so that two
    # gates without a lock would both read the old champion before either moves the alias, and the
    # weaker newcomer's gate (slower still) would move it last.
    figures = {"models:/%s/1" % name: 0.60}
    def slow(uri):
        time.sleep(2.0 if acc > 0.8 else 4.0)
        return figures[uri]
    print(registry.champion_gate(name, version, registry.GateFigure(acc, "B", 1000, slow)).promoted)
""")


def test_two_processes_gating_one_name_leave_one_consistent_champion(mlflow_server, tmp_path):
    name = "pairnet-gate-race"
    v1, v2, v3 = _versions(name, [(0.60, "A"), (0.90, "B"), (0.75, "B")])
    assert v1 == "1"
    registry.promote(name, v1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{v}" for v in (v2, v3)]
    procs = [subprocess.Popen([sys.executable, "-c", GATE_ONE, name, v, str(acc), str(r), str(go)], env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for (v, acc), r in zip(((v2, 0.90), (v3, 0.75)), ready, strict=True)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    # Whichever gated first, the best version ends champion: 0.90 beats both 0.60 and 0.75 by
    # more than a standard error, and 0.75 never beats 0.90.
    assert _alias(name, "champion") == v2
    promoted = {v: out.strip().splitlines()[-1] for v, (out, _) in zip((v2, v3), outs, strict=True)}
    assert promoted[v2] == "True"
