"""Test-time shifts: each half moves inside its own box, and the prediction is the mean over views."""

from __future__ import annotations

import numpy as np

from pairnet.tta import SHIFTS, mean_over_shifts, shift_halves


def test_each_half_moves_inside_its_own_box():
    x = np.zeros((1, 28, 56), dtype=np.uint8)
    x[0, 5, 27] = 200  # the left half's last column
    x[0, 0, 28] = 100  # the right half's top-left corner
    right = shift_halves(x, 0, 1)
    assert right[0, 5, 28] == 0 and right.sum() == 100 and right[0, 0, 29] == 100  # nothing crosses into the right half
    down = shift_halves(x, 1, 0)
    assert down[0, 6, 27] == 200 and down[0, 1, 28] == 100 and down[0, 0].sum() == 0
    up = shift_halves(x, -1, 0)
    assert up[0, 4, 27] == 200 and up.sum() == 200  # the top row's pixel moved out
    assert shift_halves(x, 0, 0) is x and x.sum() == 300  # the input is never written


def test_the_prediction_is_the_mean_over_the_views():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(4, 28, 56), dtype=np.uint8)

    def left_ink(v: np.ndarray) -> np.ndarray:  # a "model": the left half's mean intensity
        return v[:, :, :28].mean(axis=(1, 2)) / 255

    expected = np.mean([left_ink(shift_halves(x, dy, dx)) for dy, dx in SHIFTS], axis=0)
    got = mean_over_shifts(left_ink, x)
    assert got.shape == (4,) and np.allclose(got, expected)
    assert not np.allclose(got, left_ink(x))  # the shifted views lose edge ink: not the plain prediction
