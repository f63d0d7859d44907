"""What a training run writes to MLflow besides its curves: params, inputs, outcome.

``log_start`` records the effective config, the model spec and the data; ``log_outcome``
judges the trained model (test_public, fusion-head ablation), logs its figures, logs and
registers it, links the final metrics to the logged model and gates the champion alias.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
import torch

from pairnet import names
from pairnet.data.splits import Splits
from pairnet.paths import project_root
from pairnet.tracking import registry
from pairnet.tracking.callback import final_metrics
from pairnet.tracking.evaluation import log_evaluation
from pairnet.tracking.init_from import PRESET_TAG
from pairnet.tracking.model import gate_figure, log_pair_model
from pairnet.train.config import TrainConfig
from pairnet.device import amp_dtype
from pairnet.train.loop import FitResult, metrics_from_logits, predict_logits


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _local_file_source(path: str):
    """A dataset source object for a local file. Given a bare path, MLflow guesses among its
    registered sources, finds two local ones and warns; naming the source avoids the guess."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
    return local(str(Path(path).resolve()))


def log_start(cfg: TrainConfig, model, splits: Splits, extra: dict):
    """Effective values under prefixes (``mlflow run`` already logs the raw entry-point
    parameters under their plain names, and MLflow refuses to change a logged param), and
    the train/val inputs. Returns the validation dataset, for linking the final metrics."""
    params = {**cfg.as_params(), **{f"model.{k}": v for k, v in model.spec.items()},
              "data.dir": str(splits.data_dir), "data.n_train": len(splits.train), "data.n_val": len(splits.val),
              "data.n_val_select": len(splits.select), "data.n_val_gate": len(splits.gate),
              "data.digest": splits.digest(), **extra}
    mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
    logged = {}
    for pairs, context in ((splits.train, "training"), (splits.val, "validation")):
        logged[context] = mlflow.data.from_numpy(pairs.x, targets=pairs.y, source=_local_file_source(pairs.source),
                                                 name=Path(pairs.source).stem)
        log_input(logged[context], context)
    return logged["validation"]


def log_evaluation_input(pairs) -> None:
    """The labelled test set as the run's ``evaluation`` dataset input."""
    dataset = mlflow.data.from_numpy(pairs.x, targets=pairs.y, source=_local_file_source(pairs.source),
                                     name=Path(pairs.source).stem)
    log_input(dataset, "evaluation")


def log_input(dataset, context: str, attempts: int = 4) -> None:
    """``mlflow.log_input``, again when the store refuses it for a duplicate dataset: runs logging the
    same dataset at once (stage 3 workers) race to create its row, and the loser finds it next time."""
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as err:
            duplicate = "unique constraint" in str(err).lower()
            if not duplicate or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def fusion_ablation(model, val, dev, cfg: TrainConfig) -> dict[str, float]:
    """Softmax weight of each fusion head and the val accuracy of each head alone."""
    weights = model.head.weights().detach().cpu().numpy()
    logits = predict_logits(model, val.x, device=dev, batch_size=cfg.eval_batch_size,
                            method="forward_per_head").numpy()
    out = {}
    for i, name in enumerate(model.head.NAMES):
        out[f"head_weight_{name}"] = float(weights[i])
        out[f"head_acc_{name}"] = float(((logits[:, i] > 0).astype(int) == val.y).mean())
    return out


def log_outcome(model, result: FitResult, cfg: TrainConfig, splits: Splits, dev, *, stage: str, registered: str,
                run_id: str, val_dataset=None, init_uri: str | None = None, preset: str = "") -> dict:
    from pairnet import plots

    final = dict(result.final)  # val_*: the best epoch on the val selection part, which fit chose on
    log_evaluation("val", splits.select, result.val_prob)
    if splits.public is not None:
        logits = predict_logits(model, splits.public.x, device=dev, batch_size=cfg.eval_batch_size,
                                amp=amp_dtype(cfg.amp, dev))
        pub = metrics_from_logits(logits, splits.public.y, prefix="test_public_")
        final.update(pub)
        mlflow.log_metrics(pub)
        log_evaluation_input(splits.public)
        log_evaluation("test_public", splits.public, torch.sigmoid(logits).numpy())
    if hasattr(model.head, "per_head"):  # fusion heads: weights and a per-head ablation
        ablation = fusion_ablation(model, splits.select, dev, cfg)
        final.update(ablation)
        mlflow.log_metrics(ablation)

    mlflow.log_figure(plots.learning_curves(result.history, title=f"{stage} {cfg.model_name}"), "learning_curves.png")
    mlflow.log_figure(plots.confusion(splits.select.y, result.val_prob), "confusion_matrix.png")
    mlflow.log_dict({"best_epoch": result.best_epoch, "stopped_early": result.stopped_early, **final},
                    "final_metrics.json")

    info = log_pair_model(model, splits.val.x, registered_name=registered)
    # The final metrics belong to the logged model (MLflow 3 shows them on its page) and to val.
    mlflow.log_metrics(final_metrics(result), model_id=info.model_id, dataset=val_dataset)
    version = str(info.registered_model_version)
    val_acc = float(final[names.VAL_ACC])
    # The gate part of val, chosen on by nothing: the registered model scored there exactly as a
    # champion from other data would be, so the gate compares like with like.
    gate = gate_figure(registered, version, splits.gate)
    mlflow.log_metric("gate_acc", gate.acc)
    decision = registry.register_and_gate(registered, version, val_acc, run_id, {
        "val_auc": f"{final['val_auc']:.6f}", "stage": stage, "model": cfg.model_name, "seed": cfg.seed,
        **({PRESET_TAG: preset} if preset else {}),
        **({"init_from": init_uri} if init_uri else {}),
        **({"test_public_acc": f"{final['test_public_acc']:.6f}"} if "test_public_acc" in final else {}),
    }, val_digest=splits.val.digest(),
        gate=gate,
        description=(f"{stage} {cfg.model_name} seed {cfg.seed}, trained on data {splits.digest()}"
                    + (f" from {init_uri}" if init_uri else "") + f" (run {run_id})"),
        model_description=(f"pairnet {cfg.model_name}: a siamese CNN saying whether the left digit of a pair is "
                           "greater than the right one; input uint8 pairs (N, 28, 56), output P(label 1)."))
    return {"run_id": run_id, "name": registered, "version": version, "val_acc": val_acc, "gate_acc": gate.acc,
            "test_public_acc": final.get("test_public_acc"), "promoted": decision.promoted,
            "model": cfg.model_name, "stage": stage, "seed": cfg.seed, "init_from": init_uri,
            "model_id": info.model_id}
