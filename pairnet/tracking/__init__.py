"""MLflow integration: tracking server, run lifecycle, callback, model flavour, registry."""

import logging
import os
import sys
from pathlib import Path

# MLflow's HTTP client settings, unless the user set them: 6 retries with back-off
# 1, 2, 4, 8, 16, 32 s (about a minute in all) ride over a tracking-server restart;
# a request that hangs is given up after 60 s (MLflow's defaults: 7 retries, factor 2,
# 120 s — several minutes before a dead server is reported).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def configure_http() -> None:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates its folder and file only when the first record arrives."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True, encoding="utf-8")

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def mlflow_log_file() -> Path:
    from pairnet.paths import data_dir

    return data_dir() / "logs" / "mlflow.log"


def route_mlflow_logs() -> Path | None:
    """MLflow's INFO chatter (registry waits, input-example validation, …) goes to
    ``<data>/logs/mlflow.log``; its warnings and errors still reach the screen. MLflow's
    "View run … at" lines are left out (pairnet prints its own links). With ``-v`` (root
    logger at DEBUG) nothing is rerouted. Returns the log file, or None."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if logging.getLogger().level <= logging.DEBUG:
        return None
    path = mlflow_log_file()
    logger = logging.getLogger("mlflow")
    if any(isinstance(h, _LazyFileHandler) for h in logger.handlers):
        return path
    screen = logging.StreamHandler(sys.stderr)
    screen.setLevel(logging.WARNING)
    screen.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    to_file = _LazyFileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.handlers = [to_file, screen]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return path
