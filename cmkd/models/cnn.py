"""A small CNN for small images (digits, digits-M)."""

from __future__ import annotations

import torch
from torch import nn

from cmkd.models import register_arch, select_stages


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 2 * width
        self.head = nn.Linear(2 * width, num_classes)
        self.stage_names = ["block1", "block2", "block3", "features"]
        self.stage_channels = {"block1": width, "block2": 2 * width, "block3": 2 * width, "features": 2 * width}
        self.intermediate_stage = "block2"

    # body indices where each stage ends: conv-bn-relu-pool, conv-bn-relu-pool, conv-bn-relu, pool-flatten
    _STAGE_ENDS = (4, 8, 11, 13)

    def forward_stages(self, x: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
        out, outputs, start = x, {}, 0
        for name, end in zip(self.stage_names, self._STAGE_ENDS):
            out = self.body[start:end](out)
            outputs[name] = out
            start = end
        return select_stages(outputs, names, self.head(out))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_arch("small_cnn")
def build_small_cnn(in_shape: tuple[int, ...], num_classes: int, width: int = 32) -> SmallCNN:
    return SmallCNN(in_shape[0], num_classes, width)
