"""``init_from``: resolve a registry URI to one exact version and fetch its weights.

Weights are the registered model's own files (``weights.safetensors`` + ``spec.json``,
digit head included): the best-validation weights, with the spec needed to check the
architecture. A version pairnet did not log is refused; nothing is unpickled.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from pairnet.errors import PairnetError

@dataclass
class InitSource:
    uri: str  # the exact version, models:/name/version
    run_id: str
    state: dict
    spec: dict


def fetch_init_source(uri: str, client: MlflowClient | None = None) -> InitSource:
    from pairnet.serving.predictors import read_pair_dir
    from pairnet.tracking.model import check_version, copy_model_artifacts

    client = client or MlflowClient()
    try:
        mv = check_version(uri, client)
    except PairnetError as err:
        raise PairnetError(f"init_from: {err}; run the pretrain entry point first, or see `pairnet models`") from None
    exact = f"models:/{mv.name}/{mv.version}"
    with tempfile.TemporaryDirectory() as tmp:
        spec, state = read_pair_dir(copy_model_artifacts(exact, Path(tmp), client))
    return InitSource(uri=exact, run_id=mv.run_id, state=state, spec=spec)
