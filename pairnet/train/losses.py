"""Losses on logits, computed in float32 whatever the autocast dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 1.0, gamma: float = 2.0,
               smoothing: float = 0.0) -> torch.Tensor:
    """Binary focal loss (Lin et al., 2017) with label smoothing towards 0.5."""
    t = target * (1 - smoothing) + 0.5 * smoothing
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
    p_t = torch.exp(-bce)
    return (alpha * (1 - p_t) ** gamma * bce).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor, *, smoothing: float = 0.0) -> torch.Tensor:
    t = target * (1 - smoothing) + 0.5 * smoothing
    return F.binary_cross_entropy_with_logits(logits.float(), t)


def make_loss(cfg):
    if cfg.loss == "focal":
        return lambda z, y: focal_loss(z, y, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                                       smoothing=cfg.label_smoothing)
    return lambda z, y: bce_loss(z, y, smoothing=cfg.label_smoothing)
