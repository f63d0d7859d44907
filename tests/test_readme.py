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


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_the_preset_values_the_readme_quotes_are_the_presets():
    """The numbers the README gives for the presets come from presets.py, so they cannot drift."""
    from pairnet.data.generate import SIZES
    from pairnet.presets import PRESETS, build_config

    text = _flat((ROOT / "README.md").read_text())
    quick = build_config("stage2", "quick", {"model_name": "resnet_optimized"})
    m = re.search(r"`quick` \(CPU demo: ([\d,]+) training pairs, batch (\d+), lr ([\de.-]+), width ([\d.]+), "
                  r"(\d+) epochs\)", text)
    assert m, "the README's quick preset sentence moved"
    assert (int(m[1].replace(",", "")), int(m[2]), float(m[3]), float(m[4]), int(m[5])) == (
        SIZES["quick"]["train"], quick.batch_size, quick.lr, quick.width_mult, quick.epochs)
    pre = build_config("pretrain", "quick", {})
    m = re.search(r"quick: (\d+) epochs at batch (\d+); full: (\d+) epochs, patience (\d+)\)", text)
    full_pre = build_config("pretrain", "full", {})
    assert m and (int(m[1]), int(m[2]), int(m[3]), int(m[4])) == (
        pre.epochs, pre.batch_size, full_pre.epochs, full_pre.patience)
    ft = build_config("stage2", "quick", {"init_from": "models:/x/1"})
    full_ft = build_config("stage2", "full", {"init_from": "models:/x/1"})
    m = re.search(r"\(quick: (\d+) epochs, no early stopping, `tower_lr_mult` ([\d.]+), lr ([\de.-]+), one "
                  r"frozen-tower epoch; full: (\d+) epochs, patience (\d+),", text)
    assert m and (int(m[1]), float(m[2]), float(m[3]), int(m[4]), int(m[5])) == (
        ft.epochs, ft.tower_lr_mult, ft.lr, full_ft.epochs, full_ft.patience)
    assert ft.patience == 0 and ft.freeze_epochs == 1 == full_ft.freeze_epochs
    assert PRESETS["quick"]["finetune"]["tower_lr_mult"] == full_ft.tower_lr_mult
