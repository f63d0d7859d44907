"""Batched augmentation on the training device: no per-sample Python.

The settings are ``TrainConfig.aug`` (``pairnet.train.config.AugmentConfig``). Every
random draw comes from one ``torch.Generator`` on the batch's device, so a run is
reproducible and resumable (the loop checkpoints the generator's state) and a step
makes no host-device copies: on CUDA the draws never leave the GPU.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from pairnet.train.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def augment_batch(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, cfg: AugmentConfig | None = None,
                  digits: torch.Tensor | None = None):
    """x (B, 28, 56) float in [0, 1], y (B,) float, optional digit labels (B, 2)
    → augmented copies (x, y, digits); digits (None when not given) follow a swap.
    ``g`` lives on x's device (``torch.Generator(device=x.device)``)."""
    cfg = cfg or AugmentConfig()
    b, dev = x.shape[0], x.device
    swap = torch.rand(b, generator=g, device=dev) < cfg.swap
    left, right = x[:, :, :28], x[:, :, 28:]
    halves = torch.cat([torch.where(swap[:, None, None], right, left), torch.where(swap[:, None, None], left, right)])
    y = torch.where(swap, 1.0 - y, y)
    if digits is not None:
        digits = torch.where(swap[:, None], digits.flip(1), digits)

    m = 2 * b
    rot = _uniform(m, -cfg.rotation_deg, cfg.rotation_deg, g) * (math.pi / 180)
    scale = _uniform(m, 1 - cfg.scale, 1 + cfg.scale, g)
    shift = _uniform(2 * m, -cfg.shift_px, cfg.shift_px, g).view(m, 2) * (2 / 28)
    cos, sin = torch.cos(rot) / scale, torch.sin(rot) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), [m, 1, 28, 28], align_corners=False)
    halves = F.grid_sample(halves[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]

    on = torch.rand(m, generator=g, device=dev) < cfg.erase
    lo, hi = cfg.erase_min_px, cfg.erase_max_px
    w = _uniform(m, lo, hi, g)
    h = _uniform(m, lo, hi, g)
    x0 = _uniform(m, -2, 28, g)
    y0 = _uniform(m, -2, 28, g)
    ar = torch.arange(28, device=dev, dtype=x.dtype)
    in_x = (ar[None] >= x0[:, None]) & (ar[None] < (x0 + w)[:, None])
    in_y = (ar[None] >= y0[:, None]) & (ar[None] < (y0 + h)[:, None])
    box = in_y[:, :, None] & in_x[:, None, :] & on[:, None, None]
    halves = halves.masked_fill(box, 0.0)
    return torch.cat([halves[:b], halves[b:]], dim=2), y, digits
