"""The LightGBM meta-learner on a small val split: it must still learn from its inputs."""

from __future__ import annotations

import numpy as np
import pytest

from pairnet.stacking import LgbmConfig, cross_validate, leaf_floor, make_lgbm, meta_features


def base_probs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and five base models' probabilities: each right on about 90 % of the pairs."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    probs = []
    for _ in range(5):
        right = rng.random(n) < 0.9
        p = np.where(right == (y == 1), rng.uniform(0.6, 0.99, n), rng.uniform(0.01, 0.4, n))
        probs.append(p)
    return meta_features(probs), y


@pytest.mark.parametrize("n", [100, 60])
def test_the_stack_learns_from_a_val_split_of_a_hundred_pairs_or_fewer(n):
    x, y = base_probs(n)
    oof, folds = cross_validate(x, y, n_folds=5, seed=42)
    assert np.mean((oof > 0.5) == y) >= 0.8  # with 50 pairs per leaf it stayed at the prior: 0.5
    fitted = make_lgbm(42, n_rows=n).fit(x, y)
    assert np.mean((fitted.predict_proba(x)[:, 1] > 0.5) == y) >= 0.8


def test_the_leaf_floor_keeps_the_setting_where_val_is_large_enough():
    cfg = LgbmConfig()
    assert leaf_floor(cfg, 1200) == cfg.min_child_samples == 50  # quick's val: 1,500 pairs, 5 folds
    assert leaf_floor(cfg, 80) == 16  # 64 rows a round, room for 3 leaves
    assert leaf_floor(cfg, 204) == 40  # the tiny preset's val (256 pairs), a CV fold's rows
    assert leaf_floor(cfg, 250) == 50  # from 250 rows up: the setting as given
    assert leaf_floor(cfg, 1) == 1
    assert make_lgbm(0, n_rows=80).get_params()["min_child_samples"] == 16
    assert make_lgbm(0).get_params()["min_child_samples"] == 50
