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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pairnet import names
from pairnet.data.generate import (FILES, GENERATOR_VERSION, LABELS_CSV, GenConfig, check_may_fill, ensure_dataset,
                                   has_pair_files, make_dataset)
from pairnet.fsutil import folder_lock
from pairnet.paths import PACKAGE_DIR, default_set_dir
from pairnet.presets import build_config, check_preset
from pairnet.tracking import registry
from pairnet.tracking.lifecycle import experiment_url, log_config_file, tracked_run
from pairnet.tracking.model import accuracies_on
from pairnet.train.loop import amp_dtype, digit_labels, pick_device
from pairnet.data.splits import check_data_dir, load_splits, preset_data_dir
from pairnet.tracking.session import setup_tracking

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
    d = preset_data_dir(check_data_dir(req.data_dir), req.preset)
    if not has_pair_files(d):
        check_may_fill(d)  # a mistyped folder fails before anything starts
    if req.pretrain_data_dir:
        check_data_dir(req.pretrain_data_dir)
    pick_device(req.device)  # an unusable device fails before anything starts
    with folder_lock(d, f"run the {req.preset} pipeline"):
        return _run_locked(req, preset, d)


def pretrain_splits(req: PipelineRequest, preset: dict, splits) -> tuple:
    """The splits the pretrained towers train on (see ``PipelineRequest.pretrain_data_dir``) and
    the training values pretraining adds there (the preset's ``default_pretrain`` ones, on the
    default set beside a folder without digit labels)."""
    if req.pretrain_data_dir:
        return load_splits(req.pretrain_data_dir, req.preset), {}
    if digit_labels(splits.train) is not None:
        return splits, {}
    size = preset["default_pretrain"]["data_size"]
    folder = default_set_dir(size)
    gen = GenConfig(size=size, seed=req.seed)
    # Byte-identical to the default set of that size made anywhere else (same seed, same bytes),
    # so the pretrain step's key, which hashes the files, finds a tower made from it before.
    if has_pair_files(folder) and not _meta_matches(folder, gen):
        log.warning("%s holds an older default set: making the %s set again", folder, gen.size)
        make_dataset(folder, gen, force=True)
    ensure_dataset(folder, size=gen.size, seed=gen.seed, severity=gen.severity)
    log.info("step pretrain: %s has no digit labels; the towers pretrain on the default %s set in %s",
             splits.data_dir, gen.size, folder)
    return load_splits(folder, req.preset), preset["default_pretrain"]["pretrain"]


def _run_locked(req: PipelineRequest, preset: dict, d: Path) -> dict:
    from pairnet.stack import StackRequest, run_stack
    uri = setup_tracking()
    client = MlflowClient()
    code = code_version()
    env = environment()
    reused, rows = [], []
    with tracked_run(f"pipeline/{req.preset}", {names.TAG_STAGE: "pipeline", names.TAG_PRESET: req.preset,
                                                "pairnet.code_version": code},
                     description=f"the whole recipe at preset {req.preset}: data, pretrain, stages 2-3, stack, "
                                 "predictions; finished steps are reused") as run:
        parent = run.run_id
        mlflow.log_params({"pipeline.preset": req.preset, "pipeline.data_dir": str(d), "pipeline.code_version": code,
                           "pipeline.pretrain_data_dir": req.pretrain_data_dir or ""})
        log_config_file(req.config_text)
        # data
        gen = GenConfig(size=preset["data_size"], seed=req.seed)
        meta_ok = has_pair_files(d) and _meta_matches(d, gen)
        if meta_ok:
            log.info("step data: reused the %s dataset in %s", gen.size, d)
            reused.append("data")
        elif has_pair_files(d):
            log.info("step data: your pair files in %s (not the default set) are used as they are", d)
        else:
            _run_data_step(d, gen, parent)
        splits = load_splits(d, req.preset)
        pre_splits, extra = pretrain_splits(req, preset, splits)

        # stage 0: pretrained towers, then the base models started from the exact versions
        # these steps registered or reused (not whichever version holds the alias now)
        pretrained = {}
        beside = pre_splits.data_dir != splits.data_dir  # towers trained on other data than the folder's
        for variant in PRETRAIN[req.preset]:
            row = _train_steps([("pretrain", variant, 42, None)], req, pre_splits, code, env, client, parent,
                               reused, extra)[0]
            rows.append(row)
            pretrained[variant] = f"models:/{row['name']}/{row['version']}"
            if beside:  # the tower on the user's data, untouched
                rows.append(zero_shot_row(row, splits))
        trained = _train_steps([(stage, variant, seed, pretrained[init] if init else None)
                                for stage, variant, seed, init in PLANS[req.preset]],
                               req, splits, code, env, client, parent, reused)
        rows += trained
        # The from-scratch twin is a reference row, not a base model. A tower pretrained on other
        # data (the default set, for a folder without digit labels) is one: untouched by the
        # folder's labels, it errs differently from the models fine-tuned on them.
        base = trained[:-1] + [r for r in rows if r.get("zero_shot")]

        # stack over exactly the versions above
        uris = ",".join(f"models:/{r['name']}/{r['version']}" for r in base)
        key = stack_key(uris, d, code, env)
        done = find_finished(key, client)
        if done is not None and _version_exists(done, client, registry.STACK_NAME):
            log.info("step stack: reused run %s", done.info.run_id)
            reused.append("stack")
            stack = {"run_id": done.info.run_id, "version": done.data.tags.get(names.TAG_MODEL_VERSION, "?"),
                     "cv_oof_acc": done.data.metrics["cv_oof_acc"],
                     "test_public_acc": done.data.metrics["test_public_acc_lightgbm_stack"]}
        else:
            out = run_stack(StackRequest(models=uris, data_dir=str(d), preset=req.preset, parent_run_id=parent))
            client.set_tag(out["run_id"], names.TAG_STEP_KEY, key)
            stack = {"run_id": out["run_id"], "version": out["version"], "cv_oof_acc": out["cv_oof_acc"],
                     "test_public_acc": out["table"][0]["test_public_acc"]}

        # predict test_private with this stack version
        pred_path = d / "predictions_private.csv"
        key = predict_key(f"models:/{registry.STACK_NAME}/{stack['version']}", d, code, env)
        done = find_finished(key, client)
        if done is not None and pred_path.exists() and \
                done.data.tags.get(names.TAG_OUTPUT_DIGEST) == file_digest(pred_path):
            log.info("step predict: reused run %s (%s)", done.info.run_id, pred_path)
            reused.append("predict")
        else:
            _run_predict_step(f"models:/{registry.STACK_NAME}/{stack['version']}", d, pred_path, parent, key)

        table = [{"model": r["name"] + _suffix(r),
                  "version": r["version"], "stage": r["stage"], "val_acc": r["val_acc"],
                  "test_public_acc": r["test_public_acc"], "init_from": r["init_from"] or ""} for r in rows]
        table.append({"model": registry.STACK_NAME, "version": stack["version"], "stage": "stack",
                      "val_acc": stack["cv_oof_acc"], "test_public_acc": stack["test_public_acc"]})
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "ladder.json").write_text(json.dumps(table, indent=2))
            mlflow.log_artifacts(tmp)
        mlflow.log_metrics({"steps_reused": float(len(reused)), "stack_test_public_acc": stack["test_public_acc"]})
        mlflow.set_tag("pairnet.reused_steps", ",".join(reused)[:5000])
    ui = experiment_url(uri, client.get_run(parent).info.experiment_id)
    return {"run_id": parent, "table": table, "reused": reused, "ui": ui, "predictions": str(pred_path)}


def zero_shot_row(pretrained: dict, splits) -> dict:
    """The pretrained tower judged on the pipeline's own val and test_public, untrained on them."""
    uri = f"models:/{pretrained['name']}/{pretrained['version']}"
    val, *rest = accuracies_on(uri, splits.val, *([splits.public] if splits.public is not None else []))
    public = rest[0] if rest else None
    mlflow.log_metrics({f"zero_shot_val_acc_{pretrained['model']}": val,
                        **({f"zero_shot_test_public_acc_{pretrained['model']}": public} if public is not None else {})})
    return {**pretrained, "val_acc": val, "test_public_acc": public, "zero_shot": True}


def _suffix(row: dict) -> str:
    if row.get("zero_shot"):
        return " (zero-shot)"
    return "" if row["init_from"] or row["stage"] == "pretrain" else " (from scratch)"


def train_key(stage: str, variant: str, seed: int, init_from: str | None, req: PipelineRequest,
              splits, code: str, env: dict, overrides: dict | None = None) -> tuple:
    """A training step's config, registered name, label and key. The key holds the whole
    config (init_from's exact version included), where it runs, the files it reads, the code
    and the library versions: a change to any of them reruns the step and, through the new
    version it registers, every step started from it."""
    from pairnet.stages import registered_for

    explicit = {**(overrides or {}), "model_name": variant, "seed": seed}
    if init_from:
        explicit["init_from"] = init_from
        # Digit supervision wherever the data has digit labels (the default set does).
        if digit_labels(splits.train) is not None:
            explicit["aux_digit_weight"] = FINETUNE_DIGIT_WEIGHT
    cfg = build_config(stage, req.preset, explicit)
    name = registered_for(stage, variant, seed if stage == "stage3" else None)
    label = f"{stage}/{variant}/seed{seed}" + ("" if init_from or stage == "pretrain" else "/scratch")
    dev = pick_device(req.device)
    where = {"device": str(dev), "amp_dtype": str(amp_dtype(cfg.amp, dev))}
    key = step_key(label, {**cfg.to_dict(), "registered": name, **where}, code,
                   reads_digest(splits.data_dir, TRAIN_READS), env)
    return cfg, name, label, key


def stack_key(uris: str, d: Path, code: str, env: dict) -> str:
    return step_key("stack", {"models": uris, "n_folds": 5}, code, reads_digest(d, STACK_READS), env)


def predict_key(model_uri: str, d: Path, code: str, env: dict) -> str:
    return step_key("predict", {"model": model_uri}, code, reads_digest(d, PREDICT_READS), env)


def _train_steps(steps: list[tuple], req: PipelineRequest, splits, code: str, env: dict, client: MlflowClient,
                 parent: str, reused: list, overrides: dict | None = None) -> list[dict]:
    """Independent training steps (stage, variant, seed, init_from): each reuses the FINISHED
    run with its key, the others train, ``req.jobs`` at a time in worker processes.
    ``overrides``: config values on top of the preset's, for every step (and its key)."""
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
        todo.append((len(rows), Member(cfg, stage, name, label, req.preset, member_device(req.device, len(todo))), key))
        rows.append(None)
    results = train_members([m for _, m, _ in todo], req.jobs, parent_run_id=parent, data_dir=str(splits.data_dir),
                            preset=req.preset, splits=splits)
    for (index, _, key), res in zip(todo, results, strict=True):
        if "error" not in res:
            client.set_tag(res["run_id"], names.TAG_STEP_KEY, key)
        rows[index] = {**res, "reused": False}
    report_failures(results, "training steps")
    return rows


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


def _run_predict_step(model_uri: str, d: Path, out: Path, parent: str, key: str) -> None:
    from pairnet.predict import check_submission, predict_file

    with tracked_run("pipeline/predict", {names.TAG_STAGE: "predict", names.TAG_STEP_KEY: key}, parent_run_id=parent):
        n = predict_file(model_uri, d / FILES["private"], out)
        problems = check_submission(d / FILES["private"], out)
        mlflow.set_tag(names.TAG_OUTPUT_DIGEST, file_digest(out))
        mlflow.log_params({"predict.model": model_uri, "predict.rows": n})
        mlflow.log_metric("submission_problems", float(len(problems)))
        mlflow.log_artifact(str(out))
