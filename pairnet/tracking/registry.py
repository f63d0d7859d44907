"""Model registry: ``pairnet-<variant>`` names, val metrics as version tags, and the
``champion`` alias moved only when a new version beats the champion's val accuracy."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.errors import PairnetError

log = logging.getLogger(__name__)

PREFIX = "pairnet-"
PRETRAIN_PREFIX = "pairnet-pretrain-"
CHAMPION = "champion"
STACK_NAME = "pairnet-stack"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def registered_name(variant: str, seed: int | None = None) -> str:
    name = f"{PREFIX}{variant}" + (f"-seed{seed}" if seed is not None else "")
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


@dataclass
class GateDecision:
    name: str
    version: str
    promoted: bool
    new_val_acc: float
    champion_val_acc: float | None
    champion_version: str | None


def champion_gate(name: str, version: str, val_acc: float, metric: str = "val_acc",
                  client: MlflowClient | None = None) -> GateDecision:
    """Point ``champion`` at ``version`` iff it beats the current champion (or none exists)."""
    client = client or MlflowClient()
    current = champion_version(name, client)
    old_acc = None
    if current is not None:
        try:
            old_acc = float(current.tags.get(metric, "nan"))
        except ValueError:
            old_acc = float("nan")
    promoted = current is None or not (old_acc == old_acc) or val_acc > old_acc
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    decision = GateDecision(name, str(version), promoted, val_acc, old_acc,
                            current.version if current is not None else None)
    log.info("%s v%s: val acc %.4f vs champion %s → %s", name, version, val_acc,
             "none" if old_acc is None else f"{old_acc:.4f}", "promoted" if promoted else "kept")
    return decision


def register_and_gate(name: str, version: str, val_acc: float, run_id: str, tags: dict,
                      client: MlflowClient | None = None, *, description: str = "",
                      model_description: str = "") -> GateDecision:
    """The one path after a version is registered: tag it (``val_acc``, ``run_id`` — the run
    that made the model — and ``tags``), move ``champion`` only if it wins, and record the
    decision on the active run (tags ``pairnet.champion_decision``/``pairnet.model_version``,
    metrics ``champion_promoted`` and ``champion_val_acc_before``)."""
    import mlflow

    client = client or MlflowClient()
    tag_version(name, version, {"val_acc": f"{val_acc:.6f}", "run_id": run_id, **tags}, client)
    # Descriptions the registry UI shows: what the model is (set once, a user's edit is kept)
    # and what this version is.
    if description:
        client.update_model_version(name, str(version), description=f"{description}; val acc {val_acc:.4f}")
    if model_description and not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_description)
    decision = champion_gate(name, version, val_acc, client=client)
    mlflow.set_tags({names.TAG_CHAMPION_DECISION: "promoted" if decision.promoted else "kept",
                     names.TAG_MODEL_VERSION: str(version)})
    mlflow.log_metric("champion_promoted", float(decision.promoted))
    if decision.champion_val_acc is not None:
        mlflow.log_metric("champion_val_acc_before", decision.champion_val_acc)
    return decision


def champion_version(name: str, client: MlflowClient | None = None):
    client = client or MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def tag_version(name: str, version: str, tags: dict, client: MlflowClient | None = None) -> None:
    client = client or MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def list_registered(prefix: str = PREFIX, client: MlflowClient | None = None) -> list[dict]:
    """Rows (name, version, aliases, val_acc, run_id) for every pairnet model version."""
    client = client or MlflowClient()
    rows = []
    for rm in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'", max_results=1000):
        aliases: dict[str, list[str]] = {}
        for alias, ver in (rm.aliases or {}).items():
            aliases.setdefault(str(ver), []).append(alias)
        for mv in client.search_model_versions(f"name='{rm.name}'", max_results=1000):
            rows.append({
                "name": rm.name, "version": int(mv.version),
                "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                "val_acc": mv.tags.get("val_acc", ""), "run_id": mv.run_id,
            })
    return sorted(rows, key=lambda r: (r["name"], r["version"]))


def promote(name: str, version: str, alias: str = CHAMPION, client: MlflowClient | None = None) -> None:
    client = client or MlflowClient()
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        known = [r["version"] for r in list_registered(name, client) if r["name"] == name]
        hint = f"known versions: {known}" if known else "no such registered model"
        raise PairnetError(f"model '{name}' version {version} not found ({hint})") from None
    client.set_registered_model_alias(name, alias, str(version))


def resolve_version(uri: str, client: MlflowClient | None = None):
    """``models:/name/version`` or ``models:/name@alias`` → the registry's ModelVersion."""
    client = client or MlflowClient()
    m = MODEL_URI.match(uri.strip())
    if not m:
        raise PairnetError(f"model URI '{uri}' must look like models:/name@alias or models:/name/version")
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        return client.get_model_version(m["name"], m["version"])
    except MlflowException:
        what = f"alias '{m['alias']}'" if m["alias"] else f"version {m['version']}"
        raise PairnetError(f"registered model '{m['name']}' has no {what} ({uri})") from None
