"""The meta-learner of stage 4, without MLflow: features, LightGBM settings and CV.

``pairnet.stack`` (the tracked stage) and ``pairnet.serving`` (the served stack) both
build on this module, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pairnet.config import Config, param
from pairnet.train.metrics import accuracy

EPS = 1e-6
META_FEATURES = ("probability", "logit")  # per base model, in this order


@dataclass
class LgbmConfig(Config):
    """The LightGBM meta-learner. Stump-like trees and strong regularisation: it sees only
    val (10k pairs at full size, 1,500 at quick), and its inputs are already good,
    correlated predictors. On the quick pipeline's four fine-tuned models, 5-fold
    out-of-fold accuracy was 0.863 with 7 leaves / 20 per leaf / 200 trees and 0.876 with
    these defaults (best single 0.877)."""

    WHAT = "LightGBM setting"

    n_estimators: int = param(100, "boosting rounds", above=0)
    learning_rate: float = param(0.05, "shrinkage per round", above=0)
    num_leaves: int = param(3, "leaves per tree", min=2)
    min_child_samples: int = param(50, "fewest val pairs in a leaf", min=1)
    subsample: float = param(0.8, "share of rows each round sees", above=0, max=1)
    colsample_bytree: float = param(0.8, "share of features each tree sees", above=0, max=1)
    reg_lambda: float = param(1.0, "L2 penalty on leaf values", min=0)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def meta_features(probs: list[np.ndarray]) -> np.ndarray:
    """Per base model: probability and logit."""
    cols = []
    for p in probs:
        cols += [p, _logit(p)]
    return np.stack(cols, axis=1).astype(np.float64)


def leaf_floor(cfg: LgbmConfig, n_rows: int) -> int:
    """The fewest pairs per leaf on ``n_rows`` training pairs: ``cfg.min_child_samples``, or a
    ``num_leaves + 1``-th of the rows one round sees when that is less, so a tree of
    ``num_leaves`` leaves fits with room to spare. On a small val split (a folder with 100 val
    pairs: 80 per fold, 64 a round) 50 pairs per leaf allow no split at all, and the stack
    would predict the prior for every pair; the tiny preset's 256 val pairs get 40 in CV."""
    rows = int(n_rows * cfg.subsample)
    return max(1, min(cfg.min_child_samples, rows // (cfg.num_leaves + 1)))


def make_lgbm(seed: int, cfg: LgbmConfig | None = None, n_rows: int | None = None):
    """The meta-learner, for ``n_rows`` training pairs when given (see ``leaf_floor``)."""
    from lightgbm import LGBMClassifier

    cfg = cfg or LgbmConfig()
    params = cfg.to_dict()
    if n_rows is not None:
        params["min_child_samples"] = leaf_floor(cfg, n_rows)
    return LGBMClassifier(**params, subsample_freq=1, random_state=seed, verbose=-1, n_jobs=2)


def cross_validate(x: np.ndarray, y: np.ndarray, n_folds: int, seed: int,
                   cfg: LgbmConfig | None = None) -> tuple[np.ndarray, list[float]]:
    """Stratified k-fold out-of-fold probabilities and each fold's accuracy."""
    from sklearn.model_selection import StratifiedKFold

    oof = np.zeros(len(y))
    folds = []
    for train_idx, test_idx in StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, y):
        model = make_lgbm(seed, cfg, n_rows=len(train_idx)).fit(x[train_idx], y[train_idx])
        oof[test_idx] = model.predict_proba(x[test_idx])[:, 1]
        folds.append(accuracy(oof[test_idx], y[test_idx]))
    return oof, folds
