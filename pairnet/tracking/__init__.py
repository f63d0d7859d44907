"""MLflow integration: tracking server, run lifecycle, callback, model flavour, registry."""

import os

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
