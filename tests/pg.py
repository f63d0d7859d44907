"""A throw-away PostgreSQL server for the tests: its own cluster in a temporary folder,
listening on a free loopback port with a password, stopped and removed at the end.

The binaries are Debian's (``apt-get install postgresql``: /usr/lib/postgresql/<ver>/bin)
or any ``initdb`` on PATH. PostgreSQL refuses to run as root, so under root the cluster is
made and run as ``nobody``, in a folder under the system temporary directory (pytest's own
folders are private to root and closed to that user).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

START_WAIT_S = 60.0
USER = "pairnet"  # the cluster's superuser, who owns the test databases
UNPRIVILEGED = "nobody"  # who runs the server when the tests run as root


def find_bin() -> Path | None:
    """The folder holding initdb and postgres: the newest Debian version, else PATH."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name))

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None or not (Path(initdb).parent / "postgres").exists():
        return None
    return Path(initdb).parent


@dataclass
class Postgres:
    port: int
    password: str
    folder: Path
    proc: subprocess.Popen
    host: str = "127.0.0.1"
    user: str = USER

    def url(self, database: str, password: bool = True, driver: str = "") -> str:
        """``postgresql[+driver]://user[:password]@127.0.0.1:port/database``."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        secret = f":{self.password}" if password else ""
        return f"{scheme}://{self.user}{secret}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=database, connect_timeout=5, autocommit=True)

    def create_database(self, name: str) -> str:
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, database: str, sql: str, *args) -> list[tuple]:
        with self.connect(database) as conn:
            return conn.execute(sql, args).fetchall()

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions end, no waiting for clients), then the folder goes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _run_as() -> dict:
    """Popen arguments that drop root to the unprivileged user; nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    who = pwd.getpwnam(UNPRIVILEGED)
    return {"user": who.pw_uid, "group": who.pw_gid, "extra_groups": []}


def start(bindir: Path, port: int) -> Postgres:
    """initdb a new cluster and start ``postgres`` on 127.0.0.1:``port``; wait until it takes connections."""
    drop = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="pairnet-pg-"))
    password = secrets.token_hex(12)
    try:
        pwfile = folder / "pw"
        pwfile.write_text(password + "\n")
        if drop:
            os.chown(folder, drop["user"], drop["group"])
            os.chown(pwfile, drop["user"], drop["group"])
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "LANG": "C"}
        subprocess.run([str(bindir / "initdb"), "-D", str(folder / "data"), "-U", USER, f"--pwfile={pwfile}",
                        "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"],
                       env=env, cwd=folder, check=True, capture_output=True, text=True, timeout=120, **drop)
        log = open(folder / "postgres.log", "wb")
        # fsync off: a test cluster that dies with the machine loses nothing anyone wants.
        proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(folder / "data"), "-p", str(port),
                                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={folder}",
                                 "-c", "fsync=off", "-c", "max_connections=200"],
                                env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **drop)
        log.close()
    except (OSError, subprocess.SubprocessError) as err:
        shutil.rmtree(folder, ignore_errors=True)
        detail = getattr(err, "stderr", "") or ""
        raise RuntimeError(f"could not start PostgreSQL from {bindir}: {err} {detail[-1000:]}") from None
    import psycopg

    pg = Postgres(port=port, password=password, folder=folder, proc=proc)
    deadline = time.monotonic() + START_WAIT_S
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            text = (folder / "postgres.log").read_text(errors="replace")[-2000:]
            pg.stop()
            raise RuntimeError(f"PostgreSQL on port {port} did not start (exit code {proc.poll()}): {text}")
        try:
            pg.connect().close()
            return pg
        except psycopg.OperationalError:  # until the server accepts connections
            time.sleep(0.2)
