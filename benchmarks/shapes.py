"""The input shapes of ResNet-50's BatchNorm layers, derived from its architecture.

torchvision's resnet50 (v1.5, the stride on each bottleneck's 3x3 conv) on 224x224 images: a 7x7
stride-2 stem conv (112x112), a stride-2 max pool (56x56), then four stages of bottlenecks
(1x1 reduce to ``width``, 3x3, 1x1 expand to 4 x ``width``; the first block of a stage has a
1x1 projection shortcut), each stage after the first halving the resolution.
"""

import argparse
from collections import Counter
from typing import List, Tuple

Shape = Tuple[int, int, int, int]

STEM_CHANNELS = 64
STEM_SIZE = 112
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)
EXPANSION = 4


def bn_input_shapes(batch: int) -> List[Shape]:
    """The input shape of every BatchNorm layer of ResNet-50, in execution order (53 layers)."""
    shapes = [(batch, STEM_CHANNELS, STEM_SIZE, STEM_SIZE)]
    size = STEM_SIZE // 2
    for width, blocks, stage_stride in STAGES:
        for block in range(blocks):
            stride = stage_stride if block == 0 else 1
            shapes.append((batch, width, size, size))  # after the 1x1 reduce
            size //= stride
            shapes.append((batch, width, size, size))  # after the (strided) 3x3
            shapes.append((batch, width * EXPANSION, size, size))  # after the 1x1 expand
            if block == 0:
                shapes.append((batch, width * EXPANSION, size, size))  # after the projection shortcut
    return shapes


def resnet50_shapes(batch: int) -> List[Tuple[Shape, int]]:
    """The distinct BatchNorm input shapes of ResNet-50, in order of first use, each with the
    number of BatchNorm layers that see it."""
    layers = Counter(bn_input_shapes(batch))
    return list(layers.items())


def parse_chw(text: str) -> Tuple[int, int, int]:
    """``"64x56x56"`` (channels x height x width) -> ``(64, 56, 56)``; an argparse type."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected CxHxW with positive integers, e.g. 64x56x56, got {text!r}")
    return tuple(int(part) for part in parts)


def shape_label(shape: Shape) -> str:
    return "x".join(str(extent) for extent in shape)
