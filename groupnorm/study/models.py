"""Models of the study. Any registered norm plugs into any model, in 1-D, 2-D or 3-D.

* :class:`PlainNet`: VGG-style stages of (conv3x3, norm, ReLU), max-pool between
  stages, global average pool, linear classifier.
* :class:`ResNet`: the CIFAR ResNet of He et al. (2016): depth = 6n + 2, three stages
  of n basic blocks at widths 16k / 32k / 64k (k = ``width``). The last norm of each
  residual block starts with gamma = 0 (Goyal et al., 2017), as in the GN paper.

``dims=3`` gives the volumetric variants (Conv3d, 3-D pooling) for inputs of shape
(N, C, D, H, W); ``dims=1`` gives (N, C, L).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from .norms import NormFactory, conv_class, resolve_norm

_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_GAP = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class _NormBuilder:
    """Bundle of (factory, options) so the models build norms and convs consistently."""

    def __init__(self, norm: Union[str, NormFactory], dims: int, **opts):
        self.factory = resolve_norm(norm)
        self.dims = dims
        self.opts = dict(opts, dims=dims)
        self.conv_cls = conv_class(self.factory, dims)
        self.conv_bias = bool(getattr(self.factory, "conv_bias", False))

    def norm(self, c: int) -> nn.Module:
        return self.factory(c, **self.opts)

    def conv(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Module:
        return self.conv_cls(cin, cout, k, stride=stride, padding=k // 2, bias=self.conv_bias)


def _init(model: nn.Module):
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PlainNet(nn.Module):
    """VGG-style plain conv net.

    Args:
        norm (str or callable): a registered norm name or a factory.
        in_channels (int): input channels.
        num_classes (int): output classes.
        widths (sequence of int): channels of each stage. Default: (16, 32, 64).
        convs_per_stage (int): conv-norm-ReLU units per stage. Default: 1.
        dims (int): spatial dimensions (1, 2, 3). Default: 2.
        **norm_opts: passed to the norm factory (ghost_size, num_groups, ...).
    """

    def __init__(self, norm, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64),
                 convs_per_stage: int = 1, dims: int = 2, **norm_opts):
        super().__init__()
        nb = _NormBuilder(norm, dims, **norm_opts)
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(_POOL[dims](2, ceil_mode=True))
            for _ in range(convs_per_stage):
                layers += [nb.conv(c, w), nb.norm(w), nn.ReLU()]
                c = w
        self.features = nn.Sequential(*layers)
        self.pool = _GAP[dims](1)
        self.fc = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """conv-norm-ReLU-conv-norm + shortcut, ReLU. The second norm is the block's last."""

    def __init__(self, nb: _NormBuilder, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.n1 = nb.conv(cin, cout, 3, stride), nb.norm(cout)
        self.conv2, self.n2 = nb.conv(cout, cout, 3, 1), nb.norm(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            # 1x1 projection shortcut with its own norm (option B of He et al.)
            self.shortcut = nn.Sequential(nb.conv(cin, cout, 1, stride), nb.norm(cout))

    def forward(self, x):
        out = self.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (depth = 6n + 2: 8, 14, 20, 32, 56, 110).

    Args:
        norm (str or callable): a registered norm name or a factory.
        in_channels (int): input channels.
        num_classes (int): output classes.
        depth (int): 6n + 2 layers. Default: 20.
        width (int): width multiplier k, stage widths 16k/32k/64k. Default: 1.
        dims (int): spatial dimensions (1, 2, 3). Default: 2.
        zero_init_last (bool): gamma = 0 in each block's last norm. Default: True.
        **norm_opts: passed to the norm factory.
    """

    def __init__(self, norm, in_channels: int, num_classes: int, depth: int = 20, width: int = 1,
                 dims: int = 2, zero_init_last: bool = True, **norm_opts):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        nb = _NormBuilder(norm, dims, **norm_opts)
        w = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nb.conv(in_channels, w[0]), nb.norm(w[0]), nn.ReLU())
        blocks, c = [], w[0]
        for s, cout in enumerate(w):
            for b in range(n):
                blocks.append(BasicBlock(nb, c, cout, 2 if (s > 0 and b == 0) else 1))
                c = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = _GAP[dims](1)
        self.fc = nn.Linear(c, num_classes)
        _init(self)
        if zero_init_last:
            for blk in self.blocks:
                if getattr(blk.n2, "weight", None) is not None:
                    nn.init.zeros_(blk.n2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


MODELS = {"plain": PlainNet, "resnet": ResNet}


def build_model(model: str, norm, in_channels: int, num_classes: int, *, dims: int = 2, depth: int = 20,
                width: int = 1, widths: Sequence[int] = (16, 32, 64), convs_per_stage: int = 1,
                zero_init_last: bool = True, **norm_opts) -> nn.Module:
    """Build ``plain`` or ``resnet`` with the given norm (name or factory)."""
    if model == "plain":
        return PlainNet(norm, in_channels, num_classes, widths=widths, convs_per_stage=convs_per_stage,
                        dims=dims, **norm_opts)
    if model == "resnet":
        return ResNet(norm, in_channels, num_classes, depth=depth, width=width, dims=dims,
                      zero_init_last=zero_init_last, **norm_opts)
    raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODELS)}")
