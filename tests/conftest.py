"""Shared fixtures: a tiny default dataset made once per session."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# No path in pairnet may unpickle a model: MLflow refuses pickled pyfuncs with this set,
# and every subprocess the tests start (mlflow run, pairnet ...) inherits it.
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
# pairnet's state (folder locks, Optuna journals of user folders) in a folder of the session's,
# not in the checkout's data/state; subprocesses inherit it.
os.environ["PAIRNET_STATE_DIR"] = tempfile.mkdtemp(prefix="pairnet-state-")
# One intra-op thread per process: the two xdist workers (and the servers and subprocesses they
# start) already fill the cores, and OpenMP threads of several processes spin-waiting on each
# other's cores cost more than they compute (measured: two integration modules 214 s with
# torch's default of one thread per core, 89 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from pairnet.data.generate import GenConfig, make_dataset
from pairnet.data.pairs import load_pairs
from pairnet.train import TrainConfig

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The embedded default dataset at size tiny, as a user would make it."""
    out = tmp_path_factory.mktemp("tiny_data")
    make_dataset(out, GenConfig(size="tiny", seed=3))
    return out


@pytest.fixture(scope="session")
def splits(tiny_data):
    """(train, val) of the tiny default dataset."""
    return load_pairs(tiny_data / "train.npz"), load_pairs(tiny_data / "val.npz")


def small_config(**over) -> TrainConfig:
    """A training config that runs in seconds on the CPU: tiny widths, 3 steps an epoch, fp32."""
    base = dict(model_name="compare_cnn", width_mult=0.25, feat_dim=16, epochs=4, batch_size=64, patience=0,
                max_steps_per_epoch=3, amp="off", eval_batch_size=128, seed=5)
    base.update(over)
    return TrainConfig(**base)


ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tracking_server(root: Path, **start):
    """pairnet's own `server start` on a free loopback port, the tracking URI while it runs."""
    import mlflow

    from pairnet.tracking import server

    port = _free_port()
    info = server.start(port=port, root=root, **start)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = info.url
    mlflow.set_tracking_uri(info.url)
    try:
        yield info
    finally:
        server.stop(port=port, root=root)
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        mlflow.set_tracking_uri(old)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite store, served artifacts) on a free loopback port."""
    with tracking_server(tmp_path_factory.mktemp("mlflow_server")) as info:
        yield info.url


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL of the tests' own (tests/pg.py) on a free loopback port.

    Skipped only outside CI when the binaries or psycopg are missing; .ci/run installs both.
    """
    import pg

    bindir = pg.find_bin()
    missing = []
    if bindir is None:
        missing.append("PostgreSQL (apt-get install postgresql)")
    if importlib.util.find_spec("psycopg") is None:
        missing.append("psycopg (pip install -e '.[ci]')")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"missing {' and '.join(missing)}; .ci/run installs them")
        pytest.skip(f"missing {' and '.join(missing)}")
    server = pg.start(bindir, _free_port())
    yield server
    server.stop()


def user_env(tracking_uri: str, experiment: str) -> dict:
    """The environment a user has after activating the venv and exporting the server URI."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["MLFLOW_EXPERIMENT_NAME"] = experiment
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # tiny runs last seconds
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    return env


def mlflow_run(entry: str, params: dict, env: dict, timeout: int = 600, run_name: str = "",
               **popen) -> subprocess.CompletedProcess:
    cmd = ["mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
           "--experiment-name", env["MLFLOW_EXPERIMENT_NAME"], *(["--run-name", run_name] if run_name else [])]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen)


JOURNEY_EXPERIMENT = "it-journey"


@pytest.fixture(scope="session")
def pipeline_runs(mlflow_server, tmp_path_factory):
    data = tmp_path_factory.mktemp("journey_data")  # empty: the pipeline makes the data itself
    env = user_env(mlflow_server, JOURNEY_EXPERIMENT)
    env["PAIRNET_DATA_DIR"] = str(data)  # the project's own data folder, as data/ is for a user
    first = mlflow_run("pipeline", {"preset": "tiny", "data_dir": data}, env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = mlflow_run("pipeline", {"preset": "tiny", "data_dir": data}, env)
    assert second.returncode == 0, second.stderr[-3000:]
    return first, second, data
