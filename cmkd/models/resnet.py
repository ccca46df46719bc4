"""ResNet-18 and ResNet-34 (He et al. 2016; BasicBlocks [2, 2, 2, 2] and [3, 4, 6, 3]) with
their first convolution adapted to any channel count.

Written here rather than taken from torchvision: torchvision's wheels do not import beside the
CPU build of torch this project pins (see README, "Why torch 2.13 CPU"), and timm depends on
torchvision. The layers match torchvision's (conv-bn-relu stem, 7x7/2 and max-pool, the same
blocks and strides), so a converted ImageNet state dict would fit their shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from cmkd.models import register_arch, select_stages


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ResNet18(nn.Module):
    """ResNet-18 (or, with `blocks` (3, 4, 6, 3), ResNet-34). `width` scales every stage (64 is
    the standard network); `small_input` replaces the 7x7/2 stem and max-pool by a 3x3/1 stem
    for images of 32 px or less."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, small_input: bool = False,
                 blocks: tuple[int, ...] = RESNET_BLOCKS[18]):
        super().__init__()
        if small_input:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        stages = []
        in_planes = width
        for i, planes in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride),
                                        *(BasicBlock(planes, planes, 1) for _ in range(blocks[i] - 1))))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, num_classes)
        self.stage_names = ["stem", "layer1", "layer2", "layer3", "layer4", "features"]
        self.stage_channels = {"stem": width, "layer1": width, "layer2": 2 * width, "layer3": 4 * width,
                               "layer4": 8 * width, "features": 8 * width}
        self.intermediate_stage = "layer3"  # C2KD's proxies sit on the output of layer3

    def stage_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{stem, layer1, ..., layer4, features} in one pass."""
        out = self.stem(x)
        maps = {"stem": out}
        for i, stage in enumerate(self.stages):
            out = stage(out)
            maps[f"layer{i + 1}"] = out
        maps["features"] = self.pool(out)
        return maps

    def forward_stages(self, x: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
        maps = self.stage_maps(x)
        return select_stages(maps, names, self.head(maps["features"]))

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_maps(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_arch("resnet18")
def build_resnet18(in_shape: tuple[int, ...], num_classes: int, width: int = 64, small_input: bool = False) -> ResNet18:
    return ResNet18(in_shape[0], num_classes, width, small_input)


class ResNet34(ResNet18):
    """ResNet-34: the ResNet-18 network with BasicBlocks [3, 4, 6, 3] (PMF's camera backbone)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, small_input: bool = False):
        super().__init__(in_channels, num_classes, width, small_input, RESNET_BLOCKS[34])


@register_arch("resnet34")
def build_resnet34(in_shape: tuple[int, ...], num_classes: int, width: int = 64, small_input: bool = False) -> ResNet34:
    return ResNet34(in_shape[0], num_classes, width, small_input)
