"""The whole recipe as one MLflow run: data → stage1 → stage2 variants → stage3 →
stack → predict, each step a child run of one pipeline run.

A step whose earlier run FINISHED with the same key is reused instead of rerun (the
user is told which). The key, stored on the run as the tag ``pairnet.step_key``, hashes
the step's parameters, the code version, the digest of every file the step reads (test
files included), the resolved device and AMP dtype, and the versions of torch, mlflow,
lightgbm and scikit-learn. A reused step whose registered version was deleted, or whose
predictions file changed, reruns. The whole pipeline holds the data folder's lock, so
two pipelines on one folder never interleave.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from pairnet import names, plan
from pairnet.data.generate import (FILES, GENERATOR_VERSION, LABELS_CSV, POOL_SHARE, SIZES, GenConfig, check_may_fill,
                                   ensure_dataset, has_pair_files, make_dataset)
from pairnet.errors import PairnetError, PairnetRuntimeError
from pairnet.fsutil import folder_lock
from pairnet.paths import PACKAGE_DIR, default_set_dir
from pairnet.presets import build_config, check_preset
from pairnet.tracking import registry
from pairnet.tracking.lifecycle import experiment_url, log_config_file, tracked_run
from pairnet.tracking.model import accuracies_on
from pairnet.train.loop import amp_dtype, digit_labels, pick_device
from pairnet.data.splits import Splits, check_data_dir, load_splits, preset_data_dir
from pairnet.stages import registered_for
from pairnet.tracking.checkpoints import ARTIFACT_DIR
from pairnet.tracking.server import tracking_uri
from pairnet.tracking.session import setup_tracking
from pairnet.tta import SHIFTS

log = logging.getLogger(__name__)

# Stage 0 per preset: the variants pretrained with digit + pair losses.
PRETRAIN = {
    "tiny": ("resnet_optimized",),
    "quick": ("resnet_optimized",),
    "full": ("improved_v2", "resnet_optimized", "resnet_optimized_1.12", "fpn_model"),
}
# (stage, variant, seed, init): the base models each preset trains; ``init`` is the
# pretrained variant whose tower the model shares (its champion is the starting point),
# or None for the recipe's from-scratch training. The last entry of each plan is the
# from-scratch twin of a fine-tuned model: shown in the ladder, not stacked.
PLANS = {
    "tiny": [("stage2", "resnet_optimized", 42, "resnet_optimized"),
             ("stage3", "resnet_fusion", 42, "resnet_optimized"),
             ("stage2", "resnet_optimized", 42, None)],
    "quick": [("stage2", "resnet_optimized", 42, "resnet_optimized"),
              ("stage2", "resnet_fusion", 42, "resnet_optimized"),
              ("stage3", "resnet_optimized", 2023, "resnet_optimized"),
              ("stage3", "resnet_fusion", 2024, "resnet_optimized"),
              ("stage2", "resnet_optimized", 42, None)],
    "full": [("stage1", "improved_v2", 42, "improved_v2"),
             ("stage2", "resnet_optimized_1.12", 42, "resnet_optimized_1.12"),
             ("stage2", "resnet_optimized", 42, "resnet_optimized"),
             ("stage2", "resnet_fusion", 42, "resnet_optimized")]
            + [("stage3", v, s, i) for v, s, i in [("resnet_optimized_1.12", 2023, "resnet_optimized_1.12"),
                                                   ("resnet_optimized_1.12", 2024, "resnet_optimized_1.12"),
                                                   ("resnet_optimized_1.12", 2025, "resnet_optimized_1.12"),
                                                   ("fpn_model", 42, "fpn_model"),
                                                   ("improved_v2", 123, "improved_v2"),
                                                   ("improved_v2", 456, "improved_v2")]]
            + [("stage2", "resnet_optimized_1.12", 42, None)],
}


PRETRAIN_MODES = ("default", "none")

# Fine-tuned steps keep the digit loss when the training file has digit labels.
FINETUNE_DIGIT_WEIGHT = 1.0


@dataclass
class PipelineRequest:
    preset: str = "quick"
    data_dir: str | None = None
    device: str = "auto"
    seed: int = 42  # dataset seed
    jobs: int = 1  # base models trained at once, each in its own worker process
    # Where the pretrained towers learn to read digits: None = data_dir when its training file
    # carries digit labels (the default set does), else the preset's default set in a folder of
    # pairnet's own (paths.default_set_dir), made once and shared by every data folder.
    pretrain_data_dir: str | None = None
    config_text: str = ""  # the --config file as given, logged as the pipeline run's config.yaml
    # default: towers pretrained on pairnet's default set (outside data: MNIST scans); none: no
    # tower, every model from scratch on the folder's own labels (a course that forbids outside data)
    pretrain: str = "default"
    plan: bool = False  # print the steps and their estimates; train and write nothing
    # An Optuna study of lr and weight decay on the folder before the base models, which then take
    # the best trial's values: tune_trials new trials, or from_study, an existing study's best.
    tune_trials: int = 0
    from_study: str = ""
    # Test-time shifts (pairnet.tta) for the zero-shot rows and the predictions written. Off by
    # default: +1.4 points on the dev pairs' choosing half, -0.6 on the reporting half.
    tta: bool = False


def code_version() -> str:
    """Hash of the package's source: a step reruns when the code that made it changed."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


# The files each kind of step reads.
TRAIN_READS = (FILES["train"], FILES["val"], FILES["public"], LABELS_CSV)
STACK_READS = (FILES["val"], FILES["public"], LABELS_CSV, FILES["private"])
PREDICT_READS = (FILES["private"],)
_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def reads_digest(d: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {n: file_digest(d / n) if (d / n).exists() else "absent" for n in names}


def environment() -> dict[str, str]:
    import lightgbm
    import sklearn
    import torch

    return {"torch": torch.__version__, "mlflow": mlflow.__version__, "lightgbm": lightgbm.__version__,
            "scikit-learn": sklearn.__version__}


def step_key(step: str, params: dict, code: str, reads: dict, env: dict) -> str:
    """Hash of everything a step's result depends on (see the module docstring)."""
    blob = json.dumps({"step": step, "params": params, "code": code, "reads": reads, "env": env},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def reusable(key: str, client: MlflowClient, name: str | None = None) -> mlflow.entities.Run | None:
    """The FINISHED run with ``key`` whose registered version still exists (``name``: under that
    registered name rather than the one the run recorded): what a plan counts as reused and a
    run reuses."""
    done = find_finished(key, client)
    return done if done is not None and _version_exists(done, client, name) else None


def find_finished(key: str, client: MlflowClient) -> mlflow.entities.Run | None:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids,
                              filter_string=f"tags.`{names.TAG_STEP_KEY}` = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _summary_from_run(run) -> dict:
    t, m = run.data.tags, run.data.metrics
    return {"run_id": run.info.run_id, "name": t[names.TAG_REGISTERED_NAME], "version": t[names.TAG_MODEL_VERSION],
            "val_acc": m.get("final_val_acc"), "test_public_acc": m.get("test_public_acc"),
            "stage": t[names.TAG_STAGE], "model": t[names.TAG_MODEL], "seed": int(t[names.TAG_SEED]),
            "init_from": t.get(names.TAG_INIT_FROM), "reused": True}


def run_pipeline(req: PipelineRequest) -> dict:
    from pairnet.parallel import check_jobs

    preset = check_preset(req.preset)
    check_jobs(req.jobs)
    if req.pretrain not in PRETRAIN_MODES:
        raise PairnetError(f"pretrain must be one of {', '.join(PRETRAIN_MODES)} (got {req.pretrain!r}): default "
                           "pretrains the towers on pairnet's default set, none trains every model from scratch on "
                           "your folder's labels alone")
    d = preset_data_dir(check_data_dir(req.data_dir), req.preset)
    if not has_pair_files(d):
        check_may_fill(d)  # a mistyped folder fails before anything starts
    if req.pretrain_data_dir:
        if req.pretrain == "none":
            raise PairnetError("pretrain=none trains no tower: drop pretrain_data_dir, or use pretrain=default")
        check_data_dir(req.pretrain_data_dir)
    if isinstance(req.tune_trials, bool) or not isinstance(req.tune_trials, int) or req.tune_trials < 0:
        raise PairnetError(f"tune_trials must be a whole number >= 0 (got {req.tune_trials!r})")
    if req.tune_trials and req.from_study:
        raise PairnetError("give tune_trials (a new study) or from_study (an existing one), not both")
    pick_device(req.device)  # an unusable device fails before anything starts
    if req.plan:
        return _plan_only(req, preset, d)
    with folder_lock(d, f"run the {req.preset} pipeline"):
        return _run_locked(req, preset, d)


@dataclass
class Recipe:
    """What the pipeline trains for a request and a folder, decided before anything runs."""

    towers: tuple[str, ...]  # variants pretrained (none with pretrain=none)
    models: list[tuple]  # base models: (stage, variant, seed, tower variant or None)
    twin: tuple | None  # the from-scratch twin of a fine-tuned model: a ladder row, not stacked
    tower_dir: Path | None  # the folder the towers pretrain on
    tower_set: GenConfig | None  # the default set made there when absent (None: the folder is given)
    tower_values: dict  # training values pretraining adds there
    beside: bool  # the towers learn on other data than the folder's: they get zero-shot rows and are stacked


def decide(req: PipelineRequest, preset: dict, d: Path) -> Recipe:
    """The recipe for this request: the preset's plan; where its towers pretrain (see
    ``PipelineRequest.pretrain_data_dir``); with ``pretrain=none`` no tower, every model from
    scratch on the folder's own labels, and no twin (it would be the first model again)."""
    plan = PLANS[req.preset]
    if req.pretrain == "none":
        return Recipe((), [(stage, v, seed, None) for stage, v, seed, _ in plan[:-1]], None, None, None, {}, False)
    if req.pretrain_data_dir:
        folder, gen, values = Path(req.pretrain_data_dir), None, {}
    elif not has_pair_files(d) or has_digit_labels(d):  # the default set (made in d if absent) or like it
        folder, gen, values = d, None, {}
    else:
        size = preset["default_pretrain"]["data_size"]
        # Byte-identical to the default set of that size made anywhere else (same seed, same bytes),
        # so the pretrain step's key, which hashes the files, finds a tower made from it before.
        folder, gen, values = default_set_dir(size), GenConfig(size=size, seed=req.seed), \
            preset["default_pretrain"]["pretrain"]
    return Recipe(PRETRAIN[req.preset], plan[:-1], plan[-1], folder, gen, values,
                  beside=folder.resolve() != d.resolve())


def has_digit_labels(d: Path) -> bool:
    """The folder's training file carries each half's digit (read from the file's index, not its arrays)."""
    with np.load(d / FILES["train"], allow_pickle=False) as z:
        return {"digit_a", "digit_b"} <= set(z.files)


def pretrain_splits(recipe: Recipe, req: PipelineRequest, splits) -> tuple:
    """The splits the recipe's towers train on and the training values pretraining adds there
    (``decide``): the folder's own splits, or the default set beside it, made there first when
    absent (again when it holds an older one)."""
    if not recipe.beside:
        return splits, {}
    gen = recipe.tower_set
    if gen is not None:
        folder = recipe.tower_dir
        if has_pair_files(folder) and not _meta_matches(folder, gen):
            log.warning("%s holds an older default set: making the %s set again", folder, gen.size)
            make_dataset(folder, gen, force=True)
        ensure_dataset(folder, size=gen.size, seed=gen.seed, severity=gen.severity)
        log.info("step pretrain: %s has no digit labels; the towers pretrain on the default %s set in %s",
                 splits.data_dir, gen.size, folder)
    return load_splits(recipe.tower_dir, req.preset), recipe.tower_values


def _plan_only(req: PipelineRequest, preset: dict, d: Path) -> dict:
    """``--plan``: the steps and their estimates; reads the tracking store to tell reuse, trains
    and writes nothing (no run, no experiment, no data)."""
    try:
        mlflow.set_tracking_uri(tracking_uri(start_local=False))
        client = MlflowClient()
    except PairnetError as err:
        log.warning("%s; the plan cannot tell reused steps, so it counts every step", err)
        client = None
    recipe = decide(req, preset, d)
    steps = plan_steps(Ctx(req, preset, d, recipe, code_version(), environment(), client))
    return {"plan": steps, "text": plan.render(steps, _plan_header(req, d, recipe)), "eta_seconds": plan.total(steps)}


def _plan_header(req: PipelineRequest, d: Path, recipe: Recipe) -> str:
    import torch

    towers = ("no tower: every model from scratch on the folder's labels (pretrain=none)" if not recipe.towers
              else f"towers pretrained on {recipe.tower_dir}")
    return (f"pipeline plan: preset {req.preset} on {d}; {towers}; device {pick_device(req.device)}, "
            f"{torch.get_num_threads()} threads; estimates from this machine's measured throughput")


def _sizes(folder: Path | None, size: str) -> dict[str, int]:
    """Pairs per split: the files' when they exist, else the default set's of ``size``."""
    if folder is not None and has_pair_files(folder):
        out = {}
        for split, name in FILES.items():
            if (folder / name).exists():
                with np.load(folder / name, allow_pickle=False) as z:
                    out[split] = int(z["x"].shape[0]) if "x" in z.files else 0
            else:
                out[split] = 0
        return out
    return dict(SIZES[size])


# ------------------------------------------------------------------ the steps
@dataclass
class Ctx:
    """What the steps of one pipeline hand on to each other: the request and its recipe, and
    what earlier steps made or found. A plan fills it without running anything (``parent`` is
    None); a run fills it as the steps run."""

    req: PipelineRequest
    preset: dict
    d: Path
    recipe: Recipe
    code: str
    env: dict
    client: MlflowClient | None  # None: a plan that cannot reach the store (every step counts)
    parent: str | None = None  # the pipeline run (None: planning)
    eta: Eta | None = None
    gen: GenConfig | None = None  # the default set the folder holds or will hold
    sizes: dict = field(default_factory=dict)  # pairs per split of the folder
    splits: Splits | None = None  # the folder's (a plan: None until its data exist)
    tower_sizes: dict = field(default_factory=dict)
    tower_splits: Splits | None = None
    tower_extra: dict = field(default_factory=dict)  # training values pretraining adds on the default set
    towers: dict = field(default_factory=dict)  # a plan: variant -> the version reused (None: made by this run)
    tower_rows: dict = field(default_factory=dict)  # variant -> the pretrain step's row (a run)
    tuned: dict = field(default_factory=dict)  # lr and weight decay for the base models
    bases: list = field(default_factory=list)  # the base models' versions (a plan: None when trained by this run)
    rows: list = field(default_factory=list)  # the ladder's rows, in order (a run)
    trained: list = field(default_factory=list)  # the base models' and the twin's rows (a run)
    stack: dict | None = None  # the stack step's row (a run)
    stack_reused: bool = False  # a plan: the stack's finished run is reused
    n_bases: int = 0
    pair_s: float = 0.0  # a plan: seconds to score one pair with a base model
    reused: list = field(default_factory=list)
    ship: dict | None = None
    predictions: Path | None = None

    @property
    def device(self):
        return pick_device(self.req.device)

    def tower_uri(self, variant: str) -> str:
        row = self.tower_rows[variant]
        return f"models:/{row['name']}/{row['version']}"

    def speed(self, cfg) -> plan.Speed:
        return plan.measure(cfg, self.device, keep=not self.req.plan)


class PipelineStep:
    """One step of the pipeline, in one place: ``describe`` is what the plan shows (what it
    trains, on how many pairs, whether a finished run of it is reused, its estimate), ``run``
    does it (reusing by the same key through ``reusable``, resuming an interrupted run).
    ``--plan`` prints the descriptions, the ETA follows them, and a run runs the same list."""

    def describe(self, c: Ctx) -> list[plan.Step]:
        raise NotImplementedError

    def run(self, c: Ctx) -> None:
        raise NotImplementedError


class DataStep(PipelineStep):
    """The folder's pairs: the user's files as they are, or the default set, made when absent."""

    def describe(self, c: Ctx) -> list[plan.Step]:
        c.gen = GenConfig(size=c.preset["data_size"], seed=c.req.seed)
        c.sizes = _sizes(c.d, c.gen.size)
        c.splits = load_splits(c.d, c.req.preset) if has_pair_files(c.d) else None
        if has_pair_files(c.d):
            return []
        n = sum(c.sizes.values())
        return [plan.Step("data", "data", f"make the default {c.gen.size} set in {c.d}", n,
                          seconds=n * plan.make_pair_seconds())]

    def run(self, c: Ctx) -> None:
        c.gen = GenConfig(size=c.preset["data_size"], seed=c.req.seed)
        if has_pair_files(c.d) and _meta_matches(c.d, c.gen):
            log.info("step data: reused the %s dataset in %s", c.gen.size, c.d)
            c.reused.append("data")
        elif has_pair_files(c.d):
            log.info("step data: your pair files in %s (not the default set) are used as they are", c.d)
        else:
            c.eta.start("data")
            _run_data_step(c.d, c.gen, c.parent)
        c.splits = load_splits(c.d, c.req.preset)


class TowerDataStep(PipelineStep):
    """Where the towers pretrain: the folder itself, or the default set beside it (made once)."""

    @staticmethod
    def label(gen: GenConfig) -> str:
        return f"data {gen.size} default set"

    def describe(self, c: Ctx) -> list[plan.Step]:
        r = c.recipe
        c.tower_sizes = _sizes(r.tower_dir, r.tower_set.size if r.tower_set else c.gen.size)
        c.tower_extra = r.tower_values if r.beside else {}  # as pretrain_splits gives the run
        if not r.beside:
            c.tower_splits = c.splits
        else:  # a tower folder without pair files yet: the tower will be new
            c.tower_splits = load_splits(r.tower_dir, c.req.preset) if has_pair_files(r.tower_dir) else None
        if r.tower_set is None or has_pair_files(r.tower_dir):
            return []
        n = sum(c.tower_sizes.values())
        return [plan.Step(self.label(r.tower_set), "data",
                          f"make the default {r.tower_set.size} set in {r.tower_dir} (once)", n,
                          seconds=n * plan.make_pair_seconds())]

    def run(self, c: Ctx) -> None:
        if c.recipe.tower_set is not None:
            c.eta.start(self.label(c.recipe.tower_set))
        c.tower_splits, c.tower_extra = pretrain_splits(c.recipe, c.req, c.splits)


class PretrainStep(PipelineStep):
    """A tower: digit and pair losses on the tower's data."""

    def __init__(self, variant: str):
        self.variant = variant

    def describe(self, c: Ctx) -> list[plan.Step]:
        step, version = _train_plan(("pretrain", self.variant, 42, None), c, c.tower_splits, c.tower_sizes,
                                    c.tower_extra, what=f"tower {self.variant}: digit + pair losses on "
                                                        f"{c.recipe.tower_dir}", known=True)
        c.towers[self.variant] = version
        return [step]

    def run(self, c: Ctx) -> None:
        row = _train_steps([("pretrain", self.variant, 42, None)], c, c.tower_splits, c.tower_extra)[0]
        c.rows.append(row)
        c.tower_rows[self.variant] = row


class ZeroShotStep(PipelineStep):
    """A tower pretrained beside the folder, as it is, on the folder's val and test_public."""

    def __init__(self, variant: str):
        self.variant = variant
        self.label = f"zero-shot/{variant}"

    def describe(self, c: Ctx) -> list[plan.Step]:
        speed = c.speed(build_config("pretrain", c.req.preset, {"model_name": self.variant}))
        n = c.sizes["val"] + c.sizes.get("public", 0)
        views = len(SHIFTS) if c.req.tta else 1  # scoring with test-time shifts scores each pair this often
        return [plan.Step(self.label, "zero_shot", "the tower as it is, scored on your val and test_public"
                          + (" (mean over test-time shifts)" if c.req.tta else ""), n,
                          seconds=plan.LOAD_S + views * n * speed.pair_s)]

    def run(self, c: Ctx) -> None:
        c.eta.start(self.label)
        c.rows.append(zero_shot_row(c.tower_rows[self.variant], c.splits, c.req.tta))


class TuneStep(PipelineStep):
    """lr and weight decay for the base models: an Optuna study on the folder, or an existing one."""

    def describe(self, c: Ctx) -> list[plan.Step]:
        req = c.req
        if req.from_study:
            return [plan.Step(tune_label(req), "tune", f"the best lr and weight decay of study {req.from_study}",
                              reused=True)]
        _, variant, seed, init = c.recipe.models[0]  # each trial trains the first base model's config once
        cfg, _, _ = step_config("tune", variant, seed, "models:/tower/1" if init else None, req.preset,
                                c.splits is None or digit_labels(c.splits.train) is not None)
        seconds = req.tune_trials * plan.train_seconds(cfg, c.sizes["train"], c.sizes["val"], 0, c.speed(cfg))
        return [plan.Step(tune_label(req), "tune", f"Optuna: {req.tune_trials} trials of lr and weight decay "
                          f"for {variant}", c.sizes["train"], cfg.epochs, reused=None, seconds=seconds)]

    def run(self, c: Ctx) -> None:
        c.eta.start(tune_label(c.req))
        c.tuned = _tune_step(c)


class BaseModelsStep(PipelineStep):
    """The base models, from the exact tower versions the towers' steps registered or reused
    (not whichever version holds the alias now), with the tuned values; then the from-scratch
    twin, a reference row with the preset's values."""

    def describe(self, c: Ctx) -> list[plan.Step]:
        r, tuning = c.recipe, bool(c.req.tune_trials or c.req.from_study)  # keys wait for the tuned values
        out = []
        c.bases = []
        for row in [*r.models, *([r.twin] if r.twin else [])]:
            stage, variant, seed, init = row
            init_uri = f"models:/{registered_for('pretrain', init)}/{c.towers.get(init) or 'new'}" if init else None
            known = bool(not init or c.towers.get(init)) and not (tuning and row != r.twin)
            step, version = _train_plan((stage, variant, seed, init_uri), c, c.splits, c.sizes, None, known=known,
                                        what=("fine-tune the tower" if init else "from scratch")
                                        + " on your train, judged on your val")
            if tuning and not known and (not init or c.towers.get(init)):
                step.reused = None  # reused when the tuning step is
            out.append(step)
            c.bases.append(version)
        del c.bases[len(r.models):]  # the twin is not a base model
        return out

    def run(self, c: Ctx) -> None:
        r = c.recipe
        trained = _train_steps([(stage, variant, seed, c.tower_uri(init) if init else None)
                                for stage, variant, seed, init in r.models], c, c.splits, c.tuned or None)
        if r.twin:
            trained += _train_steps([r.twin], c, c.splits)
        c.trained = trained
        c.rows += trained


def _stack_bases(c: Ctx) -> list[dict]:
    """The stack's base models (a run): the base models, and the towers pretrained on other data
    than the folder's (their zero-shot rows): untouched by the folder's labels, they err
    differently from the models fine-tuned on them. The from-scratch twin is a reference row."""
    return c.trained[:len(c.recipe.models)] + [row for row in c.rows if row.get("zero_shot")]


class StackStep(PipelineStep):
    """LightGBM over the base models' probabilities, 5-fold CV on val."""

    def describe(self, c: Ctx) -> list[plan.Step]:
        r = c.recipe
        n_bases = len(r.models) + (len(r.towers) if r.beside else 0)
        scored = c.sizes["val"] + c.sizes.get("public", 0) + c.sizes.get("private", 0)
        reused = False
        uris = _base_uris(r, c.bases, c.towers)
        if c.client is not None and uris is not None:  # every base reused: the stack's key is known now
            reused = reusable(stack_key(uris, c.d, c.code, c.env), c.client, registry.stack_name()) is not None
        # Scoring speed of a base model (the stack and the predictions score every base on their pairs).
        c.pair_s = 0.0 if reused else \
            c.speed(build_config("stage2", c.req.preset, {"model_name": r.models[0][1]})).pair_s
        c.stack_reused, c.n_bases = reused, n_bases
        return [plan.Step("stack", "stack", f"LightGBM over {n_bases} base models, 5-fold CV on val", scored,
                          reused=reused, seconds=n_bases * (plan.LOAD_S + scored * c.pair_s) + plan.STEP_OVERHEAD_S)]

    def run(self, c: Ctx) -> None:
        from pairnet.stack import StackRequest, run_stack

        c.eta.start("stack")
        c.stack = _stack_step(_stack_bases(c), c, lambda r: run_stack(StackRequest(**r)))


class PredictStep(PipelineStep):
    """predictions_private.csv from the model that ships: the stack, unless its out-of-fold val
    is not above the best base model's val (the towers' zero-shot rows included)."""

    def describe(self, c: Ctx) -> list[plan.Step]:
        views = len(SHIFTS) if c.req.tta else 1
        n = c.sizes.get("private", 0)
        return [plan.Step("predict", "predict", "predictions_private.csv from the model that ships"
                          + (" (mean over test-time shifts)" if c.req.tta else ""), n,
                          reused=None if c.stack_reused else False,
                          seconds=c.n_bases * (plan.LOAD_S + views * n * c.pair_s))]

    def run(self, c: Ctx) -> None:
        c.ship = ship_choice(c.stack, _stack_bases(c))
        c.eta.start("predict")
        c.predictions = c.d / "predictions_private.csv"
        key = predict_key(model_uri(c.ship), c.d, c.code, c.env, c.req.tta)
        done = find_finished(key, c.client)
        if done is not None and c.predictions.exists() and \
                done.data.tags.get(names.TAG_OUTPUT_DIGEST) == file_digest(c.predictions):
            log.info("step predict: reused run %s (%s)", done.info.run_id, c.predictions)
            c.reused.append("predict")
        else:
            _run_predict_step(model_uri(c.ship), c.d, c.predictions, c.parent, key, c.req.tta)


def pipeline_steps(req: PipelineRequest, recipe: Recipe) -> list[PipelineStep]:
    """The request's steps, in order: the one description a plan prints and a run runs
    (``pretrain=none``: a recipe without towers, so no tower steps)."""
    steps: list[PipelineStep] = [DataStep()]
    if recipe.towers:
        steps.append(TowerDataStep())
        for variant in recipe.towers:
            steps.append(PretrainStep(variant))
            if recipe.beside:
                steps.append(ZeroShotStep(variant))
    if req.tune_trials or req.from_study:
        steps.append(TuneStep())
    return steps + [BaseModelsStep(), StackStep(), PredictStep()]


def plan_steps(c: Ctx) -> list[plan.Step]:
    """Every step of the run, in order, with its size, whether a finished run of it can be
    reused (from the tracking store, by step key) and its time on this machine."""
    return [view for step in pipeline_steps(c.req, c.recipe) for view in step.describe(c)]


def _base_uris(recipe: Recipe, models: list[str | None], towers: dict[str, str | None]) -> str | None:
    """The stack's base models, in the run's order: the base models, then the towers used beside
    the folder (their zero-shot rows); None while a version is not known yet."""
    pairs = [(registered_for(st, v, s if st == "stage3" else None), version)
             for (st, v, s, _), version in zip(recipe.models, models, strict=True)]
    if recipe.beside:
        pairs += [(registered_for("pretrain", v), towers.get(v)) for v in recipe.towers]
    if not all(version for _, version in pairs):
        return None
    return ",".join(f"models:/{name}/{version}" for name, version in pairs)


def _train_plan(step: tuple, c: Ctx, splits, sizes: dict, overrides: dict | None, what: str,
                known: bool) -> tuple[plan.Step, str | None]:
    """A training step as the plan shows it, and the version a reusable finished run of it
    registered (None when it will train). Its key is looked up only when ``known`` (everything
    it hashes is known before the run: the tower version it starts from, no tuned values still
    to come) and the data exist; without ``splits`` (data not made yet) it trains on the
    default set, which carries digit labels."""
    stage, variant, seed, init_uri = step
    digits = splits is None or digit_labels(splits.train) is not None
    cfg, _, label = step_config(stage, variant, seed, init_uri, c.req.preset, digits, overrides)
    version = None
    if known and c.client is not None and splits is not None:
        done = reusable(train_key(stage, variant, seed, init_uri, c.req, splits, c.code, c.env, overrides)[3], c.client)
        if done is not None:
            version = done.data.tags[names.TAG_MODEL_VERSION]
    seconds = 0.0 if version else plan.train_seconds(cfg, sizes["train"], sizes["val"], sizes.get("public", 0),
                                                     c.speed(cfg))
    return plan.Step(label, "pretrain" if stage == "pretrain" else "train", what, sizes["train"], cfg.epochs,
                     reused=version is not None, seconds=seconds), version


class Eta:
    """Each step's estimate and what is left in all, logged as the run reaches the step."""

    def __init__(self, steps: list[plan.Step]):
        self.steps = {s.label: s for s in steps}
        self.left = [s.label for s in steps]

    def start(self, *labels: str) -> None:
        now = [self.steps[label] for label in labels if label in self.left]
        if not now:
            return
        self.left = [label for label in self.left if label not in labels]
        took, rest = sum(s.cost for s in now), sum(self.steps[label].cost for label in self.left)
        log.info("step %d/%d %s: about %s; about %s left after it (done about %s)",
                 len(self.steps) - len(self.left), len(self.steps), " + ".join(s.label for s in now),
                 plan.clock(took), plan.clock(rest), time.strftime("%H:%M", time.localtime(time.time() + took + rest)))


def _run_locked(req: PipelineRequest, preset: dict, d: Path) -> dict:
    import pairnet.stack  # noqa: F401  (the stack step's module: a broken install fails before anything trains)

    uri = setup_tracking(d)
    client = MlflowClient()
    code, env = code_version(), environment()
    recipe = decide(req, preset, d)
    views = plan_steps(Ctx(req, preset, d, recipe, code, env, client))
    outside = "none" if req.pretrain == "none" else f"default set ({recipe.tower_dir})" if recipe.beside else ""
    with tracked_run(f"pipeline/{req.preset}", {names.TAG_STAGE: "pipeline", names.TAG_PRESET: req.preset,
                                                "pairnet.code_version": code,
                                                **({names.TAG_OUTSIDE_DATA: outside} if outside else {})},
                     description=f"the whole recipe at preset {req.preset}: data, pretrain, stages 2-3, stack, "
                                 "predictions; finished steps are reused") as run:
        c = Ctx(req, preset, d, recipe, code, env, client, parent=run.run_id, eta=Eta(views))
        mlflow.set_tag(names.TAG_NAMESPACE, registry.namespace())
        mlflow.log_params({"pipeline.preset": req.preset, "pipeline.data_dir": str(d), "pipeline.code_version": code,
                           "pipeline.pretrain_data_dir": req.pretrain_data_dir or "",
                           "pipeline.pretrain": req.pretrain, "pipeline.tta": req.tta})
        log_config_file(req.config_text)
        text = plan.render(views, _plan_header(req, d, recipe))
        log.info("%s", text)
        mlflow.log_text(text + "\n", "plan.txt")
        mlflow.log_metric("eta_seconds", plan.total(views))
        for step in pipeline_steps(req, recipe):
            step.run(c)
        stack, ship = c.stack, c.ship
        table = [{"model": r["name"] + _suffix(r), "version": r["version"], "stage": r["stage"],
                  "val_acc": r["val_acc"], "test_public_acc": r["test_public_acc"], "init_from": r["init_from"] or "",
                  "ships": r is ship, "run_id": r["run_id"]} for r in c.rows]
        table.append({"model": registry.stack_name(), "version": stack["version"], "stage": "stack",
                      "val_acc": stack["cv_oof_acc"], "test_public_acc": stack["test_public_acc"], "init_from": "",
                      "ships": stack is ship, "run_id": stack["run_id"]})
        mlflow.log_dict(table, "ladder.json")
        mlflow.log_metrics({"steps_reused": float(len(c.reused)), "stack_test_public_acc": stack["test_public_acc"]})
        mlflow.set_tags({"pairnet.reused_steps": ",".join(c.reused)[:5000], names.TAG_SHIPS: model_uri(ship)})
    ui = experiment_url(uri, client.get_run(c.parent).info.experiment_id)
    return {"run_id": c.parent, "table": table, "reused": c.reused, "ui": ui, "predictions": str(c.predictions),
            "ships": model_uri(ship), "eta_seconds": plan.total(views), "plan": views}


def tune_label(req: PipelineRequest) -> str:
    return f"tune/{req.from_study}" if req.from_study else f"tune/{registry.namespace()}-pipeline-{req.preset}"


def _tune_step(c: Ctx) -> dict:
    """lr and weight decay for the base models: an existing study's best trial (``from_study``),
    or a study of ``tune_trials`` trials nested in the pipeline run, reused by step key like any
    step. The trials train the first base model's variant as the base models will: from the
    tower when there is one, else from scratch."""
    from pairnet.tune import TuneRequest, best_of_study, run_tune

    req, splits = c.req, c.splits
    variant, init = c.recipe.models[0][1], c.recipe.models[0][3]
    tower = c.tower_uri(init) if init else ""
    if req.from_study:
        best = best_of_study(TuneRequest(study_name=req.from_study, data_dir=str(splits.data_dir), preset=req.preset))
        log.info("step tune: the best trial (%d, val acc %.4f) of study %s: lr %.2e, weight decay %.2e",
                 best["trial"], best["value"], best["study"], best["lr"], best["weight_decay"])
        mlflow.log_params({"pipeline.from_study": req.from_study, "pipeline.tuned_lr": best["lr"],
                           "pipeline.tuned_weight_decay": best["weight_decay"]})
        return {"lr": best["lr"], "weight_decay": best["weight_decay"]}
    study = tune_label(req).removeprefix("tune/")
    key = step_key("tune", {"trials": req.tune_trials, "study": study, "model": variant, "init_from": tower,
                            "preset": req.preset}, c.code, reads_digest(splits.data_dir, TRAIN_READS), c.env)
    done = find_finished(key, c.client)
    if done is not None and "best_lr" in done.data.params:
        log.info("step %s: reused run %s", tune_label(req), done.info.run_id)
        c.reused.append(tune_label(req))
        best = {"lr": float(done.data.params["best_lr"]), "weight_decay": float(done.data.params["best_weight_decay"])}
    else:
        out = run_tune(TuneRequest(model_name=variant, preset=req.preset, n_trials=req.tune_trials, study_name=study,
                                   data_dir=str(splits.data_dir), device=req.device, init_from=tower,
                                   parent_run_id=c.parent, tags={names.TAG_STEP_KEY: key}))
        if "best_params" not in out:
            raise PairnetRuntimeError(f"study {study} ended without a complete trial; nothing to tune the base models "
                                      "with (more tune_trials, or from_study)")
        best = {"lr": out["best_params"]["lr"], "weight_decay": out["best_params"]["weight_decay"]}
    mlflow.log_params({"pipeline.tuned_lr": best["lr"], "pipeline.tuned_weight_decay": best["weight_decay"]})
    return best


def _stack_step(base: list[dict], c: Ctx, run_stack) -> dict:
    """The stack over exactly ``base``'s versions: reused by key, or trained by ``run_stack``."""
    uris = ",".join(f"models:/{r['name']}/{r['version']}" for r in base)
    key = stack_key(uris, c.d, c.code, c.env)
    done = reusable(key, c.client, registry.stack_name())
    if done is not None:
        log.info("step stack: reused run %s", done.info.run_id)
        c.reused.append("stack")
        run_id, version = done.info.run_id, done.data.tags.get(names.TAG_MODEL_VERSION, "?")
        cv, public = done.data.metrics["cv_oof_acc"], done.data.metrics["test_public_acc_lightgbm_stack"]
    else:
        out = run_stack(dict(models=uris, data_dir=str(c.d), preset=c.req.preset, parent_run_id=c.parent))
        c.client.set_tag(out["run_id"], names.TAG_STEP_KEY, key)
        run_id, version = out["run_id"], out["version"]
        cv, public = out["cv_oof_acc"], out["table"][0]["test_public_acc"]
    return {"uri": f"models:/{registry.stack_name()}/{version}", "version": version, "cv_oof_acc": cv,
            "test_public_acc": public, "run_id": run_id}


def ship_choice(stack: dict, base: list[dict]) -> dict:
    """The model whose predictions the pipeline writes (``stack`` or a row of ``base``): the
    stack when its out-of-fold val accuracy is above every base model's val accuracy (the
    towers' zero-shot rows included), else the best of them."""
    best = max(base, key=lambda r: r["val_acc"] if r["val_acc"] is not None else float("-inf"), default=None)
    if best is None or best["val_acc"] is None or stack["cv_oof_acc"] > best["val_acc"]:
        return stack
    log.info("step predict: the stack's out-of-fold val %.4f is not above %s's val %.4f: that model makes the "
             "predictions", stack["cv_oof_acc"], best["name"] + _suffix(best), best["val_acc"])
    return best


def model_uri(row: dict) -> str:
    return row.get("uri") or f"models:/{row['name']}/{row['version']}"



def zero_shot_row(pretrained: dict, splits, tta: bool = False) -> dict:
    """The pretrained tower judged on the pipeline's own val and test_public, untrained on them
    (``tta``: by the mean over test-time shifts)."""
    uri = f"models:/{pretrained['name']}/{pretrained['version']}"
    val, *rest = accuracies_on(uri, splits.val, *([splits.public] if splits.public is not None else []), tta=tta)
    public = rest[0] if rest else None
    mlflow.log_metrics({f"zero_shot_val_acc_{pretrained['model']}": val,
                        **({f"zero_shot_test_public_acc_{pretrained['model']}": public} if public is not None else {})})
    return {**pretrained, "val_acc": val, "test_public_acc": public, "zero_shot": True, "tta": tta}


def _suffix(row: dict) -> str:
    if row.get("zero_shot"):
        return " (zero-shot, shifts)" if row.get("tta") else " (zero-shot)"
    return "" if row["init_from"] or row["stage"] == "pretrain" else " (from scratch)"


def step_config(stage: str, variant: str, seed: int, init_from: str | None, preset: str, digits: bool,
                overrides: dict | None = None) -> tuple:
    """A training step's config, registered name and label; ``digits``: its training file
    carries digit labels (the default set does), which fine-tuning then keeps using."""
    explicit = {**(overrides or {}), "model_name": variant, "seed": seed}
    if init_from:
        explicit["init_from"] = init_from
        if digits:
            explicit["aux_digit_weight"] = FINETUNE_DIGIT_WEIGHT
    cfg = build_config(stage, preset, explicit)
    name = registered_for(stage, variant, seed if stage == "stage3" else None)
    label = f"{stage}/{variant}/seed{seed}" + ("" if init_from or stage == "pretrain" else "/scratch")
    return cfg, name, label


def train_key(stage: str, variant: str, seed: int, init_from: str | None, req: PipelineRequest,
              splits, code: str, env: dict, overrides: dict | None = None) -> tuple:
    """A training step's config, registered name, label and key. The key holds the whole
    config (init_from's exact version included), where it runs, the files it reads, the code
    and the library versions: a change to any of them reruns the step and, through the new
    version it registers, every step started from it."""
    cfg, name, label = step_config(stage, variant, seed, init_from, req.preset, digit_labels(splits.train) is not None,
                                   overrides)
    dev = pick_device(req.device)
    where = {"device": str(dev), "amp_dtype": str(amp_dtype(cfg.amp, dev))}
    key = step_key(label, {**cfg.to_dict(), "registered": name, **where}, code,
                   reads_digest(splits.data_dir, TRAIN_READS), env)
    return cfg, name, label, key


def stack_key(uris: str, d: Path, code: str, env: dict) -> str:
    return step_key("stack", {"models": uris, "n_folds": 5}, code, reads_digest(d, STACK_READS), env)


def predict_key(model_uri: str, d: Path, code: str, env: dict, tta: bool = False) -> str:
    return step_key("predict", {"model": model_uri, **({"tta": True} if tta else {})}, code,
                    reads_digest(d, PREDICT_READS), env)


def _train_steps(steps: list[tuple], c: Ctx, splits, overrides: dict | None = None) -> list[dict]:
    """Independent training steps (stage, variant, seed, init_from): each reuses the FINISHED
    run with its key, resumes an interrupted one (killed or failed, with a checkpoint) from its
    last epoch, or trains; ``req.jobs`` at a time in worker processes. Every run carries its
    key from its start, so an interrupted step is found again. ``overrides``: config values on
    top of the preset's, for every step (and its key)."""
    from pairnet.parallel import Member, member_device, report_failures, train_members

    req = c.req
    rows: list[dict | None] = []
    todo: list[tuple[int, Member, str]] = []
    for stage, variant, seed, init_from in steps:
        cfg, name, label, key = train_key(stage, variant, seed, init_from, req, splits, c.code, c.env, overrides)
        done = reusable(key, c.client)
        if done is not None:
            log.info("step %s: reused run %s (same params, code and data)", label, done.info.run_id)
            c.reused.append(label)
            rows.append(_summary_from_run(done))
            continue
        resume = find_interrupted(key, c.client)
        if resume:
            log.info("step %s: resumes interrupted run %s from its last checkpoint", label, resume)
        todo.append((len(rows), Member(cfg, stage, name, label, req.preset, member_device(req.device, len(todo)),
                                       tags={names.TAG_STEP_KEY: key}, resume_run_id=resume), key))
        rows.append(None)
    # One at a time, each announced with its estimate; with jobs > 1, all at once.
    batches = [[t] for t in todo] if req.jobs == 1 else [todo]
    results = []
    for batch in batches:
        if batch:
            c.eta.start(*[m.run_name for _, m, _ in batch])
        results += train_members([m for _, m, _ in batch], req.jobs, parent_run_id=c.parent,
                                 data_dir=str(splits.data_dir), preset=req.preset, splits=splits)
    for (index, _, _), res in zip(todo, results, strict=True):
        rows[index] = {**res, "reused": False}
    report_failures(results, "training steps")
    return rows


def find_interrupted(key: str, client: MlflowClient) -> str | None:
    """The newest killed or failed run of the step with ``key`` that left a checkpoint."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, filter_string=f"tags.`{names.TAG_STEP_KEY}` = '{key}' and "
                                                     "attributes.status != 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=10)
    for run in (r for r in runs if r.info.status in ("KILLED", "FAILED")):
        if names.CHECKPOINT_ARTIFACT in [a.path for a in client.list_artifacts(run.info.run_id, ARTIFACT_DIR)]:
            return run.info.run_id
    return None


def _version_exists(run, client: MlflowClient, name: str | None = None) -> bool:
    """The registered version a finished step made still exists (a user may have deleted it)."""
    t = run.data.tags
    try:
        client.get_model_version(name or t[names.TAG_REGISTERED_NAME], t[names.TAG_MODEL_VERSION])
        return True
    except (KeyError, mlflow.exceptions.MlflowException):
        return False


def _meta_matches(d: Path, gen: GenConfig) -> bool:
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("size") == gen.size and meta.get("seed") == gen.seed
            and meta.get("generator_version") == GENERATOR_VERSION
            and meta.get("severity", {}).get("train") == gen.severity
            and meta.get("config", {}).get("train_scans", POOL_SHARE["train"]) == gen.train_scans)


def _run_data_step(d: Path, gen: GenConfig, parent: str) -> None:
    from tqdm.auto import tqdm

    with tracked_run("pipeline/data", {names.TAG_STAGE: "data"}, parent_run_id=parent):
        with tqdm(total=4, desc="making data", unit="split", disable=None, leave=False) as bar:
            meta = make_dataset(d, gen, progress=lambda split: bar.update(1))
        mlflow.log_params({"data.size": gen.size, "data.seed": gen.seed, "data.severity": gen.severity})
        mlflow.log_dict(meta, "meta.json")


def _run_predict_step(model_uri: str, d: Path, out: Path, parent: str, key: str, tta: bool) -> None:
    from pairnet.predict import check_submission, predict_file

    with tracked_run("pipeline/predict", {names.TAG_STAGE: "predict", names.TAG_STEP_KEY: key}, parent_run_id=parent):
        n = predict_file(model_uri, d / FILES["private"], out, tta)
        problems = check_submission(d / FILES["private"], out)
        mlflow.set_tag(names.TAG_OUTPUT_DIGEST, file_digest(out))
        mlflow.log_params({"predict.model": model_uri, "predict.rows": n, "predict.tta": tta})
        mlflow.log_metric("submission_problems", float(len(problems)))
        mlflow.log_artifact(str(out))
