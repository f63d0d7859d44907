"""One flat training config: parsed at the edge, logged as run params, saved in checkpoints.

Each field carries its own help, choices and bounds (``param``): the CLI flags, the
checks in ``validate`` and the logged params all come from here, so a new
hyper-parameter is one field plus the code that uses it.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from dataclasses import Field, asdict, dataclass, field, fields

from pairnet.errors import PairnetError

MODEL_KEYS = ("layers", "width_mult", "feat_dim", "block", "attention", "fusion", "dropout")


def param(default, help: str, *, choices: tuple | None = None, min: float | None = None,
          above: float | None = None, below: float | None = None):
    """A config field with its help text, allowed values and bounds.

    ``min`` is an inclusive lower bound, ``above`` an exclusive one, ``below`` an
    exclusive upper bound; ``None`` (for fields that allow it) skips every check.
    """
    meta = {"help": help}
    meta.update({k: v for k, v in (("choices", choices), ("min", min), ("above", above), ("below", below))
                 if v is not None})
    return field(default=default, metadata=meta)


def field_type(cls, f: Field) -> type:
    """A field's value type, ``X | None`` unwrapped to ``X``."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def check_field(cls, f: Field, value) -> None:
    """One field's value against its type and metadata; raises a one-line PairnetError."""
    if value is None:
        return
    typ, meta, name = field_type(cls, f), f.metadata, f.name
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise PairnetError(f"{name} must be a number (got {value!r})")
        if not math.isfinite(value):
            raise PairnetError(f"{name} must be a finite number (got {value})")
        if typ is int and value != int(value):
            raise PairnetError(f"{name} must be a whole number (got {value})")
        low, high = meta.get("min", meta.get("above")), meta.get("below")
        too_low = ("min" in meta and value < meta["min"]) or ("above" in meta and value <= meta["above"])
        if too_low or (high is not None and value >= high):
            if low is not None and high is not None:
                bound = f"in {'[' if 'min' in meta else '('}{low}, {high})"
            elif low is not None:
                bound = f"{'>=' if 'min' in meta else '>'} {low}"
            else:
                bound = f"< {high}"
            raise PairnetError(f"{name} must be {bound} (got {value})")
    if "choices" in meta and value not in meta["choices"]:
        raise PairnetError(f"{name} '{value}' is not one of {', '.join(meta['choices'])}")


@dataclass
class TrainConfig:
    # Model: a zoo name plus overrides (None = the variant's default).
    model_name: str = param("resnet_optimized_1.12", "zoo model, e.g. compare_cnn, improved_v2, resnet_optimized, "
                            "resnet_optimized_1.12, resnet_fusion, fpn_model")
    layers: str | None = param(None, "blocks per ResNet stage, e.g. 3,3,3 (empty: the variant's)")
    width_mult: float | None = param(None, "channel width multiplier (empty: the variant's)")
    feat_dim: int | None = param(256, "tower feature size")
    block: str | None = param(None, "ResNet block: basic or bottleneck (empty: the variant's)")
    attention: str | None = param(None, "channel attention in the tower: se, cbam or none (empty: the variant's)")
    fusion: bool | None = param(None, "fusion heads on a ResNet tower (empty: the variant's)")
    dropout: float | None = param(None, "tower and head dropout (empty: the variant's)", min=0, below=1)
    # Optimisation (AdamW). lr in 1/step units, weight decay decoupled.
    epochs: int = param(100, "training epochs", above=0)
    batch_size: int = param(64, "training batch size", above=0)
    lr: float = param(1e-3, "AdamW learning rate", above=0)
    weight_decay: float = param(5e-4, "AdamW decoupled weight decay", min=0)
    scheduler: str = param("cosine", "learning-rate schedule", choices=("cosine", "plateau", "onecycle", "none"))
    grad_clip: float = param(1.0, "max global gradient norm (0: no clipping)", min=0)
    patience: int = param(10, "epochs without a val-accuracy gain before stopping (0: no early stop)", min=0)
    # Loss: focal (alpha, gamma) with label smoothing, or plain BCE.
    loss: str = param("focal", "pair loss", choices=("focal", "bce"))
    focal_alpha: float = param(1.0, "focal loss alpha")
    focal_gamma: float = param(2.0, "focal loss gamma", min=0)
    label_smoothing: float = param(0.1, "label smoothing of the pair targets", min=0, below=1)
    # Speed.
    amp: str = param("auto", "mixed precision (auto: bf16 or fp16 on CUDA, bf16 on CPUs with bf16 units, else off)",
                     choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool = param(True, "channels-last memory format")
    eval_batch_size: int = param(1024, "evaluation batch size", above=0)
    max_steps_per_epoch: int = param(0, "cap on steps per epoch (0: whole epochs; >0 for benchmarks, smoke tests)",
                                     min=0)
    # Data.
    augment: bool = param(True, "batch augmentation (swap halves, erase a rectangle)")
    seed: int = param(42, "seed of weights, data order and augmentation")
    # Digit supervision: weight of the 10-class digit loss on both halves (needs the
    # training file's digit_a/digit_b arrays; 0 = pair loss only, the seed recipe).
    aux_digit_weight: float = param(0.0, "weight of the digit loss on both halves (needs digit_a/digit_b in "
                                         "train.npz; 0 = off)", min=0)
    # Fine-tuning: start from a registered model ("" = from scratch, the seed recipe).
    init_from: str = param("", "start from a registered model, e.g. models:/pairnet-pretrain-resnet_optimized@champion "
                               "(empty: from scratch)")
    freeze_epochs: int = param(0, "first epochs train the heads only, tower frozen (with init_from)", min=0)
    tower_lr_mult: float = param(1.0, "tower learning rate = lr x this (with init_from the preset uses 0.05)", min=0)

    def validate(self) -> "TrainConfig":
        for f in fields(self):
            check_field(type(self), f, getattr(self, f.name))
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

    def as_params(self) -> dict:
        """Every field as the run param ``cfg.<name>``, as a training run logs them."""
        return {f"cfg.{k}": v for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
