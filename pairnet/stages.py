"""Stages 0–3 as tracked MLflow runs: config, data, the training loop, tracking and the
registry meet here. Entry points and the CLI call these functions."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import mlflow
import numpy as np
import torch

from pairnet import names
from pairnet.data.splits import Splits, check_data_dir, load_splits
from pairnet.device import amp_dtype, pick_device
from pairnet.models import create_model, model_from_spec
from pairnet.models.pair import weights_digest
from pairnet.errors import PairnetError
from pairnet.models.transfer import copy_matching, describe
from pairnet.pool import Member, check_jobs, member_device, report_failures, train_members
from pairnet.presets import build_config, parse_members, warn_if_slow
from pairnet.progress import EpochBar
from pairnet.tracking import registry
from pairnet.tracking.callback import MlflowCallback
from pairnet.tracking.checkpoints import download_checkpoint, local_checkpoint, resume_target
from pairnet.tracking.init_from import PRETRAINED, InitSource, fetch_init_source, find_pretrained
from pairnet.tracking.lifecycle import log_config_file, tracked_run
from pairnet.tracking.runlog import git_commit, log_outcome, log_start
from pairnet.tracking.session import setup_tracking
from pairnet.train import distributed
from pairnet.train.config import TrainConfig
from pairnet.train.loop import digit_targets, fit

log = logging.getLogger(__name__)

@dataclass
class StageRequest:
    """What a user asked for, before presets are applied."""

    preset: str = "full"
    data_dir: str | None = None
    explicit: dict = field(default_factory=dict)  # training values the user gave (dotted keys)
    device: str = "auto"
    resume: str = ""  # "", "true" (latest killed run of this model) or a run id
    members: str = ""  # stage 3 only: "variant:seed,..." subset of presets.STAGE3_MEMBERS
    jobs: int = 1  # stage 3 only: members trained at once, each in its own worker process
    config_text: str = ""  # the --config file as given, logged as the run's config.yaml


def train_tracked(cfg: TrainConfig, *, stage: str, splits: Splits, registered: str, run_name: str,
                  device: str = "auto", preset: str = "full", parent_run_id: str | None = None,
                  resume_run_id: str | None = None, init_source: InitSource | None = None,
                  config_text: str = "", extra_tags: dict | None = None) -> dict:
    """Train one model inside its own MLflow run; log everything; register; gate champion.

    ``init_source``: the weights ``cfg.init_from`` names, when the caller already fetched them.
    ``extra_tags``: more tags the run carries from its start (the pipeline's step key).
    """
    dev, commit = pick_device(device), git_commit()
    tags = {names.TAG_STAGE: stage, names.TAG_MODEL: cfg.model_name, names.TAG_SEED: str(cfg.seed),
            names.TAG_DATA_DIGEST: splits.digest(), names.TAG_PRESET: preset, names.TAG_GIT_COMMIT: commit,
            names.TAG_SOURCE_COMMIT: commit, names.TAG_REGISTERED_NAME: registered, **(extra_tags or {})}
    me = distributed.current()  # under torchrun only rank 0 gets here; the others run train_replica
    resume = distributed.share(download_checkpoint(resume_run_id) if resume_run_id else None, me)
    if resume:
        cfg = type(cfg).from_dict(resume["config"])
        tags[names.TAG_RESUMED_FROM] = resume_run_id
        if cfg.init_from.startswith("models:/") and "@" not in cfg.init_from:  # the exact version it started from
            tags[names.TAG_INIT_FROM] = cfg.init_from
    digit_targets(cfg, splits.train)  # a digit loss without digit labels fails before any run opens
    torch.manual_seed(cfg.seed)  # before building: the initial weights follow cfg.seed alone
    if resume:
        model = model_from_spec(resume["spec"])
    else:
        model = create_model(cfg.model_name, digit_head=cfg.aux_digit_weight > 0, **cfg.model_overrides())
    extra = {"run.stage": stage, "run.preset": preset, "run.device": str(dev), "run.registered_name": registered,
             "run.amp_dtype": str(amp_dtype(cfg.amp, dev)), "run.init_weights_digest": weights_digest(model),
             "run.world_size": me.world, **({"run.resumed_from": resume_run_id} if resume else {})}
    if cfg.init_from and not resume:  # a resumed run already holds the fine-tuned weights
        if cfg.init_from == PRETRAINED:  # the exact version found is what the run logs
            source = find_pretrained(model, preset)
            cfg = replace(cfg, init_from=source.uri)
        else:
            source = init_source or fetch_init_source(cfg.init_from)
        extra.update(copy_matching(model, source.state, source_spec=source.spec, source=source.uri).as_params())
        tags.update({names.TAG_INIT_FROM: source.uri, names.TAG_INIT_FROM_RUN: source.run_id})
    origin = f"fine-tuned from {tags[names.TAG_INIT_FROM]}" if names.TAG_INIT_FROM in tags else "from scratch"
    description = (f"{stage}: {cfg.model_name}, seed {cfg.seed}, preset {preset}, {cfg.epochs} epochs max, "
                   f"data {splits.digest()}, {origin}")
    with tracked_run(run_name, tags, parent_run_id=parent_run_id, description=description) as run, \
            local_checkpoint(run.run_id) as ckpt:
        # Metrics and the checkpoint of every epoch go to the server from a background thread
        # that buffers and retries: a server restart loses nothing, a killed run can resume.
        callback = MlflowCallback(run.run_id, final_metrics=False)
        run.on_abort.append(callback.abort)
        val_dataset = log_start(cfg, model, splits, extra)
        log_config_file(config_text)
        for row in (resume or {}).get("history", []):  # the killed run's curves continue here
            callback.on_epoch_end(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})
        bar = EpochBar(cfg.epochs, run_name, start=len(resume["history"]) if resume else 0)
        result = fit(model, splits.train, splits.select, cfg, device=dev, callbacks=[callback, bar],
                     checkpoint_path=ckpt, resume=resume)
        distributed.log_final_weights(me, weights_digest(model))
        return log_outcome(model, result, cfg, splits, dev, stage=stage, registered=registered, run_id=run.run_id,
                           val_dataset=val_dataset, init_uri=tags.get(names.TAG_INIT_FROM), preset=preset)


def train_replica(cfg: TrainConfig, data_dir, preset: str, device: str, me: distributed.Rank) -> None:
    """A rank other than 0: the same model and batches as rank 0, its own shard of each
    batch, no MLflow, no checkpoint. Meets rank 0 at the same collectives in the same order:
    the data barrier, the resume state, then fit's."""
    distributed.barrier(me)
    splits = load_splits(data_dir, preset)
    resume = distributed.share(None, me)
    if resume:
        cfg = type(cfg).from_dict(resume["config"])
    torch.manual_seed(cfg.seed)
    if resume:
        model = model_from_spec(resume["spec"])
    else:  # rank 0's weights (fine-tuned ones included) arrive when DDP wraps the model
        model = create_model(cfg.model_name, digit_head=cfg.aux_digit_weight > 0, **cfg.model_overrides())
    fit(model, splits.train, splits.select, cfg, device=pick_device(device), resume=resume)
    distributed.log_final_weights(me, weights_digest(model))


def registered_for(stage: str, variant: str, seed: int | None = None) -> str:
    """``pairnet-<variant>``; pretrained towers as ``pairnet-pretrain-<variant>``."""
    return registry.tower_name(variant) if stage == "pretrain" else registry.registered_name(variant, seed)


def run_single(stage: str, req: StageRequest) -> dict:
    """Pretrain and stages 1–2: one model, one run, registered as ``pairnet-[pretrain-]<variant>``."""
    # Bad values, model names and data folders fail before the server, the data or a run.
    cfg = build_config(stage, req.preset, req.explicit)
    check_data_dir(req.data_dir)
    me, device = distributed.setup(req.device)  # torchrun: join the process group
    with distributed.session(me):
        if not me.main:  # trains its shards; rank 0 alone talks to MLflow
            return train_replica(cfg, req.data_dir, req.preset, device, me)
        warn_if_slow(req.preset, device, cfg.epochs)
        setup_tracking()
        splits = load_splits(req.data_dir, req.preset)
        distributed.barrier(me)  # the data exists (made here if absent) before the replicas read it
        return train_tracked(cfg, stage=stage, splits=splits, registered=registered_for(stage, cfg.model_name),
                             run_name=f"{stage}/{cfg.model_name}/seed{cfg.seed}", device=device, preset=req.preset,
                             resume_run_id=resume_target(req.resume, stage, cfg.model_name, cfg.seed),
                             config_text=req.config_text)


def check_members_fit(source: InitSource, members: list[tuple[str, int]], configs: list[TrainConfig]) -> None:
    """One init_from serves only members whose tower it matches: the others are named in one
    line with the members that can start from it, before any run opens."""
    fits, misfits = [], []
    for (variant, seed), cfg in zip(members, configs, strict=True):
        try:
            copy_matching(create_model(cfg.model_name, **cfg.model_overrides()), source.state,
                          source_spec=source.spec, source=source.uri)
            fits.append(f"{variant}:{seed}")
        except PairnetError:
            misfits.append(f"{variant}:{seed}")
    if misfits:
        can = f"--members {','.join(fits)}" if fits else "none of these members"
        raise PairnetError(f"init_from {source.uri} ({describe(source.spec)}) does not fit the tower of "
                           f"{', '.join(misfits)}; it can start {can}; the others need a tower pretrained with "
                           "their own variant and width (pretrain -P model_name=...), or no init_from")


def run_stage3(req: StageRequest) -> list[dict]:
    """One parent run; a nested child per (variant, seed) member, each registered."""
    members, _ = parse_members(req.members), check_jobs(req.jobs)
    configs = [build_config("stage3", req.preset, {**req.explicit, "model_name": v, "seed": s}) for v, s in members]
    check_data_dir(req.data_dir)
    warn_if_slow(req.preset, req.device, sum(c.epochs for c in configs))
    setup_tracking()
    splits = load_splits(req.data_dir, req.preset)
    source = None
    if configs[0].init_from and configs[0].init_from != PRETRAINED:  # every member must fit it: checked first
        source = fetch_init_source(configs[0].init_from)
        check_members_fit(source, members, configs)
    tags = {names.TAG_STAGE: "stage3", names.TAG_PRESET: req.preset, names.TAG_DATA_DIGEST: splits.digest()}
    with tracked_run("stage3/diversity", tags, description=f"stage3: {len(members)} members") as parent:
        mlflow.log_params({"run.preset": req.preset, "run.members": ",".join(f"{v}:{s}" for v, s in members),
                           "run.jobs": req.jobs, "data.dir": str(splits.data_dir), "data.digest": splits.digest()})
        log_config_file(req.config_text)
        results = train_members([Member(cfg, "stage3", registry.registered_name(cfg.model_name, cfg.seed),
                                        f"stage3/{cfg.model_name}/seed{cfg.seed}", req.preset,
                                        member_device(req.device, i), source) for i, cfg in enumerate(configs)],
                                req.jobs, train=train_tracked, parent_run_id=parent.run_id,
                                data_dir=str(splits.data_dir), preset=req.preset, splits=splits)
        accs = np.array([r["val_acc"] for r in results if "error" not in r])
        if len(accs):
            mlflow.log_metrics({"members": float(len(accs)), "best_member_val_acc": float(accs.max()),
                                "mean_member_val_acc": float(accs.mean())})
        return report_failures(results, "stage 3 members")
