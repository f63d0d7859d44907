"""One flat training config: parsed at the edge, logged as run params, saved in checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from pairnet.errors import PairnetError

MODEL_KEYS = ("layers", "width_mult", "feat_dim", "block", "attention", "fusion", "dropout")


@dataclass
class TrainConfig:
    # Model: a zoo name plus overrides (None = the variant's default).
    model_name: str = "resnet_optimized_1.12"
    layers: str | None = None  # e.g. "3,3,3"
    width_mult: float | None = None
    feat_dim: int | None = 256
    block: str | None = None
    attention: str | None = None
    fusion: bool | None = None
    dropout: float | None = None
    # Optimisation (AdamW). lr in 1/step units, weight decay decoupled.
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    scheduler: str = "cosine"  # cosine | plateau | onecycle | none
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    patience: int = 10  # epochs without a val-accuracy gain before stopping; 0 disables
    # Loss: focal (alpha, gamma) with label smoothing, or plain BCE.
    loss: str = "focal"  # focal | bce
    focal_alpha: float = 1.0
    focal_gamma: float = 2.0
    label_smoothing: float = 0.1
    # Speed.
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: bool = True
    eval_batch_size: int = 1024
    max_steps_per_epoch: int = 0  # 0 = whole epochs; >0 caps steps (benchmarks, smoke tests)
    # Data.
    augment: bool = True
    seed: int = 42
    # Digit supervision: weight of the 10-class digit loss on both halves (needs the
    # training file's digit_a/digit_b arrays; 0 = pair loss only, the seed recipe).
    aux_digit_weight: float = 0.0
    # Fine-tuning: start from a registered model ("" = from scratch, the seed recipe).
    init_from: str = ""  # models:/name/version or models:/name@alias
    freeze_epochs: int = 0  # first epochs train the heads only (tower frozen)
    tower_lr_mult: float = 1.0  # tower learning rate = lr × this

    CHOICES = {
        "scheduler": ("cosine", "plateau", "onecycle", "none"),
        "loss": ("focal", "bce"),
        "amp": ("auto", "bf16", "fp16", "off"),
    }

    def validate(self) -> "TrainConfig":
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise PairnetError(f"{f.name} must be a finite number (got {value})")
        for key, choices in self.CHOICES.items():
            if getattr(self, key) not in choices:
                raise PairnetError(f"{key} '{getattr(self, key)}' is not one of {', '.join(choices)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "eval_batch_size": self.eval_batch_size}
        for key, value in positive.items():
            if not value > 0:
                raise PairnetError(f"{key} must be > 0 (got {value})")
        for key in ("weight_decay", "grad_clip", "patience", "label_smoothing", "focal_gamma", "max_steps_per_epoch"):
            if getattr(self, key) < 0:
                raise PairnetError(f"{key} must be >= 0 (got {getattr(self, key)})")
        if self.label_smoothing >= 1:
            raise PairnetError(f"label_smoothing must be < 1 (got {self.label_smoothing})")
        # Written as "not >= 0" so that NaN fails too.
        for key in ("aux_digit_weight", "freeze_epochs", "tower_lr_mult"):
            if not getattr(self, key) >= 0 or getattr(self, key) == float("inf"):
                raise PairnetError(f"{key} must be a finite number >= 0 (got {getattr(self, key)})")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise PairnetError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.freeze_epochs != int(self.freeze_epochs):
            raise PairnetError(f"freeze_epochs must be a whole number (got {self.freeze_epochs})")
        if self.init_from and not self.init_from.startswith("models:/"):
            raise PairnetError(f"init_from '{self.init_from}' must be a registry URI such as "
                               "models:/pairnet-pretrain-resnet_optimized@champion (or empty for from scratch)")
        from pairnet.models.registry import resolve

        resolve(self.model_name, **self.model_overrides())  # unknown model names and options fail here
        return self

    def model_overrides(self) -> dict:
        out = {k: getattr(self, k) for k in MODEL_KEYS if getattr(self, k) is not None}
        if "layers" in out and isinstance(out["layers"], str):
            try:
                out["layers"] = tuple(int(v) for v in out["layers"].replace(" ", "").split(",") if v)
            except ValueError:
                raise PairnetError(f"layers '{self.layers}' must be comma-separated integers such as 3,3,3") from None
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
