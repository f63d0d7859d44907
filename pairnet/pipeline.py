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
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from pairnet import names, plan
from pairnet.data.generate import (FILES, GENERATOR_VERSION, LABELS_CSV, SIZES, GenConfig, check_may_fill,
                                   ensure_dataset, has_pair_files, make_dataset)
from pairnet.errors import PairnetError, PairnetRuntimeError
from pairnet.fsutil import folder_lock
from pairnet.paths import PACKAGE_DIR, default_set_dir
from pairnet.presets import build_config, check_preset
from pairnet.tracking import registry
from pairnet.tracking.lifecycle import experiment_url, log_config_file, tracked_run
from pairnet.tracking.model import accuracies_on
from pairnet.train.loop import amp_dtype, digit_labels, pick_device
from pairnet.data.splits import check_data_dir, load_splits, preset_data_dir
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
    steps = plan_steps(req, preset, d, recipe, client, code_version(), environment())
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


def plan_steps(req: PipelineRequest, preset: dict, d: Path, recipe: Recipe, client: MlflowClient | None,
               code: str, env: dict) -> list[plan.Step]:
    """Every step of the run, in order, with its size, whether a finished run of it can be
    reused (from the tracking store, by step key) and its time on this machine."""
    views = len(SHIFTS) if req.tta else 1  # scoring with test-time shifts scores each pair this often
    dev = pick_device(req.device)
    steps: list[plan.Step] = []
    gen = GenConfig(size=preset["data_size"], seed=req.seed)
    sizes = _sizes(d, gen.size)
    if not has_pair_files(d):
        steps.append(plan.Step("data", "data", f"make the default {gen.size} set in {d}", sum(sizes.values()),
                               seconds=sum(sizes.values()) * plan.make_pair_seconds()))
    splits = load_splits(d, req.preset) if has_pair_files(d) else None
    versions: dict[str, str | None] = {}  # tower variant -> the version reused (None: made by this run)
    if recipe.towers:
        tower_sizes = _sizes(recipe.tower_dir, recipe.tower_set.size if recipe.tower_set else gen.size)
        if recipe.tower_set is not None and not has_pair_files(recipe.tower_dir):
            n = sum(tower_sizes.values())
            steps.append(plan.Step(f"data {recipe.tower_set.size} default set", "data",
                                   f"make the default {recipe.tower_set.size} set in {recipe.tower_dir} (once)", n,
                                   seconds=n * plan.make_pair_seconds()))
        if not recipe.beside:
            pre = splits
        else:  # a tower folder without pair files yet: the tower will be new
            pre = load_splits(recipe.tower_dir, req.preset) if has_pair_files(recipe.tower_dir) else None
        for variant in recipe.towers:
            step, version = _train_plan(("pretrain", variant, 42, None), req, pre, tower_sizes, code, env, client,
                                        dev, recipe.tower_values, what=f"tower {variant}: digit + pair losses on "
                                                                       f"{recipe.tower_dir}")
            steps.append(step)
            versions[variant] = version
            if recipe.beside:
                cfg = build_config("pretrain", req.preset, {"model_name": variant})
                speed = plan.measure(cfg, dev, keep=not req.plan)
                n = sizes["val"] + sizes.get("public", 0)
                steps.append(plan.Step(f"zero-shot/{variant}", "zero_shot", "the tower as it is, scored on your "
                                       "val and test_public" + (" (mean over test-time shifts)" if req.tta else ""),
                                       n, seconds=plan.LOAD_S + views * n * speed.pair_s))
    if req.tune_trials:  # each trial trains the first base model's config once
        stage, variant, seed, init = recipe.models[0]
        cfg, _, _ = step_config("tune", variant, seed, "models:/tower/1" if init else None, req.preset,
                                splits is None or digit_labels(splits.train) is not None)
        seconds = req.tune_trials * plan.train_seconds(cfg, sizes["train"], sizes["val"], 0,
                                                       plan.measure(cfg, dev, keep=not req.plan))
        steps.append(plan.Step(tune_label(req), "tune", f"Optuna: {req.tune_trials} trials of lr and weight decay "
                               f"for {variant}", sizes["train"], cfg.epochs, reused=None, seconds=seconds))
    elif req.from_study:
        steps.append(plan.Step(tune_label(req), "tune", f"the best lr and weight decay of study {req.from_study}",
                               reused=True))
    tuning = bool(req.tune_trials or req.from_study)  # the base models' keys wait for the tuned values
    rows = [*recipe.models, *([recipe.twin] if recipe.twin else [])]
    bases: list[str | None] = []
    for stage, variant, seed, init in rows:
        init_uri = None
        if init:
            init_uri = f"models:/{registered_for('pretrain', init)}/{versions.get(init) or 'new'}"
        known = (not init or versions.get(init)) and not (tuning and (stage, variant, seed, init) != recipe.twin)
        step, version = _train_plan((stage, variant, seed, init_uri), req, splits, sizes, code, env,
                                    client if known else None, dev, None,
                                    what=("fine-tune the tower" if init else "from scratch")
                                    + " on your train, judged on your val")
        if tuning and not known and (not init or versions.get(init)):
            step.reused = None  # reused when the tuning step is
        steps.append(step)
        bases.append(version)
    n_bases = len(recipe.models) + (len(recipe.towers) if recipe.beside else 0)
    scored = sizes["val"] + sizes.get("public", 0) + sizes.get("private", 0)
    stack_reused = False
    uris = _base_uris(recipe, bases[:len(recipe.models)], versions)
    if client is not None and uris is not None:  # every base reused: the stack's key is known now
        done = find_finished(stack_key(uris, d, code, env), client)
        stack_reused = done is not None and _version_exists(done, client, registry.stack_name())
    # Scoring speed of a base model (the stack and predictions score every base on their pairs).
    pair_s = 0.0 if stack_reused else \
        plan.measure(build_config("stage2", req.preset, {"model_name": recipe.models[0][1]}), dev,
                     keep=not req.plan).pair_s
    steps.append(plan.Step("stack", "stack", f"LightGBM over {n_bases} base models, 5-fold CV on val", scored,
                           reused=stack_reused,
                           seconds=n_bases * (plan.LOAD_S + scored * pair_s) + plan.STEP_OVERHEAD_S))
    steps.append(plan.Step("predict", "predict", "predictions_private.csv from the model that ships"
                           + (" (mean over test-time shifts)" if req.tta else ""),
                           sizes.get("private", 0), reused=None if stack_reused else False,
                           seconds=n_bases * (plan.LOAD_S + views * sizes.get("private", 0) * pair_s)))
    return steps


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


def _train_plan(step: tuple, req: PipelineRequest, splits, sizes: dict, code: str, env: dict,
                client: MlflowClient | None, dev, overrides: dict | None, what: str) -> tuple[plan.Step, str | None]:
    """A training step as the plan shows it, and the version a reusable finished run of it
    registered (None when it will train). Without ``splits`` (data not made yet) it trains on
    the default set, which carries digit labels."""
    stage, variant, seed, init_uri = step
    digits = splits is None or digit_labels(splits.train) is not None
    cfg, _, label = step_config(stage, variant, seed, init_uri, req.preset, digits, overrides)
    version = None
    if client is not None and splits is not None:
        key = train_key(stage, variant, seed, init_uri, req, splits, code, env, overrides)[3]
        done = find_finished(key, client)
        if done is not None and _version_exists(done, client):
            version = done.data.tags[names.TAG_MODEL_VERSION]
    seconds = 0.0 if version else plan.train_seconds(cfg, sizes["train"], sizes["val"], sizes.get("public", 0),
                                                     plan.measure(cfg, dev, keep=not req.plan))
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
    from pairnet.stack import StackRequest, run_stack
    uri = setup_tracking(d)
    client = MlflowClient()
    code = code_version()
    env = environment()
    recipe = decide(req, preset, d)
    steps = plan_steps(req, preset, d, recipe, client, code, env)
    eta = Eta(steps)
    reused, rows = [], []
    outside = "none" if req.pretrain == "none" else f"default set ({recipe.tower_dir})" if recipe.beside else ""
    with tracked_run(f"pipeline/{req.preset}", {names.TAG_STAGE: "pipeline", names.TAG_PRESET: req.preset,
                                                "pairnet.code_version": code,
                                                **({names.TAG_OUTSIDE_DATA: outside} if outside else {})},
                     description=f"the whole recipe at preset {req.preset}: data, pretrain, stages 2-3, stack, "
                                 "predictions; finished steps are reused") as run:
        parent = run.run_id
        mlflow.set_tag(names.TAG_NAMESPACE, registry.namespace())
        mlflow.log_params({"pipeline.preset": req.preset, "pipeline.data_dir": str(d), "pipeline.code_version": code,
                           "pipeline.pretrain_data_dir": req.pretrain_data_dir or "",
                           "pipeline.pretrain": req.pretrain, "pipeline.tta": req.tta})
        log_config_file(req.config_text)
        text = plan.render(steps, _plan_header(req, d, recipe))
        log.info("%s", text)
        mlflow.log_text(text + "\n", "plan.txt")
        mlflow.log_metric("eta_seconds", plan.total(steps))
        # data
        gen = GenConfig(size=preset["data_size"], seed=req.seed)
        if has_pair_files(d) and _meta_matches(d, gen):
            log.info("step data: reused the %s dataset in %s", gen.size, d)
            reused.append("data")
        elif has_pair_files(d):
            log.info("step data: your pair files in %s (not the default set) are used as they are", d)
        else:
            eta.start("data")
            _run_data_step(d, gen, parent)
        splits = load_splits(d, req.preset)

        # stage 0: pretrained towers, then the base models started from the exact versions
        # these steps registered or reused (not whichever version holds the alias now)
        pretrained = {}
        if recipe.towers:
            eta.start(*[s.label for s in steps if s.kind == "data" and s.label != "data"])
            pre_splits, extra = pretrain_splits(recipe, req, splits)
            for variant in recipe.towers:
                row = _train_steps([("pretrain", variant, 42, None)], req, pre_splits, code, env, client, parent,
                                   reused, extra, eta=eta)[0]
                rows.append(row)
                pretrained[variant] = f"models:/{row['name']}/{row['version']}"
                if recipe.beside:  # the tower on the user's data, untouched
                    eta.start(f"zero-shot/{variant}")
                    rows.append(zero_shot_row(row, splits, req.tta))
        tuned = {}
        if req.tune_trials or req.from_study:
            eta.start(tune_label(req))
            tuned = _tune_step(req, recipe, pretrained, splits, code, env, client, parent, reused)
        # The base models take the tuned values; the twin, a reference, keeps the preset's.
        trained = _train_steps([(stage, variant, seed, pretrained[init] if init else None)
                                for stage, variant, seed, init in recipe.models],
                               req, splits, code, env, client, parent, reused, tuned or None, eta=eta)
        if recipe.twin:
            trained += _train_steps([recipe.twin], req, splits, code, env, client, parent, reused, eta=eta)
        rows += trained
        # The from-scratch twin is a reference row, not a base model. A tower pretrained on other
        # data (the default set, for a folder without digit labels) is one: untouched by the
        # folder's labels, it errs differently from the models fine-tuned on them.
        base = trained[:len(recipe.models)] + [r for r in rows if r.get("zero_shot")]

        eta.start("stack")
        stack = _stack_step(base, d, req, code, env, client, parent, reused, lambda r: run_stack(StackRequest(**r)))

        # predictions from the model that ships: the stack, unless its out-of-fold val is not
        # above the best base model's val (the towers' zero-shot rows included)
        ship = ship_choice(stack, base)
        eta.start("predict")
        pred_path = d / "predictions_private.csv"
        key = predict_key(model_uri(ship), d, code, env, req.tta)
        done = find_finished(key, client)
        if done is not None and pred_path.exists() and \
                done.data.tags.get(names.TAG_OUTPUT_DIGEST) == file_digest(pred_path):
            log.info("step predict: reused run %s (%s)", done.info.run_id, pred_path)
            reused.append("predict")
        else:
            _run_predict_step(model_uri(ship), d, pred_path, parent, key, req.tta)

        table = [{"model": r["name"] + _suffix(r), "version": r["version"], "stage": r["stage"],
                  "val_acc": r["val_acc"], "test_public_acc": r["test_public_acc"], "init_from": r["init_from"] or "",
                  "ships": r is ship, "run_id": r["run_id"]} for r in rows]
        table.append({"model": registry.stack_name(), "version": stack["version"], "stage": "stack",
                      "val_acc": stack["cv_oof_acc"], "test_public_acc": stack["test_public_acc"], "init_from": "",
                      "ships": stack is ship, "run_id": stack["run_id"]})
        mlflow.log_dict(table, "ladder.json")
        mlflow.log_metrics({"steps_reused": float(len(reused)), "stack_test_public_acc": stack["test_public_acc"]})
        mlflow.set_tags({"pairnet.reused_steps": ",".join(reused)[:5000], names.TAG_SHIPS: model_uri(ship)})
    ui = experiment_url(uri, client.get_run(parent).info.experiment_id)
    return {"run_id": parent, "table": table, "reused": reused, "ui": ui, "predictions": str(pred_path),
            "ships": model_uri(ship), "eta_seconds": plan.total(steps), "plan": steps}


def tune_label(req: PipelineRequest) -> str:
    return f"tune/{req.from_study}" if req.from_study else f"tune/{registry.namespace()}-pipeline-{req.preset}"


def _tune_step(req: PipelineRequest, recipe: Recipe, pretrained: dict, splits, code: str, env: dict,
               client: MlflowClient, parent: str, reused: list) -> dict:
    """lr and weight decay for the base models: an existing study's best trial (``from_study``),
    or a study of ``tune_trials`` trials nested in the pipeline run, reused by step key like any
    step. The trials train the first base model's variant as the base models will: from the
    tower when there is one, else from scratch."""
    from pairnet.tune import TuneRequest, best_of_study, run_tune

    variant, init = recipe.models[0][1], recipe.models[0][3]
    tower = pretrained[init] if init else ""
    if req.from_study:
        best = best_of_study(TuneRequest(study_name=req.from_study, data_dir=str(splits.data_dir), preset=req.preset))
        log.info("step tune: the best trial (%d, val acc %.4f) of study %s: lr %.2e, weight decay %.2e",
                 best["trial"], best["value"], best["study"], best["lr"], best["weight_decay"])
        mlflow.log_params({"pipeline.from_study": req.from_study, "pipeline.tuned_lr": best["lr"],
                           "pipeline.tuned_weight_decay": best["weight_decay"]})
        return {"lr": best["lr"], "weight_decay": best["weight_decay"]}
    study = tune_label(req).removeprefix("tune/")
    key = step_key("tune", {"trials": req.tune_trials, "study": study, "model": variant, "init_from": tower,
                            "preset": req.preset}, code, reads_digest(splits.data_dir, TRAIN_READS), env)
    done = find_finished(key, client)
    if done is not None and "best_lr" in done.data.params:
        log.info("step %s: reused run %s", tune_label(req), done.info.run_id)
        reused.append(tune_label(req))
        best = {"lr": float(done.data.params["best_lr"]), "weight_decay": float(done.data.params["best_weight_decay"])}
    else:
        out = run_tune(TuneRequest(model_name=variant, preset=req.preset, n_trials=req.tune_trials, study_name=study,
                                   data_dir=str(splits.data_dir), device=req.device, init_from=tower,
                                   parent_run_id=parent, tags={names.TAG_STEP_KEY: key}))
        if "best_params" not in out:
            raise PairnetRuntimeError(f"study {study} ended without a complete trial; nothing to tune the base models "
                                      "with (more tune_trials, or from_study)")
        best = {"lr": out["best_params"]["lr"], "weight_decay": out["best_params"]["weight_decay"]}
    mlflow.log_params({"pipeline.tuned_lr": best["lr"], "pipeline.tuned_weight_decay": best["weight_decay"]})
    return best


def _stack_step(base: list[dict], d: Path, req: PipelineRequest, code: str, env: dict, client: MlflowClient,
                parent: str, reused: list, run_stack) -> dict:
    """The stack over exactly ``base``'s versions: reused by key, or trained by ``run_stack``."""
    uris = ",".join(f"models:/{r['name']}/{r['version']}" for r in base)
    key = stack_key(uris, d, code, env)
    done = find_finished(key, client)
    if done is not None and _version_exists(done, client, registry.stack_name()):
        log.info("step stack: reused run %s", done.info.run_id)
        reused.append("stack")
        run_id, version = done.info.run_id, done.data.tags.get(names.TAG_MODEL_VERSION, "?")
        cv, public = done.data.metrics["cv_oof_acc"], done.data.metrics["test_public_acc_lightgbm_stack"]
    else:
        out = run_stack(dict(models=uris, data_dir=str(d), preset=req.preset, parent_run_id=parent))
        client.set_tag(out["run_id"], names.TAG_STEP_KEY, key)
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


def _train_steps(steps: list[tuple], req: PipelineRequest, splits, code: str, env: dict, client: MlflowClient,
                 parent: str, reused: list, overrides: dict | None = None, eta: Eta | None = None) -> list[dict]:
    """Independent training steps (stage, variant, seed, init_from): each reuses the FINISHED
    run with its key, resumes an interrupted one (killed or failed, with a checkpoint) from its
    last epoch, or trains; ``req.jobs`` at a time in worker processes. Every run carries its
    key from its start, so an interrupted step is found again. ``overrides``: config values on
    top of the preset's, for every step (and its key)."""
    from pairnet.parallel import Member, member_device, report_failures, train_members

    rows: list[dict | None] = []
    todo: list[tuple[int, Member, str]] = []
    for stage, variant, seed, init_from in steps:
        cfg, name, label, key = train_key(stage, variant, seed, init_from, req, splits, code, env, overrides)
        done = find_finished(key, client)
        if done is not None and _version_exists(done, client):
            log.info("step %s: reused run %s (same params, code and data)", label, done.info.run_id)
            reused.append(label)
            rows.append(_summary_from_run(done))
            continue
        resume = find_interrupted(key, client)
        if resume:
            log.info("step %s: resumes interrupted run %s from its last checkpoint", label, resume)
        todo.append((len(rows), Member(cfg, stage, name, label, req.preset, member_device(req.device, len(todo)),
                                       tags={names.TAG_STEP_KEY: key}, resume_run_id=resume), key))
        rows.append(None)
    # One at a time, each announced with its estimate; with jobs > 1, all at once.
    batches = [[t] for t in todo] if req.jobs == 1 else [todo]
    results = []
    for batch in batches:
        if eta is not None and batch:
            eta.start(*[m.run_name for _, m, _ in batch])
        results += train_members([m for _, m, _ in batch], req.jobs, parent_run_id=parent,
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
            and meta.get("severity", {}).get("train") == gen.severity)


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
