"""A labelled grid of pairs, so a person can see what the data looks like."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pairnet.data.pairs import PairSet
from pairnet.fsutil import atomic_path


def preview_grid(pairs: PairSet, out: str | Path, n: int = 24, cols: int = 4, seed: int = 0) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global backend is switched

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(pairs), size=min(n, len(pairs)), replace=False))
    rows = -(-pick.size // cols)
    fig = Figure(figsize=(cols * 2.6, rows * 1.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    digits = (pairs.extras.get("digit_a"), pairs.extras.get("digit_b"))
    for ax, i in zip(axes.ravel(), pick, strict=False):  # the grid may have spare cells
        ax.imshow(pairs.x[i], cmap="gray", vmin=0, vmax=255)
        title = pairs.ids[i] if pairs.ids is not None else f"#{i}"
        if pairs.y is not None:
            title += f"  y={int(pairs.y[i])}"
        if digits[0] is not None:
            title += f"  ({int(digits[0][i])}|{int(digits[1][i])})"
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"{Path(pairs.source).name}: y=1 iff left digit > right digit", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:  # a crash mid-write leaves the old file, never a torn one
        fig.savefig(tmp, dpi=110, format="png")
    return out
