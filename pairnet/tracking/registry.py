"""Model registry: ``pairnet-<variant>`` names, val metrics as version tags, and the
``champion`` alias moved only when a new version beats the champion's accuracy on the gate part
of val (every 5th pair, which no training, early stop or trial choice looked at), measured on the
same pairs (a champion judged on other pairs is evaluated on these first), by more than their
noise (one standard error by default); a version that does not takes the ``challenger`` alias."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.errors import PairnetError
from pairnet.fsutil import LOCK_SUFFIX, file_lock
from pairnet.paths import state_dir

log = logging.getLogger(__name__)

# Each dataset has a namespace, the prefix of its registered names: the main job's (the project's
# own default data) is ``pairnet``, a folder of the user's its own (see ``session.setup_tracking``),
# so two datasets never share a champion. The towers, trained on the default data, keep shared
# names. The namespace of this process is set once at the edge and handed to worker processes.
DEFAULT_NAMESPACE = "pairnet"
NAMESPACE_ENV = "PAIRNET_NAMESPACE"
PRETRAIN_PREFIX = "pairnet-pretrain-"
CHAMPION = "champion"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_NAMESPACE: list[str] = []  # the namespace set for this process (empty: the environment's or the default)


def set_namespace(namespace: str) -> None:
    _NAMESPACE[:] = [check_namespace(namespace)]


def namespace() -> str:
    return _NAMESPACE[0] if _NAMESPACE else check_namespace(os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE)


def check_namespace(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", text or "") or text.lower().startswith("pairnet-pretrain"):
        raise PairnetError(f"namespace {text!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                           "letter or digit (it prefixes registered model names)")
    return text


def prefix() -> str:
    return f"{namespace()}-"


def registered_name(variant: str, seed: int | None = None) -> str:
    """``<namespace>-<variant>[-seed<N>]``."""
    name = f"{prefix()}{variant}" + (f"-seed{seed}" if seed is not None else "")
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def tower_name(variant: str) -> str:
    """A pretrained tower's name: shared by every namespace (``pairnet-pretrain-<variant>``)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", f"{PRETRAIN_PREFIX}{variant}")


def stack_name() -> str:
    return f"{prefix()}stack"


# Model-version tags of the gate: what each figure was measured on.
VAL_DIGEST = "val_digest"  # digest of the val file (val_acc: the best epoch on its selection part)
GATE_ACC = "gate_acc"  # accuracy on the gate part of that val file, which nothing was chosen on
GATE_DIGEST = "gate_digest"  # digest of the gate part gate_acc was measured on
GATE_N = "gate_n"  # how many pairs the gate part holds
CHAMPION_GATE_ACC = "champion_gate_acc"  # the champion's accuracy on this version's gate part, at the gate
CHAMPION_COMPARED = "champion_compared"  # the champion version it was compared with
ON_GATE = "gate_acc_on."  # + digest: a version's accuracy on another gate part, measured by a gate


@dataclass
class GateFigure:
    """What the gate judges a new version by: its accuracy on the gate part of val (``digest``,
    ``n`` pairs: see ``pairnet.data.splits.val_parts``), and ``evaluate``, a callable
    ``models:/name/version -> accuracy`` on the same pairs for a champion judged on other ones."""

    acc: float
    digest: str
    n: int
    evaluate: Callable[[str], float] | None = None

    @classmethod
    def on(cls, acc: float, pairs, evaluate: Callable[[str], float] | None = None) -> GateFigure:
        return cls(acc, pairs.digest(), len(pairs), evaluate)


@dataclass
class GateDecision:
    name: str
    version: str
    promoted: bool
    new_acc: float  # the newcomer's gate figure
    champion_acc: float | None  # the champion's, on the same pairs
    champion_version: str | None
    measured: str = "recorded"  # how champion_acc was had: recorded on the version, or evaluated now
    margin: float = 0.0  # the gain over the champion's figure that a promotion needed
    reason: str = ""  # the decision in words, also tagged on the version (``gate_reason``)


CHALLENGER = "challenger"  # the alias of the newest version that did not beat the champion
GATE_REASON = "gate_reason"
MARGIN_SE_ENV = "PAIRNET_GATE_MARGIN_SE"
DEFAULT_MARGIN_SE = 1.0
LOCK_WAIT_S = 300.0


def margin_se() -> float:
    """Standard errors a newcomer must win by: ``PAIRNET_GATE_MARGIN_SE``, else 1."""
    text = os.environ.get(MARGIN_SE_ENV, "").strip()
    if not text:
        return DEFAULT_MARGIN_SE
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise PairnetError(f"{MARGIN_SE_ENV}={text!r} must be a number of standard errors >= 0 (default 1)")
    return value


def gate_margin(champion_acc: float, val_n: int | None, se: float) -> float:
    """``se`` standard errors of an accuracy near ``champion_acc`` measured on ``val_n`` pairs: the
    noise of that val set (binomial, sqrt(p(1-p)/n)); 0 when the size is unknown."""
    if not val_n or champion_acc != champion_acc:
        return 0.0
    p = min(max(champion_acc, 0.0), 1.0)
    return se * math.sqrt(p * (1.0 - p) / val_n)


def gate_lock(name: str) -> contextlib.AbstractContextManager[None]:
    """One gate at a time per registered name and tracking store (read alias, compare, set alias),
    for every process on this machine: a lock file in pairnet's state folder."""
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}\n{name}".encode()).hexdigest()[:16]
    return file_lock(state_dir() / "locks" / f"gate-{key}{LOCK_SUFFIX}", wait_s=LOCK_WAIT_S, note=f"gate {name}",
                     busy=f"registered model '{name}' has been gated by another process for {LOCK_WAIT_S:.0f} s; "
                          "try again when it is done")


def champion_figure(current, gate: GateFigure, client: MlflowClient) -> tuple[float, str]:
    """The champion's accuracy on the gate pairs with ``gate.digest``: its own recorded figure when
    it was measured on them, a figure an earlier gate measured there, or evaluated now with
    ``gate.evaluate(models:/name/version)`` and recorded on the champion (``gate_acc_on.<digest>``).
    NaN when none can be had (the champion cannot be loaded, or carries no figure)."""
    tags = current.tags or {}
    if gate.digest and tags.get(GATE_DIGEST) == gate.digest:
        return _float(tags.get(GATE_ACC)), "recorded"
    if gate.digest and ON_GATE + gate.digest in tags:
        return _float(tags[ON_GATE + gate.digest]), "recorded at an earlier gate"
    if not gate.digest or gate.evaluate is None:
        # No like-for-like figure: the champion's own gate figure, on other pairs.
        return _float(tags.get(GATE_ACC)), "recorded on other data"
    uri = f"models:/{current.name}/{current.version}"
    try:
        acc = float(gate.evaluate(uri))
    except (PairnetError, MlflowException, OSError) as err:
        log.warning("champion %s could not be evaluated on the new val data (%s); it stays champion",
                    uri, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return float("nan"), "unloadable"
    client.set_model_version_tag(current.name, current.version, ON_GATE + gate.digest, f"{acc:.6f}")
    return acc, "evaluated on this gate part"


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def champion_gate(name: str, version: str, gate: GateFigure, client: MlflowClient | None = None, *,
                  se: float | None = None) -> GateDecision:
    """Point ``champion`` at ``version`` iff its gate figure beats the current champion's on the
    same gate pairs by more than their noise (``se`` standard errors on ``gate.n`` pairs, see
    ``gate_margin``): a champion judged on other pairs is first evaluated on these with
    ``gate.evaluate``. Nothing was chosen on the gate pairs, so neither side carries a selection
    gain. A figure that cannot be had (NaN, either side) never promotes. A version that loses
    takes ``challenger``. The whole read-compare-set holds ``gate_lock(name)``."""
    client = client or MlflowClient()
    se = margin_se() if se is None else se
    new_acc, n = gate.acc, gate.n
    with gate_lock(name):
        current = champion_version(name, client)
        old_acc, measured, margin = None, "none", 0.0
        if not new_acc == new_acc:
            promoted, reason = False, "its own gate figure could not be had"
        elif current is None:
            promoted, reason = True, "no champion yet"
        elif str(current.version) == str(version):
            promoted, reason = True, "already champion"
        else:
            old_acc, measured = champion_figure(current, gate, client)
            margin = gate_margin(old_acc, n, se)
            if not old_acc == old_acc:
                promoted = False
                reason = f"champion v{current.version}'s figure could not be had ({measured}); it stays champion"
            else:
                promoted = new_acc > old_acc + margin
                reason = (f"gate part: {new_acc:.4f} {'>' if promoted else '<='} champion v{current.version} "
                          f"{old_acc:.4f} ({measured}) + margin {margin:.4f} ({se:g} SE on {n or '?'} pairs)")
        client.set_registered_model_alias(name, CHAMPION if promoted else CHALLENGER, version)
    decision = GateDecision(name, str(version), promoted, new_acc, old_acc,
                            current.version if current is not None else None, measured, margin, reason)
    log.info("%s v%s: %s → %s", name, version, reason, "promoted" if promoted else "kept the champion")
    return decision


def register_and_gate(name: str, version: str, val_acc: float, run_id: str, tags: dict,
                      client: MlflowClient | None = None, *, gate: GateFigure, description: str = "",
                      model_description: str = "", val_digest: str = "") -> GateDecision:
    """The one path after a version is registered: tag it (``val_acc``, its figure on the val
    selection part, ``val_digest`` — the val file —, the gate figure ``gate_acc`` with its pairs'
    ``gate_digest`` and ``gate_n``, ``run_id`` — the run that made the model — and ``tags``), move
    ``champion`` only if it beats the champion on the same gate pairs (see ``champion_gate``), and
    record the comparison on the version (``champion_gate_acc``, ``champion_compared``) and the
    decision on the active run (tags ``pairnet.champion_decision``/``pairnet.model_version``,
    metrics ``champion_promoted`` and ``champion_gate_acc_before``)."""
    client = client or MlflowClient()
    tag_version(name, version, {"val_acc": f"{val_acc:.6f}", "run_id": run_id,
                                **({VAL_DIGEST: val_digest} if val_digest else {}),
                                GATE_ACC: f"{gate.acc:.6f}", GATE_DIGEST: gate.digest, GATE_N: str(gate.n),
                                **tags}, client)
    # Descriptions the registry UI shows: what the model is (set once, a user's edit is kept)
    # and what this version is.
    if description:
        client.update_model_version(name, str(version), description=f"{description}; val acc {val_acc:.4f}")
    if model_description and not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_description)
    decision = champion_gate(name, version, gate, client=client)
    tag_version(name, version, {GATE_REASON: decision.reason[:5000]}, client)
    if decision.champion_version is not None and decision.champion_acc is not None:
        tag_version(name, version, {CHAMPION_GATE_ACC: f"{decision.champion_acc:.6f}",
                                    CHAMPION_COMPARED: f"v{decision.champion_version} ({decision.measured})"}, client)
    mlflow.set_tags({names.TAG_CHAMPION_DECISION: "promoted" if decision.promoted else "kept",
                     names.TAG_MODEL_VERSION: str(version)})
    mlflow.log_metric("champion_promoted", float(decision.promoted))
    if decision.champion_acc is not None and decision.champion_acc == decision.champion_acc:
        mlflow.log_metric("champion_gate_acc_before", decision.champion_acc)
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


def list_registered(starts: str | None = None, client: MlflowClient | None = None) -> list[dict]:
    """Rows (name, version, aliases, val_acc, run_id) for every model version whose name starts
    with ``starts`` (default: this namespace's models and the shared towers)."""
    client = client or MlflowClient()
    rows = []
    prefixes = [starts] if starts is not None else [prefix(), PRETRAIN_PREFIX]
    found = {rm.name: rm for p in prefixes
             for rm in client.search_registered_models(filter_string=f"name LIKE '{p}%'", max_results=1000)}
    for rm in found.values():
        aliases: dict[str, list[str]] = {}
        for alias, ver in (rm.aliases or {}).items():
            aliases.setdefault(str(ver), []).append(alias)
        for mv in client.search_model_versions(f"name='{rm.name}'", max_results=1000):
            rows.append({
                "name": rm.name, "version": int(mv.version),
                "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                "val_acc": mv.tags.get("val_acc", ""), "val_digest": mv.tags.get(VAL_DIGEST, ""),
                "gate_acc": mv.tags.get(GATE_ACC, ""), "gate_digest": mv.tags.get(GATE_DIGEST, ""),
                "champion_gate_acc": mv.tags.get(CHAMPION_GATE_ACC, ""),
                "champion_compared": mv.tags.get(CHAMPION_COMPARED, ""), "run_id": mv.run_id,
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
