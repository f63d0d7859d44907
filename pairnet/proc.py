"""Who is running: a process named by host, pid and start time.

A pid alone is not an identity: once a process exits its pid is reused. Host + pid +
start time names one process for good, so pairnet can tell whether the process that
wrote a pid file, or that owns a RUNNING MLflow run, is still the one alive.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import psutil

TAG_PREFIX = "pairnet.process."


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ValueError):
        return None


@dataclass(frozen=True)
class ProcessId:
    host: str
    pid: int
    started: float  # psutil's create_time: seconds since the epoch

    @classmethod
    def current(cls) -> "ProcessId":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _start_time(pid) or 0.0)

    @classmethod
    def of(cls, pid: int) -> "ProcessId | None":
        started = _start_time(pid)
        return None if started is None else cls(socket.gethostname(), pid, started)

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """True iff this exact process still runs (only decidable on its own host)."""
        if not self.on_this_host():
            raise ValueError(f"process {self.pid} runs on {self.host}, not on this host")
        started = _start_time(self.pid)
        if started is None:
            return False
        try:
            if psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
        return abs(started - self.started) < 0.5

    def as_tags(self) -> dict[str, str]:
        return {f"{TAG_PREFIX}host": self.host, f"{TAG_PREFIX}pid": str(self.pid),
                f"{TAG_PREFIX}started": f"{self.started:.3f}"}

    @classmethod
    def from_tags(cls, tags: dict) -> "ProcessId | None":
        try:
            return cls(tags[f"{TAG_PREFIX}host"], int(tags[f"{TAG_PREFIX}pid"]), float(tags[f"{TAG_PREFIX}started"]))
        except (KeyError, ValueError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"
