"""The training config: parsed at the edge, logged as run params, saved in checkpoints.

Each field carries its own help, choices and bounds (``param``); augmentation and
schedule details are nested sections (``aug.*``, ``sched.*``). The CLI flags, the checks
in ``validate`` and the logged params all come from here, so a new hyper-parameter is
one field plus the code that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pairnet.config import Config, param, section
from pairnet.errors import PairnetError

MODEL_KEYS = ("layers", "width_mult", "feat_dim", "block", "attention", "fusion", "dropout")


@dataclass
class AugmentConfig(Config):
    """Batch augmentation (``pairnet.data.augment``), drawn per half."""

    swap: float = param(0.5, "probability of swapping the halves (the label flips)", min=0, max=1)
    rotation_deg: float = param(10.0, "largest rotation, degrees", min=0)
    shift_px: float = param(2.0, "largest shift, pixels", min=0)
    scale: float = param(0.1, "scale drawn in [1 - scale, 1 + scale]", min=0, below=1)
    erase: float = param(0.5, "probability of one extra black rectangle per half", min=0, max=1)
    erase_min_px: int = param(4, "smallest side of that rectangle, pixels", min=1)
    erase_max_px: int = param(12, "largest side of that rectangle, pixels", min=1)

    def rules(self) -> None:
        if self.erase_min_px > self.erase_max_px:
            raise PairnetError(f"aug.erase_min_px ({self.erase_min_px}) must be <= aug.erase_max_px "
                               f"({self.erase_max_px})")


@dataclass
class SchedulerConfig(Config):
    """Details of the learning-rate schedules (``scheduler`` picks one)."""

    cosine_min_lr: float = param(0.0, "cosine: the learning rate reached at the last epoch", min=0)
    plateau_factor: float = param(0.5, "plateau: multiply the learning rate by this when val accuracy stalls",
                                  above=0, below=1)
    plateau_patience: int = param(2, "plateau: epochs without a val-accuracy gain before lowering it", min=0)
    onecycle_pct_start: float = param(0.3, "onecycle: share of the steps spent warming up", above=0, below=1)


@dataclass
class TrainConfig(Config):
    WHAT = "training parameter"

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
    sched: SchedulerConfig = section(SchedulerConfig, "learning-rate schedule details")
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
    compile: bool = param(False, "torch.compile the model's forward (inductor; the first steps of each new batch shape "
                                 "wait for the compiler)")
    eval_batch_size: int = param(1024, "evaluation batch size", above=0)
    max_steps_per_epoch: int = param(0, "cap on steps per epoch (0: whole epochs; >0 for benchmarks, smoke tests)",
                                     min=0)
    # Data.
    augment: bool = param(True, "batch augmentation (swap halves, rotate, shift, scale, erase a rectangle)")
    aug: AugmentConfig = section(AugmentConfig, "augmentation details (with augment on)")
    seed: int = param(42, "seed of weights, data order and augmentation")
    # Digit supervision: weight of the 10-class digit loss on both halves (needs the
    # training file's digit_a/digit_b arrays; 0 = pair loss only, the seed recipe).
    aux_digit_weight: float = param(0.0, "weight of the digit loss on both halves (needs digit_a/digit_b in "
                                         "train.npz; 0 = off)", min=0)
    # Fine-tuning: start from a registered model ("" = from scratch, the seed recipe).
    init_from: str = param("", "start from a registered model, e.g. "
                               "models:/pairnet-pretrain-resnet_optimized@champion, or pretrained: the registered "
                               "tower of this preset that fits (empty: from scratch)")
    freeze_epochs: int = param(0, "first epochs train the heads only, tower frozen (with init_from)", min=0)
    tower_lr_mult: float = param(1.0, "tower learning rate = lr x this (with init_from the preset uses 0.05)", min=0)

    def validate(self) -> "TrainConfig":
        super().validate()
        if self.init_from and self.init_from != "pretrained" and not self.init_from.startswith("models:/"):
            raise PairnetError(f"init_from '{self.init_from}' must be a registry URI such as "
                               "models:/pairnet-pretrain-resnet_optimized@champion, or pretrained (the registered "
                               "tower of this preset that fits), or empty for from scratch")
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
