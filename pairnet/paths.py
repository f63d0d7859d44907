"""Every path the project uses, derived from one root.

The project root is the folder that holds ``MLproject``; ``PAIRNET_HOME`` overrides it
(useful when pairnet is installed as a package and run from elsewhere).
"""

from __future__ import annotations

import hashlib
import os
import re
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


def state_dir() -> Path:
    """pairnet's own state (folder locks, Optuna journals of user folders): ``PAIRNET_STATE_DIR``
    or ``<data>/state``. Nothing of pairnet's is written into a user's data folder but its outputs."""
    env = os.environ.get("PAIRNET_STATE_DIR")
    return Path(env).resolve() if env else data_dir() / "state"


def default_set_dir(size: str) -> Path:
    """Where the embedded default set of ``size`` is kept when a stage needs it beside a user's
    folder (pretraining for a folder without digit labels): ``<data>/default/<size>``."""
    return data_dir() / "default" / size


def is_own_data_dir(folder: str | Path) -> bool:
    """The project's default data folder or one of its default-set folders: the only folders
    pairnet fills with the default set unasked."""
    d = Path(folder).resolve()
    own = data_dir().resolve()
    return d == own or d.parent == (own / "default")


def folder_key(folder: str | Path) -> str:
    """A file-name-safe key of a folder's resolved path: its name and a short hash."""
    d = Path(folder).resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", d.name)[:40] or "root"
    return f"{name}-{hashlib.sha256(str(d).encode()).hexdigest()[:10]}"
