"""A small ResNet for the end-to-end benchmark (torchvision has no CPU build here).

The block is torchvision's Bottleneck, ResNet-50's block (v1.5: the stride sits on the 3x3 conv),
with a BatchNorm after every convolution, so BatchNorm carries the share of the work it has in a
ResNet-50, at a size where one training step takes well under two seconds on two CPU cores.
"""

from typing import Sequence

import torch
from torch import nn

def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, and a shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.body = nn.Sequential(
            conv_bn(in_channels, width, 1, 1),
            nn.ReLU(inplace=True),
            conv_bn(width, width, 3, stride),
            nn.ReLU(inplace=True),
            conv_bn(width, out_channels, 1, 1),
        )
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, 1, stride)


class ResNet(nn.Module):
    """A 3x3 stem conv (no downsampling: the input is already at feature-map resolution), then
    stages of bottlenecks, one per width, every stage after the first halving the resolution,
    then a classifier."""

    def __init__(
        self,
        widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        num_classes: int = 10,
    ):
        super().__init__()
        layers = [conv_bn(3, widths[0], 3, 1), nn.ReLU(inplace=True)]
        in_channels = widths[0]
        for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(Bottleneck(in_channels, width, stride))
                in_channels = width * Bottleneck.expansion
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))
