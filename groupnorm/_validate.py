"""The one place where arguments of the GroupNorm op are checked.

Every public entry point (``group_norm``, ``GroupNorm``, the converters) goes through
:func:`resolve_groups` and :func:`validate`, so an error reads the same wherever it is
raised and always names the offending values and the fix.
"""

from __future__ import annotations

from typing import Optional

import torch

ACTIVATIONS = ("silu", "gelu", "relu")
_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float64) + _HALF


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order (the valid group counts)."""
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def resolve_groups(num_channels: int, num_groups: Optional[int], group_size: Optional[int]) -> int:
    """Return the number of groups G from exactly one of ``num_groups`` / ``group_size``."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "group_norm: pass exactly one of num_groups and group_size "
            f"(got num_groups={num_groups}, group_size={group_size}); e.g. num_groups=32 "
            "or group_size=16 (channels per group)"
        )
    for name, v in (("num_groups", num_groups), ("group_size", group_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"group_norm: {name} must be an int, got {type(v).__name__} {v!r}")
    if group_size is not None:
        if group_size <= 0:
            raise ValueError(f"group_norm: group_size must be positive, got group_size={group_size}")
        if num_channels % group_size != 0:
            raise ValueError(
                f"group_norm: num_channels={num_channels} is not divisible by group_size={group_size}; "
                f"valid group sizes for C={num_channels}: {divisors(num_channels)}"
            )
        return num_channels // group_size if num_channels > 0 else 1
    if num_groups <= 0:
        raise ValueError(
            f"group_norm: num_groups must be positive, got num_groups={num_groups}; "
            f"valid values for C={num_channels}: {divisors(num_channels)}"
        )
    if num_channels % num_groups != 0:
        raise ValueError(
            f"group_norm: num_channels={num_channels} is not divisible by num_groups={num_groups}; "
            f"valid num_groups for C={num_channels}: {divisors(num_channels)}"
        )
    return num_groups


def normalize_activation(activation: Optional[str]) -> str:
    """Map the user's activation spelling to the op's: ``"none"``, ``"silu"``, ``"gelu"``, ``"relu"``."""
    if activation is None or activation in ("none", "identity"):
        return "none"
    if isinstance(activation, str) and activation.lower() in ACTIVATIONS:
        return activation.lower()
    if isinstance(activation, str) and activation.lower() == "swish":
        return "silu"
    raise ValueError(
        f"group_norm: unknown activation={activation!r}; choose one of None, "
        + ", ".join(repr(a) for a in ACTIVATIONS)
    )


def validate(
    x: torch.Tensor,
    num_groups: Optional[int],
    group_size: Optional[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    activation: Optional[str],
) -> tuple[int, str]:
    """Check every argument of ``group_norm``; return ``(G, activation)`` in the op's spelling."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"group_norm: x must be a dense (strided) tensor, got layout {x.layout}; use x.to_dense()")
    if x.dim() < 2:
        raise ValueError(
            f"group_norm: expected x of shape (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}; "
            "add a batch dim with x.unsqueeze(0) or a channel dim with x.unsqueeze(1)"
        )
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"group_norm: x must be float32, float64, float16 or bfloat16, got {x.dtype}; "
            "convert it first, e.g. x.float()"
        )
    C = x.shape[1]
    G = resolve_groups(C, num_groups, group_size)
    # Parameters may be x's dtype, or fp32 with a half-precision x (mixed precision training
    # keeps fp32 master weights); anything else would silently round or upcast.
    allowed = (x.dtype, torch.float32) if x.dtype in _HALF else (x.dtype,)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"group_norm: {name} must be a Tensor or None, got {type(p).__name__}")
        if p.shape != (C,):
            raise ValueError(
                f"group_norm: {name} must have shape (C,) = ({C},), got {tuple(p.shape)}"
            )
        if p.dtype not in allowed:
            raise TypeError(
                f"group_norm: {name} dtype {p.dtype} does not match x dtype {x.dtype}; "
                f"allowed: {', '.join(str(a) for a in allowed)} (use {name}.to({x.dtype}))"
            )
        if not (p.is_cpu and x.is_cpu) and p.device != x.device:  # is_cpu: 3x cheaper than .device
            raise ValueError(
                f"group_norm: {name} is on {p.device} but x is on {x.device}; move it with {name}.to(x.device)"
            )
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"group_norm: residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(
                f"group_norm: residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(
                f"group_norm: residual dtype {residual.dtype} must equal x dtype {x.dtype}; "
                f"use residual.to({x.dtype})"
            )
        if not (residual.is_cpu and x.is_cpu) and residual.device != x.device:
            raise ValueError(f"group_norm: residual is on {residual.device} but x is on {x.device}")
    return G, normalize_activation(activation)
