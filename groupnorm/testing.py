"""Test helpers shared by the op's test files (and useful to users checking a route).

One tolerance table, one way to build inputs in every memory format, one comparison
against the float64 reference.
"""

from __future__ import annotations

import socket
from typing import Optional

import torch

from .reference import group_norm_ref

# Tolerances by dtype for outputs of magnitude ~1 compared with the float64 reference.
# Half precision: a few units of the output rounding (fp16 2^-11, bf16 2^-8).
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}

LAYOUTS = ("contiguous", "channels_last", "strided")


def make_input(shape, dtype=torch.float32, layout="contiguous", *, scale=1.0, shift=0.0,
               generator: Optional[torch.Generator] = None, device="cpu") -> torch.Tensor:
    """A random tensor of ``shape`` with the asked layout.

    ``"channels_last"`` means channels_last (4-D) / channels_last_3d (5-D) and falls back to
    contiguous for other ranks; ``"strided"`` is a non-contiguous view (every other element of
    a tensor twice as long in the last dim, plus a transposed batch/channel storage order).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if layout == "strided":
        rest = (*shape[2:-1], 2 * shape[-1]) if len(shape) > 2 else ()
        big = (torch.randn(shape[1], shape[0], *rest, generator=g, dtype=torch.float64)
               * scale + shift).to(device=device, dtype=dtype)
        t = big.transpose(0, 1)  # view after the cast: a cast of a non-dense view would densify it
        return t[..., ::2] if len(shape) > 2 else t
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)
    if layout == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last" and t.dim() == 5:
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t


def assert_close_to_ref(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, what: str = "",
                        scale: float = 1.0) -> None:
    """Compare against a float64 reference with the dtype's tolerance (scaled for larger values)."""
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected64.double(), atol=tol["atol"] * scale, rtol=tol["rtol"],
        equal_nan=True, msg=lambda m: f"{what}: {m}",
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for the rendezvous of multi-process (gloo) tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["TOL", "LAYOUTS", "make_input", "assert_close_to_ref", "group_norm_ref", "free_port"]
