"""Functional interface: :func:`group_norm`."""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

from ._validate import validate
from .ops import group_norm as _op
from .ops import routes

Tensor = torch.Tensor


def group_norm(
    x: Tensor,
    num_groups: Optional[int] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    group_size: Optional[int] = None,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    return_sum: bool = False,
    route: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""Group Normalization with an optional fused residual pre-add and activation.

    The C channels of each sample are split into G groups; each group is normalized by its
    own mean and (biased) variance, then a per-channel affine and the activation follow:

    .. math::
        s = x + \text{residual}, \qquad
        y = \text{act}\left(\frac{s - \mathrm{E}[s]}{\sqrt{\mathrm{Var}[s] + \epsilon}}
            \cdot \gamma + \beta\right)

    Mean and variance are taken per sample over the group's channels and all spatial
    positions, in fp32 (fp64 for fp64 input) whatever the input dtype. G=1 is LayerNorm over
    (C, \*), G=C is InstanceNorm. Without ``residual`` and ``activation`` this equals
    :func:`torch.nn.functional.group_norm`.

    Args:
        x: input of shape (N, C, \*), fp32/fp64/fp16/bf16, any memory format.
        num_groups (int, optional): number of groups G; C must be divisible by it.
        weight (Tensor, optional): per-channel scale :math:`\gamma` of shape (C,), x's dtype
            or fp32 with a half-precision x. Default: ``None`` (no scale).
        bias (Tensor, optional): per-channel shift :math:`\beta` of shape (C,). Default: ``None``.
        eps (float): added to the variance inside the square root. Default: 1e-5.
        group_size (int, optional): channels per group, instead of ``num_groups``
            (pass exactly one of the two).
        activation (str, optional): ``None``, ``"silu"``, ``"gelu"`` (exact erf form) or
            ``"relu"``, fused after the affine. Default: ``None``.
        residual (Tensor, optional): tensor of x's shape and dtype added to x before
            normalizing (the sum is rounded to x's dtype, then normalized). Default: ``None``.
        return_sum (bool): with ``residual``, also return ``x + residual`` so a residual
            stream need not be recomputed. Default: ``False``.
        route (str, optional): force an implementation (``"reference"``, ``"cpu"``,
            ``"triton"``); default: the :func:`groupnorm.use_route` setting, else automatic.

    Returns:
        ``y`` of x's shape, dtype and memory format; ``(y, x + residual)`` with ``return_sum``.

    Shape:
        - x: :math:`(N, C, *)`
        - output: :math:`(N, C, *)` (same shape as input)

    Examples::

        >>> x = torch.randn(2, 64, 16, 16)
        >>> y = group_norm(x, 32, activation="silu")
        >>> y, h = group_norm(x, group_size=8, residual=torch.randn_like(x), return_sum=True)
    """
    if isinstance(x, torch.fx.Proxy):
        # torch.fx.symbolic_trace: record one call_function node (validation runs when the
        # traced graph runs); without this the Proxy would reach the validation and fail
        return x.tracer.create_proxy(
            "call_function", group_norm, (x, num_groups, weight, bias, eps),
            dict(group_size=group_size, activation=activation, residual=residual, return_sum=return_sum,
                 route=route))
    if torch.jit.is_tracing():
        # shapes are constants to the tracer, which warns about every Python comparison of them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            G, act = validate(x, num_groups, group_size, weight, bias, residual, activation)
    else:
        G, act = validate(x, num_groups, group_size, weight, bias, residual, activation)
    if return_sum and residual is None:
        raise ValueError("group_norm: return_sum=True needs a residual to sum with x; pass residual=...")
    y, _mean, _rstd, s = _op.group_norm_op(
        x, weight, bias, residual, G, float(eps), act, route or routes.current_route()
    )
    return (y, s) if return_sum else y
