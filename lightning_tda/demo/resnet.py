"""Model architectures in plain torch (no Lightning), importable on their own by other tools.

:func:`resnet` builds a ResNet of :class:`BasicBlock` s without torchvision (whose registry build does
not match the CPU torch here, and would break ``import lightning``); :class:`lightning_tda.demo.ResNet`
trains it. The benchmark that compares with kronfluence loads this file into a separate environment,
so it imports nothing but torch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions with batch norm, and a 1×1 projection shortcut when
    the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet(
    width: int = 32,
    blocks: list[int] | tuple[int, ...] = (2, 2, 2, 2),
    in_channels: int = 3,
    num_classes: int = 10,
    stem: str = "cifar",
) -> nn.Sequential:
    """A ResNet of basic blocks as one ``nn.Sequential``: stem, stages of ``width·2^i`` channels
    (``blocks[i]`` blocks each, stride 2 from the second stage on), global average pooling, linear head.

    ``stem="cifar"``: a 3×3 stride-1 convolution (the usual choice for 32×32 inputs); ``stem="imagenet"``:
    torchvision's 7×7 stride-2 convolution and 3×3 stride-2 max pool, 16× fewer positions in every
    later layer (on 32×32 inputs the last stage sees 1×1 feature maps). ``width=64`` with
    ``blocks=(2, 2, 2, 2)`` is ResNet-18 (11.2M parameters for 10 classes), ``width=32`` halves it (2.8M).
    """
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r}: use 'cifar' (3x3, stride 1) or 'imagenet' (7x7 stride 2 and a max pool).")
    if stem == "cifar":
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False)]
    else:
        layers = [nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)]
    layers += [nn.BatchNorm2d(width), nn.ReLU()]
    if stem == "imagenet":
        layers.append(nn.MaxPool2d(3, stride=2, padding=1))
    channels = width
    for stage, count in enumerate(blocks):
        out = width * 2**stage
        for index in range(count):
            layers.append(BasicBlock(channels, out, stride=2 if stage > 0 and index == 0 else 1))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
