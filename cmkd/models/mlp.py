"""Multi-layer perceptron for vector data (the synthetic datasets)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cmkd.models import register_arch, select_stages


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
        # Stages: the output of each hidden layer; the last one is "features".
        per_layer = 3 if dropout else 2
        self._stage_ends = [per_layer * (i + 1) for i in range(len(hidden))] or [0]
        self.stage_names = [f"hidden{i + 1}" for i in range(len(self._stage_ends) - 1)] + ["features"]
        widths = list(hidden) or [in_features]
        self.stage_channels = dict(zip(self.stage_names, widths))
        self.intermediate_stage = self.stage_names[0]

    def forward_stages(self, x: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
        out, outputs, start = x.flatten(1), {}, 0
        for name, end in zip(self.stage_names, self._stage_ends):
            out = self.body[start:end](out)
            outputs[name] = out
            start = end
        return select_stages(outputs, names, self.head(out))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_arch("mlp")
def build_mlp(in_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (128, 128),
              dropout: float = 0.0) -> MLP:
    in_features = 1
    for d in in_shape:
        in_features *= d
    return MLP(in_features, num_classes, hidden, dropout)
