"""Every way a user lost data or got a stuck run in issue 11, each now ending cleanly:
data never overwritten, pickle-free loading, server restarts and SIGKILL survived,
complete step keys, parameters refused before anything starts, seeds that matter."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, _free_port, mlflow_run, user_env
from test_server import pairnet as in_folder
from test_tune_faults import FINISHED, _finish, _running_trials, _tune
from test_tune_faults import _runs as _tune_runs
from pairnet.cli import main
from pairnet.data.pairs import PairSet, save_pairs

pytestmark = pytest.mark.integration

PAIRNET = [sys.executable, "-m", "pairnet.cli"]


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(folder).iterdir())
            if f.is_file() and not f.name.startswith(".")}


def pairnet(env: dict, *args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(PAIRNET + [str(a) for a in args], env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("pairnet")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def wait_for(predicate, timeout: float, what: str, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------ data safety
def test_data_make_never_overwrites_without_force(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "make", "--out", str(out), "--size", "tiny", "--seed", "7"]) == 0
    before = digests(out)
    assert set(before) == {"train.npz", "val.npz", "test_public.npz", "test_private.npz", "test_public_labels.csv",
                           "meta.json"}
    capsys.readouterr()
    assert main(["data", "make", "--out", str(out), "--size", "tiny", "--seed", "8"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert digests(out) == before
    assert main(["data", "make", "--out", str(out), "--size", "tiny", "--seed", "8", "--force"]) == 0
    after = digests(out)
    assert set(after) == set(before) and after["train.npz"] != before["train.npz"]
    assert json.loads((out / "meta.json").read_text())["seed"] == 8
    # Built beside the folder, then moved in: no staging folder or temp file is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_an_interrupted_data_make_leaves_whole_files(tiny_data, tmp_path, monkeypatch, capsys):
    """A make that fails while moving its files in (a full disk on the third rename) leaves each
    file whole, old or new, and no meta.json: the folder says it holds no whole set."""
    import pairnet.data.generate as generate

    out, fresh = tmp_path / "d", tmp_path / "fresh"
    assert main(["data", "make", "--out", str(out), "--size", "tiny", "--seed", "7"]) == 0
    assert main(["data", "make", "--out", str(fresh), "--size", "tiny", "--seed", "8"]) == 0
    old, new = digests(out), digests(fresh)
    moves, real_replace = [], os.replace

    def replace(src, dst):
        if Path(dst).parent == out:  # a finished file moving in (os is shared: not the temp-file renames)
            if len(moves) == 2:
                raise OSError(28, "No space left on device")
            moves.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(generate.os, "replace", replace)
    capsys.readouterr()
    assert main(["data", "make", "--out", str(out), "--size", "tiny", "--seed", "8", "--force"]) == 1
    err = capsys.readouterr().err.strip()
    assert "No space left" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    after = digests(out)
    assert len(moves) == 2 and "meta.json" not in after
    assert all(after[n] == new[n] for n in moves)
    assert all(after[n] == old[n] for n in after if n not in moves)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # staging cleaned
    monkeypatch.undo()
    assert main(["data", "make", "--out", str(out), "--size", "tiny", "--seed", "8", "--force"]) == 0
    assert digests(out) == new


def test_a_sigkilled_data_make_leaves_the_old_set_and_its_litter_is_swept(tmp_path):
    out = tmp_path / "d"
    env = {**os.environ, "PAIRNET_DATA_DIR": str(tmp_path / "project")}
    assert pairnet(env, "data", "make", "--out", out, "--size", "tiny", "--seed", "7").returncode == 0
    old = digests(out)
    proc = subprocess.Popen(PAIRNET + ["data", "make", "--out", str(out), "--size", "tiny", "--seed", "8",
                                       "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = wait_for(lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".making-d-")], 120,
                       "the staging folder")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # Killed while the set was being built beside the folder: the folder still holds the old set.
    assert digests(out) == old and staging[0].exists()
    sibling = tmp_path / ".making-d-x-abcdefgh"  # another folder's (d-x) staging: not ours to sweep
    sibling.mkdir()
    assert pairnet(env, "data", "make", "--out", out, "--size", "tiny", "--seed", "8", "--force").returncode == 0
    assert not staging[0].exists() and sibling.exists() and digests(out) != old


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    from pairnet.fsutil import atomic_path, write_text

    f = tmp_path / "meta.json"
    write_text(f, "old\n")
    with pytest.raises(OSError), atomic_path(f) as tmp:
        tmp.write_text("half a fi")
        raise OSError(28, "No space left on device")
    assert f.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_held_folder_lock_refuses_data_make(tmp_path):
    """A second `data make` (or pipeline) on a folder another pairnet process holds is refused in one
    line, exit 2, the files untouched; the lock lives in the state folder, not in the data folder."""
    out = tmp_path / "d"
    env = {**os.environ, "PAIRNET_DATA_DIR": str(tmp_path / "project")}
    assert pairnet(env, "data", "make", "--out", out, "--size", "tiny", "--seed", "7").returncode == 0
    before = digests(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pairnet.fsutil import folder_lock\n"
         "with folder_lock(sys.argv[1], 'run the tiny pipeline'):\n print('held', flush=True); time.sleep(120)",
         str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = pairnet(env, "data", "make", "--out", out, "--size", "tiny", "--seed", "8", "--force")
        one_line_error(res, str(out), "in use by another pairnet process")
        assert digests(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert pairnet(env, "data", "make", "--out", out, "--size", "tiny", "--seed", "8", "--force").returncode == 0
    assert not [p for p in out.iterdir() if p.suffix == ".lock"]


@pytest.mark.slow
def test_a_second_pipeline_on_a_locked_folder_is_refused(mlflow_server, tiny_data, tmp_path):
    from pairnet.fsutil import folder_lock

    d = tmp_path / "d"
    d.mkdir()
    for f in tiny_data.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    env = user_env(mlflow_server, "it-faults-locked")
    with folder_lock(d, "run the tiny pipeline"):  # this process stands in for the first pipeline
        res = pairnet(env, "pipeline", "--preset", "tiny", "--data-dir", d)
    one_line_error(res, str(d), "in use by another pairnet process")
    assert not runs_of(MlflowClient(), "it-faults-locked")


@pytest.mark.slow
def test_data_entry_point_refuses_a_users_folder(mlflow_server, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    rng = np.random.default_rng(0)
    save_pairs(user / "train.npz", PairSet(x=rng.integers(0, 255, (20, 28, 56), dtype=np.uint8),
                                           y=rng.integers(0, 2, 20)))
    before = digests(user)
    res = mlflow_run("data", {"out": user, "size": "tiny"}, user_env(mlflow_server, "it-faults-data"))
    assert res.returncode != 0 and "refusing to overwrite" in res.stderr
    assert digests(user) == before
    runs = runs_of(MlflowClient(), "it-faults-data")
    assert runs and all(r.info.status == "FAILED" for r in runs)
    # mlflow run says only that its run failed (exit 1); the entry point's own status is the README's 2.
    direct = subprocess.run([sys.executable, "entrypoints/data.py", "--out", str(user), "--size", "tiny", "--severity",
                             "6", "--seed", "42", "--bases", "mnist", "--force", "false"], cwd=ROOT,
                            env=user_env(mlflow_server, "it-faults-data"), capture_output=True, text=True, timeout=300)
    assert direct.returncode == 2 and "refusing to overwrite" in direct.stderr, direct.stderr[-2000:]
    assert digests(user) == before


def test_predict_refuses_to_write_over_its_input(tiny_data, tmp_path, capsys):
    data = tmp_path / "t.npz"
    data.write_bytes((tiny_data / "test_private.npz").read_bytes())
    before = digests(tmp_path)
    for out in (data, tmp_path / "other.npz"):
        args = ["predict", "--model", "models:/pairnet-stack@champion", "--data", str(data), "--out", str(out)]
        assert main(args) == 2
        assert "refusing" in capsys.readouterr().err
    assert digests(tmp_path) == before
    assert main(["data", "check", str(data)]) == 0


def test_preview_and_predict_write_over_only_their_own_output(tiny_data, tmp_path, capsys):
    from pairnet.models import create_model
    from pairnet.serving import save_pair_dir

    model = save_pair_dir(create_model("compare_cnn", width_mult=0.25, feat_dim=16), tmp_path / "model")
    d = tmp_path / "d"
    d.mkdir()
    for name in ("test_private.npz", "test_public_labels.csv", "meta.json"):
        (d / name).write_bytes((tiny_data / name).read_bytes())
    data = str(d / "test_private.npz")

    def predict(out, *extra):
        return main(["predict", "--model", str(model), "--data", data, "--out", str(out), *extra])

    def preview(out, *extra):
        return main(["data", "preview", data, "--out", str(out), "-n", "4", *extra])

    before = digests(d)
    for run in (predict, preview):  # a labels CSV and meta.json are the user's, not an output
        for victim in ("test_public_labels.csv", "meta.json"):
            assert run(d / victim) == 2
            err = capsys.readouterr().err
            assert "refusing to overwrite" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert digests(d) == before
    pred, grid = tmp_path / "pred.csv", tmp_path / "grid.png"
    assert predict(pred) == 0 and predict(pred) == 0  # its own earlier output: replaced
    assert preview(grid) == 0 and preview(grid) == 0
    assert preview(pred) == 2 and predict(grid) == 2  # one command's output is not the other's
    pred.write_text(pred.read_text() + "# edited by hand\n")  # no longer what predict wrote
    capsys.readouterr()
    assert predict(pred) == 2 and "refusing to overwrite" in capsys.readouterr().err
    # The MLproject entry point passes `-P force=true|false` on to the flag.
    entry = [sys.executable, "entrypoints/predict.py", "--model", str(model), "--data", data, "--out", str(pred)]
    res = subprocess.run(entry + ["--force", "false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr and "# edited" in pred.read_text()
    res = subprocess.run(entry + ["--force", "maybe"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--force takes true or false" in res.stderr
    assert predict(pred, "--force") == 0 and "# edited" not in pred.read_text()
    assert main(["check-submission", "--data", data, "--pred", str(pred)]) == 0


@pytest.mark.slow
def test_partial_data_folder_is_refused_not_filled(mlflow_server, tiny_data, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train.npz").write_bytes((tiny_data / "train.npz").read_bytes())
    before = digests(partial)
    res = pairnet(user_env(mlflow_server, "it-faults-partial"), "stage2", "--preset", "tiny", "--data-dir", partial)
    one_line_error(res, "holds train.npz but no val.npz")
    assert digests(partial) == before
    assert not runs_of(MlflowClient(), "it-faults-partial")


@pytest.mark.slow
def test_bad_parameters_fail_before_data_or_runs(mlflow_server, tiny_data, tmp_path, monkeypatch, capsys):
    """In process (the CLI's main, as the `pairnet` command calls it): one subprocess shows the
    same line without a traceback."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "it-faults-params")
    empty = tmp_path / "fresh"

    def refused(*args: str, needle: str) -> None:
        capsys.readouterr()
        try:
            code = main([*args])
        except SystemExit as exit_:  # argparse's own refusals exit from inside parse_args
            code = exit_.code
        lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("usage:")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("pairnet") and needle in lines[0], lines

    for flag, value, needle in (("--epochs", "inf", "not a finite number"), ("--lr", "nan", "not a finite number"),
                                ("--weight-decay", "inf", "not a finite number"),
                                ("--label-smoothing", "nan", "not a finite number"),
                                ("--dropout", "1.5", "dropout must be in [0, 1)"),
                                ("--model-name", "bogus", "unknown model 'bogus'")):
        refused("stage2", "--preset", "tiny", "--data-dir", str(empty), flag, value, needle=needle)
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    refused("stage2", "--preset", "tiny", "--data-dir", str(a_file), needle="is a file")
    refused("pipeline", "--preset", "tiny", "--data-dir", str(a_file), needle="is a file")
    one_line_error(pairnet(user_env(mlflow_server, "it-faults-params"), "stage2", "--preset", "tiny", "--data-dir",
                           empty, "--lr", "nan"), "not a finite number")
    assert not empty.exists()  # no data was made for a run that could not start
    assert not runs_of(MlflowClient(), "it-faults-params")


# ------------------------------------------------------------------ the tracking server
def test_stop_leaves_a_recycled_pid_alone(tmp_path):
    port = _free_port()
    pid_file = tmp_path / "mlflow" / f"server-{port}.pid"
    pid_file.parent.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(sleeper.pid).create_time()
        mlflow_cmd = [sys.executable, "-m", "mlflow", "server", "--port", str(port)]
        # The server exited and the kernel handed its pid to `sleep`: another start time, or
        # (same start time, say after an exec) another command line.
        for rec_started in (started - 3600, started):
            rec = {"pid": sleeper.pid, "started": rec_started, "cmdline": mlflow_cmd, "host": socket.gethostname(),
                   "url": f"http://127.0.0.1:{port}"}
            pid_file.write_text(json.dumps(rec))
            st = in_folder(tmp_path, "server", "status", "--port", port)
            assert st.returncode == 1 and "now belongs to another process" in st.stdout, st
            res = in_folder(tmp_path, "server", "stop", "--port", port)
            assert res.returncode == 0, res.stderr
            assert f"stale pid file {pid_file}: pid {sleeper.pid} now belongs to another process; left it running" \
                in res.stderr
            assert f"no pairnet server running on port {port}" in res.stdout
            assert not pid_file.exists() and sleeper.poll() is None
        # An old plain-integer pid file has no start time: nothing is killed either.
        pid_file.write_text(f"{sleeper.pid}\n")
        res = in_folder(tmp_path, "server", "stop", "--port", port)
        assert res.returncode == 0 and "records no start time" in res.stderr, res.stderr
        assert not pid_file.exists() and sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------ models without pickle
class _Bomb(mlflow.pyfunc.PythonModel):
    """Unpickling this runs a shell command: what a hostile registered version could hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))

    def predict(self, context, model_input, params=None):
        return model_input


@pytest.mark.slow
def test_pickle_bomb_under_a_pairnet_name_is_refused(mlflow_server, tiny_data, tmp_path, capsys):
    name = "pairnet-bomb_check"
    marker = tmp_path / "exploded"
    client = MlflowClient()
    mlflow.set_experiment("it-faults-bomb")
    try:
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=_Bomb(str(marker)), registered_model_name=name)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(name, "champion", version)
        args = ["predict", "--model", f"models:/{name}@champion", "--data", str(tiny_data / "test_private.npz"),
                "--out", str(tmp_path / "p.csv")]
        assert main(args) == 2
        assert "was not logged by pairnet" in capsys.readouterr().err
        # A forged tag does not help: pairnet reads only safetensors + JSON, never the pickle.
        client.set_model_version_tag(name, version, "pairnet.format", "safetensors-v1")
        assert main(args) == 2
        assert "is not a pairnet model" in capsys.readouterr().err
        # Stacking refuses it as a base model too, before any run opens.
        assert main(["stack", "--models", f"models:/{name}@champion,models:/{name}/{version}",
                     "--data-dir", str(tiny_data)]) == 2
        # MLflow itself refuses the pickle in this environment (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false).
        with pytest.raises(mlflow.exceptions.MlflowException, match="pickle"):
            mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        assert not marker.exists()
        assert not (tmp_path / "p.csv").exists()
    finally:
        client.delete_registered_model(name)


# ------------------------------------------------------------------ run lifecycle
def _history(client, run_id, key="val_acc"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_server_restart_mid_run_loses_no_epoch(tiny_data, tmp_path):
    from pairnet.tracking import server

    root, port = tmp_path / "server", _free_port()
    info = server.start(port=port, root=root)
    env = user_env(info.url, "it-faults-restart")
    epochs = 12
    proc = subprocess.Popen(PAIRNET + ["stage2", "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name",
                                       "compare_cnn", "--epochs", str(epochs), "--max-steps-per-epoch", "30"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = MlflowClient(info.url)
        run_id = wait_for(lambda: next((r.info.run_id for r in runs_of(client, "it-faults-restart")
                                        if _history(client, r.info.run_id)), None), 180, "the first epoch")
        server.stop(port=port, root=root)
        time.sleep(4)  # training goes on while the server is away
        server.start(port=port, root=root)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
        err = proc.stderr.read()
        assert "Connection refused" in err, err[-3000:]  # the outage did hit training (requests retried)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert _history(client, run_id) == list(range(1, epochs + 1))
        assert _history(client, run_id, "train_loss") == list(range(1, epochs + 1))
        assert "checkpoint/last.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop(port=port, root=root)


def test_the_flush_limit_is_seconds_or_one_line(monkeypatch):
    from pairnet.errors import PairnetError
    from pairnet.tracking.callback import flush_limit

    monkeypatch.delenv("PAIRNET_TRACKING_FLUSH_S", raising=False)
    assert flush_limit() == 600.0
    monkeypatch.setenv("PAIRNET_TRACKING_FLUSH_S", "2.5")
    assert flush_limit() == 2.5
    for bad in ("abc", "0", "-1", "inf", "nan"):
        monkeypatch.setenv("PAIRNET_TRACKING_FLUSH_S", bad)
        with pytest.raises(PairnetError, match="PAIRNET_TRACKING_FLUSH_S"):
            flush_limit()


@pytest.mark.slow
def test_metrics_that_never_reach_the_server_end_the_run_failed(tiny_data, tmp_path):
    """A training run and a tune trial's run, side by side, whose buffered metrics never
    reached the server: both end FAILED, tagged with the count, every value accounted for."""
    from pairnet.tracking import server

    root, port = tmp_path / "server", _free_port()
    info = server.start(port=port, root=root)
    epochs = 12
    commands = {"stage2": ["--max-steps-per-epoch", "30"],
                "tune": ["--n-trials", "1", "--storage", str(tmp_path / "study.journal")]}
    procs, stderr = {}, {c: tmp_path / f"{c}.stderr" for c in commands}
    for command, args in commands.items():
        # The flush limit lowered from 600 s: the server stays away past it.
        # Four MLflow retries (1+2+4+8 s) instead of pairnet's six (about a minute): the request in
        # flight when the server went away ends sooner; nothing here depends on it landing.
        env = {**user_env(info.url, f"it-faults-lost-{command}"), "PAIRNET_TRACKING_FLUSH_S": "3",
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4"}
        with open(stderr[command], "w") as err_file:
            procs[command] = subprocess.Popen(
                PAIRNET + [command, "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name", "compare_cnn",
                           "--epochs", str(epochs), *args], env=env, stdout=subprocess.DEVNULL, stderr=err_file)
    try:
        client = MlflowClient(info.url)
        run_ids = {c: wait_for(lambda c=c: next((r.info.run_id for r in runs_of(client, f"it-faults-lost-{c}")
                                                 if _history(client, r.info.run_id)), None), 180, f"{c}'s first epoch")
                   for c in commands}
        server.stop(port=port, root=root)
        for c in commands:
            wait_for(lambda c=c: "gave up on" in stderr[c].read_text(), 300, f"{c}'s callback to give up")
        server.start(port=port, root=root)  # back in time for the runs to end, too late for their metrics
        for command, run_id in run_ids.items():
            err = stderr[command].read_text
            assert procs[command].wait(timeout=300) == 1, err()[-3000:]  # the work failed; the inputs were fine
            assert "could not reach the tracking server within 3 s (PAIRNET_TRACKING_FLUSH_S)" in err(), err()[-3000:]
            run = client.get_run(run_id)
            assert run.info.status == "FAILED"
            lost = int(run.data.tags["pairnet.metrics_lost"])
            epoch_keys = {k for k in run.data.metrics if not k.startswith("system/")}
            got = sum(len(client.get_metric_history(run_id, key)) for key in epoch_keys)
            assert lost > 0 and len(_history(client, run_id)) < epochs
            # A trial's callback also queues the best weights' final metrics (final_val_*, best_epoch).
            finals = len([k for k in epoch_keys if k.startswith("val_")]) + 1 if command == "tune" else 0
            assert not [k for k in epoch_keys if k.startswith("final_")]  # those were queued last: lost
            assert got + lost == epochs * len(epoch_keys) + finals  # every value: on the server or counted lost
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        server.stop(port=port, root=root)


@pytest.mark.slow
def test_sigkilled_run_is_swept_then_resumed(mlflow_server, tiny_data):
    env = user_env(mlflow_server, "it-faults-sigkill")
    epochs = 30
    proc = subprocess.Popen(PAIRNET + ["stage2", "--preset", "tiny", "--data-dir", str(tiny_data), "--model-name",
                                       "compare_cnn", "--epochs", str(epochs), "--seed", "11"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient()

    def checkpointed():
        for r in runs_of(client, "it-faults-sigkill"):
            if len(_history(client, r.info.run_id)) >= 2 and client.list_artifacts(r.info.run_id, "checkpoint"):
                return r.info.run_id
        return None

    run_id = wait_for(checkpointed, 180, "a checkpointed second epoch")
    proc.send_signal(signal.SIGKILL)  # no handler runs: the run cannot end itself
    proc.wait(timeout=30)
    assert client.get_run(run_id).info.status == "RUNNING"
    sweep = pairnet(env, "runs", "sweep")
    assert sweep.returncode == 0 and run_id in sweep.stdout, sweep.stderr
    killed = client.get_run(run_id)
    assert killed.info.status == "FAILED" and "is gone" in killed.data.tags["pairnet.swept"]
    done = len(_history(client, run_id))
    assert done < epochs
    res = pairnet(env, "stage2", "--preset", "tiny", "--data-dir", tiny_data, "--model-name", "compare_cnn",
                  "--epochs", epochs, "--seed", "11", "--resume", "true")
    assert res.returncode == 0, res.stderr[-3000:]
    (resumed,) = [r for r in runs_of(client, "it-faults-sigkill") if r.info.run_id != run_id]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["pairnet.resumed_from"] == run_id
    assert _history(client, resumed.info.run_id) == list(range(1, epochs + 1))
    assert not [r for r in runs_of(client, "it-faults-sigkill") if r.info.status == "RUNNING"]


# ------------------------------------------------------------------ tuning
@pytest.mark.slow
def test_worker_killed_mid_trial_is_replaced(mlflow_server, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    experiment = "it-tune-kill"
    client = MlflowClient()
    log_path = tmp_path / "tune.log"
    cmd = _tune(tiny_data, storage, "k", "--epochs", "4", "--n-trials", "3", "--n-workers", "2",
                "--heartbeat-interval", "1", "--grace-period", "3")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=user_env(mlflow_server, experiment), stdout=log, stderr=subprocess.STDOUT)
    victim_run = _running_trials(client, experiment, proc, want=1)[0]
    victim = int(victim_run.data.tags["pairnet.process.pid"])
    assert victim in {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    os.kill(victim, signal.SIGKILL)
    out = _finish(proc, log_path, timeout=400)
    assert proc.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name="k", storage=storage)
    assert len([t for t in study.trials if t.state in FINISHED]) == 3
    waiting = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    assert not [t for t in study.trials if t.state in waiting]
    killed = int(victim_run.data.tags["optuna.trial_number"])
    assert study.trials[killed].state == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].params == study.trials[killed].params  # re-queued, same lr and wd
    assert f"trial {killed} failed: tune worker pid {victim} died" in out  # by the parent, not after a grace period

    runs = _tune_runs(client, experiment)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    swept = client.get_run(victim_run.info.run_id)
    assert swept.info.status == "FAILED"
    assert swept.data.tags["pairnet.swept"].startswith(f"tune worker pid {victim} died")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pairnet.best_model"].startswith("models:/pairnet-compare_cnn/")


# ------------------------------------------------------------------ seeds
@pytest.mark.slow
def test_seed_controls_initial_weights_in_fresh_processes(mlflow_server, tiny_data):
    env = user_env(mlflow_server, "it-faults-seeds")
    for seed in (21, 21, 22):
        res = pairnet(env, "stage2", "--preset", "tiny", "--data-dir", tiny_data, "--model-name", "compare_cnn",
                      "--seed", seed, "--epochs", 1)
        assert res.returncode == 0, res.stderr[-2000:]
    client = MlflowClient()
    runs = sorted(runs_of(client, "it-faults-seeds"), key=lambda r: r.info.start_time)
    inits = [r.data.params["run.init_weights_digest"] for r in runs]
    losses = [client.get_metric_history(r.info.run_id, "train_loss")[0].value for r in runs]
    accs = [r.data.metrics["final_val_acc"] for r in runs]
    # Same seed, two fresh processes: the same initial weights and identical metrics.
    assert inits[0] == inits[1] and losses[0] == losses[1] and accs[0] == accs[1]
    assert inits[2] != inits[0]  # another seed: other initial weights
