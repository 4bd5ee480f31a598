r"""Weight Standardization (Qiao et al., 2019): convolutions whose filters are standardized.

Each output filter :math:`W_o` (all its ``in_channels/groups * prod(kernel_size)`` fan-in
weights) is replaced in the forward pass by

.. math::
    \hat W_o = \frac{W_o - \mathrm{mean}(W_o)}{\sqrt{\mathrm{Var}(W_o) + \epsilon}}

(biased variance, eps inside the square root as in timm's ``StdConv2d``). The stored
parameter stays unstandardized, so a checkpoint of a plain ``nn.Conv2d`` loads unchanged.
GN + WS closes most of GN's remaining gap to large-batch BN (ResNet-50: 23.72% vs 24.1%
top-1 error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Standardize every output filter of a conv weight ``(out, in/groups, *kernel)`` over its fan-in."""
    flat = weight.flatten(1)
    # two-pass in fp32 at least: filters are small, so this costs nothing and avoids cancellation
    w = flat.float() if weight.dtype in (torch.float16, torch.bfloat16) else flat
    mean = w.mean(dim=1, keepdim=True)
    var = (w - mean).pow(2).mean(dim=1, keepdim=True)
    return ((w - mean) * torch.rsqrt(var + eps)).to(weight.dtype).view_as(weight)


class _WSConvMixin:
    eps: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.eps), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class WSConv1d(_WSConvMixin, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with Weight Standardization; same arguments plus ``eps`` (default 1e-5)."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps


class WSConv2d(_WSConvMixin, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with Weight Standardization; same arguments plus ``eps`` (default 1e-5).

    Example::

        >>> conv = WSConv2d(64, 128, 3, padding=1, bias=False)
        >>> y = conv(torch.randn(2, 64, 32, 32))
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps


class WSConv3d(_WSConvMixin, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with Weight Standardization; same arguments plus ``eps`` (default 1e-5)."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps


__all__ = ["standardize_weight", "WSConv1d", "WSConv2d", "WSConv3d"]
