"""Every path the project uses, derived from one root.

The project root is the folder that holds ``MLproject``; ``PAIRNET_HOME`` overrides it
(useful when pairnet is installed as a package and run from elsewhere).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    env = os.environ.get("PAIRNET_HOME")
    if env:
        return Path(env).resolve()
    candidate = PACKAGE_DIR.parent
    if (candidate / "MLproject").exists():
        return candidate
    return Path.cwd()


def data_dir() -> Path:
    """Default data folder (pair files live here): ``PAIRNET_DATA_DIR`` or ``<root>/data``."""
    env = os.environ.get("PAIRNET_DATA_DIR")
    return Path(env).resolve() if env else project_root() / "data"


def server_dir() -> Path:
    """Tracking-server state: SQLite store, artifacts, pid and log files."""
    return data_dir() / "mlflow"
