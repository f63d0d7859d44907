"""Optuna studies over learning rate and weight decay, each trial a nested MLflow run.

The study lives in Optuna RDB storage (SQLite by default, any SQLAlchemy URL such as
PostgreSQL accepted), so running again with the same study name continues it, and
several workers (processes here, or other invocations) share it. Heartbeats mark a
dead worker's trial FAILED and ``RetryFailedTrialCallback`` re-queues it.

Optuna's MLflowCallback is deprecated in Optuna 5, so the glue is written here: each
trial is a child run created with an explicit ``mlflow.parentRunId`` tag, which nests
correctly whether or not ``mlflow run`` set MLFLOW_RUN_ID.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import optuna
import torch
from mlflow.tracking import MlflowClient

from pairnet.errors import PairnetError
from pairnet.models import create_model, model_from_spec
from pairnet.paths import data_dir as default_data_dir
from pairnet.presets import build_config
from pairnet.tracking import registry
from pairnet.models.transfer import copy_matching
from pairnet.tracking.callback import MlflowCallback
from pairnet.tracking.init_from import fetch_init_source
from pairnet.tracking.lifecycle import managed_run, start_or_attach
from pairnet.tracking.model import log_pair_model
from pairnet.train.loop import Callback, fit, pick_device

log = logging.getLogger(__name__)


@dataclass
class TuneRequest:
    model_name: str = "resnet_optimized"
    preset: str = "full"
    n_trials: int = 20
    timeout: float = 0.0  # seconds for this invocation; 0 = none
    study_name: str = "pairnet-lr-wd"
    storage: str = ""  # "" = sqlite:///<data>/optuna.db
    epochs: int = 0  # per trial; 0 = the preset's
    sampler_seed: int = 42
    n_workers: int = 1
    lr_low: float = 1e-4
    lr_high: float = 1e-2
    wd_low: float = 1e-5
    wd_high: float = 1e-3
    data_dir: str | None = None
    device: str = "auto"
    seed: int = 42
    init_from: str = ""  # every trial starts from this registered model ("" = from scratch)
    freeze_epochs: int | None = None  # None = the preset's
    tower_lr_mult: float | None = None

    def validate(self) -> "TuneRequest":
        for name, lo, hi in (("lr", self.lr_low, self.lr_high), ("weight_decay", self.wd_low, self.wd_high)):
            if not 0 < lo < hi:
                raise PairnetError(f"{name} bounds [{lo}, {hi}] must satisfy 0 < low < high (log-uniform search)")
        if self.n_trials < 1:
            raise PairnetError(f"n_trials must be >= 1 (got {self.n_trials})")
        if self.n_workers < 1:
            raise PairnetError(f"n_workers must be >= 1 (got {self.n_workers})")
        return self

    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        d = Path(self.data_dir) if self.data_dir else default_data_dir()
        d.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(d / 'optuna.db').resolve()}"


def check_storage_url(url: str) -> None:
    """Connect once with SQLAlchemy, so a bad URL fails in one line before Optuna starts."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as err:  # SQLAlchemy raises many types for bad URLs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PairnetError(f"Optuna storage '{url}' is not usable: {first}") from None


def open_storage(url: str) -> optuna.storages.RDBStorage:
    check_storage_url(url)
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=10,
        grace_period=30,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
        engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None,
    )


def make_study(req: TuneRequest, storage, worker: int = 0) -> optuna.Study:
    # TPE seeded from the sampler seed, the worker index and the trials already in the
    # study: reproducible, yet two workers (or a continued study) never replay the same
    # random start-up proposals. MedianPruner stops a trial whose
    # val accuracy at an epoch falls below the median of earlier trials at that epoch;
    # n_warmup_steps=1 keeps every trial's first (noisy) epoch.
    existing = 0
    try:
        existing = len(optuna.load_study(study_name=req.study_name, storage=storage).trials)
    except KeyError:
        pass  # a new study
    return optuna.create_study(
        study_name=req.study_name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=req.sampler_seed + 1000 * worker + existing),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )


class PruneOnValAcc(Callback):
    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.trial.report(metrics["val_acc"], step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} (val acc {metrics['val_acc']:.4f})")


def _objective(req: TuneRequest, parent_run_id: str, experiment_id: str, model_dir: Path):
    from pairnet.stages import load_splits

    splits = load_splits(req.data_dir, req.preset)
    dev = pick_device(req.device)
    client = MlflowClient()
    explicit = {"model_name": req.model_name, "seed": req.seed, "epochs": req.epochs or None,
                "init_from": req.init_from or None, "freeze_epochs": req.freeze_epochs,
                "tower_lr_mult": req.tower_lr_mult}
    explicit = {k: v for k, v in explicit.items() if v is not None}
    source = fetch_init_source(req.init_from, client) if req.init_from else None

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", req.lr_low, req.lr_high, log=True)
        wd = trial.suggest_float("weight_decay", req.wd_low, req.wd_high, log=True)
        cfg = build_config("tune", req.preset, {**explicit, "lr": lr, "weight_decay": wd})
        run = client.create_run(experiment_id, run_name=f"tune/{req.study_name}/trial{trial.number}", tags={
            "mlflow.parentRunId": parent_run_id, "pairnet.stage": "tune", "pairnet.model": cfg.model_name,
            "pairnet.seed": str(cfg.seed), "optuna.study": req.study_name, "optuna.trial_number": str(trial.number),
            "pairnet.data_digest": splits.digest(), **({"pairnet.init_from": source.uri} if source else {}),
        })
        child = run.info.run_id
        trial.set_user_attr("mlflow_run_id", child)
        client.log_batch(child, params=[mlflow.entities.Param(k, str(v)) for k, v in
                                        {"lr": lr, "weight_decay": wd, "trial_number": trial.number,
                                         **{f"cfg.{k}": v for k, v in cfg.to_dict().items()}}.items()])
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model_name, **cfg.model_overrides())
        if source is not None:
            copy_matching(model, source.state, source_spec=source.spec, source=source.uri)
        try:
            result = fit(model, splits.train, splits.val, cfg, device=dev,
                         callbacks=[MlflowCallback(child, client), PruneOnValAcc(trial)])
        except optuna.TrialPruned:
            client.set_tag(child, "pruned", "true")
            client.set_tag(child, "optuna.state", "PRUNED")
            client.set_terminated(child, "KILLED")
            raise
        except BaseException:
            client.set_tag(child, "optuna.state", "FAIL")
            client.set_terminated(child, "FAILED")
            raise
        torch.save({"state": model.state_dict(), "spec": model.spec}, model_dir / f"trial{trial.number}.pt")
        client.set_tag(child, "optuna.state", "COMPLETE")
        client.log_metric(child, "objective_val_acc", result.best_val_acc)
        client.set_terminated(child, "FINISHED")
        return result.best_val_acc

    return objective


def _worker(req_dict: dict, parent_run_id: str, experiment_id: str, model_dir: str, n_trials: int,
            worker: int = 0) -> None:
    """One worker process: its own storage connection, its share of the trials."""
    req = TuneRequest(**req_dict)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // req.n_workers))
    study = make_study(req, open_storage(req.storage_url()), worker)
    study.optimize(_objective(req, parent_run_id, experiment_id, Path(model_dir)), n_trials=n_trials,
                   timeout=req.timeout or None, catch=())


def run_tune(req: TuneRequest) -> dict:
    from pairnet.stages import setup_tracking

    req.validate()
    url = req.storage_url()
    storage = open_storage(url)  # a bad URL fails here, before any run exists
    setup_tracking()
    if req.init_from:  # a missing model or a mismatched architecture fails before any run exists
        cfg = build_config("tune", req.preset, {"model_name": req.model_name, "init_from": req.init_from})
        source = fetch_init_source(req.init_from)
        copy_matching(create_model(cfg.model_name, **cfg.model_overrides()), source.state,
                      source_spec=source.spec, source=source.uri)
    study = make_study(req, storage)
    before = len(study.trials)
    parent = start_or_attach(f"tune/{req.study_name}", {"pairnet.stage": "tune", "pairnet.model": req.model_name,
                                                        "optuna.study": req.study_name})
    experiment_id = MlflowClient().get_run(parent).info.experiment_id
    model_dir = Path(tempfile.mkdtemp(prefix="pairnet-tune-"))
    with managed_run(parent):
        mlflow.log_params({f"tune.{k}": v for k, v in asdict(req).items() if k != "storage"})
        mlflow.log_param("tune.storage", url.split("@")[-1])  # never log credentials
        shares = [req.n_trials // req.n_workers + (i < req.n_trials % req.n_workers) for i in range(req.n_workers)]
        if req.n_workers == 1:
            _worker(asdict(req), parent, experiment_id, str(model_dir), req.n_trials)
        else:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_worker, args=(asdict(req), parent, experiment_id, str(model_dir), n, i))
                     for i, n in enumerate(shares) if n]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed:
                raise PairnetError(f"{len(failed)} tuning worker(s) failed (exit codes {failed})")
        study = make_study(req, storage)
        summary = _summarise(study, before, model_dir, req)
    return summary


def _summarise(study: optuna.Study, before: int, model_dir: Path, req: TuneRequest) -> dict:
    states = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    mlflow.log_metrics({f"trials_{k.lower()}": float(v) for k, v in states.items()})
    mlflow.log_metric("trials_total", float(len(study.trials)))
    mlflow.log_metric("trials_this_invocation", float(len(study.trials) - before))
    summary = {"study": study.study_name, "trials": len(study.trials), "states": states}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()} | {"best_trial": best.number})
        mlflow.log_metric("best_value", best.value)
        summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
        _log_plots(study)
        saved = model_dir / f"trial{best.number}.pt"
        if saved.exists():  # the best trial ran in this invocation: register its model
            state = torch.load(saved, map_location="cpu", weights_only=True)
            model = model_from_spec(state["spec"])
            model.load_state_dict(state["state"])
            from pairnet.stages import load_splits

            splits = load_splits(req.data_dir, req.preset)
            name = registry.registered_name(req.model_name)
            info = log_pair_model(model, splits.val.x, registered_name=name)
            version = str(info.registered_model_version)
            registry.tag_version(name, version, {"val_acc": f"{best.value:.6f}", "stage": "tune",
                                                 "model": req.model_name, "optuna_trial": best.number})
            decision = registry.champion_gate(name, version, best.value)
            mlflow.set_tag("pairnet.champion_decision", "promoted" if decision.promoted else "kept")
            summary.update(registered=name, version=version, promoted=decision.promoted)
    return summary


def _log_plots(study: optuna.Study) -> None:
    import optuna.visualization as vis

    figures = {
        "optimization_history.html": lambda: vis.plot_optimization_history(study),
        "param_importances.html": lambda: vis.plot_param_importances(study),
        "parallel_coordinate.html": lambda: vis.plot_parallel_coordinate(study),
        "contour_lr_weight_decay.html": lambda: vis.plot_contour(study, params=["lr", "weight_decay"]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in figures.items():
            try:
                make().write_html(str(Path(tmp) / name), include_plotlyjs="cdn")
            except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ finished trials
                log.warning("skipped %s: %s", name, err)
        mlflow.log_artifacts(tmp, artifact_path="optuna")
