"""The model zoo: ``create_model(name, **overrides)`` over registered builders.

Each builder is a few lines with keyword-only defaults; named variants are a builder
plus default overrides. Unknown names or overrides fail loudly with the valid choices.
"""

from __future__ import annotations

import inspect
from typing import Callable

from pairnet.errors import PairnetError
from pairnet.models.heads import ConcatHead, FusionHeads
from pairnet.models.pair import PairModel
from pairnet.models.towers import CBAMTower, FPNTower, ResNetTower, SmallTower

_BUILDERS: dict[str, Callable[..., PairModel]] = {}
# Variant name → (builder, defaults that differ from the builder's).
VARIANTS: dict[str, tuple[str, dict]] = {
    "resnet_optimized_1.12": ("resnet", {"layers": (3, 3, 3)}),
    "resnet_fusion": ("resnet", {"layers": (2, 2, 2), "fusion": True}),
    "resnet_optimized": ("resnet", {"layers": (2, 2, 2)}),
    "fpn_model": ("fpn", {}),
}


def register_model(fn: Callable[..., PairModel]) -> Callable[..., PairModel]:
    _BUILDERS[fn.__name__] = fn
    return fn


@register_model
def compare_cnn(*, width_mult: float = 1.0, feat_dim: int = 128, dropout: float = 0.0, head_hidden: int = 128):
    """The plain baseline: small 3-conv tower, concatenated features, MLP head."""
    tower = SmallTower(width_mult=width_mult, feat_dim=feat_dim, dropout=dropout)
    return tower, ConcatHead(feat_dim, combo="concat", hidden=head_hidden, dropout=dropout)


@register_model
def improved_v2(*, width_mult: float = 1.0, feat_dim: int = 256, dropout: float = 0.1, head_hidden: int = 128):
    """Stage 1: CBAM tower and six fusion heads with learnable softmax weights."""
    tower = CBAMTower(width_mult=width_mult, feat_dim=feat_dim, dropout=dropout)
    return tower, FusionHeads(feat_dim, hidden=head_hidden, dropout=dropout)


@register_model
def resnet(
    *,
    block: str = "basic",
    layers: tuple[int, ...] = (2, 2, 2),
    width_mult: float = 1.0,
    attention: str = "se",
    feat_dim: int = 256,
    fusion: bool = False,
    dropout: float = 0.1,
    head_hidden: int = 128,
):
    """Stage 2: ResNet tower (SE after each stage); fusion heads or a concat-diff MLP."""
    tower = ResNetTower(block=block, layers=tuple(layers), width_mult=width_mult, attention=attention,
                        feat_dim=feat_dim, dropout=dropout)
    head = (FusionHeads(feat_dim, hidden=head_hidden, dropout=dropout) if fusion
            else ConcatHead(feat_dim, combo="concat_diff", hidden=head_hidden, dropout=dropout))
    return tower, head


@register_model
def fpn(*, layers: tuple[int, ...] = (1, 1, 1), width_mult: float = 1.0, pyramid_width: int = 64,
        feat_dim: int = 256, dropout: float = 0.1, head_hidden: int = 128):
    """Stage 3: multi-scale feature-pyramid tower with a concat-diff MLP head."""
    tower = FPNTower(layers=tuple(layers), width_mult=width_mult, pyramid_width=pyramid_width,
                     feat_dim=feat_dim, dropout=dropout)
    return tower, ConcatHead(feat_dim, combo="concat_diff", hidden=head_hidden, dropout=dropout)


def list_models() -> list[str]:
    return sorted(_BUILDERS) + sorted(VARIANTS)


def resolve(name: str, **overrides) -> tuple[str, dict]:
    """(builder name, complete keyword arguments) for a model name and overrides."""
    if name in VARIANTS:
        builder, defaults = VARIANTS[name]
    elif name in _BUILDERS:
        builder, defaults = name, {}
    else:
        raise PairnetError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    params = inspect.signature(_BUILDERS[builder]).parameters
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise PairnetError(
            f"model '{name}' has no option {', '.join(map(repr, unknown))}; valid options: {', '.join(params)}"
        )
    kwargs = {k: p.default for k, p in params.items()}
    kwargs.update(defaults)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if "layers" in kwargs:
        kwargs["layers"] = tuple(int(n) for n in kwargs["layers"])
        if not kwargs["layers"] or min(kwargs["layers"]) < 1:
            raise PairnetError(f"model '{name}': layers {kwargs['layers']} must be positive block counts")
    for key, choices in (("block", ("basic", "bottleneck")), ("attention", ("se", "cbam", "none"))):
        if key in kwargs and kwargs[key] not in choices:
            raise PairnetError(f"model '{name}': {key} '{kwargs[key]}' is not one of {', '.join(choices)}")
    if kwargs.get("width_mult", 1.0) <= 0:
        raise PairnetError(f"model '{name}': width_mult must be > 0")
    return builder, kwargs


def create_model(name: str, *, digit_head: bool = False, **overrides) -> PairModel:
    """Build a zoo model; ``digit_head`` adds the 10-class digit classifier on the tower."""
    builder, kwargs = resolve(name, **overrides)
    tower, head = _BUILDERS[builder](**kwargs)
    spec = {"name": name, "builder": builder, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    if digit_head:
        spec["digit_head"] = True
    return PairModel(tower, head, spec, digit_head=digit_head)


def model_from_spec(spec: dict) -> PairModel:
    """Rebuild a model from the ``spec`` saved in a checkpoint or logged with a run."""
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "builder")}
    return create_model(spec["name"], **kwargs)
