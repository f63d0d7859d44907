"""The siamese pair model: one shared tower for both halves, then a head."""

from __future__ import annotations

import torch
from torch import nn

# Pixel statistics of the default data at severity 6 (mean 17.0, std 31.6 on 0..255):
# centring the input speeds up the first epochs.
PIXEL_MEAN = 17.0 / 255
PIXEL_STD = 31.6 / 255


class PairModel(nn.Module):
    """x (N, 28, 56) in [0, 1] → logits (N,) for "left digit > right digit"."""

    def __init__(self, tower: nn.Module, head: nn.Module, spec: dict):
        super().__init__()
        self.tower = tower
        self.head = head
        self.spec = dict(spec)  # name + resolved builder arguments: enough to rebuild

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        # Both halves go through the shared tower in one call (2N images).
        both = torch.cat([x[:, :, :28], x[:, :, 28:]], dim=0)[:, None]
        both = ((both - PIXEL_MEAN) / PIXEL_STD).contiguous(memory_format=torch.channels_last)
        f = self.tower(both)
        return f[:n], f[n:]

    def forward_head(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return self.head(fa, fb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(*self.forward_features(x))


class ProbabilityModel(nn.Module):
    """Serving wrapper: uint8 pairs (N, 28, 56) → probabilities (N,) of label 1."""

    def __init__(self, model: PairModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x.float() / 255.0).float())
