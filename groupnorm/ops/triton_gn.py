"""The ``"triton"`` route: launcher of the Triton kernels in :mod:`._triton_kernels`.

Importing this module registers the route (priority 20, above the CPU routes); when Triton
is not installed the import fails with ModuleNotFoundError and the route is simply absent.

The route takes CUDA tensors. With ``TRITON_INTERPRET=1`` in the environment it also takes
CPU tensors and runs the very same kernels in Triton's interpreter: that is how the kernels
are tested without a GPU. In normal use (variable unset) ``supports`` declines CPU tensors,
so ``"auto"`` never picks this route for them.

The kernels are defined lazily, at the first launch, because ``triton.jit`` decides at
definition time whether a kernel is compiled or interpreted: a process (or a pytest worker)
that imported ``groupnorm`` before setting ``TRITON_INTERPRET=1`` still gets interpreted
kernels, and the kernel module is re-imported if the setting changed since it was loaded.

The launch configuration is chosen by :func:`pick_config`, a plain function (no
``@triton.autotune``, which needs a GPU); :func:`config_override` forces parts of it, so
tests can exercise both the split-group path and the several-groups-per-program path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
import triton  # noqa: F401  (ModuleNotFoundError here: no Triton, no route)

from .. import reference
from .routes import register_route

Tensor = torch.Tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACT = {"none": 0, "silu": 1, "gelu": 2, "relu": 3}
_KMOD = "groupnorm.ops._triton_kernels"
# Elements per [BLOCK_C, BLOCK_S] tile (upper bound) and the warps that run it.
TILE = 4096
SMALL_GROUP_TILE = 1024
# A group is split only into chunks of at least this many elements (smaller groups are
# launch-bound anyway; the second stage and the partials would cost more than they save).
MIN_CHUNK = 8192
# ... and, when few groups are split, into chunks of at most this many (more, smaller
# programs keep more loads in flight: VAE (1, 256, 1024, 1024) bf16 NCHW on an H200 forward
# 0.70 -> 0.59 ms, backward 0.78 -> 0.67 ms with 32 chunks per group instead of 9).
MAX_CHUNK = 1 << 18
# Tensors of at least this many bytes run their 4096-element tiles with 16 warps (see _warps).
BIG_TENSOR = 32 << 20
_INT32_MAX = 2**31 - 1


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """The kernel module, (re)defined for the current interpreter setting."""
    mod = sys.modules.get(_KMOD)
    if mod is None:
        mod = importlib.import_module(_KMOD)
    if mod.INTERPRET != interpreting():
        mod = importlib.reload(mod)
    return mod


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """How a call is cut into programs (see the module docstring of ``_triton_kernels``)."""

    split: int      # chunks per group (> 1: the split path, two kernels)
    items: int      # work items (group or group chunk) per program
    block_c: int    # channels per tile (power of 2)
    block_s: int    # spatial positions per tile (power of 2)
    s_chunk: int    # spatial positions per chunk (multiple of block_s)
    num_warps: int

    @property
    def block_split(self) -> int:
        return _next_pow2(self.split)


_override: dict = {}


@contextlib.contextmanager
def config_override(**fields) -> Iterator[None]:
    """Force parts of the launch configuration in the block: ``split``, ``items``, ``tile``
    (see :func:`pick_config`), ``warps`` (warps per program), ``int64`` (64-bit offsets even
    for small tensors) and ``pixel_major`` (True/False: use or avoid the channels-last
    pixel-major kernels where they apply)."""
    global _override
    bad = set(fields) - {"split", "items", "tile", "warps", "int64", "pixel_major"}
    if bad:
        raise TypeError(f"config_override: unknown fields {sorted(bad)}")
    prev, _override = _override, {**_override, **fields}
    try:
        yield
    finally:
        _override = prev


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter: plan as for an H100
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def pick_config(N: int, G: int, Cg: int, S: int, channel_contiguous: bool, num_sms: int,
                split: Optional[int] = None, items: Optional[int] = None,
                tile: Optional[int] = None) -> Config:
    """The launch configuration of one call.

    * Tile: up to ``tile`` elements; the contiguous axis gets the long side (all Cg channels
      of a pixel for channels-last, a run of positions for NCHW).
    * Few big groups (N*G below 2 * #SMs): each group is split along its positions so that
      at least 2 * #SMs programs run, each on at most MAX_CHUNK values (tiles get shorter
      along the positions if needed; never more chunks than tiles).
    * One group per program otherwise. (Several tiny groups per program, ``items > 1``, was
      the default for many one-tile groups until an H200 measured one per program 1.05-1.25x
      faster on Mask R-CNN's head; it stays available through ``items``.)
    ``split``/``items``/``tile`` (or :func:`config_override`) force the choice.
    """
    split = _override.get("split", split)
    items = _override.get("items", items)
    tile = _override.get("tile", tile)
    if tile is None and split in (None, 1) and Cg * S <= TILE and N * G >= 4 * num_sms:
        # many groups that each fit one tile: 1024-element tiles (4 warps, a loop of a few
        # tiles per group) beat one 4096-element tile with 8 warps. Measured on an H100
        # (benchmarks/results/gpu-h100_probe_2026-11-25.md): ResNet-50 stage 5 (32, 2048, 7, 7)
        # bf16 fwd 0.030 -> 0.020 ms, bwd 0.047 -> 0.037 ms; (32, 64, 32, 32) fwd 0.011 -> 0.009 ms
        tile = SMALL_GROUP_TILE
    return _forced_warps(_pick(N, G, Cg, S, bool(channel_contiguous), num_sms, split, items, tile or TILE))


@functools.lru_cache(maxsize=4096)
def _pick(N: int, G: int, Cg: int, S: int, channel_contiguous: bool, num_sms: int,
          split: Optional[int], items: Optional[int], tile: int) -> Config:
    # cached: the choice is a pure function of its arguments, and launch overhead counts
    # on the small, launch-bound shapes
    group = max(1, Cg * S)
    tile = max(1, min(tile, _next_pow2(group)))
    pc, ps = _next_pow2(max(Cg, 1)), _next_pow2(max(S, 1))
    if channel_contiguous:
        block_c = min(pc, tile)
        block_s = max(1, min(ps, tile // block_c))
    else:
        block_s = min(ps, tile)
        block_c = max(1, min(pc, tile // block_s))
    NG = N * G
    if split is None:
        split = max(_cdiv(2 * num_sms, NG), _cdiv(group, MAX_CHUNK)) if NG < 2 * num_sms else 1
        split = max(1, min(split, group // MIN_CHUNK))
    if split > 1 and _cdiv(S, block_s) < split:
        # shorter tiles along the positions so that the group can be cut into `split`
        # chunks, wider along the channels; NCHW keeps runs of >= 32 positions (coalescing),
        # channels-last keeps >= 1024 elements per tile
        floor = min(block_s, 32) if not channel_contiguous else min(block_s, max(1, 1024 // block_c))
        block_s = max(floor, min(block_s, _next_pow2(_cdiv(S, split))))
        block_c = max(1, min(pc, tile // block_s))
    max_split = max(1, _cdiv(S, block_s))
    split = max(1, min(split, max_split))
    s_chunk = _cdiv(_cdiv(max(S, 1), split), block_s) * block_s
    split = _cdiv(max(S, 1), s_chunk)  # every chunk non-empty
    items = max(1, items or 1)
    elems = block_c * block_s
    num_warps = 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return Config(split, items, block_c, block_s, s_chunk, num_warps)


def _forced_warps(cfg):
    """``cfg`` (a Config or ClConfig) with the warps of :func:`config_override`, if set."""
    return replace(cfg, num_warps=_override["warps"]) if "warps" in _override else cfg


def _warps(cfg, nbytes: int, backward: bool, fast_bwd: bool):
    """``cfg`` with 16 warps instead of 8 where that measured faster on an H200
    (benchmarks/results/gpu-h200_probe_2026-11-26.md): 4096-element tiles of tensors of at
    least BIG_TENSOR bytes (their groups span many tiles), so that more loads are in
    flight per SM (1.05-1.24x on VAE, 3-D UNet, (4, 512, 128, 128) and ResNet-50 stage 2
    forwards). Backwards only where ``fast_bwd`` (the pixel-major kernels, but for 16-bit
    dtypes with SiLU fused; NCHW split groups in 16-bit dtypes): the group kernels' backward on
    channels-last, the one-kernel NCHW backward, fp32 split backwards (0.91-0.99x) and the
    16-bit pixel-major backward with SiLU (0.79-0.99x) measured slower. ``warps`` in
    :func:`config_override` wins."""
    if "warps" in _override or cfg.num_warps != 8 or nbytes < BIG_TENSOR or (backward and not fast_bwd):
        return cfg
    return replace(cfg, num_warps=16)


# Channels-last inputs up to this many channels (padded to a power of 2) may use the
# pixel-major kernels (a tile row is a whole pixel).
CL_MAX_C = 4096


@dataclass(frozen=True)
class ClConfig:
    """Launch configuration of the pixel-major channels-last kernels."""

    split: int      # pixel chunks per sample (programs = N * split)
    block_p: int    # pixels per tile
    block_cc: int   # channels per tile (power of 2 >= C)
    p_chunk: int    # pixels per chunk (multiple of block_p)
    num_warps: int


def use_pixel_major(t: Tensor, C: int, Cg: int, S: int) -> bool:
    """Whether the (N, C, S) view ``t`` goes to the pixel-major kernels: channels-last dense
    pixels (channel stride 1, pixel stride C), C <= CL_MAX_C, and either groups that the group
    kernels cannot read with vector loads (Cg not a multiple of 8) or so few groups that the
    group kernels would cut each into many chunks of short, strided rows (N * G at most a
    quarter of the SMs: a VAE's (1, 256, 1024, 1024), G=32, bf16 ran 2.19 -> 0.73 ms forward,
    2.78 -> 1.06 ms backward on an H100; with 128 or more groups the group kernels were as fast
    or faster). Forced by ``config_override(pixel_major=...)`` where it applies."""
    if S <= 1 or t.stride(1) != 1 or t.stride(2) != C or _next_pow2(C) > CL_MAX_C:
        return False
    forced = _override.get("pixel_major")
    if forced is not None:
        return bool(forced)
    return Cg % 8 != 0 or 4 * t.shape[0] * (C // max(Cg, 1)) <= _num_sms(t.device)


def pick_cl_config(N: int, C: int, S: int, num_sms: int) -> ClConfig:
    split = _override.get("split")
    tile = _override.get("tile") or TILE
    return _forced_warps(_pick_cl(N, C, S, num_sms, split, tile))


@functools.lru_cache(maxsize=1024)
def _pick_cl(N: int, C: int, S: int, num_sms: int, split: Optional[int], tile: int) -> ClConfig:
    block_cc = _next_pow2(C)
    block_p = max(1, min(_next_pow2(S), tile // block_cc))
    if split is None:
        split = max(1, min(_cdiv(2 * num_sms, N), (S * C) // MIN_CHUNK))
    split = max(1, min(split, _cdiv(S, block_p)))
    p_chunk = _cdiv(_cdiv(S, split), block_p) * block_p
    split = _cdiv(S, p_chunk)
    elems = block_p * block_cc
    num_warps = 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return ClConfig(split, block_p, block_cc, p_chunk, num_warps)


# ----------------------------------------------------------------------------- helpers


def _ncs(t: Tensor, N: int, C: int, S: int) -> Tensor:
    """``t`` as an (N, C, S) view (no copy) when its spatial dims merge into one stride;
    a contiguous copy otherwise (only for exotic strided inputs)."""
    try:
        return t.view(N, C, S)
    except RuntimeError:
        return t.contiguous().view(N, C, S)


def _strides(t: Optional[Tensor]) -> tuple[int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _needs_int64(*ts: Optional[Tensor]) -> bool:
    for t in ts:
        if t is None:
            continue
        if t.numel() <= _INT32_MAX and t.is_contiguous():
            continue  # dense: the largest offset is numel - 1 (the common case, checked cheaply)
        if sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) > _INT32_MAX:
            return True
    return False


# Host-side arithmetic of the launcher in plain Python: triton.cdiv / next_power_of_2 are
# constexpr functions whose Python call path costs microseconds each, and a launch makes
# several of them (host overhead is what small shapes pay; see docs/triton.md).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0  # as triton.next_power_of_2 (0 -> 0)


def _align(Cg: int, cfg: Config) -> dict:
    """Alignment facts for the compiler: the largest power of 2 (<= 16) dividing Cg, and
    whether channel blocks tile the group exactly (no channel mask)."""
    return dict(CG_DIV=min(16, Cg & -Cg) if Cg > 0 else 1, EVEN_C=Cg % cfg.block_c == 0)


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _geometry(x: Tensor, G: int) -> tuple[int, int, int, int]:
    N, C = x.shape[0], x.shape[1]
    return N, C, C // G if G else 0, math.prod(x.shape[2:])


# ----------------------------------------------------------------------------- the route


def supports(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], activation: str) -> Optional[str]:
    if not x.is_cuda:  # the first check "auto" makes for every CPU call: keep it cheap
        if not (x.device.type == "cpu" and interpreting()):
            return "not a CUDA tensor (TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly, for tests)"
    if x.dtype not in _DTYPES:
        return f"{x.dtype} input (the Triton kernels take float32, float16 and bfloat16)"
    if x.dim() < 2:
        return "input with fewer than 2 dims"
    if activation not in _ACT:
        return f"activation {activation!r}"
    for t in (weight, residual):
        if t is not None and t.device != x.device:
            return "tensors on different devices"
    return None


def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
            num_groups: int, eps: float, activation: str):
    G = num_groups
    N, C, Cg, S = _geometry(x, G)
    fmt = reference.memory_format_of(x)
    y = torch.empty_like(x, memory_format=fmt)
    s = torch.empty_like(x, memory_format=fmt) if residual is not None else None
    mean = torch.empty((N, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty((N, G), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        # nothing to launch; statistics of an empty group are NaN, as in the reference
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
        if s is not None:
            s.copy_(x + residual)
        return y, mean, rstd, s
    with _on_device(x):
        return _forward(x, weight, bias, residual, G, eps, activation, y, s, mean, rstd)


def _forward(x, weight, bias, residual, G, eps, activation, y, s, mean, rstd):
    N, C, Cg, S = _geometry(x, G)
    K = _kernels()
    xv = _ncs(x, N, C, S)
    rv = _ncs(residual, N, C, S) if residual is not None else None
    yv = y.view(N, C, S)
    sv = s.view(N, C, S) if s is not None else None
    int64 = bool(_override.get("int64")) or _needs_int64(xv, rv, yv, sv)
    if use_pixel_major(xv, C, Cg, S):
        _forward_pixel_major(K, xv, rv, yv, sv, weight, bias, mean, rstd, N, G, Cg, C, S, eps,
                             activation, int64)
        return y, mean, rstd, s
    cfg = pick_config(N, G, Cg, S, xv.stride(1) == 1 and S > 1, _num_sms(x.device))
    cfg = _warps(cfg, x.numel() * x.element_size(), backward=False, fast_bwd=False)
    NG = N * G
    w = weight.contiguous() if weight is not None else xv  # the kernels index parameters densely
    b = bias.contiguous() if bias is not None else xv
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=_ACT[activation],
                  BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, INT64=int64, num_warps=cfg.num_warps,
                  **_align(Cg, cfg))
    if cfg.split == 1:
        grid = (_cdiv(NG, cfg.items),)
        K._gn_fwd_fused[grid](
            xv, rv if rv is not None else xv, sv if sv is not None else xv, w, b, yv, mean, rstd,
            NG, G, Cg, S, float(eps), cfg.items,
            *_strides(xv), *_strides(rv), *_strides(sv), *_strides(yv),
            HAS_RES=residual is not None, **common)
    else:
        part = torch.empty((NG * cfg.split, 3), dtype=torch.float32, device=x.device)
        grid = (_cdiv(NG * cfg.split, cfg.items),)
        K._gn_fwd_stats[grid](
            xv, rv if rv is not None else xv, sv if sv is not None else xv, part,
            NG, G, Cg, S, cfg.s_chunk, cfg.split, cfg.items,
            *_strides(xv), *_strides(rv), *_strides(sv),
            HAS_RES=residual is not None, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, INT64=int64,
            num_warps=cfg.num_warps, **_align(Cg, cfg))
        src = sv if sv is not None else xv
        K._gn_fwd_norm[grid](
            src, w, b, yv, part, mean, rstd,
            NG, G, Cg, S, cfg.s_chunk, cfg.split, cfg.items, float(eps),
            *_strides(src), *_strides(yv),
            BLOCK_SPLIT=cfg.block_split, **common)
    return y, mean, rstd, s


def backward(dy: Tensor, dsum: Optional[Tensor], xs: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             mean: Tensor, rstd: Tensor, num_groups: int, activation: str):
    G = num_groups
    N, C, Cg, S = _geometry(xs, G)
    dx = torch.empty_like(xs, memory_format=reference.memory_format_of(xs))
    # dense (C,) gradients, whatever the parameters' strides
    # (_gn_bwd_dwdb writes every channel; only empty inputs need the zeros)
    alloc = torch.zeros if xs.numel() == 0 else torch.empty
    dw = alloc(weight.shape, dtype=weight.dtype, device=weight.device) if weight is not None else None
    db = alloc(bias.shape, dtype=bias.dtype, device=bias.device) if bias is not None else None
    if xs.numel() == 0:
        # empty sums: zero dW/dB, empty dx
        return dx, dw, db
    with _on_device(xs):
        _backward(dy, dsum, xs, weight, bias, mean, rstd, G, activation, dx, dw, db)
    return dx, dw, db


def _backward(dy, dsum, xs, weight, bias, mean, rstd, G, activation, dx, dw, db):
    N, C, Cg, S = _geometry(xs, G)
    K = _kernels()
    dyv = _ncs(dy, N, C, S)
    xsv = _ncs(xs, N, C, S)
    dsv = _ncs(dsum, N, C, S) if dsum is not None else None
    dxv = dx.view(N, C, S)
    mean = mean.reshape(-1).to(torch.float32).contiguous()
    rstd = rstd.reshape(-1).to(torch.float32).contiguous()
    int64 = bool(_override.get("int64")) or _needs_int64(dyv, xsv, dsv, dxv)
    w = weight.contiguous() if weight is not None else xsv
    b = bias.contiguous() if bias is not None else xsv
    if use_pixel_major(xsv, C, Cg, S):
        dwp, dbp = _backward_pixel_major(K, dyv, xsv, dsv, dxv, w, b, weight is not None, bias is not None,
                                         mean, rstd, N, G, Cg, C, S, activation, int64)
        _launch_dwdb(K, dwp, dbp, C, weight, bias, dw, db)
        return
    cfg = pick_config(N, G, Cg, S, xsv.stride(1) == 1 and S > 1, _num_sms(xs.device))
    cfg = _warps(cfg, xs.numel() * xs.element_size(), backward=True,
                 fast_bwd=cfg.split > 1 and xsv.stride(2) == 1 and xs.element_size() == 2)
    NG = N * G
    rows = N * cfg.split
    dwp = torch.empty((rows, C), dtype=torch.float32, device=xs.device)
    dbp = torch.empty((rows, C), dtype=torch.float32, device=xs.device)
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=_ACT[activation],
                  BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, INT64=int64, num_warps=cfg.num_warps,
                  **_align(Cg, cfg))
    strides_dx = (*_strides(dyv), *_strides(xsv), *_strides(dsv), *_strides(dxv))
    ds = dsv if dsv is not None else xsv
    inv_d = 1.0 / (Cg * S)
    if cfg.split == 1:
        grid = (_cdiv(NG, cfg.items),)
        K._gn_bwd_fused[grid](
            dyv, xsv, w, b, mean, rstd, ds, dxv, dwp, dbp,
            NG, G, Cg, C, S, inv_d, cfg.items, *strides_dx,
            HAS_DSUM=dsum is not None, **common)
    else:
        grid = (_cdiv(NG * cfg.split, cfg.items),)
        K._gn_bwd_sums[grid](
            dyv, xsv, w, b, mean, rstd, dwp, dbp,
            NG, G, Cg, C, S, cfg.s_chunk, cfg.split, cfg.items,
            *_strides(dyv), *_strides(xsv), **common)
        K._gn_bwd_dx[grid](
            dyv, xsv, w, b, mean, rstd, ds, dxv, dwp, dbp,
            NG, G, Cg, C, S, cfg.s_chunk, cfg.split, cfg.items, inv_d, *strides_dx,
            HAS_DSUM=dsum is not None, BLOCK_SPLIT=cfg.block_split, **common)
    _launch_dwdb(K, dwp, dbp, C, weight, bias, dw, db)


def _launch_dwdb(K, dwp, dbp, C, weight, bias, dw, db):
    """dW/dB from the (rows, C) fp32 partials, summed in row order."""
    if weight is None and bias is None:
        return
    rows = dwp.shape[0]
    block_c = min(_next_pow2(C), 64)
    block_r = min(_next_pow2(rows), 32)
    K._gn_bwd_dwdb[(_cdiv(C, block_c),)](
        dwp, dbp, dw if dw is not None else dwp, db if db is not None else dbp, rows, C,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4)


def _forward_pixel_major(K, xv, rv, yv, sv, weight, bias, mean, rstd, N, G, Cg, C, S, eps, activation, int64):
    cfg = _warps(pick_cl_config(N, C, S, _num_sms(xv.device)), xv.numel() * xv.element_size(),
                 backward=False, fast_bwd=False)
    part = torch.empty((N * G * cfg.split, 3), dtype=torch.float32, device=xv.device)
    grid = (N * cfg.split,)
    K._gn_cl_fwd_stats[grid](
        xv, rv if rv is not None else xv, sv if sv is not None else xv, part,
        N, G, Cg, C, S, cfg.p_chunk, cfg.split,
        *_strides(xv), *_strides(rv), *_strides(sv),
        HAS_RES=rv is not None, BLOCK_P=cfg.block_p, BLOCK_CC=cfg.block_cc,
        BLOCK_GB=min(_next_pow2(G), 8), INT64=int64,
        num_warps=cfg.num_warps)
    K._gn_cl_merge_stats[(N * G,)](part, mean, rstd, cfg.split, float(eps),
                                   BLOCK_SPLIT=_next_pow2(cfg.split), num_warps=1)
    src = sv if sv is not None else xv
    K._gn_cl_fwd_norm[grid](
        src, weight.contiguous() if weight is not None else xv, bias.contiguous() if bias is not None else xv,
        yv, mean, rstd, N, G, Cg, C, S, cfg.p_chunk, cfg.split,
        *_strides(src), *_strides(yv),
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=_ACT[activation],
        BLOCK_P=cfg.block_p, BLOCK_CC=cfg.block_cc, INT64=int64, num_warps=cfg.num_warps)


def pixel_major_bwd_wants_16_warps(activation: str, itemsize: int) -> bool:
    """16 warps on >= 32 MiB tensors measured 1.04-1.20x on the plain pixel-major backward and
    1.12-1.38x on fp32 with SiLU, but 0.79-0.99x on 16-bit dtypes with SiLU (H200,
    benchmarks/results/gpu-h200_2026-11-26b.md). GELU and ReLU, not measured, follow SiLU."""
    return activation == "none" or itemsize == 4


def _backward_pixel_major(K, dyv, xsv, dsv, dxv, w, b, has_w, has_b, mean, rstd, N, G, Cg, C, S,
                          activation, int64):
    cfg = _warps(pick_cl_config(N, C, S, _num_sms(xsv.device)), xsv.numel() * xsv.element_size(),
                 backward=True, fast_bwd=pixel_major_bwd_wants_16_warps(activation, xsv.element_size()))
    rows = N * cfg.split
    dwp = torch.empty((rows, C), dtype=torch.float32, device=xsv.device)
    dbp = torch.empty((rows, C), dtype=torch.float32, device=xsv.device)
    grid = (rows,)
    common = dict(HAS_W=has_w, HAS_B=has_b, ACT=_ACT[activation], BLOCK_P=cfg.block_p,
                  BLOCK_CC=cfg.block_cc, INT64=int64, num_warps=cfg.num_warps)
    K._gn_cl_bwd_sums[grid](
        dyv, xsv, w, b, mean, rstd, dwp, dbp, N, G, Cg, C, S, cfg.p_chunk, cfg.split,
        *_strides(dyv), *_strides(xsv), **common)
    c1 = torch.empty((N * G,), dtype=torch.float32, device=xsv.device)
    c2 = torch.empty((N * G,), dtype=torch.float32, device=xsv.device)
    K._gn_cl_bwd_terms[(N * G,)](dwp, dbp, w, c1, c2, G, Cg, C, cfg.split, 1.0 / (Cg * S),
                                 HAS_W=has_w, BLOCK_CG=_next_pow2(Cg), num_warps=1)
    K._gn_cl_bwd_dx[grid](
        dyv, xsv, w, b, mean, rstd, dsv if dsv is not None else xsv, dxv, c1, c2,
        N, G, Cg, C, S, cfg.p_chunk, cfg.split,
        *_strides(dyv), *_strides(xsv), *_strides(dsv), *_strides(dxv),
        HAS_DSUM=dsv is not None, **common)
    return dwp, dbp


# "auto" sends only CUDA tensors here: TRITON_INTERPRET=1 (a debugging/testing mode, orders
# of magnitude slower) lets a *forced* route="triton" run CPU tensors, but must not move every
# CPU call of a process that happens to set it onto the interpreter
register_route("triton", forward, backward, supports, priority=20, auto_devices=("cuda",))
