"""``GroupNorm``: a drop-in replacement for :class:`torch.nn.GroupNorm` with fused epilogues."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._validate import normalize_activation, resolve_groups
from .functional import group_norm


class GroupNorm(nn.Module):
    r"""Applies Group Normalization over a mini-batch of inputs, optionally fused with a
    residual pre-add and an activation.

    .. math::
        y = \text{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
            \cdot \gamma + \beta\right)

    The input channels are separated into :attr:`num_groups` groups, each containing
    ``num_channels / num_groups`` channels; mean and (biased) standard deviation are
    computed per sample and group, in fp32 whatever the input dtype. :math:`\gamma` and
    :math:`\beta` are per-channel affine parameters of size :attr:`num_channels` if
    :attr:`affine` is ``True``. The parameter names and shapes are those of
    :class:`torch.nn.GroupNorm`, so its ``state_dict`` loads unchanged.

    Args:
        num_groups (int): number of groups to separate the channels into (or ``None`` with
            ``group_size``).
        num_channels (int): number of channels C expected in input.
        eps (float): a value added to the denominator for numerical stability. Default: 1e-5.
        affine (bool): learnable per-channel weight (init ones) and bias (init zeros).
            Default: ``True``.
        bias (bool): with ``affine``, also learn the bias (as torch's ``bias=``). Default: ``True``.
        group_size (int, optional): channels per group instead of ``num_groups``.
        activation (str, optional): fused ``"silu"``, ``"gelu"`` or ``"relu"``. Default: ``None``.

    Shape:
        - Input: :math:`(N, C, *)` where :math:`C=\text{num\_channels}`
        - Output: :math:`(N, C, *)` (same shape, dtype and memory format as input)

    Examples::

        >>> m = GroupNorm(32, 256, activation="silu")
        >>> y = m(torch.randn(4, 256, 28, 28))
        >>> y, h = m(torch.randn(4, 256, 28, 28), residual=torch.randn(4, 256, 28, 28), return_sum=True)
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine", "activation"]

    def __init__(
        self,
        num_groups: Optional[int],
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        group_size: Optional[int] = None,
        activation: Optional[str] = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_groups = resolve_groups(num_channels, num_groups, group_size)
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        act = normalize_activation(activation)
        self.activation = None if act == "none" else act
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, return_sum: bool = False):
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] != self.num_channels:
            raise ValueError(
                f"{self.__class__.__name__}({self.num_groups}, {self.num_channels}) expects {self.num_channels} "
                f"channels (dim 1), got input of shape {tuple(x.shape)}; for channels-last data use "
                "x.contiguous(memory_format=torch.channels_last) on an (N, C, H, W) tensor, not an (N, H, W, C) one")
        return group_norm(
            x, self.num_groups, self.weight, self.bias, self.eps,
            activation=self.activation, residual=residual, return_sum=return_sum,
        )

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script (deprecated in recent torch, still used for deployment) calls this
        # first: the Python forward (validation, routes, return_sum) is not scriptable, the
        # custom op is. Parameters are shared, state_dict keys are the same.
        return _ScriptableGroupNorm(self)

    def extra_repr(self) -> str:
        s = (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
             f"bias={self.bias is not None}")
        return s + (f", activation={self.activation!r}" if self.activation else "")


class _ScriptableGroupNorm(nn.Module):
    """What ``torch.jit.script(GroupNorm(...))`` compiles: the same computation through the
    ``groupnorm::fwd`` custom op (``residual`` supported, ``return_sum`` not)."""

    def __init__(self, m: GroupNorm):
        super().__init__()
        self.num_groups, self.num_channels, self.eps, self.affine = m.num_groups, m.num_channels, m.eps, m.affine
        self.activation = m.activation or "none"
        self.weight, self.bias = m.weight, m.bias

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError("GroupNorm: expected input of shape (N, " + str(self.num_channels)
                             + ", *), got " + str(x.shape))
        return torch.ops.groupnorm.fwd(x, self.weight, self.bias, residual, self.num_groups, float(self.eps),
                                       self.activation, "auto")[0]
