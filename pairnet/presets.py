"""Presets size data, epochs and widths: ``tiny`` (tests), ``quick`` (CPU demo), ``full`` (the recipe).

Resolution order for every training value: the recipe's defaults (``TrainConfig``) →
the preset → the values the user gave explicitly.
"""

from __future__ import annotations

import logging

from pairnet.errors import PairnetError
from pairnet.train.config import TrainConfig

log = logging.getLogger(__name__)

# Fine-tuning a pretrained model: one epoch with the tower frozen so that fresh heads
# (e.g. resnet_fusion's six fusion heads on a resnet_optimized tower) learn first, then the
# tower at lr × 0.05; no extra augmentation, as in pretraining. Measured at the quick preset
# from a resnet_optimized pretrain at val acc 0.869: lr 1e-3 with the tower at 3e-4 and
# augmentation lost accuracy (resnet_optimized 0.832, resnet_fusion 0.781 after 2 epochs);
# this setting gave resnet_fusion 0.849 after 1 + 2 epochs.
FINETUNE = dict(lr=3e-3, tower_lr_mult=0.05, freeze_epochs=1, augment=False)
# "train" applies to every stage; "pretrain" on top of it to the pretrain stage, and
# "finetune" to any stage started from a registered model (init_from set).
# "default_pretrain": the pipeline on a folder without digit labels pretrains its towers on
# the default set of this size, with these values on top of "pretrain".
PRESETS: dict[str, dict] = {
    "tiny": {
        "data_size": "tiny",
        "train": dict(epochs=2, width_mult=0.25, feat_dim=32, batch_size=64, patience=0, max_steps_per_epoch=4,
                      eval_batch_size=256),
        "pretrain": {},
        "finetune": {},
        "default_pretrain": {"data_size": "tiny", "pretrain": {}},
    },
    "quick": {
        "data_size": "quick",
        "train": dict(epochs=6, width_mult=0.5, feat_dim=128, batch_size=128, lr=2e-3, patience=3),
        "pretrain": dict(epochs=10, batch_size=64, lr=3e-3),
        "finetune": FINETUNE | dict(epochs=3, patience=0),
        # A folder without digit labels (real pairs): the towers pretrain on the full default set,
        # 8 epochs. On 1,000 real pairs (bench/real_bench.py, 5 folds) that tower reads
        # 0.859 +- 0.025 zero-shot against the quick set's 0.792 +- 0.013, better on every fold,
        # for 7.5 minutes of pretraining on 2 CPU cores instead of 1.5.
        "default_pretrain": {"data_size": "full", "pretrain": {"epochs": 8}},
    },
    "full": {"data_size": "full", "train": {}, "pretrain": {},
             "finetune": FINETUNE | dict(epochs=30, patience=5),
             "default_pretrain": {"data_size": "full", "pretrain": {}}},
}

# Stage-specific recipe values (the four-stage recipe of the README's table): stage 1 trains 50 epochs
# with patience 5.
STAGE_RECIPE = {
    "stage1": dict(model_name="improved_v2", epochs=50, patience=5),
    # layers come from the variant (resnet_optimized_1.12 is 3,3,3), so another
    # variant chosen by name keeps its own depth.
    "stage2": dict(model_name="resnet_optimized_1.12", epochs=100, patience=10),
    "stage3": dict(model_name="resnet_optimized_1.12", epochs=100, patience=10),
    "tune": dict(model_name="resnet_optimized", epochs=10, patience=0),
    # Stage 0: the tower learns to read digits (digit loss on both halves) and to compare them.
    # No extra augmentation: the default data is already jittered and occluded, and the extra
    # erase rectangle slowed learning (quick set, 8 epochs: val acc 0.857 without, 0.810 with).
    "pretrain": dict(model_name="resnet_optimized", epochs=30, patience=5, aux_digit_weight=1.0,
                     scheduler="onecycle", lr=3e-3, augment=False),
}

# Stage 3 members: (model variant, seed), the recipe's diversity stage.
STAGE3_MEMBERS = (
    [("resnet_optimized_1.12", s) for s in (42, 2023, 2024, 2025)]
    + [("fpn_model", 42)]
    + [("improved_v2", s) for s in (42, 123, 456)]
)


def parse_members(text: str) -> list[tuple[str, int]]:
    """``variant:seed,...`` (empty: all of STAGE3_MEMBERS)."""
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


def check_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise PairnetError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


def recipe_config(stage: str, config_cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    return config_cls(**STAGE_RECIPE.get(stage, {}))


def build_config(stage: str, preset: str, explicit: dict, *,
                 config_cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """The stage's config: recipe defaults, then the preset, then the values the user gave.

    ``explicit`` holds only what the user gave (``None`` = not given), so a given value
    always wins, even one equal to the recipe's. Keys of nested settings are dotted
    (``aug.rotation_deg``).
    """
    values = {}
    chosen = check_preset(preset)
    values.update(chosen["train"])
    if stage == "pretrain":
        values.update(chosen["pretrain"])
    if explicit.get("init_from"):
        values.update(chosen["finetune"])
    values.update({k: v for k, v in explicit.items() if v is not None})
    if isinstance(values.get("layers"), (list, tuple)):
        values["layers"] = ",".join(str(v) for v in values["layers"])
    return recipe_config(stage, config_cls).updated(values).validate()


def warn_if_slow(preset: str, device: str, epochs: int) -> None:
    """The full preset is the GPU recipe: on a CPU say so before hours of training start."""
    from pairnet.device import pick_device  # torch loads here, not when the CLI reads a preset

    if preset == "full" and pick_device(device).type == "cpu":
        log.warning("preset full is the GPU recipe: up to %d epochs on the full set, about 30 s each on a 2-core CPU "
                    "(hours in all; every epoch's log line gives an ETA). For a quick look use -P preset=quick "
                    "(or --preset quick).", epochs)
