"""``pairnet doctor``: what this machine gives a stage, one check a line.

Each check is (name, status, text) with status ``ok``, ``note`` (works, but worth knowing) or
``missing`` (a stage needs it); the CLI prints them and exits 1 when any is missing.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from pairnet.paths import data_dir, state_dir
from pairnet.redact import mask_url
from pairnet.tracking.server import DEFAULT_HOST, DEFAULT_PORT, health
from pairnet.device import amp_dtype, pick_device

MIN_FREE_GB = 2.0  # a full default set, checkpoints and the tracking store fit in less
PACKAGES = ("pairnet", "torch", "mlflow", "optuna", "lightgbm", "scikit-learn", "numpy")


@dataclass
class Check:
    name: str
    status: str  # ok | note | missing
    text: str


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def check_versions() -> Check:
    text = f"python {platform.python_version()}, " + ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    return Check("versions", "ok", text)


def check_device() -> list[Check]:
    import torch

    dev = pick_device("auto")
    if dev.type == "cuda":
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        where = f"cuda: {torch.cuda.device_count()} GPU(s), {', '.join(names)}"
    else:
        where = f"{dev.type}: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    checks = [Check("device", "ok", where)]
    dtype = amp_dtype("auto", dev)
    precision = str(dtype).removeprefix("torch.") if dtype is not None else "fp32 (no native bf16 here)"
    checks.append(Check("amp", "ok", f"amp=auto trains in {precision}"))
    if dev.type == "cuda" and importlib.util.find_spec("pynvml") is None:
        checks.append(Check("gpu metrics", "note", "MLflow's system metrics will carry no GPU figures: "
                                                   "pip install 'pairnet[gpu]' (nvidia-ml-py)"))
    return checks


def check_server() -> Check:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
    if not uri.startswith(("http://", "https://")):
        return Check("tracking server", "ok", f"{mask_url(uri)} (a local store, no server needed)")
    if health(uri, timeout=3.0):
        return Check("tracking server", "ok", f"{mask_url(uri)} answers /health")
    how = "fix MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "run `pairnet server start`"
    return Check("tracking server", "missing", f"{mask_url(uri)} is unreachable: {how}")


def check_storage() -> list[Check]:
    d = data_dir()
    existing = next(p for p in (d, *d.parents) if p.exists())
    free_gb = shutil.disk_usage(existing).free / 1e9
    writable = os.access(existing, os.W_OK)
    checks = [Check("data folder", "ok" if writable else "missing",
                    f"{d} ({'writable' if writable else 'not writable'}); pairnet's state in {state_dir()}")]
    status = "ok" if free_gb >= MIN_FREE_GB else "missing"
    checks.append(Check("free disk", status, f"{free_gb:.1f} GB free under {existing}"
                        + ("" if status == "ok" else f" (stages need about {MIN_FREE_GB:.0f} GB)")))
    return checks


def run_checks() -> list[Check]:
    return [check_versions(), *check_device(), check_server(), *check_storage()]
