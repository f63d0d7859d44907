"""Stage 4: a LightGBM meta-learner over base models pulled from the registry.

Leak-free by construction: base models were fit on train only; the meta-learner is
judged by 5-fold stratified out-of-fold accuracy on val, then fit on all of val and
judged once on test_public, which nothing was fit on. The ensemble is logged as one
pyfunc model that bundles the exact base versions, and registered as ``pairnet-stack``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.data.generate import FILES
from pairnet.data.pairs import PairSet, load_pairs, to_labels, write_npz
from pairnet.data.splits import check_data_dir, gate_mask, load_splits, val_parts
from pairnet.errors import PairnetError
from pairnet.stacking import META_FEATURES, LgbmConfig, cross_validate, make_lgbm, meta_features
from pairnet.tracking import registry
from pairnet.tracking.model import (PYFUNC_CODE, STACK_SIGNATURE, accuracy_on, check_version, copy_model_artifacts,
                                   load_trusted, mark_version, package_code, requirements, stack_artifacts)
from pairnet.tracking.evaluation import log_evaluation
from pairnet.tracking.runlog import log_evaluation_input
from pairnet.tracking.session import setup_tracking
from pairnet.train.metrics import accuracy

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BaseModel:
    name: str
    version: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def key(self) -> str:
        return f"{self.name}-v{self.version}"


# ---------------------------------------------------------------- base models
def resolve_base_models(spec: str, client: MlflowClient | None = None) -> list[BaseModel]:
    """Explicit ``models:/name@alias`` / ``models:/name/version`` URIs, or by default the
    champion of every registered ``pairnet-*`` base model."""
    client = client or MlflowClient()
    out = []
    if spec.strip():
        for uri in (u.strip() for u in spec.split(",") if u.strip()):
            mv = check_version(uri, client)  # a model pairnet did not log is refused here
            if (mv.tags or {}).get(names.TAG_KIND) == "stack":
                raise PairnetError(f"{uri} is a stack, not a base model")
            out.append(BaseModel(mv.name, str(mv.version), mv.run_id))
    else:
        for rm in client.search_registered_models(filter_string=f"name LIKE '{registry.prefix()}%'",
                                                  max_results=1000):
            # The stack itself and pretrained towers are not base models.
            if rm.name == registry.stack_name() or rm.name.startswith(registry.PRETRAIN_PREFIX):
                continue
            mv = registry.champion_version(rm.name, client)
            if mv is None:
                log.warning("skipping %s: it has no '%s' alias", rm.name, registry.CHAMPION)
                continue
            mv = check_version(f"models:/{mv.name}/{mv.version}", client)
            out.append(BaseModel(mv.name, str(mv.version), mv.run_id))
        if not out:
            raise PairnetError(f"no registered {registry.prefix()}* model has a 'champion' alias; train stages 1-3 "
                               "first")
    if len(out) < 2:
        raise PairnetError(f"stacking needs at least 2 base models, got {len(out)}")
    return sorted(out, key=lambda b: b.key)


def base_probabilities(base: BaseModel, splits: dict[str, PairSet], digest: str,
                       client: MlflowClient | None = None) -> dict[str, np.ndarray]:
    """Each base model predicts every split once; the result is cached as an artifact of
    the base model's own run, keyed by its version and the data digest."""
    client = client or MlflowClient()
    artifact = f"stack_cache/{base.key}-{digest}.npz"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(base.run_id, artifact, tmp)
            with np.load(path, allow_pickle=False) as npz:
                cached = {k: npz[k] for k in npz.files}
            if set(cached) == set(splits):
                log.info("%s: cached predictions reused", base.key)
                return cached
        except (MlflowException, OSError):
            pass
        model = load_trusted(base.uri, client)
        probs = {name: model.predict(p.x) for name, p in splits.items()}
        out = Path(tmp) / f"{base.key}-{digest}.npz"
        write_npz(out, probs)
        client.log_artifact(base.run_id, str(out), artifact_path="stack_cache")
    return probs


# ---------------------------------------------------------------- the stage
@dataclass
class StackRequest:
    models: str = ""
    data_dir: str | None = None
    preset: str = "full"
    n_folds: int = 5
    seed: int = 42
    lgbm: LgbmConfig = field(default_factory=LgbmConfig)
    parent_run_id: str | None = None  # set by the pipeline: the stack run becomes its child


def load_stack_splits(data_dir: str | Path | None, preset: str) -> tuple[dict[str, PairSet], PairSet]:
    s = load_splits(data_dir, preset)
    if s.public is None:
        raise PairnetError(f"{s.data_dir}: stacking needs test_public.npz with test_public_labels.csv")
    splits = {"val": s.val, "public": s.public}
    private = s.data_dir / FILES["private"]
    if private.exists():
        splits["private"] = load_pairs(private)
    return splits, s.val


def run_stack(req: StackRequest) -> dict:
    from sklearn.linear_model import LogisticRegression

    from pairnet import plots
    from pairnet.tracking.lifecycle import tracked_run
    from pairnet.tracking.server import tracking_uri

    if req.n_folds < 2:
        raise PairnetError(f"n_folds must be >= 2 (got {req.n_folds})")
    req.lgbm.validate()
    check_data_dir(req.data_dir)
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    bases = resolve_base_models(req.models, client)  # bad names fail before any run exists
    splits, val = load_stack_splits(req.data_dir, req.preset)
    setup_tracking()
    digest = "".join(p.digest()[:6] for p in splits.values())
    with tracked_run("stack/lightgbm", {names.TAG_STAGE: "stack", names.TAG_DATA_DIGEST: digest},
                     parent_run_id=req.parent_run_id,
                     description=f"stage 4: LightGBM over {len(bases)} registered base models") as run:
        parent = run.run_id
        mlflow.log_params({"stack.n_base_models": len(bases), "stack.n_folds": req.n_folds, "stack.seed": req.seed,
                           "stack.base_models": ",".join(b.key for b in bases)[:6000],
                           "stack.meta_features": ",".join(META_FEATURES), **req.lgbm.as_params("stack.lgbm.")})
        mlflow.set_tags({f"pairnet.base.{i}": f"{b.name}/{b.version}@{b.run_id}" for i, b in enumerate(bases)})
        from tqdm.auto import tqdm

        probs = {b.key: base_probabilities(b, splits, digest, client)
                 for b in tqdm(bases, desc="base-model inference", unit="model", disable=None)}
        y_val, y_pub = val.y, splits["public"].y
        x_val = meta_features([probs[b.key]["val"] for b in bases])
        x_pub = meta_features([probs[b.key]["public"] for b in bases])

        gate_part = val_parts(val)[1]
        oof, folds = cross_validate(x_val, y_val, req.n_folds, req.seed, req.lgbm)
        cv_acc = accuracy(oof, y_val)
        # The gate part of val: out-of-fold there too, and no base model chose anything on it.
        gate_rows = gate_mask(len(y_val))
        gate_acc = accuracy(oof[gate_rows], y_val[gate_rows])
        for i, acc in enumerate(folds, start=1):
            mlflow.log_metric("cv_fold_acc", acc, step=i)
        mlflow.log_metrics({"cv_oof_acc": cv_acc, "cv_fold_acc_std": float(np.std(folds)), "gate_acc": gate_acc})

        meta = make_lgbm(req.seed, req.lgbm, n_rows=len(y_val)).fit(x_val, y_val)
        leaf = meta.get_params()["min_child_samples"]  # what the final fit used (see leaf_floor)
        mlflow.log_param("stack.lgbm.min_child_samples_used", leaf)
        table = []

        def judge(method: str, p: np.ndarray) -> None:
            table.append({"method": method, "test_public_acc": accuracy(p, y_pub)})

        stack_public = meta.predict_proba(x_pub)[:, 1]
        judge("lightgbm_stack", stack_public)
        log_evaluation("val", val, oof)  # out-of-fold: each pair judged by a meta-model that never saw it
        log_evaluation_input(splits["public"])
        log_evaluation("test_public", splits["public"], stack_public)
        val_accs = {b.key: accuracy(probs[b.key]["val"], y_val) for b in bases}
        best = max(val_accs, key=val_accs.get)  # chosen on val, judged on test_public
        judge(f"best_single ({best})", probs[best]["public"])
        pub = np.stack([probs[b.key]["public"] for b in bases])
        judge("mean_probability", pub.mean(axis=0))
        judge("majority_vote", (to_labels(pub).mean(axis=0) > 0.5).astype(float))
        lr = LogisticRegression(max_iter=1000).fit(x_val, y_val)
        judge("logistic_regression_stack", lr.predict_proba(x_pub)[:, 1])
        for row in table:
            key = row["method"].split(" ")[0]
            mlflow.log_metric(f"test_public_acc_{key}", row["test_public_acc"])
        for key, acc in val_accs.items():
            mlflow.log_metric(f"base_val_acc_{key}"[:250], acc)

        lineage = {"base_models": [{"key": b.key, "name": b.name, "version": b.version, "run_id": b.run_id,
                                    "val_acc": val_accs[b.key]} for b in bases],
                   "meta_features": list(META_FEATURES),
                   "lgbm": req.lgbm.to_dict() | {"min_child_samples_used": leaf},
                   "cv_oof_acc": cv_acc, "cv_fold_acc": folds}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            df = pd.DataFrame(table)
            df.to_csv(tmp / "comparison.csv", index=False)
            chart = plots.bar_chart(df["method"].tolist(), df["test_public_acc"].tolist(),
                                    ylabel="test_public accuracy", title="stacking vs baselines (test_public)")
            mlflow.log_figure(chart, "comparison.png")
            (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2))
            meta.booster_.save_model(str(tmp / "meta_model.txt"))
            if "private" in splits:
                x_prv = meta_features([probs[b.key]["private"] for b in bases])
                p = meta.predict_proba(x_prv)[:, 1]
                ids = splits["private"].ids_or_index()
                pd.DataFrame({"id": ids, "label": to_labels(p)}).to_csv(tmp / "submission_private.csv",
                                                                                 index=False)
            mlflow.log_artifacts(str(tmp))
            # The served stack: exactly these base versions' weights, the booster and the lineage.
            for b in bases:
                copy_model_artifacts(b.uri, tmp / "bases" / b.key, client)
            with package_code() as code:
                info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE),
                                               artifacts=stack_artifacts(tmp), signature=STACK_SIGNATURE,
                                               input_example=np.ascontiguousarray(splits["val"].x[:2]),
                                               registered_model_name=registry.stack_name(),
                                               pip_requirements=requirements("lightgbm"), code_paths=code)
            mark_version(registry.stack_name(), info, "stack")
            # Linked to the logged model under the base models' key (final_val_acc): MLflow 3's
            # model views rank the stack beside them (its val figure is out-of-fold).
            mlflow.log_metrics({"final_val_acc": cv_acc, "cv_oof_acc": cv_acc,
                                "test_public_acc": table[0]["test_public_acc"]}, model_id=info.model_id)
        version = str(info.registered_model_version)
        decision = registry.register_and_gate(registry.stack_name(), version, cv_acc, parent, {
            "stage": "stack", "test_public_acc": f"{table[0]['test_public_acc']:.6f}",
            "base_models": ",".join(b.key for b in bases)[:5000],
        }, val_digest=splits["val"].digest(),
            gate=registry.GateFigure.on(gate_acc, gate_part, lambda uri: accuracy_on(uri, gate_part)),
            description=f"LightGBM over {', '.join(b.key for b in bases)}; data {digest}; "
                       f"val acc = 5-fold out-of-fold accuracy on val",
            model_description="pairnet stack: a LightGBM meta-learner over registered pairnet base models; input "
                              "uint8 pairs (N, 28, 56), output columns label and probability.")
    return {"run_id": parent, "name": registry.stack_name(), "version": version, "cv_oof_acc": cv_acc, "folds": folds,
            "table": table,
            "promoted": decision.promoted, "bases": [b.key for b in bases]}
