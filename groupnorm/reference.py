"""The one reference implementation of Group Normalization (pure PyTorch).

It serves twice:

* as the op's ``"reference"`` route (forward and the explicit backward below, math in fp32,
  or fp64 for fp64 input), which works on every device, dtype and memory format;
* as the ground truth of the tests: :func:`group_norm_ref` runs the same forward in float64
  and lets autograd differentiate it.

Math, for one sample n and group g holding the channels c of that group and positions s
(D = C/G * prod(spatial) values)::

    s_in  = x + residual                      (if a residual is fused; rounded to x.dtype)
    mu    = mean(s_in)                        two passes: mean first, then the centred
    var   = mean((s_in - mu)^2)               sum of squares (never E[x^2] - E[x]^2)
    rstd  = 1 / sqrt(var + eps)
    xhat  = (s_in - mu) * rstd
    z     = xhat * weight[c] + bias[c]
    y     = act(z)                            act in {identity, silu, gelu, relu}

Backward (VJP), with dz = dy * act'(z), dxhat = dz * weight[c] and means over the group::

    dweight[c] = sum_{n,s} dz * xhat          dbias[c] = sum_{n,s} dz
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))  (+ dsum when the sum is returned)
    dresidual = dx
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the statistics and of the internal math: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format an output of ``x``'s shape should have to "keep the input's layout"."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _group_mean(t: Tensor, G: int) -> Tensor:
    """(N, C, *) -> (N, G): the mean over each group's channels and positions."""
    # (N, C, *) -> (N, G, C/G, *) splits one dim, which is always a view whatever the
    # strides, so channels-last and strided inputs are reduced in place
    tv = t.unflatten(1, (G, t.shape[1] // G))
    return tv.mean(dim=tuple(range(2, tv.dim())))


def _bcast_group(stat: Tensor, C: int, nd: int) -> Tensor:
    """(N, G) -> (N, C, 1, ...): a per-group statistic broadcast to its channels."""
    N, G = stat.shape
    return stat.repeat_interleave(C // G if G else 0, dim=1).view(N, C, *([1] * (nd - 2)))


def _bcast_channel(p: Tensor, nd: int, dtype: torch.dtype) -> Tensor:
    """(C,) -> (C, 1, ...)."""
    return p.to(dtype).view(-1, *([1] * (nd - 2)))


def _act(z: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "relu":
        return F.relu(z)
    return z


def _act_grad(z: Tensor, activation: str) -> Tensor:
    """d act(z) / dz."""
    if activation == "silu":
        sig = torch.sigmoid(z)
        return sig * (1 + z * (1 - sig))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return cdf + z * pdf
    if activation == "relu":
        return (z > 0).to(z.dtype)
    raise ValueError(f"no derivative for activation {activation!r}")


def _finish(t: Tensor, like: Tensor) -> Tensor:
    # Elementwise math on the (N, C, *) shape gives fresh tensors (never views: an in-place op
    # such as relu_ on the op's output must work) that follow x's strides; only a non-dense
    # input needs its layout restored.
    out = t.to(like.dtype)
    fmt = memory_format_of(like)
    return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)


def forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    num_groups: int,
    eps: float,
    activation: str = "none",
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Reference forward. Returns ``(y, mean, rstd, sum)``; mean/rstd are (N, G) in
    :func:`acc_dtype`; ``sum`` is ``x + residual`` in x's dtype, or None without a residual."""
    G, C, nd = num_groups, x.shape[1], x.dim()
    s = x + residual if residual is not None else None
    xa = (s if s is not None else x).to(acc_dtype(x.dtype))
    # two passes: the mean first, then the centred sum of squares
    mean = _group_mean(xa, G)
    xc = xa - _bcast_group(mean, C, nd)
    rstd = torch.rsqrt(_group_mean(xc * xc, G) + eps)
    z = xc * _bcast_group(rstd, C, nd)
    if weight is not None:
        z = z * _bcast_channel(weight, nd, z.dtype)
    if bias is not None:
        z = z + _bcast_channel(bias, nd, z.dtype)
    return _finish(_act(z, activation), x), mean, rstd, s


def dz_xhat(dy: Tensor, xs: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
            rstd: Tensor, activation: str = "none") -> tuple[Tensor, Tensor, Tensor]:
    """``(dz, xhat, rstd broadcast)`` of the backward: dz = dy * act'(z) is the gradient at the
    affine output z = xhat * w + b, xhat the normalized input (dW = sum dz * xhat, dB = sum dz)."""
    C, nd = xs.shape[1], xs.dim()
    acc = mean.dtype
    r = _bcast_group(rstd, C, nd)
    xhat = (xs.to(acc) - _bcast_group(mean, C, nd)) * r
    dz = dy.to(acc)
    if activation != "none":
        z = xhat * _bcast_channel(weight, nd, acc) if weight is not None else xhat
        if bias is not None:
            z = z + _bcast_channel(bias, nd, acc)
        dz = dz * _act_grad(z, activation)
    return dz, xhat, r


def backward(
    dy: Tensor,
    dsum: Optional[Tensor],
    xs: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    activation: str = "none",
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Reference backward (the VJP in the module docstring). ``xs`` is the normalized input
    (x, or x + residual). Returns ``(dx, dweight, dbias)``; dweight/dbias are None when the
    parameter is None and have the parameter's dtype otherwise."""
    G, C, nd = num_groups, xs.shape[1], xs.dim()
    dz, xhat, r = dz_xhat(dy, xs, weight, bias, mean, rstd, activation)
    w = _bcast_channel(weight, nd, xhat.dtype) if weight is not None else None
    # per-channel sums run over the batch dim and the spatial dims
    ch_dims = (0,) + tuple(range(2, nd))
    dw = (dz * xhat).sum(dim=ch_dims).to(weight.dtype) if weight is not None else None
    db = dz.sum(dim=ch_dims).to(bias.dtype) if bias is not None else None
    dxhat = dz * w if w is not None else dz
    c1 = _bcast_group(_group_mean(dxhat, G), C, nd)
    c2 = _bcast_group(_group_mean(dxhat * xhat, G), C, nd)
    dx = (dxhat - c1 - xhat * c2) * r
    if dsum is not None:
        dx = dx + dsum.to(xhat.dtype)
    return _finish(dx, xs), dw, db


def group_norm_ref(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Float64 ground truth for tests: the same forward, in float64, differentiable by autograd.

    The residual sum is rounded to x's dtype first, exactly as the op does, so that a
    half-precision input is compared with the sum the op really normalizes.
    """
    d = lambda t: None if t is None else t.double()  # noqa: E731
    x64 = d(x)
    if residual is not None:
        exact = x64 + residual.double()
        # value of the rounded sum, gradient of the exact one (d/dx = d/dresidual = d/dsum)
        x64 = exact + ((x + residual).detach().double() - exact.detach())
    y, _, _, _ = forward(x64, d(weight), d(bias), None, num_groups, eps, activation or "none")
    return y
