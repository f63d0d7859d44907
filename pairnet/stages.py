"""Stages 1–3 as tracked MLflow runs: the edge where config, data, the training loop,
tracking and the registry meet. Entry points and the CLI call these functions."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from pairnet.data.pairs import PairSet
from pairnet.data.splits import Splits, check_data_dir, load_splits
from pairnet.errors import PairnetError
from pairnet.models import create_model, model_from_spec
from pairnet.models.transfer import copy_matching
from pairnet.presets import build_config
from pairnet.tracking import registry
from pairnet.tracking.callback import MlflowCallback
from pairnet.tracking.init_from import CHECKPOINT_ARTIFACT, InitSource, download_checkpoint, fetch_init_source
from pairnet.tracking.lifecycle import managed_run, start_or_attach
from pairnet.tracking.session import setup_tracking
from pairnet.tracking.model import log_pair_model
from pairnet.train.config import TrainConfig
from pairnet.train.loop import amp_dtype, digit_targets, evaluate, fit, pick_device

log = logging.getLogger(__name__)

# Stage 3 members: (model variant, seed), DESIGN.md.
STAGE3_MEMBERS = (
    [("resnet_optimized_1.12", s) for s in (42, 2023, 2024, 2025)]
    + [("fpn_model", 42)]
    + [("improved_v2", s) for s in (42, 123, 456)]
)


@dataclass
class StageRequest:
    """What a user asked for, before presets are applied."""

    preset: str = "full"
    data_dir: str | None = None
    explicit: dict = field(default_factory=dict)  # training values the user gave
    device: str = "auto"
    resume: str = ""  # "", "true" (latest killed run of this model) or a run id
    members: str = ""  # stage 3 only: "variant:seed,..." subset of STAGE3_MEMBERS


def _git_commit() -> str:
    import subprocess

    from pairnet.paths import project_root

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- one tracked training
def train_tracked(cfg: TrainConfig, *, stage: str, splits: Splits, registered: str, run_name: str,
                  device: str = "auto", preset: str = "full", parent_run_id: str | None = None,
                  resume_run_id: str | None = None, init_source: InitSource | None = None) -> dict:
    """Train one model inside its own MLflow run; log everything; register; gate champion.

    ``init_source``: the weights ``cfg.init_from`` names, when the caller already fetched them.
    """
    dev = pick_device(device)
    tags = {
        "pairnet.stage": stage, "pairnet.model": cfg.model_name, "pairnet.seed": str(cfg.seed),
        "pairnet.data_digest": splits.digest(), "pairnet.preset": preset, "pairnet.git_commit": _git_commit(),
        "pairnet.registered_name": registered,
    }
    resume_state = None
    if resume_run_id:
        resume_state = _download_checkpoint(resume_run_id)
        cfg = TrainConfig.from_dict(resume_state["config"])
        tags["pairnet.resumed_from"] = resume_run_id
    digit_targets(cfg, splits.train)  # a digit loss without digit labels fails before any run opens
    # Seed before building: the initial weights follow cfg.seed, not the process's history.
    torch.manual_seed(cfg.seed)
    if resume_state:
        model = model_from_spec(resume_state["spec"])
    else:
        model = create_model(cfg.model_name, digit_head=cfg.aux_digit_weight > 0, **cfg.model_overrides())
    transfer = None
    if cfg.init_from and not resume_state:  # a resumed run already holds the fine-tuned weights
        source = init_source or fetch_init_source(cfg.init_from)
        transfer = copy_matching(model, source.state, source_spec=source.spec, source=source.uri)
        tags["pairnet.init_from"] = source.uri
        tags["pairnet.init_from_run"] = source.run_id
    init_digest = weights_digest(model)  # the weights training starts from: follows cfg.seed

    run_id = start_or_attach(run_name, tags, parent_run_id=parent_run_id)
    ckpt_dir = Path(tempfile.mkdtemp(prefix=f"pairnet-{run_id[:8]}-"))
    ckpt = ckpt_dir / "last.pt"
    # Metrics and the checkpoint of every epoch go to the server from a background thread
    # that buffers and retries: a server restart loses nothing, a killed run can resume.
    callback = MlflowCallback(run_id)

    def on_interrupt() -> None:
        callback.close(timeout=120)
        log.warning("interrupted: run %s keeps its last checkpoint; continue it with resume=true or resume=%s",
                    run_id, run_id)

    # The run's description in the UI (MLflow keeps it in the tag mlflow.note.content).
    MlflowClient().set_tag(run_id, "mlflow.note.content",
                           f"{stage}: {cfg.model_name}, seed {cfg.seed}, preset {preset}, {cfg.epochs} epochs max, "
                           f"data {splits.digest()}" + (f", fine-tuned from {tags['pairnet.init_from']}"
                                                        if "pairnet.init_from" in tags else ", from scratch"))
    with contextlib.ExitStack() as cleanup, managed_run(run_id, on_interrupt=on_interrupt):
        cleanup.callback(shutil.rmtree, ckpt_dir, True)  # uploaded every epoch; the local copy goes
        # Effective values under prefixes: `mlflow run` already logs the raw entry-point
        # parameters under their plain names, and MLflow refuses to change a logged param.
        params = cfg.as_params()
        params.update({f"model.{k}": v for k, v in model.spec.items()})
        params.update({"run.stage": stage, "run.preset": preset, "run.device": str(dev),
                       "run.amp_dtype": str(amp_dtype(cfg.amp, dev)), "run.registered_name": registered,
                       "data.dir": str(splits.data_dir), "data.n_train": len(splits.train),
                       "data.n_val": len(splits.val), "data.digest": splits.digest()})
        params["run.init_weights_digest"] = init_digest
        if resume_run_id:
            params["run.resumed_from"] = resume_run_id
        if transfer is not None:
            params.update(transfer.as_params())
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
        _log_datasets(splits)

        if resume_state:  # the killed run's curves continue in this run
            for row in resume_state["history"]:
                callback.on_epoch_end(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})
        from pairnet.progress import EpochBar

        bar = EpochBar(cfg.epochs, run_name, start=len(resume_state["history"]) if resume_state else 0)
        try:
            result = fit(model, splits.train, splits.val, cfg, device=dev, callbacks=[callback, bar],
                         checkpoint_path=ckpt, resume=resume_state)
        except Exception:
            callback.close(timeout=120)  # the epochs that ran are on the server before the run ends FAILED
            raise
        summary = _log_outcome(model, result, cfg, splits, dev, stage, registered, run_id,
                               init_uri=tags.get("pairnet.init_from"))
    return summary


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of a model's parameters and buffers."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _local_file_source(path: str):
    """A dataset source object for a local file. Given a bare path, MLflow guesses among its
    registered sources, finds two local ones and warns; naming the source avoids the guess."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
    return local(str(Path(path).resolve()))


def _log_datasets(splits: Splits) -> None:
    for pairs, context in ((splits.train, "training"), (splits.val, "validation")):
        ds = mlflow.data.from_numpy(pairs.x, targets=pairs.y, source=_local_file_source(pairs.source),
                                    name=Path(pairs.source).stem)
        mlflow.log_input(ds, context=context)


def _log_outcome(model, result, cfg: TrainConfig, splits: Splits, dev, stage: str, registered: str, run_id: str,
                 init_uri: str | None = None) -> dict:
    from pairnet import plots

    dtype = amp_dtype(cfg.amp, dev)
    final = dict(result.final)
    if splits.public is not None:
        pub = evaluate(model, splits.public.x, splits.public.y, device=dev, batch_size=cfg.eval_batch_size,
                       amp=dtype, prefix="test_public_")
        final.update(pub)
        mlflow.log_metrics({k: v for k, v in pub.items()})
    if hasattr(model.head, "head_logits"):  # fusion heads: weights and a per-head ablation
        final.update(_fusion_ablation(model, splits.val, dev, cfg))
        mlflow.log_metrics({k: v for k, v in final.items() if k.startswith("head_")})

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plots.learning_curves(result.history, tmp / "learning_curves.png", title=f"{stage} {cfg.model_name}")
        plots.confusion(splits.val.y, result.val_prob, tmp / "confusion_matrix.png")
        (tmp / "final_metrics.json").write_text(json.dumps(
            {"best_epoch": result.best_epoch, "stopped_early": result.stopped_early, **final}, indent=2))
        mlflow.log_artifacts(str(tmp))

    info = log_pair_model(model, splits.val.x, registered_name=registered)
    version = str(info.registered_model_version)
    val_acc = float(final["val_acc"])
    decision = registry.register_and_gate(registered, version, val_acc, run_id, {
        "val_auc": f"{final['val_auc']:.6f}", "stage": stage, "model": cfg.model_name, "seed": cfg.seed,
        **({"init_from": init_uri} if init_uri else {}),
        **({"test_public_acc": f"{final['test_public_acc']:.6f}"} if "test_public_acc" in final else {}),
    }, description=(f"{stage} {cfg.model_name} seed {cfg.seed}, trained on data {splits.digest()}"
                    + (f" from {init_uri}" if init_uri else "") + f" (run {run_id})"),
        model_description=(f"pairnet {cfg.model_name}: a siamese CNN saying whether the left digit of a pair is "
                           "greater than the right one; input uint8 pairs (N, 28, 56), output P(label 1)."))
    return {"run_id": run_id, "name": registered, "version": version, "val_acc": val_acc,
            "test_public_acc": final.get("test_public_acc"), "promoted": decision.promoted,
            "model": cfg.model_name, "stage": stage, "seed": cfg.seed, "init_from": init_uri}


def _fusion_ablation(model, val: PairSet, dev, cfg: TrainConfig) -> dict[str, float]:
    """Softmax weight of each fusion head and the val accuracy of each head alone."""
    import torch

    model.eval()
    out = {}
    weights = model.head.weights().detach().cpu().numpy()
    with torch.inference_mode():
        logits = []
        for start in range(0, len(val), cfg.eval_batch_size):
            xb = torch.from_numpy(val.x[start:start + cfg.eval_batch_size]).to(dev).float() / 255
            fa, fb = model.forward_features(xb)
            logits.append(model.head.head_logits(model.head.features(fa.float(), fb.float())).cpu())
        logits = torch.cat(logits).numpy()
    for i, name in enumerate(model.head.NAMES):
        out[f"head_weight_{name}"] = float(weights[i])
        out[f"head_acc_{name}"] = float(((logits[:, i] > 0).astype(int) == val.y).mean())
    return out


def _download_checkpoint(run_id: str) -> dict:
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception:
        raise PairnetError(f"run '{run_id}' not found on the tracking server; cannot resume it") from None
    return download_checkpoint(run.info.run_id, client, purpose="to resume from")


def find_resumable(stage: str, model_name: str, seed: int) -> str:
    """The newest KILLED or FAILED run of this stage/model/seed that logged a checkpoint."""
    exp_ids = [e.experiment_id for e in MlflowClient().search_experiments()]
    runs = MlflowClient().search_runs(
        exp_ids,
        filter_string=(f"tags.`pairnet.stage` = '{stage}' and tags.`pairnet.model` = '{model_name}' "
                       f"and tags.`pairnet.seed` = '{seed}'"),
        order_by=["attributes.start_time DESC"], max_results=50,
    )
    for run in (r for r in runs if r.info.status in ("KILLED", "FAILED")):
        names = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "checkpoint")]
        if CHECKPOINT_ARTIFACT in names:
            return run.info.run_id
    raise PairnetError(f"no killed or failed {stage} run of {model_name} (seed {seed}) with a checkpoint to resume")


def _resume_target(req: StageRequest, stage: str, cfg: TrainConfig) -> str | None:
    value = (req.resume or "").strip()
    if value.lower() in ("", "false", "0", "no"):
        return None
    if value.lower() in ("true", "1", "yes"):
        return find_resumable(stage, cfg.model_name, cfg.seed)
    return value


# ---------------------------------------------------------------- stages
def registered_for(stage: str, variant: str, seed: int | None = None) -> str:
    """``pairnet-<variant>``; pretrained towers as ``pairnet-pretrain-<variant>``."""
    return registry.registered_name(f"pretrain-{variant}" if stage == "pretrain" else variant, seed)


def run_single(stage: str, req: StageRequest) -> dict:
    """Pretrain and stages 1–2: one model, one run, registered as ``pairnet-[pretrain-]<variant>``."""
    # Bad values, model names and data folders fail before the server, the data or a run.
    cfg = build_config(stage, req.preset, req.explicit)
    check_data_dir(req.data_dir)
    warn_if_slow(req.preset, req.device, cfg.epochs)
    setup_tracking()
    splits = load_splits(req.data_dir, req.preset)
    resume = _resume_target(req, stage, cfg)
    return train_tracked(cfg, stage=stage, splits=splits, registered=registered_for(stage, cfg.model_name),
                         run_name=f"{stage}/{cfg.model_name}/seed{cfg.seed}", device=req.device,
                         preset=req.preset, resume_run_id=resume)


def warn_if_slow(preset: str, device: str, epochs: int) -> None:
    """The full preset is the GPU recipe: on a CPU say so before hours of training start."""
    if preset == "full" and pick_device(device).type == "cpu":
        log.warning("preset full is the GPU recipe: up to %d epochs on the full set, about 30 s each on a 2-core CPU "
                    "(hours in all; every epoch's log line gives an ETA). For a quick look use -P preset=quick "
                    "(or --preset quick).", epochs)


def parse_members(text: str) -> list[tuple[str, int]]:
    if not text.strip():
        return list(STAGE3_MEMBERS)
    out = []
    for item in text.split(","):
        variant, _, seed = item.strip().partition(":")
        try:
            out.append((variant, int(seed)))
        except ValueError:
            raise PairnetError(f"member '{item}' must look like variant:seed, e.g. fpn_model:42") from None
    return out


def run_stage3(req: StageRequest) -> list[dict]:
    """One parent run; a nested child per (variant, seed) member, each registered."""
    members = parse_members(req.members)
    configs = []
    for variant, seed in members:
        explicit = {**req.explicit, "model_name": variant, "seed": seed}
        configs.append(build_config("stage3", req.preset, explicit))
    check_data_dir(req.data_dir)
    warn_if_slow(req.preset, req.device, sum(c.epochs for c in configs))
    setup_tracking()
    splits = load_splits(req.data_dir, req.preset)
    source = None
    if configs[0].init_from:  # every member must match it: checked before any run opens
        source = fetch_init_source(configs[0].init_from)
        for cfg in configs:
            copy_matching(create_model(cfg.model_name, **cfg.model_overrides()), source.state,
                          source_spec=source.spec, source=source.uri)
    parent = start_or_attach("stage3/diversity", {"pairnet.stage": "stage3", "pairnet.preset": req.preset,
                                                  "pairnet.data_digest": splits.digest()})
    results = []
    with managed_run(parent):
        mlflow.log_params({"run.preset": req.preset, "run.members": ",".join(f"{v}:{s}" for v, s in members),
                           "data.dir": str(splits.data_dir), "data.digest": splits.digest()})
        for cfg in configs:
            res = train_tracked(cfg, stage="stage3", splits=splits,
                                registered=registry.registered_name(cfg.model_name, cfg.seed),
                                run_name=f"stage3/{cfg.model_name}/seed{cfg.seed}", device=req.device,
                                preset=req.preset, parent_run_id=parent, init_source=source)
            results.append(res)
        accs = np.array([r["val_acc"] for r in results])
        mlflow.log_metrics({"members": float(len(results)), "best_member_val_acc": float(accs.max()),
                            "mean_member_val_acc": float(accs.mean())})
    return results
