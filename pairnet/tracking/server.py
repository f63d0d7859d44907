"""The local MLflow tracking server and tracking-URI resolution.

Default setup: a real ``mlflow server`` on 127.0.0.1 with a SQLite backend store and a
local artifact store (served through the server) under ``<data>/mlflow``, a folder only
its owner may enter (mode 0700). Every command uses ``MLFLOW_TRACKING_URI`` when it is
set; otherwise the local server, started on demand.

Safety: the pid file names the server by pid, start time and command line, so ``stop``
never signals a process that merely inherited a recycled pid; ``start`` and ``stop`` hold
a lock file per port, so two ``start`` calls at once make one server, not two.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from pairnet.dburl import check_connects, with_driver
from pairnet.errors import PairnetError
from pairnet.fsutil import file_lock, write_text
from pairnet.paths import server_dir
from pairnet.proc import ProcessId
from pairnet.redact import mask_url

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
REACH_TIMEOUT_S = 4.0  # with interpreter start-up, an unreachable server is reported within 10 s
START_WAIT_S = 90.0  # a first start creates the SQLite schema: seconds on a busy machine
STOP_WAIT_S = 10.0  # SIGTERM, then this long for a clean exit, then SIGKILL
LOCK_MARGIN_S = 30.0  # a second start/stop waits this much longer than one start may take
AUTH_MIN_PASSWORD = 12  # MLflow's basic-auth app refuses shorter passwords
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServerInfo:
    url: str
    pid: int | None
    running: bool
    log_file: Path
    store: str  # the backend store URI, password masked
    auth: bool = False
    stale: str | None = None  # why a pid file left behind does not name a live pairnet server


def _files(port: int, root: Path | None = None) -> dict[str, Path]:
    root = root or server_dir()
    return {
        "root": root,
        "db": root / "mlflow.db",
        "artifacts": root / "artifacts",
        "pid": root / f"server-{port}.pid",
        "lock": root / f"server-{port}.lock",
        "log": root / f"server-{port}.log",
        "auth_ini": root / "basic_auth.ini",
        "auth_db": root / "basic_auth.db",
        "secret": root / "flask-secret-key",
    }


def _url(host: str, port: int) -> str:
    """The address a client on this machine uses for a server bound to ``host``."""
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{connect}]:{port}" if ":" in connect else f"http://{connect}:{port}"


def health(url: str, timeout: float = 2.0) -> bool:
    # /health needs no credentials, also with basic auth on, and passes MLflow's Host-header check.
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# ---------------------------------------------------------------- pid file
def _cmdline(pid: int) -> list[str] | None:
    try:
        return [mask_url(arg) for arg in psutil.Process(pid).cmdline()]
    except psutil.Error:
        return None


def _inspect(pid_file: Path) -> tuple[dict | None, str | None]:
    """``(record, None)`` when the pid file names pairnet's live server, ``(None, why)`` when
    it is stale, ``(None, None)`` when there is none."""
    try:
        text = pid_file.read_text()
    except FileNotFoundError:
        return None, None
    except OSError as err:
        raise PairnetError(f"cannot read the pid file {pid_file}: {err.strerror}") from None
    try:
        rec = json.loads(text)
        proc = ProcessId(rec["host"], int(rec["pid"]), float(rec["started"]))
        cmdline = list(rec["cmdline"])
    except (ValueError, KeyError, TypeError):
        # Without a start time a live pid proves nothing: it may have been handed to another process.
        return None, (f"pid file {pid_file} records no start time (older pairnet or damaged), so pid "
                      f"{text.strip()[:12]!r} may not be pairnet's server; left any such process running")
    if not proc.on_this_host():
        raise PairnetError(f"the server in {pid_file} was started on host {proc.host}; "
                           f"run `pairnet server` there")
    reused = f"stale pid file {pid_file}: pid {proc.pid} now belongs to another process; left it running"
    if not proc.alive():
        now = ProcessId.of(proc.pid)
        if now is None or abs(now.started - proc.started) < 0.5:  # no such pid, or the server's zombie
            return None, f"stale pid file {pid_file}: its server (pid {proc.pid}) has exited"
        return None, reused
    if _cmdline(proc.pid) != cmdline:
        return None, reused
    return rec, None


def _write_record(pid_file: Path, pid: int, cmd: list[str], url: str, store: str, auth: bool) -> None:
    # The command line recorded is the one given to exec, not read back from /proc: right
    # after the fork the child still shows its parent's command line until it execs.
    proc = ProcessId.of(pid)
    cmdline = [mask_url(str(arg)) for arg in cmd]
    if proc is None:
        return  # exited already; the caller sees that and reports it
    rec = {"pid": pid, "started": proc.started, "cmdline": cmdline, "host": proc.host, "url": url,
           "store": mask_url(store), "auth": auth}
    write_text(pid_file, json.dumps(rec, indent=1) + "\n")


def _info(f: dict[str, Path], rec: dict) -> ServerInfo:
    return ServerInfo(url=rec["url"], pid=rec["pid"], running=True, log_file=f["log"], store=rec.get("store", ""),
                      auth=bool(rec.get("auth")))


# ---------------------------------------------------------------- folders and locks
def _private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or tighten it to 0700 when it exists and is ours."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != 0o700:
            path.chmod(0o700)
    except OSError as err:
        raise PairnetError(f"cannot use {path} for the tracking server: {err.strerror}; "
                           f"set PAIRNET_DATA_DIR to a folder you can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PairnetError(f"cannot write to {path} for the tracking server; "
                           f"set PAIRNET_DATA_DIR to a folder you can write")


def _lock(f: dict[str, Path], port: int, wait_s: float):
    return file_lock(f["lock"], wait_s=wait_s, note=f"server port {port}",
                     busy=f"another pairnet process is starting or stopping the server on port {port} "
                          f"(lock {f['lock']}); try again when it is done")


def _local_path(uri: str) -> str:
    """A plain path made absolute: the server runs in its own folder, not the caller's."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def _backend(uri: str | None, f: dict[str, Path]) -> str:
    if not uri:
        return f"sqlite:///{f['db']}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):  # sqlite:///rel.db is relative to the caller's folder
            path = str(Path(path).resolve())
            uri = f"sqlite:///{path}"
        try:
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise PairnetError(f"cannot create the folder of the backend store {path}: {err.strerror}") from None
    return _local_path(with_driver(uri))


DATABASE_SERVERS = ("postgresql", "mysql", "mssql")  # backend stores MLflow reaches over the network


def _port_taken(host: str, port: int) -> bool:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise PairnetError(f"cannot bind the tracking server to --host {host}: {err.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            s.bind(addr)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise PairnetError(f"cannot bind the tracking server to {host}:{port}: {err.strerror}") from None
    return False


# ---------------------------------------------------------------- basic auth
def _auth_env(f: dict[str, Path], auth_config: str | Path | None) -> dict[str, str]:
    """Environment for ``mlflow server --app-name basic-auth``.

    Without a config of the user's, pairnet writes one that keeps the user database in the
    server folder. MLflow ships no admin password: the first start creates the admin user
    (``admin`` unless MLFLOW_AUTH_ADMIN_USERNAME says otherwise) with MLFLOW_AUTH_ADMIN_PASSWORD.
    """
    if importlib.util.find_spec("flask_wtf") is None:
        raise PairnetError("--auth needs Flask-WTF (MLflow's basic-auth app uses it): pip install 'pairnet[auth]'")
    env = {}
    config = auth_config or os.environ.get("MLFLOW_AUTH_CONFIG_PATH")
    if config:
        config = Path(config).expanduser().resolve()
        if not config.is_file():
            raise PairnetError(f"auth config {config} does not exist")
    else:
        config = f["auth_ini"]
        if not config.exists():
            write_text(config, "[mlflow]\ndefault_permission = READ\n"
                               f"database_uri = sqlite:///{f['auth_db']}\nadmin_username = admin\n")
        if not f["auth_db"].exists():
            password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
            if len(password) < AUTH_MIN_PASSWORD:
                raise PairnetError(f"the first start with --auth creates the admin user: export "
                                   f"MLFLOW_AUTH_ADMIN_PASSWORD=<at least {AUTH_MIN_PASSWORD} characters> first")
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        # The auth app's CSRF protection needs a key that survives restarts; keep one, readable by the owner only.
        if not f["secret"].exists():
            write_text(f["secret"], secrets.token_hex(32))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = f["secret"].read_text().strip()
    return env


# ---------------------------------------------------------------- start, stop, status
def status(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, root: Path | None = None) -> ServerInfo:
    f = _files(port, root)
    rec, why = _inspect(f["pid"])
    if rec is not None:
        info = _info(f, rec)
        info.running = health(info.url)
        return info
    return ServerInfo(url=_url(host, port), pid=None, running=False, log_file=f["log"],
                      store=f"sqlite:///{f['db']}", stale=why)


def start(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, root: Path | None = None,
          wait_s: float = START_WAIT_S, *, backend_store_uri: str | None = None,
          artifacts_destination: str | None = None, allowed_hosts: str | None = None, auth: bool = False,
          auth_config: str | Path | None = None) -> ServerInfo:
    """Start ``mlflow server`` in its own process group and wait until it answers.

    A pairnet server already running on ``port`` is returned as it is (whatever options
    it was started with). ``auth_config`` implies ``auth``.
    """
    f = _files(port, root)
    _private_dir(f["root"])
    with _lock(f, port, wait_s + LOCK_MARGIN_S):
        rec, why = _inspect(f["pid"])
        if why:
            log.warning("%s; removed the pid file", why)
            f["pid"].unlink(missing_ok=True)
        if rec is not None:
            info = _info(f, rec)
            if health(info.url):
                return info
            raise PairnetError(f"pairnet's server on port {port} (pid {info.pid}) runs but does not answer "
                               f"{info.url}/health; see {f['log']}, or `pairnet server stop --port {port}`")
        return _spawn(f, port, host, wait_s, backend_store_uri, artifacts_destination, allowed_hosts,
                      auth or auth_config is not None, auth_config)


def _spawn(f: dict[str, Path], port: int, host: str, wait_s: float, backend_store_uri: str | None,
           artifacts_destination: str | None, allowed_hosts: str | None, auth: bool,
           auth_config: str | Path | None) -> ServerInfo:
    url = _url(host, port)
    if health(url):
        raise PairnetError(f"port {port} already has a server that pairnet did not start; "
                           f"set MLFLOW_TRACKING_URI={url} to use it, or pick another --port")
    if _port_taken(host, port):
        raise PairnetError(f"port {port} on {host} is in use by another program; pick another --port")
    backend = _backend(backend_store_uri, f)
    if backend_store_uri and backend.partition("://")[0].split("+")[0] in DATABASE_SERVERS:
        # MLflow retries an unreachable database for minutes before it gives up; say why now.
        check_connects(backend_store_uri, "backend store")
    artifacts = _local_path(artifacts_destination or str(f["artifacts"]))
    # The store URI goes in the environment, not on the command line, where `ps` would show its password.
    env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=backend)
    # MLflow's background job runners (GenAI evaluation jobs) are unused by pairnet and add
    # ~8 processes and seconds of start-up; a user can turn them back on with the variable.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", artifacts,
           "--host", host, "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        # The list replaces MLflow's default (loopback and private addresses); keep the address pairnet prints.
        own = url.split("//", 1)[1]
        cmd += ["--allowed-hosts", allowed_hosts if own in allowed_hosts.split(",") else f"{allowed_hosts},{own}"]
    elif host not in LOOPBACK:
        log.warning("the server listens on %s but accepts only localhost and private-network Host headers; "
                    "pass --allowed-hosts with the names clients use", host)
    if auth:
        cmd += ["--app-name", "basic-auth"]
        env.update(_auth_env(f, auth_config))
    try:
        logfh = open(f["log"], "ab")
    except OSError as err:
        raise PairnetError(f"cannot write the server log {f['log']}: {err.strerror}") from None
    with logfh:
        log_from = logfh.tell()
        proc = subprocess.Popen(cmd, stdout=logfh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=f["root"], env=env)
    _write_record(f["pid"], proc.pid, cmd, url, backend, auth)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            f["pid"].unlink(missing_ok=True)
            raise PairnetError(f"mlflow server exited with status {proc.returncode}: "
                               f"{_last_error(f['log'], log_from)} (see {f['log']})")
        if health(url):
            log.info("MLflow tracking server at %s (store %s)", url, mask_url(backend))
            return ServerInfo(url=url, pid=proc.pid, running=True, log_file=f["log"], store=mask_url(backend),
                              auth=auth)
        time.sleep(0.5)
    _stop_locked(f)
    raise PairnetError(f"mlflow server on {url} did not answer within {wait_s:.0f} s; see {f['log']}")


def _last_error(log_file: Path, offset: int) -> str:
    """The line of this start's log that best says why the server quit, password masked."""
    try:
        with open(log_file, "rb") as fh:
            fh.seek(offset)
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error" in ln or "Exception" in ln or ln.startswith("error")]
    line = (errors or lines or ["no output"])[-1]
    return mask_url(line)[:300]


def stop(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, root: Path | None = None) -> bool:
    """Stop pairnet's server on ``port``; True if one was running.

    A stale pid file (its process gone, or its pid now another process's) is removed with
    a warning, and nothing is signalled.
    """
    f = _files(port, root)
    if not f["root"].is_dir():
        return False
    with _lock(f, port, START_WAIT_S + LOCK_MARGIN_S):
        return _stop_locked(f)


def _stop_locked(f: dict[str, Path]) -> bool:
    rec, why = _inspect(f["pid"])
    if why:
        log.warning("%s; removed the pid file", why)
    if rec is not None:
        _kill_group(rec["pid"])
    f["pid"].unlink(missing_ok=True)
    return rec is not None


def _kill_group(pid: int) -> None:
    """SIGTERM the server's process group (the CLI and its uvicorn worker), SIGKILL what outlives the wait."""
    try:
        leader = psutil.Process(pid)
        procs = [leader, *leader.children(recursive=True)]
        own_group = os.getpgid(pid) == pid  # start_new_session made the server a group leader
    except (psutil.Error, ProcessLookupError):
        return

    def send(sig: signal.Signals, targets: list[psutil.Process]) -> None:
        if own_group:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        else:
            for p in targets:  # psutil checks each is still the same process before signalling
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass

    send(signal.SIGTERM, procs)
    _, alive = psutil.wait_procs(procs, timeout=STOP_WAIT_S)
    if alive:
        log.warning("the server did not exit within %.0f s of SIGTERM; sending SIGKILL", STOP_WAIT_S)
        send(signal.SIGKILL, alive)
        psutil.wait_procs(alive, timeout=5)


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
    raise PairnetError(f"MLflow tracking server {mask_url(uri)} is unreachable (no answer to /health within "
                       f"{REACH_TIMEOUT_S:.0f} s); start it with `pairnet server start` or fix MLFLOW_TRACKING_URI")
