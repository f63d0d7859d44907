"""The README's layout section names what is in the tree, and only that."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    return section[section.index("```") + 3:].split("```", 1)[0]


def test_every_module_and_package_is_in_the_layout():
    block = _layout()
    pkg = ROOT / "pairnet"
    missing = [p.name for p in pkg.glob("*.py") if p.name != "__init__.py" and p.name not in block]
    missing += [f"{p.name}/" for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()
                and f"pairnet/{p.name}/" not in block]
    # The tracking modules are each named in their line.
    missing += [f"tracking/{p.stem}" for p in (pkg / "tracking").glob("*.py")
                if p.stem != "__init__" and not re.search(rf"\b{p.stem}\b", block)]
    assert not missing, f"README layout misses {missing}"


def test_every_path_in_the_layout_exists():
    block = _layout()
    named = set(re.findall(r"(?<![\w.])((?:pairnet|entrypoints|bench|notebooks|tests)/[\w./]*)", block))
    named |= {"MLproject", "conda.yaml"}
    assert named and not [p for p in named if not (ROOT / p.rstrip(",")).exists()]
