"""The README and its docs/ pages: the layout names what is in the tree, links resolve, quoted presets hold."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


DOCS = sorted((ROOT / "docs").glob("*.md"))


def _layout() -> str:
    text = (ROOT / "docs" / "layout.md").read_text()
    return text[text.index("```") + 3:].split("```", 1)[0]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors plus explicit <a id=...> targets."""
    text = path.read_text()
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
    return slugs | set(re.findall(r'<a id="([^"]+)"', text))


def test_every_relative_link_resolves():
    bad = []
    for page in [ROOT / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
                bad.append(f"{page.relative_to(ROOT)} -> {target}")
    assert DOCS and not bad, bad


def test_the_front_page_keeps_what_gets_a_person_going():
    text = (ROOT / "README.md").read_text()
    heads = re.findall(r"^## (.+)$", text, flags=re.M)
    for need in ("Install", "The main job", "Your own folder", "GPUs", "Expected accuracy and time", "Tests"):
        assert any(h.startswith(need) for h in heads), f"the front page lost its '{need}' section"
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", text))
    assert linked == {p.name for p in DOCS}, "every docs/ page is linked from the front page"
    assert len(text.splitlines()) < 250


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
    named = set(re.findall(r"(?<![\w.])((?:pairnet|entrypoints|bench|notebooks|tests|docs)/[\w./]*)", block))
    named |= {"MLproject", "conda.yaml"}
    assert named and not [p for p in named if not (ROOT / p.rstrip(",")).exists()]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_the_preset_values_the_readme_quotes_are_the_presets():
    """The numbers the README gives for the presets come from presets.py, so they cannot drift."""
    from pairnet.data.generate import SIZES
    from pairnet.presets import PRESETS, build_config

    text = _flat("\n".join(p.read_text() for p in [ROOT / "README.md", *DOCS]))
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


def test_every_fault_row_names_a_test_that_exists():
    text = (ROOT / "docs" / "faults.md").read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| scenario")]
    named = [re.findall(r"`(test_\w+\.py)::(test_\w+)`", r) for r in rows]
    assert rows and all(named), [r[:60] for r, n in zip(rows, named, strict=True) if not n]
    missing = [f"{f}::{t}" for pairs in named for f, t in pairs
               if not re.search(rf"^def {t}\(", (ROOT / "tests" / f).read_text(), flags=re.M)]
    assert not missing, missing
