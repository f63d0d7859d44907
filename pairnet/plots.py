"""Figures shared by runs and stacking, returned as ``matplotlib.figure.Figure`` objects that
callers log with ``mlflow.log_figure`` (each at its own resolution, the figure's dpi).

Built on ``Figure`` directly, not pyplot: no global backend is chosen, so importing this in
a notebook leaves its inline figures alone.
"""

from __future__ import annotations

import numpy as np

from pairnet.data.pairs import to_labels


def _figure(figsize: tuple[float, float], dpi: int = 100):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def learning_curves(history: list[dict], title: str = ""):
    epochs = [h["epoch"] for h in history]
    fig = _figure((9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend()
    ax2.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax2.plot(epochs, [h["val_acc"] for h in history], label="val")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy"), ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion(y: np.ndarray, prob: np.ndarray, title: str = ""):
    pred = to_labels(prob)
    m = np.zeros((2, 2), dtype=int)
    np.add.at(m, (y.astype(int), pred), 1)
    fig = _figure((3.6, 3.2))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(m[i, j]), ha="center", va="center")
    ax.set_xticks([0, 1], ["pred 0", "pred 1"]), ax.set_yticks([0, 1], ["true 0", "true 1"])
    ax.set_title(title or "validation confusion matrix", fontsize=9)
    fig.tight_layout()
    return fig


def bar_chart(labels: list[str], values: list[float], ylabel: str, title: str = ""):
    fig = _figure((max(4, 0.8 * len(labels)), 3.4))
    ax = fig.subplots()
    ax.bar(range(len(labels)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    lo = min(values) if values else 0
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    return fig


def curves(y: np.ndarray, prob: np.ndarray, title: str = ""):
    """ROC (with AUC), precision-recall (with average precision) and a reliability diagram
    (10 bins), side by side, drawn by scikit-learn's display classes."""
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig = _figure((10.5, 3.4), dpi=80)
    roc, pr, rel = fig.subplots(1, 3)
    RocCurveDisplay.from_predictions(y, prob, ax=roc, name="model")
    roc.plot([0, 1], [0, 1], ls=":", c="grey")
    PrecisionRecallDisplay.from_predictions(y, prob, ax=pr, name="model")
    CalibrationDisplay.from_predictions(y, prob, n_bins=10, ax=rel, name="model")
    rel.set_xlabel("mean predicted probability"), rel.set_ylabel("fraction of label 1")
    for ax, name in ((roc, "ROC"), (pr, "precision-recall"), (rel, "reliability")):
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="lower right" if ax is not rel else "upper left")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.15, top=0.84, wspace=0.3)  # fixed: tight_layout draws twice
    return fig


def digit_pair_heatmap(errors: np.ndarray, pairs: np.ndarray, title: str = ""):
    """Error rate per (left digit, right digit): ``errors`` and ``pairs`` are 10×10 counts."""
    rate = np.divide(errors, pairs, out=np.full(errors.shape, np.nan), where=pairs > 0)
    fig = _figure((4.6, 4.0), dpi=80)
    ax = fig.subplots()
    im = ax.imshow(rate, cmap="Reds", vmin=0, vmax=max(0.5, float(np.nanmax(rate)) if pairs.any() else 0.5))
    for i, j in zip(*np.nonzero(pairs), strict=True):
        ax.text(j, i, f"{rate[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(10)), ax.set_yticks(range(10))
    ax.set_xlabel("right digit"), ax.set_ylabel("left digit")
    ax.set_title(title or "error rate per digit pair", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.12, top=0.92)
    return fig


def gallery(x: np.ndarray, y: np.ndarray, prob: np.ndarray, title: str = "",
            ids: np.ndarray | None = None):
    """The pairs shown with their true label and P(label 1), a grid of 4 columns.

    One image of all the pairs (a mosaic with a caption strip over each) rather than one
    axes per pair: the same picture, drawn in a quarter of the time."""
    n, cols = len(x), 4
    rows = max(1, -(-n // cols))
    h, w = x.shape[1:] if n else (28, 56)
    cap, gap = 10, 4  # pixels: the caption strip above each pair, the gap beside it
    mosaic = np.full((rows * (h + cap), cols * (w + gap)), 255, dtype=np.uint8)
    fig = _figure((8.0, 8.0 * mosaic.shape[0] / mosaic.shape[1] + 0.35), dpi=80)
    ax = fig.add_axes((0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = r * (h + cap) + cap, c * (w + gap)
        mosaic[top:top + h, left:left + w] = x[i]
        name = f"{ids[i]} " if ids is not None else ""
        ax.text(left, top - 1, f"{name}true {int(y[i])}, p={prob[i]:.2f}", fontsize=7, va="bottom")
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / fig.get_figheight(), va="top")
    return fig
