"""`pairnet doctor`: one line per check, exit 1 when a stage would miss something."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


def test_doctor_names_a_missing_server_in_one_line_and_exits_1(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PAIRNET_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pairnet", "doctor"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    names = [line.split("  ")[0].strip() for line in lines]
    assert names == ["versions", "device", "amp", "tracking server", "data folder", "free disk"]
    (server,) = [line for line in lines if line.startswith("tracking server")]
    assert server.split()[2] == "missing" and f"{url} is unreachable: fix MLFLOW_TRACKING_URI" in server
    statuses = [line[len(max(names, key=len)) + 2:].split()[0] for line in lines]
    assert set(statuses) <= {"ok", "note", "missing"} and statuses.count("missing") == 1
    assert [line for line in lines if " missing " in line] == [server]  # the rest of this machine is fine
    assert f"{tmp_path} (writable)" in proc.stdout
