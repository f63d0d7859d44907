"""Towers: one image (B, 1, 28, 28) → one feature vector (B, feat_dim).

Each tower exposes ``forward_features`` (the spatial trunk) and a ``neck`` that
pools and projects; ``forward`` runs both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pairnet.models.blocks import BLOCKS, conv_bn_relu, conv1x1, conv3x3, make_attention


def _ch(base: int, width_mult: float) -> int:
    return max(8, int(round(base * width_mult)))


class Neck(nn.Module):
    """Global average pool → dropout → linear projection to the feature size."""

    def __init__(self, cin: int, feat_dim: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(cin, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(x.mean(dim=(2, 3))))


class Tower(nn.Module):
    feat_dim: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.forward_features(x))


class SmallTower(Tower):
    """The plain baseline: three conv-BN-ReLU layers with pooling."""

    def __init__(self, *, width_mult: float = 1.0, feat_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        c1, c2, c3 = (_ch(b, width_mult) for b in (32, 64, 128))
        self.trunk = nn.Sequential(
            conv_bn_relu(1, c1), nn.MaxPool2d(2), conv_bn_relu(c1, c2), nn.MaxPool2d(2), conv_bn_relu(c2, c3)
        )
        self.neck = Neck(c3, feat_dim, dropout)
        self.feat_dim = feat_dim

    def forward_features(self, x):
        return self.trunk(x)


class CBAMTower(Tower):
    """Stage-1 tower: three double-conv stages, each followed by CBAM attention."""

    def __init__(self, *, width_mult: float = 1.0, feat_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        chans = [_ch(b, width_mult) for b in (32, 64, 128)]
        layers, cin = [], 1
        for i, c in enumerate(chans):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [conv_bn_relu(cin, c), conv_bn_relu(c, c), make_attention("cbam", c)]
            cin = c
        self.trunk = nn.Sequential(*layers)
        self.neck = Neck(cin, feat_dim, dropout)
        self.feat_dim = feat_dim

    def forward_features(self, x):
        return self.trunk(x)


class ResNetTower(Tower):
    """ResNet whose stem keeps 28×28 (a 3×3 conv, no stride, no max-pool), stages at
    28, 14, 7 (and 4 for a fourth) pixels, attention after each stage."""

    def __init__(
        self,
        *,
        block: str = "basic",
        layers: tuple[int, ...] = (2, 2, 2),
        width_mult: float = 1.0,
        attention: str = "se",
        feat_dim: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        blk = BLOCKS[block]
        stem = _ch(32, width_mult)
        self.stem = conv_bn_relu(1, stem)
        stages, cin = [], stem
        for i, n in enumerate(layers):
            planes = _ch(32 * 2**i, width_mult)
            blocks = []
            for j in range(n):
                blocks.append(blk(cin, planes, stride=2 if (i and j == 0) else 1))
                cin = planes * blk.expansion
            blocks.append(make_attention(attention, cin))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.neck = Neck(cin, feat_dim, dropout)
        self.feat_dim = feat_dim

    def forward_features(self, x):
        return self.stages(self.stem(x))


class FPNTower(Tower):
    """Feature-pyramid tower: a residual bottom-up path at 28/14/7 px, a top-down path
    with lateral 1×1 connections, every pyramid level pooled and concatenated."""

    def __init__(
        self,
        *,
        layers: tuple[int, ...] = (1, 1, 1),
        width_mult: float = 1.0,
        pyramid_width: int = 64,
        feat_dim: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        blk = BLOCKS["basic"]
        cin = _ch(32, width_mult)
        self.stem = conv_bn_relu(1, cin)
        self.levels = nn.ModuleList()
        self.lateral = nn.ModuleList()
        p = _ch(pyramid_width, width_mult)
        for i, n in enumerate(layers):
            planes = _ch(32 * 2**i, width_mult)
            blocks = [blk(cin if j == 0 else planes, planes, stride=2 if (i and j == 0) else 1) for j in range(n)]
            self.levels.append(nn.Sequential(*blocks))
            self.lateral.append(conv1x1(planes, p))
            cin = planes
        self.smooth = nn.ModuleList(nn.Sequential(conv3x3(p, p), nn.BatchNorm2d(p), nn.ReLU(inplace=True))
                                    for _ in layers)
        self.neck = Neck(p * len(layers), feat_dim, dropout)
        self.feat_dim = feat_dim

    def forward_features(self, x):
        feats, h = [], self.stem(x)
        for level in self.levels:
            h = level(h)
            feats.append(h)
        top = self.lateral[-1](feats[-1])
        pyramid = [top]
        for i in range(len(feats) - 2, -1, -1):
            top = self.lateral[i](feats[i]) + F.interpolate(top, size=feats[i].shape[-2:], mode="nearest")
            pyramid.insert(0, top)
        return [s(p) for s, p in zip(self.smooth, pyramid, strict=True)]

    def forward(self, x):
        pooled = torch.cat([p.mean(dim=(2, 3)) for p in self.forward_features(x)], dim=1)
        return self.neck.proj(self.neck.drop(pooled))
