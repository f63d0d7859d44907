"""Heads: two feature vectors (fa, fb) → one logit per pair (label 1: left > right)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(cin: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, 1))


class ConcatHead(nn.Module):
    """An MLP over a fixed combination of the two feature vectors."""

    COMBOS = {
        "concat": lambda a, b: torch.cat([a, b], dim=1),
        "concat_diff": lambda a, b: torch.cat([a, b, a - b], dim=1),
    }
    WIDTH = {"concat": 2, "concat_diff": 3}

    def __init__(self, feat_dim: int, *, combo: str = "concat", hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.combo = combo
        self.mlp = mlp(self.WIDTH[combo] * feat_dim, hidden, dropout)

    def forward(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.COMBOS[self.combo](fa, fb)).squeeze(1)


class FusionHeads(nn.Module):
    """Six fusion features, each feeding its own head, mixed by learnable softmax weights.

    Four of the features (|fa−fb|, fa⊙fb, cosine, L2) are symmetric in (a, b) and alone
    cannot tell which digit is larger; they are kept as the recipe asks, and the learned
    weights plus the per-head accuracies logged by stage 1 show what each contributes.
    """

    NAMES = ("abs_diff", "concat", "product", "cosine", "l2", "diff")

    def __init__(self, feat_dim: int, *, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        width = {"abs_diff": feat_dim, "concat": 2 * feat_dim, "product": feat_dim, "cosine": 1, "l2": 1,
                 "diff": feat_dim}
        self.heads = nn.ModuleDict({n: mlp(width[n], hidden, dropout) for n in self.NAMES})
        self.mix = nn.Parameter(torch.zeros(len(self.NAMES)))

    @staticmethod
    def features(fa: torch.Tensor, fb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "abs_diff": (fa - fb).abs(),
            "concat": torch.cat([fa, fb], dim=1),
            "product": fa * fb,
            "cosine": F.cosine_similarity(fa, fb, dim=1, eps=1e-6)[:, None],
            "l2": (fa - fb).float().pow(2).sum(dim=1, keepdim=True).add(1e-6).sqrt().to(fa.dtype),
            "diff": fa - fb,
        }

    def head_logits(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, 6): each head's logit from its own feature only."""
        return torch.cat([self.heads[n](feats[n]) for n in self.NAMES], dim=1)

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.mix, dim=0)

    def per_head(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """(B, len(NAMES)) logits, one column per head, before the softmax mix."""
        return self.head_logits(self.features(fa, fb))

    def forward(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return self.per_head(fa, fb) @ self.weights().to(fa.dtype)
