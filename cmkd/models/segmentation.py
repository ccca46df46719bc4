"""Segmentation network: a ResNet-style encoder and a light FPN-like decoder.

The encoder is four stages of ResNet BasicBlocks (strides 1, 2, 2, 2 after the stem); the
decoder projects every stage to `decoder_dim` channels with 1x1 convolutions, adds them top
down (bilinear upsampling to the finer stage's size, so any input size works), refines with a
3x3 convolution and upsamples to the input size. `features(x)` is that per-pixel map
[N, D, H, W]; `head` is a 1x1 convolution to the class logits [N, C, H, W]. Inputs of any
floating dtype (float16 LiDAR images in prepared files) are cast to the weights' dtype first;
integer inputs (stored uint8 RGB) are refused: cmkd.training.data.load_split normalises them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import ConfigError
from cmkd.models import register_arch, select_stages
from cmkd.models.resnet import BasicBlock


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SegResNet(nn.Module):
    """`width` scales the encoder (stages of width, 2, 4, 8 x width channels); `blocks` is the
    number of BasicBlocks per stage, one number or one per stage ([3, 4, 6, 3] with width 64:
    a ResNet-34 encoder, PMF's camera branch); `stem_stride` 2 or 4 halves or quarters the
    resolution the encoder starts at (cheaper on large images)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, blocks: int | Sequence[int] = 1,
                 decoder_dim: int | None = None, stem_stride: int = 1):
        super().__init__()
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        per_stage = [blocks] * 4 if isinstance(blocks, int) else list(blocks)
        if len(per_stage) != 4 or not all(isinstance(b, int) and b >= 1 for b in per_stage):
            raise ConfigError("blocks", "must be a positive integer or four of them (e.g. [3, 4, 6, 3]), got "
                                        f"{blocks!r}")
        stem = [_conv_bn_relu(in_channels, width, 3, min(stem_stride, 2))]
        if stem_stride == 4:
            stem.append(_conv_bn_relu(width, width, 3, 2))
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList()
        in_planes = width
        widths = [width, 2 * width, 4 * width, 8 * width]
        for i, planes in enumerate(widths):
            layers = [BasicBlock(in_planes, planes, 1 if i == 0 else 2)]
            layers += [BasicBlock(planes, planes, 1) for _ in range(per_stage[i] - 1)]
            self.stages.append(nn.Sequential(*layers))
            in_planes = planes
        dim = decoder_dim or 2 * width
        self.lateral = nn.ModuleList(nn.Conv2d(w, dim, 1) for w in widths)
        self.refine = _conv_bn_relu(dim, dim, 3)
        self.feature_dim = dim
        self.head = nn.Conv2d(dim, num_classes, 1)
        self.stage_names = ["stem", "layer1", "layer2", "layer3", "layer4", "features"]
        self.stage_channels = {"stem": width, **{f"layer{i + 1}": w for i, w in enumerate(widths)}, "features": dim}
        self.intermediate_stage = "layer3"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._stages(x)["features"]

    def forward_stages(self, x: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
        outputs = self._stages(x)
        return select_stages(outputs, names, self.head(outputs["features"]))

    def _stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Inputs may be stored as float16 (half the prepared file); compute in the weights' dtype.
        if not x.is_floating_point():
            raise TypeError(f"expects normalised floating-point input, got {x.dtype} (raw pixels?)")
        x = x.to(self.head.weight.dtype)
        size = x.shape[-2:]
        maps = []
        out = self.stem(x)
        outputs = {"stem": out}
        for i, stage in enumerate(self.stages):
            out = stage(out)
            maps.append(out)
            outputs[f"layer{i + 1}"] = out
        top = self.lateral[-1](maps[-1])
        for lateral, skip in zip(reversed(self.lateral[:-1]), reversed(maps[:-1])):
            top = lateral(skip) + F.interpolate(top, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        top = self.refine(top)
        if top.shape[-2:] != size:
            top = F.interpolate(top, size=size, mode="bilinear", align_corners=False)
        outputs["features"] = top
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_arch("seg_resnet")
def build_seg_resnet(in_shape: tuple[int, ...], num_classes: int, width: int = 16, blocks: int | Sequence[int] = 1,
                     decoder_dim: int | None = None, stem_stride: int = 1) -> SegResNet:
    return SegResNet(in_shape[0], num_classes, width, blocks, decoder_dim, stem_stride)
