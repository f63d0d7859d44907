"""Config dataclasses whose fields describe themselves: help, choices and bounds.

A ``Config`` is a dataclass of ``param`` fields and ``section`` fields (a nested
``Config``). The CLI flags, the checks in ``validate``, the logged params and the
checkpointed dict all come from the fields, so a new setting is one field plus the code
that uses it. Nested names are dotted: ``aug.rotation_deg`` is the field ``rotation_deg``
of the section ``aug``. No torch, no MLflow: the CLI reads configs before either loads.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import Field, asdict, field, fields
from typing import Iterator

from pairnet.errors import PairnetError


def param(default, help: str, *, choices: tuple | None = None, min: float | None = None,
          above: float | None = None, below: float | None = None, max: float | None = None):
    """A config field with its help text, allowed values and bounds.

    ``min``/``max`` are inclusive bounds, ``above``/``below`` exclusive ones; ``None``
    (for fields that allow it) skips every check.
    """
    meta = {"help": help}
    meta.update({k: v for k, v in (("choices", choices), ("min", min), ("above", above), ("below", below),
                                   ("max", max)) if v is not None})
    return field(default=default, metadata=meta)


def section(cls: type, help: str):
    """A nested config, its fields reached as ``<name>.<field>``."""
    return field(default_factory=cls, metadata={"help": help})


def field_type(cls, f: Field) -> type:
    """A field's value type, ``X | None`` unwrapped to ``X``."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, type, Field]]:
    """(dotted name, value type, field) of every setting, sections walked depth first."""
    for f in fields(cls):
        typ = field_type(cls, f)
        if dataclasses.is_dataclass(typ):
            yield from leaves(typ, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, typ, f


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested dicts → one dict with dotted keys."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_field(name: str, typ: type, meta, value) -> None:
    """One setting's value against its type and metadata; raises a one-line PairnetError."""
    if value is None:
        return
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise PairnetError(f"{name} must be a number (got {value!r})")
        if not math.isfinite(value):
            raise PairnetError(f"{name} must be a finite number (got {value})")
        if typ is int and value != int(value):
            raise PairnetError(f"{name} must be a whole number (got {value})")
        low, high = meta.get("min", meta.get("above")), meta.get("max", meta.get("below"))
        too_low = ("min" in meta and value < meta["min"]) or ("above" in meta and value <= meta["above"])
        too_high = ("max" in meta and value > meta["max"]) or ("below" in meta and value >= meta["below"])
        if too_low or too_high:
            if low is not None and high is not None:
                bound = f"in {'[' if 'min' in meta else '('}{low}, {high}{']' if 'max' in meta else ')'}"
            elif low is not None:
                bound = f"{'>=' if 'min' in meta else '>'} {low}"
            else:
                bound = f"{'<=' if 'max' in meta else '<'} {high}"
            raise PairnetError(f"{name} must be {bound} (got {value})")
    if "choices" in meta and value not in meta["choices"]:
        raise PairnetError(f"{name} '{value}' is not one of {', '.join(meta['choices'])}")


class Config:
    """Mixin for config dataclasses: checks, dicts and params from the field metadata."""

    WHAT = "setting"  # how errors name one of its keys

    def validate(self):
        flat = self.flat()
        for name, typ, f in leaves(type(self)):
            check_field(name, typ, f.metadata, flat[name])
        self._check_sections()
        return self

    def rules(self) -> None:
        """Checks across fields (one field's own bounds live in its metadata)."""

    def _check_sections(self) -> None:
        self.rules()
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value._check_sections()

    def to_dict(self) -> dict:
        """Nested, as checkpoints keep it."""
        return asdict(self)

    def flat(self) -> dict:
        return flatten(self.to_dict())

    def as_params(self, prefix: str = "cfg.") -> dict:
        """Every setting as the run param ``<prefix><dotted name>``."""
        return {prefix + k: v for k, v in self.flat().items()}

    @classmethod
    def from_dict(cls, data: dict):
        """Nested or dotted keys; keys this class has no field for are dropped (older
        checkpoints keep loading), settings missing from ``data`` keep their defaults."""
        nested: dict = {}
        for key, value in data.items():
            head, _, rest = key.partition(".")
            if rest:
                nested.setdefault(head, {})[rest] = value
            else:
                nested[key] = value
        kwargs = {}
        for f in fields(cls):
            if f.name not in nested:
                continue
            typ = field_type(cls, f)
            value = nested[f.name]
            if dataclasses.is_dataclass(typ):
                if not isinstance(value, dict):
                    raise PairnetError(f"{f.name} is a group of settings, not a single value ({value!r})")
                value = typ.from_dict(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def updated(self, values: dict):
        """A copy with dotted-key ``values`` applied; an unknown key is refused."""
        flat = self.flat()
        for key, value in values.items():
            if key not in flat:
                raise PairnetError(f"unknown {self.WHAT} '{key}'")
            flat[key] = value
        return type(self).from_dict(flat)
