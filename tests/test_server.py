"""`pairnet server` is safe to start and stop: pid files name one process, one server per port,
a private store, the store/host/auth options, and one-line errors without passwords."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest

from conftest import _free_port
from pairnet.dburl import POSTGRES_EXTRA
from pairnet.redact import mask_url
from pairnet.tracking import server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAIRNET = [sys.executable, "-m", "pairnet.cli"]
ADMIN_PASSWORD = "pairnet-test-admin-pw"  # 12+ characters, as MLflow's basic auth demands


def pairnet(data_dir, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    """`pairnet ARGS` as a user runs it, with its data (and server folder) under ``data_dir``."""
    env = dict(os.environ, PAIRNET_DATA_DIR=str(data_dir))
    return subprocess.run(PAIRNET + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def servers_on(port: int) -> list[psutil.Process]:
    """The `mlflow server` processes listening on ``port``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "server" in cmd and "mlflow" in cmd and f"--port {port}" in " ".join(cmd):
            found.append(p)
    return found


def http_status(url: str, **headers) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_mask_url_hides_every_password():
    text = "postgresql://bob:s3cr@t@db.example:5432/mlflow and mysql+pymysql://amy:pw@h/db?x=1"
    assert mask_url(text) == "postgresql://bob:***@db.example:5432/mlflow and mysql+pymysql://amy:***@h/db?x=1"
    for keep in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000/path@x", "https://user@host/", "/plain/path"):
        assert mask_url(keep) == keep
    assert mask_url("redis://:pw@host:6379") == "redis://:***@host:6379"


def test_concurrent_starts_make_one_server(tmp_path):
    port = _free_port()
    store = tmp_path / "mlflow"
    store.mkdir(mode=0o755)
    store.chmod(0o755)  # an existing, too open store folder is tightened
    env = dict(os.environ, PAIRNET_DATA_DIR=str(tmp_path))
    starts = [subprocess.Popen(PAIRNET + ["server", "start", "--port", str(port)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in starts]
    try:
        assert [p.returncode for p in starts] == [0, 0], outs
        assert len({re.search(r"\(pid (\d+)", out).group(1) for out, _ in outs}) == 1, outs
        assert len(servers_on(port)) == 1
        assert stat.S_IMODE(store.stat().st_mode) == 0o700
        rec = json.loads((store / f"server-{port}.pid").read_text())
        assert rec["cmdline"][1:4] == ["-m", "mlflow", "server"] and rec["started"] > 0
    finally:
        res = pairnet(tmp_path, "server", "stop", "--port", port)
    assert res.returncode == 0 and res.stdout.strip() == "stopped", res
    assert not servers_on(port) and not (store / f"server-{port}.pid").exists()


def test_store_artifacts_host_and_allowed_hosts_are_honoured(tmp_path):
    from mlflow.tracking import MlflowClient

    port = _free_port()
    root, db, blobs = tmp_path / "mlflow", tmp_path / "new" / "runs.db", tmp_path / "blobs"
    info = server.start(port=port, root=root, host="127.0.0.2", backend_store_uri=f"sqlite:///{db}",
                        artifacts_destination=str(blobs), allowed_hosts="pairnet.test:*")
    try:
        assert info.url == f"http://127.0.0.2:{port}" and db.exists() and not (root / "mlflow.db").exists()
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert server.status(port=port, root=root).running
        client = MlflowClient(info.url)
        run = client.create_run(client.create_experiment("it-server-options"))
        note = tmp_path / "note.txt"
        note.write_text("served")
        client.log_artifact(run.info.run_id, str(note))
        assert [p.read_text() for p in blobs.rglob("note.txt")] == ["served"]
        api = f"{info.url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api, Host=f"pairnet.test:{port}") == 200
        assert http_status(api, Host="evil.example") == 403  # MLflow's DNS-rebinding guard
    finally:
        assert server.stop(port=port, root=root)


def test_basic_auth_rejects_anonymous_and_admits_admin(tmp_path, monkeypatch):
    pytest.importorskip("flask_wtf", reason="basic auth needs pip install 'pairnet[auth]'")
    port = _free_port()
    root = tmp_path / "mlflow"
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_CONFIG_PATH", raising=False)
    res = pairnet(tmp_path, "server", "start", "--port", port, "--auth")  # no admin password: one line, no server
    assert res.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in res.stderr and not servers_on(port), res
    assert len(res.stderr.strip().splitlines()) == 1

    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
    info = server.start(port=port, root=root, auth=True)
    try:
        assert info.auth and server.status(port=port, root=root).auth
        assert ADMIN_PASSWORD not in (root / f"server-{port}.pid").read_text()
        api = f"{info.url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api) == 401
        basic = "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
        assert http_status(api, Authorization=basic) == 200
        wrong = "Basic " + base64.b64encode(b"admin:not-the-password").decode()
        assert http_status(api, Authorization=wrong) == 401
    finally:
        assert server.stop(port=port, root=root)


def with_driver_installed() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("psycopg2", "psycopg"))


def test_user_errors_are_one_line_without_passwords(tmp_path):
    port = _free_port()
    with socket.socket() as busy:  # a program that is not an MLflow server holds the port
        busy.bind(("127.0.0.1", port))
        busy.listen()
        res = pairnet(tmp_path, "server", "start", "--port", port)
    assert res.returncode == 2 and "in use by another program" in res.stderr, res
    # A store the server cannot reach: refused before MLflow starts (it would retry for minutes);
    # the message names why and hides the password.
    res = pairnet(tmp_path, "server", "start", "--port", port,
                  "--backend-store-uri", "postgresql://bob:hunter2secret@127.0.0.1:9/mlflow")
    if with_driver_installed():  # CI's `ci` extra: the driver tries the store and is refused
        assert res.returncode == 2 and "backend store 'postgresql://bob:***@127.0.0.1:9/mlflow' is not usable" \
            in res.stderr
        assert "Connection refused" in res.stderr, res
    else:  # the README's `test` install: no driver, and the message says how to get one
        assert res.returncode == 2 and ("'postgresql://bob:***@127.0.0.1:9/mlflow' needs a PostgreSQL driver and "
                                        f"none is installed: {POSTGRES_EXTRA}") in res.stderr, res
    assert "hunter2secret" not in res.stderr + res.stdout and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not servers_on(port) and not (tmp_path / "mlflow" / f"server-{port}.pid").exists()
    # A store folder that cannot be created.
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = pairnet(blocker, "server", "start", "--port", port)
    assert res.returncode == 2 and "cannot use" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res
