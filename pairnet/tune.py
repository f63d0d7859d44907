"""Optuna studies over learning rate and weight decay, each trial a nested MLflow run.

The study lives in an Optuna journal file by default (``<data>/optuna.journal``: what
Optuna recommends for several processes on one machine), or in RDB storage given by URL
(SQLite, or PostgreSQL for several machines), so running again with the same study name
continues it, and several workers (processes here, or other invocations) share it.

Optuna's MLflowCallback is deprecated in Optuna 5, so the glue is written here: each
trial is a child run created with an explicit ``mlflow.parentRunId`` tag, which nests
correctly whether or not ``mlflow run`` set MLFLOW_RUN_ID.

Nothing lost, nothing left RUNNING:

- every child run carries its process identity (``pairnet.process.*`` tags) and every
  trial the same as user attr ``pairnet.process``, so whoever sees the process gone can
  end what it left behind;
- SIGINT/SIGTERM end the in-flight child run KILLED (the trial FAIL) and the parent KILLED;
  with several workers the parent forwards SIGTERM to them and waits briefly;
- a worker that dies (exit code != 0) is buried by the parent: its child run ends FAILED
  (tag ``pairnet.swept``), its trial FAIL and re-queued with the same parameters,
  and a replacement worker takes its place until this invocation has added ``n_trials``
  finished (COMPLETE or PRUNED) trials. Optuna's heartbeat does the same for trials whose
  process nobody watches (another machine, a killed parent);
- each COMPLETE trial logs its weights (artifact folder ``weights/``: safetensors + spec) on its child run, so
  the best trial is registered whichever invocation or machine ran it.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import optuna
import sqlalchemy.exc
import torch
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend

from pairnet import names
from pairnet.dburl import check_connects, with_driver
from pairnet.errors import PairnetError
from pairnet.models import create_model
from pairnet.serving import load_pair_dir, save_pair_dir
from pairnet.paths import data_dir as default_data_dir
from pairnet.paths import folder_key, is_own_data_dir, state_dir
from pairnet.pool import member_device, usable_cpus
from pairnet.presets import build_config
from pairnet.proc import ProcessId
from pairnet.redact import mask_url
from pairnet.tracking import registry
from pairnet.models.transfer import copy_matching
from pairnet.tracking.callback import MetricsLost, MlflowCallback
from pairnet.tracking.init_from import fetch_init_source
from pairnet.tracking.lifecycle import Terminated, log_config_file, tracked_run
from pairnet.tracking.model import gate_figure, log_pair_model
from pairnet.device import pick_device
from pairnet.train.loop import Callback, fit
from pairnet.data.splits import load_splits
from pairnet.tune_workers import PROCESS_ATTR, Workers
from pairnet.tracking.session import setup_tracking

log = logging.getLogger(__name__)

WEIGHTS = "weights"  # artifact folder of each COMPLETE trial's child run: weights.safetensors + spec.json
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
TRIAL_VALUE, BEST_SO_FAR = "trial_value", "best_value_so_far"  # the parent run's history metrics
JOURNAL = "optuna.journal"  # the default storage, in the data folder
LEGACY_DB = "optuna.db"  # the default before the journal; kept where it is the only one
SCHEMA_TRIES = 4  # attempts to open an RDB storage whose tables another machine is creating


@dataclass
class TuneRequest:
    model_name: str = "resnet_optimized"
    preset: str = "full"
    n_trials: int = 20  # finished (COMPLETE or PRUNED) trials this invocation adds
    timeout: float = 0.0  # seconds for this invocation; 0 = none
    study_name: str = "pairnet-lr-wd"
    storage: str = ""  # RDB URL or journal file path; "" = a journal file (see storage_url)
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
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 30  # seconds without a heartbeat before a trial counts as dead (FAIL, re-queued)
    config_text: str = ""  # the --config file as given, logged as the parent's config.yaml
    parent_run_id: str | None = None  # the study run nested under this run (the pipeline's)
    tags: dict | None = None  # more tags on the study run (the pipeline's step key)

    def validate(self) -> "TuneRequest":
        for name, lo, hi in (("lr", self.lr_low, self.lr_high), ("weight_decay", self.wd_low, self.wd_high)):
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
                raise PairnetError(f"{name} bounds [{lo}, {hi}] must be finite and satisfy 0 < low < high "
                                   f"(log-uniform search)")
        if not (math.isfinite(self.timeout) and self.timeout >= 0):
            raise PairnetError(f"timeout must be a finite number of seconds >= 0 (0: none; got {self.timeout})")
        _whole("n_trials", self.n_trials, 1)
        _whole("n_workers", self.n_workers, 1)
        _whole("epochs", self.epochs, 0)
        _whole("heartbeat_interval", self.heartbeat_interval, 1)
        _whole("grace_period", self.grace_period, self.heartbeat_interval + 1)
        cpus = usable_cpus()
        if self.n_workers > cpus:  # refused, not capped: the user asked for a layout this machine cannot give
            raise PairnetError(f"n_workers {self.n_workers} exceeds the {cpus} CPU cores available here; use at "
                               f"most {cpus}, or start another `pairnet tune` with the same study on another machine")
        return self

    def storage_url(self) -> str:
        """An RDB URL (``scheme://...``) or the absolute path of an Optuna journal file.

        The default is ``<data>/optuna.journal`` for the project's own data folder, and
        ``<state>/optuna/<folder>-<hash>.journal`` for any other (pairnet writes nothing of its
        own into a user's folder); a folder that already holds ``optuna.journal`` or only
        ``optuna.db`` (the defaults before) keeps using it, so its studies continue.
        """
        if self.storage:
            return self.storage if "://" in self.storage else str(Path(self.storage).expanduser().resolve())
        d = Path(self.data_dir) if self.data_dir else default_data_dir()
        if (d / LEGACY_DB).exists() and not (d / JOURNAL).exists():
            return f"sqlite:///{(d / LEGACY_DB).resolve()}"
        if (d / JOURNAL).exists() or is_own_data_dir(d):
            d.mkdir(parents=True, exist_ok=True)
            return str((d / JOURNAL).resolve())
        # A user's folder: the study lives in pairnet's state folder, one journal per data folder.
        folder = state_dir() / "optuna"
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder / f"{folder_key(d)}.journal")


def _whole(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PairnetError(f"{name} must be a whole number >= {low} (got {value})")


def check_storage_url(url: str) -> None:
    """Connect once with SQLAlchemy, so a bad URL fails in one line before Optuna starts."""
    check_connects(url, "Optuna storage")


def open_storage(req: TuneRequest) -> optuna.storages.BaseStorage:
    url = req.storage_url()
    if "://" not in url:
        return _open_journal(Path(url), req.study_name)
    check_storage_url(url)
    for attempt in range(1, SCHEMA_TRIES + 1):
        try:
            return optuna.storages.RDBStorage(
                with_driver(url),
                heartbeat_interval=req.heartbeat_interval,
                grace_period=req.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None,
            )
        except sqlalchemy.exc.SQLAlchemyError as err:
            # Machines that open a new database at once race to create Optuna's tables, and
            # the losers fail (tests/test_postgres.py: one of two at once, on PostgreSQL 15);
            # once the winner has committed, the tables are there.
            if attempt == SCHEMA_TRIES:
                first = str(err).strip().splitlines()[0]
                raise PairnetError(mask_url(f"Optuna storage '{url}' is not usable: {first}")) from None
            time.sleep(random.uniform(0.2, 1.0) * attempt)


class JournalStudyStorage(optuna.storages.JournalStorage):
    """An Optuna journal file, the storage Optuna recommends for several processes on one machine.

    Measured by ``bench/storage_bench.py`` (4 processes, one study, fast trials, some
    enqueued as re-queued trials are): the journal kept every trial and ran each enqueued
    one once; SQLite kept the plain trials, but lets two processes take the same WAITING
    trial (it has no row locks), and the slower one dies updating a finished trial.

    A journal has no heartbeat. The parent still sees its own workers die and re-queues
    their trials with the callback an RDB heartbeat would use (``bury``), and opening the
    journal fails the RUNNING trials of this host's processes that are gone (a killed
    parent), re-queued the same way.
    """

    def get_heartbeat_stale_trial_callback(self) -> optuna.storages.RetryHeartbeatStaleTrialCallback:
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)


def _open_journal(path: Path, study_name: str) -> JournalStudyStorage:
    if not path.parent.is_dir():
        raise PairnetError(f"Optuna storage '{path}' is not usable: the folder {path.parent} does not exist "
                           f"(a journal file path, or an RDB URL such as sqlite:///... or postgresql://...)")
    try:
        storage = JournalStudyStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise PairnetError(f"Optuna storage '{path}' is not usable: {err.strerror or err}") from None
    _fail_dead_trials(storage, study_name)
    return storage


def _fail_dead_trials(storage: JournalStudyStorage, study_name: str) -> None:
    """FAIL and re-queue the RUNNING trials whose process (this host's) has exited."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return  # a new study
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        who = ProcessId.from_tags(t.user_attrs.get(PROCESS_ATTR) or {})
        if who is None or not who.on_this_host() or who.alive():
            continue  # another machine's (undecidable here) or still running
        try:
            failed = study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process failed it first
        log.warning("trial %d failed: its process (%s) is gone", t.number, who.describe())
        storage.get_heartbeat_stale_trial_callback()(study, failed)


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
        # constant_liar: with several workers, trials still running count as poor, so parallel
        # workers do not all sample next to the same best point (explicit: defaults change).
        sampler=optuna.samplers.TPESampler(seed=req.sampler_seed + 1000 * worker + existing, constant_liar=True),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )


class PruneOnValAcc(Callback):
    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.trial.report(metrics["val_acc"], step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} (val acc {metrics['val_acc']:.4f})")


def _log_weights(client: MlflowClient, run_id: str, model: torch.nn.Module) -> None:
    # safetensors + spec.json, the pickle-free format every pairnet model uses.
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pair_dir(model, Path(tmp) / WEIGHTS)
        client.log_artifacts(run_id, str(folder), artifact_path=WEIGHTS)


def load_trial_weights(run_id: str):
    """The model a COMPLETE trial logged (artifact folder ``weights/`` of its child run)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=WEIGHTS, dst_path=tmp)
        return load_pair_dir(folder)


def _objective(req: TuneRequest, parent_run_id: str, experiment_id: str, splits=None):
    splits = splits if splits is not None else load_splits(req.data_dir, req.preset)
    dev = pick_device(req.device)
    client = MlflowClient()
    me = ProcessId.current().as_tags()
    explicit = {"model_name": req.model_name, "seed": req.seed, "epochs": req.epochs or None,
                "init_from": req.init_from or None, "freeze_epochs": req.freeze_epochs,
                "tower_lr_mult": req.tower_lr_mult}
    explicit = {k: v for k, v in explicit.items() if v is not None}
    source = fetch_init_source(req.init_from, client) if req.init_from else None

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(PROCESS_ATTR, me)  # first, so the parent can find this trial if we die
        lr = trial.suggest_float("lr", req.lr_low, req.lr_high, log=True)
        wd = trial.suggest_float("weight_decay", req.wd_low, req.wd_high, log=True)
        cfg = build_config("tune", req.preset, {**explicit, "lr": lr, "weight_decay": wd})
        tracker: list[MlflowCallback] = []  # the trial's callback, once it exists

        def abort(err: BaseException) -> None:
            if tracker and isinstance(err, MetricsLost):  # the trial's run ends FAILED, tagged with the count
                tracker[0].abort(err)
            else:
                _flush(tracker[0] if tracker else None)
            if isinstance(err, Terminated):  # Optuna fails a trial on KeyboardInterrupt, not on other signals
                trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)

        tags = {names.TAG_STAGE: "tune", names.TAG_MODEL: cfg.model_name, names.TAG_SEED: str(cfg.seed),
                "optuna.study": req.study_name, "optuna.trial_number": str(trial.number),
                names.TAG_DATA_DIGEST: splits.digest(), **({names.TAG_INIT_FROM: source.uri} if source else {})}
        with tracked_run(f"tune/{req.study_name}/trial{trial.number}", tags, parent_run_id=parent_run_id,
                         experiment_id=experiment_id, client=client, finished_by=(optuna.TrialPruned,),
                         end_tags=_trial_end_tags) as run:
            run.on_abort.append(abort)
            child = run.run_id
            trial.set_user_attr("mlflow_run_id", child)
            client.log_batch(child, params=[Param(k, str(v)) for k, v in
                                            {"lr": lr, "weight_decay": wd, "trial_number": trial.number,
                                             **cfg.as_params()}.items()])
            torch.manual_seed(cfg.seed)
            model = create_model(cfg.model_name, **cfg.model_overrides())
            if source is not None:
                copy_matching(model, source.state, source_spec=source.spec, source=source.uri)
            tracker.append(MlflowCallback(child, client, checkpoint_every=0))
            result = fit(model, splits.train, splits.select, cfg, device=dev,
                         callbacks=[tracker[0], PruneOnValAcc(trial)])
            # Every COMPLETE trial keeps its weights (under 4 MB even at the full preset): which
            # trial is best is only known when the study ends, perhaps in another invocation or
            # on another machine, and this way no worker has to agree with another on it.
            _log_weights(client, child, model)
            client.log_metric(child, "objective_val_acc", result.best_val_acc)
            return result.best_val_acc

    return objective


def _trial_end_tags(err: BaseException | None) -> dict[str, str]:
    """How a trial ended, on its run: Optuna's state, and what stopped it."""
    if err is None:
        return {"optuna.state": "COMPLETE"}
    if isinstance(err, optuna.TrialPruned):
        return {"pruned": "true", "optuna.state": "PRUNED"}
    if isinstance(err, (KeyboardInterrupt, Terminated)):
        return {"optuna.state": "FAIL", "pairnet.interrupted": type(err).__name__}
    return {"optuna.state": "FAIL"}


def _flush(tracker: MlflowCallback | None) -> None:
    """The epochs a trial ran reach its run before the run ends (pruned, killed, failed)."""
    if tracker is not None:
        tracker.close(timeout=60)


def _worker_study(req_dict: dict, parent_run_id: str, experiment_id: str, worker: int):
    """A spawned worker's study and objective: its own storage connection, its GPU round-robin."""
    req = TuneRequest(**{**req_dict, "device": member_device(req_dict["device"], worker)})
    return make_study(req, open_storage(req), worker), _objective(req, parent_run_id, experiment_id)


def run_tune(req: TuneRequest) -> dict:
    req.validate()
    url = req.storage_url()
    storage = open_storage(req)  # a bad URL fails here, before any run exists
    pick_device(req.device)  # as does a device that is not there
    splits = load_splits(req.data_dir, req.preset)  # made here if absent, not by several workers at once
    setup_tracking()
    if req.init_from:  # a missing model or a mismatched architecture fails before any run exists
        cfg = build_config("tune", req.preset, {"model_name": req.model_name, "init_from": req.init_from})
        source = fetch_init_source(req.init_from)
        copy_matching(create_model(cfg.model_name, **cfg.model_overrides()), source.state,
                      source_spec=source.spec, source=source.uri)
    study = make_study(req, storage)
    before = len(study.trials)
    tags = {names.TAG_STAGE: "tune", names.TAG_MODEL: req.model_name, "optuna.study": req.study_name,
            "optuna.storage": mask_url(url), **(req.tags or {})}
    what = f"Optuna study {req.study_name}: {req.n_trials} trials of lr and weight decay for {req.model_name}"
    with tracked_run(f"tune/{req.study_name}", tags, description=what, parent_run_id=req.parent_run_id) as run:
        parent = run.run_id
        experiment_id = MlflowClient().get_run(parent).info.experiment_id
        mlflow.log_params({f"tune.{k}": v for k, v in asdict(req).items()
                           if k not in ("storage", "config_text", "parent_run_id", "tags")})
        log_config_file(req.config_text)
        mlflow.log_param("tune.storage", mask_url(url))  # never log credentials
        if req.n_workers == 1:
            study.optimize(_objective(req, parent, experiment_id, splits), n_trials=req.n_trials,
                           timeout=req.timeout or None, catch=())
        else:
            open_study = functools.partial(_worker_study, asdict(req), parent, experiment_id)
            Workers(req, storage, parent, experiment_id, open_study).run()
        study = make_study(req, storage)
        summary = _summarise(study, before, req, splits)
    return summary


def _registered_version(name: str, trial_run: str) -> str | None:
    """The version already registered from this trial's weights (by an earlier invocation), if any."""
    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and tags.optuna_trial_run = '{trial_run}'")
    except MlflowException:
        return None
    return str(found[0].version) if found else None


def _registering_run(trial_run: str) -> str | None:
    """The parent run of another invocation, still RUNNING, whose trial this is: that one registers it.

    Two invocations that end at once (two machines on one study) both saw the trial unregistered
    and registered it twice; the one that ran it registers it before its run ends, and an
    invocation that finds the owner's run ended finds the version too (or registers it, when
    the owner died first).
    """
    client = MlflowClient()
    try:
        owner = client.get_run(trial_run).data.tags.get("mlflow.parentRunId")
        if owner is None or owner == mlflow.active_run().info.run_id:
            return None
        return owner if client.get_run(owner).info.status == "RUNNING" else None
    except MlflowException:
        return None


def _summarise(study: optuna.Study, before: int, req: TuneRequest, splits=None) -> dict:
    states = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    mlflow.log_metrics({f"trials_{k.lower()}": float(v) for k, v in states.items()})
    mlflow.log_metric("trials_total", float(len(study.trials)))
    mlflow.log_metric("trials_this_invocation", float(len(study.trials) - before))
    summary = {"study": study.study_name, "trials": len(study.trials), "states": states}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return summary
    best = study.best_trial
    mlflow.log_params({f"best_{k}": v for k, v in best.params.items()} | {"best_trial": best.number})
    mlflow.log_metric("best_value", best.value)
    log_history(complete)
    summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
    _log_plots(study)
    name = registry.registered_name(req.model_name)
    trial_run = best.user_attrs.get("mlflow_run_id")
    owner = _registering_run(trial_run) if trial_run else None
    if owner is not None:  # checked before the registry: once the owner's run has ended, its version exists
        mlflow.set_tag("pairnet.best_model", f"registered by run {owner}, which ran trial {best.number}")
        return summary
    known = _registered_version(name, trial_run) if trial_run else None
    if known is not None:
        mlflow.set_tag(names.TAG_BEST_MODEL, f"models:/{name}/{known}")
        summary.update(registered=name, version=known, promoted=None)
        return summary
    try:  # the weights live with the trial's run, wherever and whenever it ran
        model = load_trial_weights(trial_run) if trial_run else None
    except (MlflowException, OSError) as err:
        model = None
        log.warning("best trial %d (run %s) has no %s artifact: %s", best.number, trial_run, WEIGHTS, err)
    if model is None:
        mlflow.set_tag(names.TAG_BEST_MODEL, f"not registered: trial {best.number} logged no weights")
        return summary
    splits = splits if splits is not None else load_splits(req.data_dir, req.preset)
    info = log_pair_model(model, splits.val.x, registered_name=name)
    version = str(info.registered_model_version)
    gate = gate_figure(name, version, splits.gate)
    mlflow.log_metric("best_gate_acc", gate.acc)
    decision = registry.register_and_gate(name, version, best.value, trial_run, {
        "stage": "tune", "model": req.model_name, "optuna_study": study.study_name, "optuna_trial": best.number,
        "optuna_trial_run": trial_run}, val_digest=splits.val.digest(), gate=gate)
    mlflow.set_tag(names.TAG_BEST_MODEL, f"models:/{name}/{version}")
    summary.update(registered=name, version=version, promoted=decision.promoted)
    return summary


def log_history(complete: list[optuna.trial.FrozenTrial]) -> None:
    """The optimisation history on the parent run, which MLflow's UI draws as a chart: each
    finished trial's value (``trial_value``) and the best so far (``best_value_so_far``), at
    step = trial number."""
    now, best, metrics = int(time.time() * 1000), float("-inf"), []
    for t in sorted(complete, key=lambda t: t.number):
        best = max(best, t.value)
        metrics += [Metric(TRIAL_VALUE, t.value, now, t.number), Metric(BEST_SO_FAR, best, now, t.number)]
    client, run_id = MlflowClient(), mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def _log_plots(study: optuna.Study) -> None:
    """One interactive page (the optimisation history, plotly.js inside so it opens offline) and
    the other plots as PNG from Optuna's matplotlib backend: a study's plots stay a few MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_png

    with tempfile.TemporaryDirectory() as tmp:
        vis.plot_optimization_history(study).write_html(str(Path(tmp) / "optimization_history.html"),
                                                        include_plotlyjs=True)
        mlflow.log_artifact(str(Path(tmp) / "optimization_history.html"), artifact_path="optuna")
    figures = {
        "param_importances.png": lambda: vis_png.plot_param_importances(study),
        "parallel_coordinate.png": lambda: vis_png.plot_parallel_coordinate(study),
        "contour_lr_weight_decay.png": lambda: vis_png.plot_contour(study, params=["lr", "weight_decay"]),
    }
    for name, make in figures.items():
        try:
            with warnings.catch_warnings():
                # Optuna marks its matplotlib backend experimental; the plots are what we log.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = make()
        except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ finished trials
            log.warning("skipped %s: %s", name, err)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        mlflow.log_figure(fig, f"optuna/{name}")
        plt.close(fig)


def best_of_study(req: TuneRequest) -> dict:
    """The best complete trial's lr and weight decay in an existing study (``--from-study``),
    without running a trial; one line when the study or a complete trial is missing."""
    storage = open_storage(req)
    try:
        study = optuna.load_study(study_name=req.study_name, storage=storage)
    except KeyError:
        raise PairnetError(f"no Optuna study '{req.study_name}' in {mask_url(req.storage_url())}; run `pairnet tune "
                           f"--study-name {req.study_name}` first, or give tune_trials") from None
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise PairnetError(f"Optuna study '{req.study_name}' has no complete trial yet")
    best = max(complete, key=lambda t: t.value)
    return {"lr": best.params["lr"], "weight_decay": best.params["weight_decay"], "value": best.value,
            "trial": best.number, "study": req.study_name}
