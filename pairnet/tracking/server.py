"""The local MLflow tracking server and tracking-URI resolution.

Default setup: a real ``mlflow server`` on 127.0.0.1 with a SQLite backend store and a
local artifact store (served through the server) under ``<data>/mlflow``. Every
command uses ``MLFLOW_TRACKING_URI`` when it is set; otherwise the local server,
started on demand.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pairnet.errors import PairnetError
from pairnet.paths import server_dir

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
REACH_TIMEOUT_S = 4.0  # with interpreter start-up, an unreachable server is reported within 10 s


@dataclass
class ServerInfo:
    url: str
    pid: int | None
    running: bool
    log_file: Path
    store: Path


def _files(port: int, root: Path | None = None) -> dict[str, Path]:
    root = root or server_dir()
    return {
        "root": root,
        "db": root / "mlflow.db",
        "artifacts": root / "artifacts",
        "pid": root / f"server-{port}.pid",
        "log": root / f"server-{port}.log",
    }


def health(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def status(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, root: Path | None = None) -> ServerInfo:
    f = _files(port, root)
    pid = _read_pid(f["pid"])
    url = f"http://{host}:{port}"
    running = pid is not None and _pid_alive(pid) and health(url)
    return ServerInfo(url=url, pid=pid, running=running, log_file=f["log"], store=f["db"])


def start(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, root: Path | None = None,
          wait_s: float = 90.0) -> ServerInfo:
    """Start ``mlflow server`` in its own process group and wait until it answers."""
    info = status(port, host, root)
    if info.running:
        return info
    url = f"http://{host}:{port}"
    if health(url):
        raise PairnetError(f"port {port} already has a server that pairnet did not start; "
                           f"set MLFLOW_TRACKING_URI={url} to use it, or pick another --port")
    f = _files(port, root)
    f["root"].mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{f['db']}",
        "--artifacts-destination", str(f["artifacts"]),
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    with open(f["log"], "ab") as logfh:
        proc = subprocess.Popen(cmd, stdout=logfh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=f["root"])
    f["pid"].write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PairnetError(f"mlflow server exited with status {proc.returncode}; see {f['log']}")
        if health(url):
            log.info("MLflow tracking server at %s (store %s)", url, f["db"])
            return ServerInfo(url=url, pid=proc.pid, running=True, log_file=f["log"], store=f["db"])
        time.sleep(0.5)
    stop(port, host, root)
    raise PairnetError(f"mlflow server on {url} did not answer within {wait_s:.0f} s; see {f['log']}")


def stop(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, root: Path | None = None) -> bool:
    f = _files(port, root)
    pid = _read_pid(f["pid"])
    if pid is None or not _pid_alive(pid):
        f["pid"].unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for _ in range(100):
        if not _pid_alive(pid):
            break
        time.sleep(0.1)
    else:
        os.killpg(pid, signal.SIGKILL)
    f["pid"].unlink(missing_ok=True)
    return True


def tracking_uri(start_local: bool = True) -> str:
    """``MLFLOW_TRACKING_URI`` if set (checked reachable), else the local server."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_reachable(uri)
        return uri
    info = status()
    if not info.running:
        if not start_local:
            raise PairnetError(f"no tracking server at {info.url}; run `pairnet server start`")
        log.info("starting the local MLflow tracking server on %s", info.url)
        info = start()
    os.environ["MLFLOW_TRACKING_URI"] = info.url
    return info.url


def check_reachable(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return  # sqlite:/// and other local stores need no server
    deadline = time.monotonic() + REACH_TIMEOUT_S
    while time.monotonic() < deadline:
        if health(uri, timeout=2.0):
            return
        time.sleep(0.5)
    raise PairnetError(f"MLflow tracking server {uri} is unreachable (no answer to /health within "
                       f"{REACH_TIMEOUT_S:.0f} s); start it with `pairnet server start` or fix MLFLOW_TRACKING_URI")
