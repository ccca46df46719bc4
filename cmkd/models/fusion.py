"""The multi-modal teacher of DisCoM-KD's Table 2: one ResNet-18 branch per modality, fused at
the penultimate layer by element-wise addition of the pooled features, then one linear layer.

The network takes a single tensor with the modalities concatenated along channels (e.g. the
4-channel `rgb_depth` of SUN RGB-D); `split` gives each branch's channel count, in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cmkd.errors import ConfigError
from cmkd.models import register_arch, select_stages
from cmkd.models.resnet import ResNet18


class FusionResNet18(nn.Module):
    """Two (or more) ResNet-18 branches; features = sum of the branches' pooled features."""

    def __init__(self, split: Sequence[int], num_classes: int, width: int = 64, small_input: bool = False):
        super().__init__()
        self.split = [int(c) for c in split]
        self.branches = nn.ModuleList()
        for channels in self.split:
            branch = ResNet18(channels, num_classes, width, small_input)
            branch.head = nn.Identity()  # only the fused head classifies; no unused parameters (DDP)
            self.branches.append(branch)
        self.feature_dim = self.branches[0].feature_dim
        self.head = nn.Linear(self.feature_dim, num_classes)
        # Each stage is the sum of the branches' outputs of that stage (as the fused features are).
        self.stage_names = list(self.branches[0].stage_names)
        self.stage_channels = dict(self.branches[0].stage_channels)
        self.intermediate_stage = self.branches[0].intermediate_stage

    def forward_stages(self, x: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
        per_branch = [b.stage_maps(part) for b, part in zip(self.branches, self._inputs(x))]
        summed = {name: torch.stack([maps[name] for maps in per_branch]).sum(0) for name in self.stage_names}
        return select_stages(summed, names, self.head(summed["features"]))

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.shape[1] != sum(self.split):
            raise ValueError(f"fusion_resnet18 expects {sum(self.split)} channels (split {self.split}), got "
                             f"{x.shape[1]}")
        return torch.split(x, self.split, dim=1)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the branches' last feature maps (average pooling of it gives `features`)."""
        return torch.stack([b.feature_maps(part) for b, part in zip(self.branches, self._inputs(x))]).sum(0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b.features(part) for b, part in zip(self.branches, self._inputs(x))]).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_arch("fusion_resnet18")
def build_fusion_resnet18(in_shape: tuple[int, ...], num_classes: int, split: Sequence[int] | None = None,
                          width: int = 64, small_input: bool = False) -> FusionResNet18:
    if split is None or len(split) < 2 or any(int(c) < 1 for c in split):
        raise ConfigError("split", "fusion_resnet18 needs `split`, the channels of each modality (e.g. [3, 1]), got "
                                   f"{split}")
    if sum(int(c) for c in split) != in_shape[0]:
        raise ConfigError("split", f"channel split {list(split)} sums to {sum(int(c) for c in split)}, "
                                   f"but the input has {in_shape[0]} channels")
    return FusionResNet18(split, num_classes, width, small_input)
