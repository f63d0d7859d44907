"""One experiment file: ``--config FILE.yaml`` (``-`` reads standard input) and ``--print-config``.

A file holds a command's options by their snake_case names (``preset``, ``data_dir``,
``epochs``...), training settings nested as in the config (``aug: {rotation_deg: 5}``) or
dotted (``aug.rotation_deg: 5``). Its values stand between the preset and the flags: recipe →
preset → file → explicit flags. ``--print-config`` writes the resolved values in the same
form, so its output read back with ``--config`` gives the same run.

Built on PyYAML (already there through MLflow) and the config fields' own metadata rather
than a parser library: the flags, checks and one-line errors stay the ones every other input
gets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pairnet.config import flatten
from pairnet.errors import PairnetError


def source_name(path: str) -> str:
    return "standard input" if path == "-" else path


def read(path: str) -> tuple[str, dict]:
    """The file's text and its values with dotted keys; a bad file is one PairnetError line."""
    name = source_name(path)
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise PairnetError(f"--config {name}: cannot read it ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise PairnetError(f"--config {name}: not valid YAML{at} ({getattr(err, 'problem', None) or err})") from None
    if data is None:
        return text, {}
    if not isinstance(data, dict):
        raise PairnetError(f"--config {name}: must be a mapping of option names to values, got {type(data).__name__}")
    return text, flatten(data)


def as_flag_text(value) -> str:
    """A YAML value in the spelling its flag parses: lists comma-joined, null empty (= not given)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def nest(flat: dict) -> dict:
    """Dotted keys → nested mappings (the form ``--print-config`` writes)."""
    out: dict = {}
    for key, value in flat.items():
        *heads, last = key.split(".")
        node = out
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = list(value) if isinstance(value, tuple) else value
    return out


def dump(flat: dict) -> str:
    return yaml.safe_dump(nest(flat), sort_keys=False, default_flow_style=False)
