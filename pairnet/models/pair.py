"""The siamese pair model: one shared tower for both halves, then a head."""

from __future__ import annotations

import torch
from torch import nn

# Pixel statistics of the default data at severity 6 (mean 17.0, std 31.6 on 0..255):
# centring the input speeds up the first epochs.
PIXEL_MEAN = 17.0 / 255
PIXEL_STD = 31.6 / 255


DIGIT_CLASSES = 10


class PairModel(nn.Module):
    """x (N, 28, 56) in [0, 1] → logits (N,) for "left digit > right digit".

    With ``digit_head=True`` a linear 10-class digit classifier sits on the shared
    tower's features; it serves the auxiliary digit loss in training only, so pair
    prediction and the served interface are the same with or without it.
    """

    def __init__(self, tower: nn.Module, head: nn.Module, spec: dict, *, digit_head: bool = False):
        super().__init__()
        self.tower = tower
        self.head = head
        self.digit_head = nn.Linear(tower.feat_dim, DIGIT_CLASSES) if digit_head else None
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

    def forward(self, x: torch.Tensor, with_digits: bool = False):
        """Pair logits (N,); with ``with_digits`` also the digit logits, as ``forward_with_digits``
        (through ``forward`` so that a DistributedDataParallel wrapper sees the call)."""
        if with_digits:
            return self.forward_with_digits(x)
        return self.forward_head(*self.forward_features(x))

    def forward_per_head(self, x: torch.Tensor) -> torch.Tensor:
        """(N, heads) logits of each fusion head alone (models with fusion heads)."""
        if not hasattr(self.head, "per_head"):
            raise ValueError(f"{type(self.head).__name__} has a single head; per-head logits need fusion heads")
        return self.head.per_head(*self.forward_features(x))

    def forward_with_digits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair logits (N,) and digit logits (2N, 10): left halves first, then right."""
        if self.digit_head is None:
            raise ValueError("this model was built without a digit head (create_model(..., digit_head=True))")
        fa, fb = self.forward_features(x)
        return self.forward_head(fa, fb), self.digit_head(torch.cat([fa, fb]))


def weights_digest(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
