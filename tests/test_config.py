"""TrainConfig is the single source: flags, checks, logged params and checkpoints come from its fields."""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass

import pytest
import yaml

from pairnet.cli import OneLineParser, add_config_args, build_parser, config_values, main
from pairnet.errors import PairnetError
from pairnet.presets import PRESETS, STAGE_RECIPE, build_config
from pairnet.train import TrainConfig
from pairnet.config import flatten, param, section
from pairnet.train.config import AugmentConfig

# The flags users' scripts rely on: generated now, so every one must still be there.
LEGACY_FLAGS = ["--model-name", "--layers", "--width-mult", "--feat-dim", "--block", "--attention", "--dropout",
                "--epochs", "--batch-size", "--lr", "--weight-decay", "--scheduler", "--grad-clip", "--patience",
                "--loss", "--focal-alpha", "--focal-gamma", "--label-smoothing", "--amp", "--seed",
                "--max-steps-per-epoch", "--eval-batch-size", "--aux-digit-weight", "--init-from",
                "--freeze-epochs", "--tower-lr-mult", "--fusion", "--augment", "--channels-last"]


@dataclass
class WithWarmup(TrainConfig):
    """What a contributor writes to add a hyper-parameter: one field with its metadata."""

    warmup_steps: int = param(0, "linear learning-rate warm-up steps", min=0)


@dataclass
class WiderAugment(AugmentConfig):
    """The same inside a nested section."""

    cutout_holes: int = param(1, "rectangles erased per half", min=0)


@dataclass
class WithWiderAugment(TrainConfig):
    aug: WiderAugment = section(WiderAugment, "augmentation details")


def _stage_parser(stage: str) -> argparse.ArgumentParser:
    sub = build_parser()._subparsers._group_actions[0]
    return sub.choices[stage]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("stage", ["pretrain", "stage1", "stage2", "stage3"])
def test_every_training_flag_is_still_there(stage):
    flags = _flags(_stage_parser(stage))
    expected = set(LEGACY_FLAGS) - ({"--model-name", "--seed"} if stage == "stage3" else set())
    assert expected <= flags
    assert "--mlproject" not in flags
    assert ("--model-name" in flags) == (stage != "stage3")


def test_flags_parse_by_field_type_and_empty_means_not_given():
    p = _stage_parser("stage1")
    args = p.parse_args(["--epochs", "6.0", "--lr", "2e-3", "--augment", "false", "--layers", "2,2",
                         "--amp", "", "--feat-dim", "", "--dropout", "0.2"])
    assert config_values(args) == {"epochs": 6, "lr": 2e-3, "augment": False, "layers": "2,2", "dropout": 0.2}
    assert isinstance(config_values(args)["epochs"], int)
    parser = OneLineParser(prog="t")
    add_config_args(parser)
    for bad in (["--epochs", "2.5"], ["--lr", "nan"], ["--augment", "maybe"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_help_shows_metadata_choices_and_the_stage_recipe_default():
    text = _stage_parser("stage1").format_help()
    assert "{cosine,plateau,onecycle,none}" in text and "AdamW learning rate" in text
    assert "recipe default 50" in text  # stage 1's recipe, not TrainConfig's 100


def test_a_new_field_reaches_cli_params_and_checkpoint(splits, tmp_path):
    from pairnet.models import create_model
    from pairnet.train import fit, load_checkpoint, pick_device

    parser = OneLineParser(prog="t")
    add_config_args(parser, WithWarmup)
    assert "--warmup-steps" in parser.format_help() and "linear learning-rate warm-up steps" in parser.format_help()
    args = parser.parse_args(["--warmup-steps", "7", "--model-name", "compare_cnn", "--epochs", "1", "--amp", "off"])
    cfg = build_config("stage2", "tiny", config_values(args, WithWarmup), config_cls=WithWarmup)
    assert cfg.warmup_steps == 7
    assert cfg.as_params()["cfg.warmup_steps"] == 7  # what train_tracked logs
    model = create_model(cfg.model_name, **cfg.model_overrides())
    fit(model, *splits, cfg, device=pick_device("cpu"), checkpoint_path=tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["config"]["warmup_steps"] == 7
    # Its bounds are checked like every other field's.
    with pytest.raises(PairnetError, match=r"warmup_steps must be >= 0 \(got -1\)"):
        build_config("stage2", "tiny", {"warmup_steps": -1}, config_cls=WithWarmup)


# ---------------------------------------------------------------- resolution: recipe → preset → explicit
def test_explicit_value_wins_even_when_it_equals_the_recipe():
    assert STAGE_RECIPE["stage1"]["epochs"] == 50 and PRESETS["quick"]["train"]["epochs"] == 6
    assert build_config("stage1", "quick", {"epochs": 50}).epochs == 50
    assert build_config("stage1", "quick", {"lr": 0.001}).lr == 0.001
    assert build_config("stage2", "quick", {"batch_size": 64}).batch_size == 64


def test_unset_values_keep_the_preset_and_the_recipe():
    cfg = build_config("stage1", "quick", {"epochs": None, "lr": None})
    assert cfg.epochs == 6 and cfg.lr == 2e-3  # the preset's
    assert cfg.model_name == "improved_v2" and cfg.patience == 3 and cfg.weight_decay == 5e-4
    assert build_config("stage1", "full", {}).epochs == 50  # the recipe's


def test_cli_path_explicit_beats_preset():
    args = _stage_parser("stage1").parse_args(["--preset", "quick", "--epochs", "50", "--lr", "", "--seed", ""])
    cfg = build_config("stage1", args.preset, config_values(args))
    assert cfg.epochs == 50 and cfg.lr == 2e-3 and cfg.seed == 42


def test_unknown_keys_are_refused():
    with pytest.raises(PairnetError, match="unknown training parameter 'epoch'"):
        build_config("stage1", "tiny", {"epoch": 3})


def test_nested_settings_reach_cli_params_and_checkpoint(splits, tmp_path):
    from pairnet.models import create_model
    from pairnet.train import fit, load_checkpoint, pick_device

    parser = OneLineParser(prog="t")
    add_config_args(parser, WithWiderAugment)
    text = parser.format_help()
    assert "--aug.rotation-deg" in text and "--sched.plateau-factor" in text and "--aug.cutout-holes" in text
    assert "largest rotation, degrees" in text and "rectangles erased per half" in text
    # mlflow run passes undeclared -P name=value as --name value: the snake_case spelling works too.
    args = parser.parse_args(["--aug.cutout-holes", "3", "--aug.rotation_deg", "4", "--sched.plateau-factor",
                              "0.25", "--scheduler", "plateau", "--model-name", "compare_cnn", "--amp", "off"])
    assert config_values(args, WithWiderAugment) == {"aug.cutout_holes": 3, "aug.rotation_deg": 4.0,
                                                     "sched.plateau_factor": 0.25, "scheduler": "plateau",
                                                     "model_name": "compare_cnn", "amp": "off"}
    cfg = build_config("stage2", "tiny", config_values(args, WithWiderAugment), config_cls=WithWiderAugment)
    assert (cfg.aug.cutout_holes, cfg.aug.rotation_deg, cfg.aug.shift_px) == (3, 4.0, 2.0)
    params = cfg.as_params()
    assert params["cfg.aug.cutout_holes"] == 3 and params["cfg.sched.plateau_factor"] == 0.25
    assert params["cfg.aug.erase_max_px"] == 12  # defaults are logged too
    fit(create_model(cfg.model_name, **cfg.model_overrides()), *splits, cfg, device=pick_device("cpu"),
        checkpoint_path=tmp_path / "last.pt")
    saved = load_checkpoint(tmp_path / "last.pt")["config"]
    assert saved["aug"]["cutout_holes"] == 3 and saved["sched"]["plateau_factor"] == 0.25
    assert WithWiderAugment.from_dict(saved) == cfg  # a resumed run gets the same config back


def test_nested_bounds_unknown_keys_and_old_checkpoints():
    with pytest.raises(PairnetError, match=r"aug.swap must be in \[0, 1\] \(got 1.5\)"):
        build_config("stage2", "tiny", {"aug.swap": 1.5})
    with pytest.raises(PairnetError, match=r"aug.erase_min_px \(20\) must be <= aug.erase_max_px \(12\)"):
        build_config("stage2", "tiny", {"aug.erase_min_px": 20})
    with pytest.raises(PairnetError, match="unknown training parameter 'aug.rotation'"):
        build_config("stage2", "tiny", {"aug.rotation": 3})
    # A checkpoint written before the sections existed loads with their defaults.
    old = {k: v for k, v in TrainConfig(epochs=3).to_dict().items() if k not in ("aug", "sched")}
    cfg = TrainConfig.from_dict(old)
    assert cfg.epochs == 3 and cfg.aug == AugmentConfig() and cfg.sched.plateau_patience == 2


@pytest.mark.parametrize("over, message", [
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"epochs": 0}, r"epochs must be > 0 \(got 0\)"),
    ({"weight_decay": -1.0}, r"weight_decay must be >= 0"),
    ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
    ({"loss": "hinge"}, "loss 'hinge' is not one of focal, bce"),
    ({"freeze_epochs": 1.5}, "freeze_epochs must be a whole number"),
    ({"batch_size": "64"}, "batch_size must be a number"),
])
def test_validate_uses_field_metadata(over, message):
    with pytest.raises(PairnetError, match=message):
        TrainConfig(**over).validate()


def test_every_option_of_every_command_says_what_it_does():
    missing = []

    def walk(parser: argparse.ArgumentParser, prog: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prog} {name}")
            elif action.option_strings and not action.help:
                missing.append(f"{prog} {action.option_strings[0]}")

    walk(build_parser(), "pairnet")
    assert not missing


@pytest.mark.parametrize("argv, verbose, quiet", [
    (["-v", "models"], True, False), (["models", "-v"], True, False), (["models"], False, False),
    (["stage2", "--preset", "tiny", "-q"], False, True), (["-q", "server", "status"], False, True),
    (["data", "make", "--out", "d", "--quiet"], False, True),
])
def test_global_options_work_before_and_after_the_command(argv, verbose, quiet):
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["models", "-v", "-q"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.fixture
def _cli(monkeypatch, capsys):
    """``pairnet ARGS`` in this process, standard input given: (exit status, stdout, stderr)."""
    def run(args: list[str], stdin: str = "") -> argparse.Namespace:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(args)
        out, err = capsys.readouterr()
        return argparse.Namespace(returncode=code, stdout=out, stderr=err)
    return run


def test_print_config_reads_back_through_config_to_the_same_run(_cli):
    first = _cli(["stage2", "--preset", "tiny", "--epochs", "3", "--aug.rotation-deg", "5", "--print-config"])
    assert first.returncode == 0, first.stderr
    again = _cli(["stage2", "--config", "-", "--print-config"], stdin=first.stdout)
    assert again.returncode == 0 and again.stdout == first.stdout
    values = yaml.safe_load(first.stdout)
    assert values["preset"] == "tiny" and values["epochs"] == 3 and values["aug"]["rotation_deg"] == 5.0
    cfg = build_config("stage2", "tiny", {"epochs": 3, "aug.rotation_deg": 5.0})
    assert {k: v for k, v in flatten(values).items() if k in cfg.flat()} == cfg.flat()
    # recipe -> preset -> file -> flags: a flag beats the file, the file beats the preset.
    mixed = _cli(["stage2", "--config", "-", "--epochs", "7", "--print-config"],
                 stdin="preset: tiny\nepochs: 4\nbatch_size: 16\n")
    got = yaml.safe_load(mixed.stdout)
    assert (got["epochs"], got["batch_size"], got["width_mult"]) == (7, 16, 0.25)


@pytest.mark.parametrize("text, message", [
    ("epochs: 3\nbogus: 1\n", "--config standard input: unknown key 'bogus' for `pairnet stage2`"),
    ("epochs: x\n", "--config standard input: epochs: 'x' is not a number"),
    ("aug:\n  rotation_deg: -1\n", "aug.rotation_deg must be >= 0 (got -1.0)"),
    ("epochs: [\n", "--config standard input: not valid YAML at line 2"),
    ("- 1\n", "must be a mapping of option names to values"),
])
def test_a_bad_experiment_file_is_one_line_and_exit_2(_cli, text, message):
    proc = _cli(["stage2", "--config", "-", "--print-config"], stdin=text)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_tune_and_pipeline_take_an_experiment_file_too(_cli):
    for command in ("tune", "pipeline"):
        first = _cli([command, "--preset", "tiny", "--print-config"])
        assert first.returncode == 0 and yaml.safe_load(first.stdout)["preset"] == "tiny"
        assert _cli([command, "--config", "-", "--print-config"], stdin=first.stdout).stdout == first.stdout
