"""Test-time shifts: a pair's probability as the mean over small shifts of each half.

A pair image is two 28×28 digits side by side (N, 28, 56). Each view moves both halves by the
same (dy, dx) pixels, each inside its own box (nothing crosses from one half into the other);
the uncovered edge is zero, the background of the pairs. ``SHIFTS`` are the identity and the
four one-pixel moves.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def _span(d: int, size: int) -> tuple[slice, slice]:
    """Destination and source slices of a move by ``d`` along an axis of ``size``."""
    return slice(max(d, 0), size + min(d, 0)), slice(max(-d, 0), size - max(d, 0))


def shift_halves(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``x`` (N, H, 2W) with each half moved by ``dy`` rows and ``dx`` columns in its own box."""
    if (dy, dx) == (0, 0):
        return x
    n, h, w = x.shape
    half = w // 2
    out = np.zeros_like(x)
    (dst_r, src_r), (dst_c, src_c) = _span(dy, h), _span(dx, half)
    for lo in (0, half):
        out[:, dst_r, lo:lo + half][:, :, dst_c] = x[:, src_r, lo:lo + half][:, :, src_c]
    return out


def mean_over_shifts(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                     shifts: tuple[tuple[int, int], ...] = SHIFTS) -> np.ndarray:
    """The mean of ``predict`` (pairs -> probabilities) over the shifted views of ``x``."""
    return np.mean([np.asarray(predict(shift_halves(x, dy, dx)), dtype=np.float64).reshape(-1)
                    for dy, dx in shifts], axis=0)
