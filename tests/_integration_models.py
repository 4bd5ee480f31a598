"""Tiny real-world-shaped models for the integration tests (torchvision is not installable
beside this torch, so the ResNet is written out in its style)."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-bn-relu-conv-bn + (downsampled) identity."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet (stem, layer1..layer2 of BasicBlocks, avgpool, fc)."""

    def __init__(self, widths=(8, 16), blocks=(1, 1), num_classes: int = 10):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = self._make_layer(widths[0], blocks[0], 1)
        self.layer2 = self._make_layer(widths[1], blocks[1], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1], num_classes)

    def _make_layer(self, planes, n, stride):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class UNetResBlock(nn.Module):
    """diffusers-style ResnetBlock2D: (GN -> SiLU -> conv) twice, plus the skip connection."""

    def __init__(self, cin: int, cout: int, groups: int = 4):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.block2 = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block2(self.block1(x))


class Tiny3DNet(nn.Module):
    """A 3-D conv net (video/volumes) with BatchNorm3d and a BatchNorm1d head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(2, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(),
            nn.Conv3d(6, 12, 3, padding=1, stride=2), nn.BatchNorm3d(12), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3, 4), keepdim=True))


def count(model: nn.Module, cls) -> int:
    """Distinct module instances of ``cls`` in the tree."""
    return sum(isinstance(m, cls) for m in model.modules())
