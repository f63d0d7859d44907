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
from pairnet.models.transfer import copy_matching, describe
from pairnet.tracking.registry import CHAMPION, PRETRAIN_PREFIX

# init_from=pretrained: the registry finds a pretrained tower of the run's preset that fits.
PRETRAINED = "pretrained"
PRESET_TAG = "preset"  # model-version tag: the preset a version was trained at

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


def find_pretrained(model, preset: str, client: MlflowClient | None = None) -> InitSource:
    """``init_from=pretrained``: a registered ``pairnet-pretrain-*`` version trained at ``preset``
    whose tower fits ``model`` (each name's champion first, then its newest versions), so a
    full-width model never starts from the quick tower. None there is one line saying how to
    make one."""
    client = client or MlflowClient()
    for rm in client.search_registered_models(filter_string=f"name LIKE '{PRETRAIN_PREFIX}%'", max_results=100):
        champion = str((rm.aliases or {}).get(CHAMPION, ""))
        versions = [v for v in client.search_model_versions(f"name='{rm.name}'", max_results=200)
                    if (v.tags or {}).get(PRESET_TAG) == preset]
        for mv in sorted(versions, key=lambda v: (str(v.version) != champion, -int(v.version)))[:3]:
            source = fetch_init_source(f"models:/{mv.name}/{mv.version}", client)
            try:
                copy_matching(model, source.state, source_spec=source.spec, source=source.uri)
            except PairnetError:
                continue
            return source
    raise PairnetError(f"init_from=pretrained: no pretrained tower of preset {preset} fits "
                       f"{describe(getattr(model, 'spec', {}))}; make one with `mlflow run . -e pretrain -P "
                       f"preset={preset} -P model_name=<a variant with that tower>` (or run the pipeline at "
                       f"preset {preset})")
