"""Multi-layer perceptron for vector data (the synthetic datasets)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cmkd.models import register_arch


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (128, 128), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = width
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_arch("mlp")
def build_mlp(in_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (128, 128), dropout: float = 0.0) -> MLP:
    in_features = 1
    for d in in_shape:
        in_features *= d
    return MLP(in_features, num_classes, hidden, dropout)
