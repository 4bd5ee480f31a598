"""Triton kernels of the GroupNorm op (kernels only; launching lives in ``triton_gn``).

Every tensor is addressed as a strided ``(N, C, S)`` view (S = product of the spatial
dims), so NCHW (channel stride S, spatial stride 1), channels-last 2D/3D (channel stride 1,
spatial stride C: the Cg channels of a group are contiguous per pixel) and any other layout
whose spatial dims merge into one stride are read and written in place, without a copy.
A tile is ``[BLOCK_C, BLOCK_S]`` (channels of one group x spatial positions); Triton
specializes stride arguments equal to 1, so the contiguous axis of either layout is known
at compile time and vectorized.

Work items. A group (n, g) holds ``D = Cg * S`` values. Its spatial range is cut into
``SPLIT`` chunks of ``S_CHUNK`` positions; a work item is one (group, chunk) pair, and a
program runs ``ITEMS`` consecutive work items. ``SPLIT > 1, ITEMS = 1`` spreads few big
groups over the whole chip; ``SPLIT = 1, ITEMS > 1`` packs many tiny groups into one program.
Split work items are numbered chunk-major (``w = chunk * N*G + group``): programs that run
together read the same positions of neighbouring groups, which in channels-last share
memory sectors (read from DRAM once). The second stage of the split path walks the items in
reverse, so that it starts on the data the first stage read last (still in L2).

Forward (statistics in fp32, never E[x^2] - E[x]^2)::

    s    = round_to_x_dtype(x + residual)       (written to SUM when a residual is fused)
    each tile lane keeps a Welford (count, mean, M2) over the tiles it sees; lanes, then
    chunks, are merged with Chan's parallel formula (mean = sum c_j m_j / sum c_j,
    M2 = sum M2_j + sum c_j (m_j - mean)^2), always in the same order
    rstd = 1 / sqrt(M2 / D + eps)
    y    = act((s - mean) * rstd * w[c] + b[c])

Backward (VJP), with xhat = (s - mean) * rstd, z = xhat * w + b, dz = dy * act'(z),
dxhat = dz * w and means over the group::

    dw[c] = sum_{n,s} dz * xhat               db[c] = sum_{n,s} dz
    dx    = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))  (+ dsum)

The group sums follow from the per-channel ones: sum(dxhat) = sum_c w[c] * DBP[n, c] and
sum(dxhat * xhat) = sum_c w[c] * DWP[n, c], so one pass writes per-(sample, chunk, channel)
fp32 partials DWP/DBP; the dx pass combines them per group and ``_gn_bwd_dwdb`` sums them
over the rows for dW/dB. Every reduction runs in a fixed order: no atomics, bitwise
deterministic for a given configuration.

The ``_gn_cl_*`` kernels at the end are the pixel-major variant for channels-last input
(see their section): same math, a tile row is a whole pixel.

Offsets are int64 when ``INT64`` (a tensor of 2^31 elements or more), int32 otherwise.
``CG_DIV`` (a power of 2 dividing Cg, <= 16) and ``EVEN_C`` (BLOCK_C divides Cg) tell the
compiler that a group's channels start aligned and need no mask, so that channels-last
tiles are read with vector loads.
Every load is cast to fp32 right away (the interpreter hands bf16 over as raw 16-bit ints).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.standard import _sum_combine

# Whether these kernels were defined for the interpreter (``triton.jit`` decides at
# definition time); the launcher re-imports this module when the setting changed.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Only builtins of triton.language are used in the kernels, never its @jit-defined helpers
# (tl.sum, tl.zeros, tl.sigmoid, ...): those are defined when triton is imported, so in a
# process that imported triton before TRITON_INTERPRET=1 was set they are compiled-mode
# functions that an interpreted kernel cannot call. Sums use tl.reduce with triton's own
# _sum_combine (the interpreter runs that one as a numpy sum).


# ----------------------------------------------------------------------------- helpers
#
# The interpreter pays a lot for each call of a @jit helper and for each int32 operation
# (it checks them for overflow), so per-tile work is written inline: offsets are built as a
# per-channel row offset (once per channel block) plus a per-position column offset. The
# shared helpers (_group_channels, _channel_params) run once per channel block, not per tile.

# The interpreter converts fp32 to bf16 by truncation, the GPU (cvt.rn) rounds to nearest
# even; under the interpreter bf16 outputs are rounded by bit arithmetic instead, so the
# interpreter checks the GPU's rounding (e.g. sum = x + residual bit for bit).
_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def _bf16_rne(v):
    """fp32 -> bf16, round to nearest even, by bit arithmetic."""
    b = v.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z): 1 silu, 2 gelu (exact erf), 3 relu (NaN stays NaN)."""
    if ACT == 1:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        z = tl.where(z < 0.0, 0.0, z)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz for ACT in 1..3 (same formulas as ``reference._act_grad``)."""
    if ACT == 1:
        sig = 1.0 / (1.0 + tl.exp(-z))
        g = sig * (1.0 + z * (1.0 - sig))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        g = cdf + z * pdf
    else:
        g = tl.where(z > 0.0, 1.0, 0.0)
    return g


@triton.jit
def _group_channels(g, Cg, c0, BLOCK_C: tl.constexpr, CG_DIV: tl.constexpr, EVEN_C: tl.constexpr):
    """Channel block ``c0`` of group ``g``: (mask, channel indices). The hints let channels-last
    tiles use vector loads: the group's first channel is a multiple of CG_DIV, and with EVEN_C
    the blocks tile the group exactly (no mask)."""
    gc = g * Cg
    if CG_DIV > 1:
        gc = tl.multiple_of(gc, CG_DIV)
    cc = tl.multiple_of(c0, BLOCK_C) + tl.arange(0, BLOCK_C)
    if EVEN_C:
        cmask = tl.full([BLOCK_C], 1, tl.int1)
    else:
        cmask = cc < Cg
    return cmask, gc + cc


@triton.jit
def _channel_params(W, B, ch, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """fp32 (w, b) of channels ``ch``: absent weight = 1, absent bias = 0 (masked lanes 0)."""
    if HAS_W:
        wv = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        wv = tl.where(cmask, 1.0, 0.0)
    if HAS_B:
        bv = tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        bv = tl.where(cmask, 0.0, 0.0)
    return wv, bv


@triton.jit
def _merge_partials(PART, base, count, BLOCK_SPLIT: tl.constexpr):
    """Chan merge of ``count`` (cnt, mean, M2) triples at PART[base:base+3*count] -> (mean, var)."""
    j = tl.arange(0, BLOCK_SPLIT)
    jm = j < count
    c = tl.load(PART + (base + j * 3 + 0), mask=jm, other=0.0).to(tl.float32)
    m = tl.load(PART + (base + j * 3 + 1), mask=jm, other=0.0).to(tl.float32)
    q = tl.load(PART + (base + j * 3 + 2), mask=jm, other=0.0).to(tl.float32)
    tot = tl.reduce(c, 0, _sum_combine)
    mean = tl.reduce(c * m, 0, _sum_combine) / tot
    d = tl.where(jm, m - mean, 0.0)
    m2 = tl.reduce(q, 0, _sum_combine) + tl.reduce(c * d * d, 0, _sum_combine)
    return mean, m2 / tot


@triton.jit
def _fwd_stats_chunk(
    X, R, SUM, n, g, s_lo, s_hi, Cg,
    x_sn, x_sc, x_ss, r_sn, r_sc, r_ss, u_sn, u_sc, u_ss,
    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """(count, mean, M2) of group (n, g) over positions [s_lo, s_hi); writes SUM = x + r.

    Welford per tile lane (each lane of the [BLOCK_C, BLOCK_S] tile keeps its own count,
    mean and M2 over the tiles it sees), then one Chan merge of the lanes at the end: no
    cross-lane reduction inside the loop, and no E[x^2] - E[x]^2 cancellation."""
    cnt = tl.full([BLOCK_C, BLOCK_S], 0.0, tl.float32)
    mean = tl.full([BLOCK_C, BLOCK_S], 0.0, tl.float32)
    m2 = tl.full([BLOCK_C, BLOCK_S], 0.0, tl.float32)
    if INT64:
        n = n.to(tl.int64)
    for c0 in range(0, Cg, BLOCK_C):
        cmask, ch = _group_channels(g, Cg, c0, BLOCK_C, CG_DIV, EVEN_C)
        if INT64:
            ch = ch.to(tl.int64)
        xrow = n * x_sn + ch * x_sc
        if HAS_RES:
            rrow = n * r_sn + ch * r_sc
            urow = n * u_sn + ch * u_sc
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (ss < s_hi)[None, :]
            if INT64:
                ss = ss.to(tl.int64)
            v = tl.load(X + (xrow[:, None] + ss[None, :] * x_ss), mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(R + (rrow[:, None] + ss[None, :] * r_ss), mask=mask, other=0.0).to(tl.float32)
                # the op normalizes the sum rounded to x's dtype
                if _INTERP and SUM.dtype.element_ty == tl.bfloat16:
                    sv = _bf16_rne(v + r)
                else:
                    sv = (v + r).to(SUM.dtype.element_ty)
                tl.store(SUM + (urow[:, None] + ss[None, :] * u_ss), sv, mask=mask)
                v = sv.to(tl.float32)
            cnt += tl.where(mask, 1.0, 0.0)
            delta = v - mean
            mean += tl.where(mask, delta / tl.maximum(cnt, 1.0), 0.0)
            m2 += tl.where(mask, delta * (v - mean), 0.0)
    # Chan merge of the lanes (fixed reduction tree)
    tot = tl.reduce(tl.reduce(cnt, 1, _sum_combine), 0, _sum_combine)
    gmean = tl.reduce(tl.reduce(cnt * mean, 1, _sum_combine), 0, _sum_combine) / tot
    d = mean - gmean
    gm2 = tl.reduce(tl.reduce(m2 + cnt * d * d, 1, _sum_combine), 0, _sum_combine)
    cnt, mean, m2 = tot, gmean, gm2
    return cnt, mean, m2


@triton.jit
def _fwd_norm_chunk(
    XS, W, B, Y, n, g, s_lo, s_hi, Cg, mean, rstd,
    s_sn, s_sc, s_ss, y_sn, y_sc, y_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Y = act((XS - mean) * rstd * w + b) over positions [s_lo, s_hi) of group (n, g)."""
    if INT64:
        n = n.to(tl.int64)
    for c0 in range(0, Cg, BLOCK_C):
        cmask, ch = _group_channels(g, Cg, c0, BLOCK_C, CG_DIV, EVEN_C)
        wv, b = _channel_params(W, B, ch, cmask, HAS_W, HAS_B)
        a = wv * rstd
        if INT64:
            ch = ch.to(tl.int64)
        srow = n * s_sn + ch * s_sc
        yrow = n * y_sn + ch * y_sc
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (ss < s_hi)[None, :]
            if INT64:
                ss = ss.to(tl.int64)
            v = tl.load(XS + (srow[:, None] + ss[None, :] * s_ss), mask=mask, other=0.0).to(tl.float32)
            z = (v - mean) * a[:, None] + b[:, None]
            if ACT != 0:
                z = _act(z, ACT)
            if _INTERP and Y.dtype.element_ty == tl.bfloat16:
                z = _bf16_rne(z)
            tl.store(Y + (yrow[:, None] + ss[None, :] * y_ss), z.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _gn_fwd_fused(
    X,      # (N, C, S) input, strides x_*
    R,      # (N, C, S) residual, strides r_* (unused without HAS_RES)
    SUM,    # (N, C, S) out: x + residual in x's dtype, strides u_* (unused without HAS_RES)
    W,      # (C,) weight, fp32 or x's dtype (unused without HAS_W)
    B,      # (C,) bias (unused without HAS_B)
    Y,      # (N, C, S) out, x's dtype, strides y_*
    MEAN,   # (N * G,) out fp32
    RSTD,   # (N * G,) out fp32
    NG, G, Cg, S, eps, ITEMS,
    x_sn, x_sc, x_ss, r_sn, r_sc, r_ss, u_sn, u_sc, u_ss, y_sn, y_sc, y_ss,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """SPLIT == 1: each program normalizes ITEMS whole groups (statistics pass, then the
    normalize pass, which re-reads the group, mostly from L2)."""
    pid = tl.program_id(0)
    for it in range(ITEMS):
        grp = pid * ITEMS + it
        if grp < NG:
            n = grp // G
            g = grp % G
            cnt, mean, m2 = _fwd_stats_chunk(
                X, R, SUM, n, g, 0, S, Cg, x_sn, x_sc, x_ss, r_sn, r_sc, r_ss, u_sn, u_sc, u_ss,
                HAS_RES, BLOCK_C, BLOCK_S, INT64, CG_DIV, EVEN_C)
            rstd = 1.0 / tl.sqrt_rn(m2 / cnt + eps)
            tl.store(MEAN + grp, mean)
            tl.store(RSTD + grp, rstd)
            if HAS_RES:
                # SUM was written by this program; make it visible to all its threads
                tl.debug_barrier()
                _fwd_norm_chunk(SUM, W, B, Y, n, g, 0, S, Cg, mean, rstd,
                                u_sn, u_sc, u_ss, y_sn, y_sc, y_ss,
                                HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S, INT64, CG_DIV, EVEN_C)
            else:
                _fwd_norm_chunk(X, W, B, Y, n, g, 0, S, Cg, mean, rstd,
                                x_sn, x_sc, x_ss, y_sn, y_sc, y_ss,
                                HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S, INT64, CG_DIV, EVEN_C)


@triton.jit
def _gn_fwd_stats(
    X,      # (N, C, S) input, strides x_*
    R,      # (N, C, S) residual (unused without HAS_RES)
    SUM,    # (N, C, S) out: x + residual in x's dtype (unused without HAS_RES)
    PART,   # (N * G * SPLIT, 3) out fp32: (count, mean, M2) of each work item
    NG, G, Cg, S, S_CHUNK, SPLIT, ITEMS,
    x_sn, x_sc, x_ss, r_sn, r_sc, r_ss, u_sn, u_sc, u_ss,
    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Split path, stage 1: partial statistics of each (group, chunk) work item."""
    pid = tl.program_id(0)
    for it in range(ITEMS):
        w = pid * ITEMS + it
        if w < NG * SPLIT:
            grp = w % NG
            sp = w // NG
            pw = grp * SPLIT + sp  # partials are stored group-major
            s_lo = sp * S_CHUNK
            s_hi = tl.minimum(s_lo + S_CHUNK, S)
            cnt, mean, m2 = _fwd_stats_chunk(
                X, R, SUM, grp // G, grp % G, s_lo, s_hi, Cg,
                x_sn, x_sc, x_ss, r_sn, r_sc, r_ss, u_sn, u_sc, u_ss,
                HAS_RES, BLOCK_C, BLOCK_S, INT64, CG_DIV, EVEN_C)
            tl.store(PART + pw * 3 + 0, cnt)
            tl.store(PART + pw * 3 + 1, mean)
            tl.store(PART + pw * 3 + 2, m2)


@triton.jit
def _gn_fwd_norm(
    XS,     # (N, C, S) normalized input: x, or SUM of stage 1; strides s_*
    W,      # (C,) weight (unused without HAS_W)
    B,      # (C,) bias (unused without HAS_B)
    Y,      # (N, C, S) out, strides y_*
    PART,   # (N * G * SPLIT, 3) fp32 partial statistics of stage 1
    MEAN,   # (N * G,) out fp32
    RSTD,   # (N * G,) out fp32
    NG, G, Cg, S, S_CHUNK, SPLIT, ITEMS, eps,
    s_sn, s_sc, s_ss, y_sn, y_sc, y_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Split path, stage 2: merge the group's SPLIT partials (same order in every program),
    then normalize this work item's chunk; chunk 0 stores mean/rstd."""
    pid = tl.program_id(0)
    for it in range(ITEMS):
        w = NG * SPLIT - 1 - (pid * ITEMS + it)  # reverse order: L2 still holds the last items of stage 1
        if w >= 0:
            grp = w % NG
            sp = w // NG
            mean, var = _merge_partials(PART, grp * SPLIT * 3, SPLIT, BLOCK_SPLIT)
            rstd = 1.0 / tl.sqrt_rn(var + eps)
            if sp == 0:
                tl.store(MEAN + grp, mean)
                tl.store(RSTD + grp, rstd)
            s_lo = sp * S_CHUNK
            s_hi = tl.minimum(s_lo + S_CHUNK, S)
            _fwd_norm_chunk(XS, W, B, Y, grp // G, grp % G, s_lo, s_hi, Cg, mean, rstd,
                            s_sn, s_sc, s_ss, y_sn, y_sc, y_ss,
                            HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S, INT64, CG_DIV, EVEN_C)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_chunk_sums(
    DY, XS, W, B, DWP, DBP, prow, n, g, s_lo, s_hi, Cg, C, mean, rstd,
    dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Per-channel sums of dz * xhat and dz over [s_lo, s_hi) -> DWP/DBP[prow, channels of g];
    returns this chunk's sum(dxhat * xhat) and sum(dxhat) for the group."""
    t_w = tl.full([], 0.0, tl.float32)
    t_b = tl.full([], 0.0, tl.float32)
    if INT64:
        n = n.to(tl.int64)
    for c0 in range(0, Cg, BLOCK_C):
        cmask, ch = _group_channels(g, Cg, c0, BLOCK_C, CG_DIV, EVEN_C)
        wv, bv = _channel_params(W, B, ch, cmask, HAS_W, HAS_B)
        prow_off = prow.to(tl.int64) * C + ch
        if INT64:
            ch = ch.to(tl.int64)
        xrow = n * xs_sn + ch * xs_sc
        drow = n * dy_sn + ch * dy_sc
        acc_w2 = tl.full([BLOCK_C, BLOCK_S], 0.0, tl.float32)
        acc_b2 = tl.full([BLOCK_C, BLOCK_S], 0.0, tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (ss < s_hi)[None, :]
            if INT64:
                ss = ss.to(tl.int64)
            x = tl.load(XS + (xrow[:, None] + ss[None, :] * xs_ss), mask=mask, other=0.0).to(tl.float32)
            dz = tl.load(DY + (drow[:, None] + ss[None, :] * dy_ss), mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if ACT != 0:
                dz = tl.where(mask, dz * _act_grad(xhat * wv[:, None] + bv[:, None], ACT), 0.0)
            acc_b2 += dz
            acc_w2 += dz * xhat
        acc_w = tl.reduce(acc_w2, 1, _sum_combine)
        acc_b = tl.reduce(acc_b2, 1, _sum_combine)
        tl.store(DWP + prow_off, acc_w, mask=cmask)
        tl.store(DBP + prow_off, acc_b, mask=cmask)
        t_w += tl.reduce(acc_w * wv, 0, _sum_combine)
        t_b += tl.reduce(acc_b * wv, 0, _sum_combine)
    return t_w, t_b


@triton.jit
def _bwd_dx_chunk(
    DY, XS, W, B, DSUM, DX, n, g, s_lo, s_hi, Cg, mean, rstd, c1, c2,
    dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss, ds_sn, ds_sc, ds_ss, dx_sn, dx_sc, dx_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DSUM: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """DX = rstd * (dxhat - c1 - xhat * c2) (+ DSUM) over [s_lo, s_hi) of group (n, g)."""
    if INT64:
        n = n.to(tl.int64)
    for c0 in range(0, Cg, BLOCK_C):
        cmask, ch = _group_channels(g, Cg, c0, BLOCK_C, CG_DIV, EVEN_C)
        wv, bv = _channel_params(W, B, ch, cmask, HAS_W, HAS_B)
        if INT64:
            ch = ch.to(tl.int64)
        xrow = n * xs_sn + ch * xs_sc
        drow = n * dy_sn + ch * dy_sc
        orow = n * dx_sn + ch * dx_sc
        if HAS_DSUM:
            srow = n * ds_sn + ch * ds_sc
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (ss < s_hi)[None, :]
            if INT64:
                ss = ss.to(tl.int64)
            x = tl.load(XS + (xrow[:, None] + ss[None, :] * xs_ss), mask=mask, other=0.0).to(tl.float32)
            dz = tl.load(DY + (drow[:, None] + ss[None, :] * dy_ss), mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            if ACT != 0:
                dz = dz * _act_grad(xhat * wv[:, None] + bv[:, None], ACT)
            dx = (dz * wv[:, None] - c1 - xhat * c2) * rstd
            if HAS_DSUM:
                dx += tl.load(DSUM + (srow[:, None] + ss[None, :] * ds_ss), mask=mask, other=0.0).to(tl.float32)
            if _INTERP and DX.dtype.element_ty == tl.bfloat16:
                dx = _bf16_rne(dx)
            tl.store(DX + (orow[:, None] + ss[None, :] * dx_ss), dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_fused(
    DY,     # (N, C, S) upstream gradient of y, strides dy_*
    XS,     # (N, C, S) normalized input (x, or x + residual), strides xs_*
    W,      # (C,) weight (unused without HAS_W)
    B,      # (C,) bias (unused without HAS_B; needed only with an activation)
    MEAN,   # (N * G,) fp32
    RSTD,   # (N * G,) fp32
    DSUM,   # (N, C, S) gradient of the returned sum, strides ds_* (unused without HAS_DSUM)
    DX,     # (N, C, S) out, strides dx_*
    DWP,    # (N, C) out fp32: per-(sample, channel) sum of dz * xhat (SPLIT == 1)
    DBP,    # (N, C) out fp32: per-(sample, channel) sum of dz
    NG, G, Cg, C, S, inv_D, ITEMS,  # inv_D = 1 / (Cg * S)
    dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss, ds_sn, ds_sc, ds_ss, dx_sn, dx_sc, dx_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DSUM: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """SPLIT == 1: each program handles ITEMS whole groups: sums pass, then the dx pass."""
    pid = tl.program_id(0)
    for it in range(ITEMS):
        grp = pid * ITEMS + it
        if grp < NG:
            n = grp // G
            g = grp % G
            mean = tl.load(MEAN + grp).to(tl.float32)
            rstd = tl.load(RSTD + grp).to(tl.float32)
            t_w, t_b = _bwd_chunk_sums(
                DY, XS, W, B, DWP, DBP, n, n, g, 0, S, Cg, C, mean, rstd,
                dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss,
                HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S, INT64, CG_DIV, EVEN_C)
            _bwd_dx_chunk(DY, XS, W, B, DSUM, DX, n, g, 0, S, Cg, mean, rstd, t_b * inv_D, t_w * inv_D,
                          dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss, ds_sn, ds_sc, ds_ss, dx_sn, dx_sc, dx_ss,
                          HAS_W, HAS_B, HAS_DSUM, ACT, BLOCK_C, BLOCK_S, INT64, CG_DIV, EVEN_C)


@triton.jit
def _gn_bwd_sums(
    DY,     # (N, C, S) upstream gradient, strides dy_*
    XS,     # (N, C, S) normalized input, strides xs_*
    W,      # (C,) weight (unused without HAS_W)
    B,      # (C,) bias (unused without HAS_B)
    MEAN,   # (N * G,) fp32
    RSTD,   # (N * G,) fp32
    DWP,    # (N * SPLIT, C) out fp32: per-(sample, chunk, channel) sum of dz * xhat
    DBP,    # (N * SPLIT, C) out fp32: per-(sample, chunk, channel) sum of dz
    NG, G, Cg, C, S, S_CHUNK, SPLIT, ITEMS,
    dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Split path, stage 1: per-channel partial sums of each (group, chunk) work item."""
    pid = tl.program_id(0)
    for it in range(ITEMS):
        w = pid * ITEMS + it
        if w < NG * SPLIT:
            grp = w % NG
            sp = w // NG
            n = grp // G
            mean = tl.load(MEAN + grp).to(tl.float32)
            rstd = tl.load(RSTD + grp).to(tl.float32)
            s_lo = sp * S_CHUNK
            s_hi = tl.minimum(s_lo + S_CHUNK, S)
            _bwd_chunk_sums(DY, XS, W, B, DWP, DBP, n * SPLIT + sp, n, grp % G, s_lo, s_hi, Cg, C,
                            mean, rstd, dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss,
                            HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S, INT64, CG_DIV, EVEN_C)


@triton.jit
def _gn_bwd_dx(
    DY,     # (N, C, S) upstream gradient, strides dy_*
    XS,     # (N, C, S) normalized input, strides xs_*
    W,      # (C,) weight (unused without HAS_W)
    B,      # (C,) bias (unused without HAS_B)
    MEAN,   # (N * G,) fp32
    RSTD,   # (N * G,) fp32
    DSUM,   # (N, C, S) gradient of the returned sum (unused without HAS_DSUM)
    DX,     # (N, C, S) out, strides dx_*
    DWP,    # (N * SPLIT, C) fp32 partials of stage 1
    DBP,    # (N * SPLIT, C) fp32 partials of stage 1
    NG, G, Cg, C, S, S_CHUNK, SPLIT, ITEMS, inv_D,  # inv_D = 1 / (Cg * S)
    dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss, ds_sn, ds_sc, ds_ss, dx_sn, dx_sc, dx_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DSUM: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr, INT64: tl.constexpr,
    CG_DIV: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Split path, stage 2: combine the group's partials (chunks in order, then channels in
    order, identical in every program) into mean(dxhat), mean(dxhat * xhat); write dx."""
    pid = tl.program_id(0)
    for it in range(ITEMS):
        w = NG * SPLIT - 1 - (pid * ITEMS + it)  # reverse order: L2 still holds the last items of stage 1
        if w >= 0:
            grp = w % NG
            sp = w // NG
            n = grp // G
            g = grp % G
            mean = tl.load(MEAN + grp).to(tl.float32)
            rstd = tl.load(RSTD + grp).to(tl.float32)
            t_w = tl.full([], 0.0, tl.float32)
            t_b = tl.full([], 0.0, tl.float32)
            j = tl.arange(0, BLOCK_SPLIT)
            jm = j < SPLIT
            for c0 in range(0, Cg, BLOCK_C):
                cmask, ch = _group_channels(g, Cg, c0, BLOCK_C, CG_DIV, EVEN_C)
                wv, _ = _channel_params(W, B, ch, cmask, HAS_W, False)
                rows = (n * SPLIT + j).to(tl.int64)[:, None] * C + ch[None, :]
                pm = jm[:, None] & cmask[None, :]
                pw = tl.reduce(tl.load(DWP + rows, mask=pm, other=0.0), 0, _sum_combine)
                pb = tl.reduce(tl.load(DBP + rows, mask=pm, other=0.0), 0, _sum_combine)
                t_w += tl.reduce(pw * wv, 0, _sum_combine)
                t_b += tl.reduce(pb * wv, 0, _sum_combine)
            s_lo = sp * S_CHUNK
            s_hi = tl.minimum(s_lo + S_CHUNK, S)
            _bwd_dx_chunk(DY, XS, W, B, DSUM, DX, n, g, s_lo, s_hi, Cg, mean, rstd, t_b * inv_D, t_w * inv_D,
                          dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss, ds_sn, ds_sc, ds_ss, dx_sn, dx_sc, dx_ss,
                          HAS_W, HAS_B, HAS_DSUM, ACT, BLOCK_C, BLOCK_S, INT64, CG_DIV, EVEN_C)


@triton.jit
def _gn_bwd_dwdb(
    DWP,    # (ROWS, C) fp32 partials: sum of dz * xhat per (sample, chunk, channel)
    DBP,    # (ROWS, C) fp32 partials: sum of dz
    DW,     # (C,) out, weight's dtype (unused without HAS_W)
    DB,     # (C,) out, bias's dtype (unused without HAS_B)
    ROWS, C,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dW/dB: each program sums the ROWS partials of BLOCK_C channels in a fixed order."""
    pid = tl.program_id(0)
    ch = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    acc_w = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_b = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        offs = rr.to(tl.int64)[:, None] * C + ch[None, :]
        m = (rr < ROWS)[:, None] & cmask[None, :]
        if HAS_W:
            acc_w += tl.load(DWP + offs, mask=m, other=0.0)
        if HAS_B:
            acc_b += tl.load(DBP + offs, mask=m, other=0.0)
    if HAS_W:
        dw = tl.reduce(acc_w, 0, _sum_combine)
        if _INTERP and DW.dtype.element_ty == tl.bfloat16:
            dw = _bf16_rne(dw)
        tl.store(DW + ch, dw.to(DW.dtype.element_ty), mask=cmask)
    if HAS_B:
        db = tl.reduce(acc_b, 0, _sum_combine)
        if _INTERP and DB.dtype.element_ty == tl.bfloat16:
            db = _bf16_rne(db)
        tl.store(DB + ch, db.to(DB.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- channels-last, pixel-major
#
# For channels-last input whose groups are not a multiple of 8 channels (SD UNet: C/G = 10,
# 20, 40, 60), a group's channels cannot be read with vector loads. These kernels instead
# tile [BLOCK_P pixels, BLOCK_CC >= C channels]: every row is a whole contiguous pixel. A work
# item is one (sample n, chunk of P_CHUNK pixels) and covers all G groups; per-channel
# statistics are merged into per-group partials once per item (a loop over the groups); a
# small kernel merges each group's chunks (forward: mean/rstd; backward: the two group
# means of the dx formula), and the last kernel normalizes / writes dx. The partial buffers
# have the layouts of the group kernels, so ``_merge_partials`` and ``_gn_bwd_dwdb`` are
# shared.


@triton.jit
def _gn_cl_fwd_stats(
    X,      # (N, S, C) input (channels-last: channel stride x_sc, usually 1), strides x_*
    R,      # (N, S, C) residual (unused without HAS_RES)
    SUM,    # (N, S, C) out: x + residual in x's dtype (unused without HAS_RES)
    PART,   # (N * G * SPLIT, 3) out fp32: (count, mean, M2) per (group, pixel chunk)
    N, G, Cg, C, S, P_CHUNK, SPLIT,
    x_sn, x_sc, x_ss, r_sn, r_sc, r_ss, u_sn, u_sc, u_ss,
    HAS_RES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CC: tl.constexpr, BLOCK_GB: tl.constexpr,
    INT64: tl.constexpr,
):
    """Pixel-major stage 1: per-lane Welford over the chunk, per-channel then per-group merge."""
    w = tl.program_id(0)
    n = w // SPLIT
    sp = w % SPLIT
    p_lo = sp * P_CHUNK
    p_hi = tl.minimum(p_lo + P_CHUNK, S)
    cc = tl.arange(0, BLOCK_CC)
    cmask = cc < C
    nn = n
    if INT64:
        nn = n.to(tl.int64)
        cc = cc.to(tl.int64)
    xrow = nn * x_sn + cc * x_sc
    if HAS_RES:
        rrow = nn * r_sn + cc * r_sc
        urow = nn * u_sn + cc * u_sc
    cnt = tl.full([BLOCK_P, BLOCK_CC], 0.0, tl.float32)
    mean = tl.full([BLOCK_P, BLOCK_CC], 0.0, tl.float32)
    m2 = tl.full([BLOCK_P, BLOCK_CC], 0.0, tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        mask = (pp < p_hi)[:, None] & cmask[None, :]
        if INT64:
            pp = pp.to(tl.int64)
        v = tl.load(X + (pp[:, None] * x_ss + xrow[None, :]), mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + (pp[:, None] * r_ss + rrow[None, :]), mask=mask, other=0.0).to(tl.float32)
            if _INTERP and SUM.dtype.element_ty == tl.bfloat16:
                sv = _bf16_rne(v + r)
            else:
                sv = (v + r).to(SUM.dtype.element_ty)
            tl.store(SUM + (pp[:, None] * u_ss + urow[None, :]), sv, mask=mask)
            v = sv.to(tl.float32)
        cnt += tl.where(mask, 1.0, 0.0)
        delta = v - mean
        mean += tl.where(mask, delta / tl.maximum(cnt, 1.0), 0.0)
        m2 += tl.where(mask, delta * (v - mean), 0.0)
    # lanes -> channels
    cnt_c = tl.reduce(cnt, 0, _sum_combine)
    mean_c = tl.reduce(cnt * mean, 0, _sum_combine) / tl.maximum(cnt_c, 1.0)
    d = mean - mean_c[None, :]
    m2_c = tl.reduce(m2 + cnt * d * d, 0, _sum_combine)
    # channels -> groups, BLOCK_GB groups at a time through a one-hot [BLOCK_GB, BLOCK_CC]
    # mask (a few 2-D reductions instead of one reduction per group)
    grp_c = tl.arange(0, BLOCK_CC) // Cg
    for g0 in range(0, G, BLOCK_GB):
        gi = g0 + tl.arange(0, BLOCK_GB)
        oh = (grp_c[None, :] == gi[:, None]) & cmask[None, :]
        cg = tl.reduce(tl.where(oh, cnt_c[None, :], 0.0), 1, _sum_combine)
        mg = tl.reduce(tl.where(oh, (cnt_c * mean_c)[None, :], 0.0), 1, _sum_combine) / tl.maximum(cg, 1.0)
        dg = mean_c - tl.reduce(tl.where(oh, mg[:, None], 0.0), 0, _sum_combine)
        qg = tl.reduce(tl.where(oh, (m2_c + cnt_c * dg * dg)[None, :], 0.0), 1, _sum_combine)
        gmask = gi < G
        pw = ((n * G + gi) * SPLIT + sp) * 3
        tl.store(PART + pw + 0, cg, mask=gmask)
        tl.store(PART + pw + 1, mg, mask=gmask)
        tl.store(PART + pw + 2, qg, mask=gmask)


@triton.jit
def _gn_cl_merge_stats(
    PART,   # (N * G * SPLIT, 3) fp32 partial statistics of stage 1
    MEAN,   # (N * G,) out fp32
    RSTD,   # (N * G,) out fp32
    SPLIT, eps,
    BLOCK_SPLIT: tl.constexpr,
):
    """One program per group: Chan merge of its SPLIT chunks (in chunk order) -> mean, rstd."""
    grp = tl.program_id(0)
    mean, var = _merge_partials(PART, grp * SPLIT * 3, SPLIT, BLOCK_SPLIT)
    tl.store(MEAN + grp, mean)
    tl.store(RSTD + grp, 1.0 / tl.sqrt_rn(var + eps))


@triton.jit
def _gn_cl_bwd_terms(
    DWP,    # (N * SPLIT, C) fp32 partials of backward stage 1
    DBP,    # (N * SPLIT, C) fp32 partials of backward stage 1
    W,      # (C,) weight (unused without HAS_W)
    C1,     # (N * G,) out fp32: mean(dxhat) of each group
    C2,     # (N * G,) out fp32: mean(dxhat * xhat) of each group
    G, Cg, C, SPLIT, inv_D,
    HAS_W: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    """One program per group: its channels' chunk partials summed in chunk order."""
    grp = tl.program_id(0)
    n = grp // G
    cc = tl.arange(0, BLOCK_CG)
    cmask = cc < Cg
    ch = (grp % G) * Cg + cc
    pw = tl.full([BLOCK_CG], 0.0, tl.float32)
    pb = tl.full([BLOCK_CG], 0.0, tl.float32)
    for j in range(0, SPLIT):
        row = (n * SPLIT + j).to(tl.int64) * C
        pw += tl.load(DWP + row + ch, mask=cmask, other=0.0)
        pb += tl.load(DBP + row + ch, mask=cmask, other=0.0)
    if HAS_W:
        wv = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
        pw = pw * wv
        pb = pb * wv
    tl.store(C1 + grp, tl.reduce(pb, 0, _sum_combine) * inv_D)
    tl.store(C2 + grp, tl.reduce(pw, 0, _sum_combine) * inv_D)


@triton.jit
def _gn_cl_fwd_norm(
    XS,     # (N, S, C) normalized input: x, or SUM of stage 1; strides s_*
    W,      # (C,) weight (unused without HAS_W)
    B,      # (C,) bias (unused without HAS_B)
    Y,      # (N, S, C) out, strides y_*
    MEAN,   # (N * G,) fp32, from _gn_cl_merge_stats
    RSTD,   # (N * G,) fp32
    N, G, Cg, C, S, P_CHUNK, SPLIT,
    s_sn, s_sc, s_ss, y_sn, y_sc, y_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CC: tl.constexpr, INT64: tl.constexpr,
):
    """Pixel-major stage 3 (items in reverse order, for L2): normalize a pixel chunk."""
    w = N * SPLIT - 1 - tl.program_id(0)
    n = w // SPLIT
    sp = w % SPLIT
    cc = tl.arange(0, BLOCK_CC)
    cmask = cc < C
    grp = n * G + cc // Cg
    mean = tl.load(MEAN + grp, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + grp, mask=cmask, other=0.0)
    wv, b = _channel_params(W, B, cc, cmask, HAS_W, HAS_B)
    a = wv * rstd
    p_lo = sp * P_CHUNK
    p_hi = tl.minimum(p_lo + P_CHUNK, S)
    nn = n
    if INT64:
        nn = n.to(tl.int64)
        cc = cc.to(tl.int64)
    srow = nn * s_sn + cc * s_sc
    yrow = nn * y_sn + cc * y_sc
    for p0 in range(p_lo, p_hi, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        mask = (pp < p_hi)[:, None] & cmask[None, :]
        if INT64:
            pp = pp.to(tl.int64)
        v = tl.load(XS + (pp[:, None] * s_ss + srow[None, :]), mask=mask, other=0.0).to(tl.float32)
        z = (v - mean[None, :]) * a[None, :] + b[None, :]
        if ACT != 0:
            z = _act(z, ACT)
        if _INTERP and Y.dtype.element_ty == tl.bfloat16:
            z = _bf16_rne(z)
        tl.store(Y + (pp[:, None] * y_ss + yrow[None, :]), z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_cl_bwd_sums(
    DY,     # (N, S, C) upstream gradient, strides dy_*
    XS,     # (N, S, C) normalized input, strides xs_*
    W,      # (C,) weight (unused without HAS_W)
    B,      # (C,) bias (unused without HAS_B)
    MEAN,   # (N * G,) fp32
    RSTD,   # (N * G,) fp32
    DWP,    # (N * SPLIT, C) out fp32: per-(sample, chunk, channel) sum of dz * xhat
    DBP,    # (N * SPLIT, C) out fp32: per-(sample, chunk, channel) sum of dz
    N, G, Cg, C, S, P_CHUNK, SPLIT,
    dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CC: tl.constexpr, INT64: tl.constexpr,
):
    """Pixel-major backward stage 1: per-channel partial sums over a pixel chunk."""
    w = tl.program_id(0)
    n = w // SPLIT
    sp = w % SPLIT
    cc = tl.arange(0, BLOCK_CC)
    cmask = cc < C
    grp = n * G + cc // Cg
    mean = tl.load(MEAN + grp, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + grp, mask=cmask, other=0.0)
    wv, bv = _channel_params(W, B, cc, cmask, HAS_W, HAS_B)
    prow = (n * SPLIT + sp).to(tl.int64) * C + cc
    p_lo = sp * P_CHUNK
    p_hi = tl.minimum(p_lo + P_CHUNK, S)
    nn = n
    ci = cc
    if INT64:
        nn = n.to(tl.int64)
        ci = cc.to(tl.int64)
    xrow = nn * xs_sn + ci * xs_sc
    drow = nn * dy_sn + ci * dy_sc
    acc_w = tl.full([BLOCK_P, BLOCK_CC], 0.0, tl.float32)
    acc_b = tl.full([BLOCK_P, BLOCK_CC], 0.0, tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        mask = (pp < p_hi)[:, None] & cmask[None, :]
        if INT64:
            pp = pp.to(tl.int64)
        x = tl.load(XS + (pp[:, None] * xs_ss + xrow[None, :]), mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DY + (pp[:, None] * dy_ss + drow[None, :]), mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        if ACT != 0:
            dz = tl.where(mask, dz * _act_grad(xhat * wv[None, :] + bv[None, :], ACT), 0.0)
        acc_b += dz
        acc_w += dz * xhat
    tl.store(DWP + prow, tl.reduce(acc_w, 0, _sum_combine), mask=cmask)
    tl.store(DBP + prow, tl.reduce(acc_b, 0, _sum_combine), mask=cmask)


@triton.jit
def _gn_cl_bwd_dx(
    DY,     # (N, S, C) upstream gradient, strides dy_*
    XS,     # (N, S, C) normalized input, strides xs_*
    W,      # (C,) weight (unused without HAS_W)
    B,      # (C,) bias (unused without HAS_B)
    MEAN,   # (N * G,) fp32
    RSTD,   # (N * G,) fp32
    DSUM,   # (N, S, C) gradient of the returned sum (unused without HAS_DSUM)
    DX,     # (N, S, C) out, strides dx_*
    C1,     # (N * G,) fp32 mean(dxhat) per group, from _gn_cl_bwd_terms
    C2,     # (N * G,) fp32 mean(dxhat * xhat) per group
    N, G, Cg, C, S, P_CHUNK, SPLIT,
    dy_sn, dy_sc, dy_ss, xs_sn, xs_sc, xs_ss, ds_sn, ds_sc, ds_ss, dx_sn, dx_sc, dx_ss,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DSUM: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CC: tl.constexpr, INT64: tl.constexpr,
):
    """Pixel-major backward stage 3 (reverse order): dx of a pixel chunk."""
    w = N * SPLIT - 1 - tl.program_id(0)
    n = w // SPLIT
    sp = w % SPLIT
    cc = tl.arange(0, BLOCK_CC)
    cmask = cc < C
    grp_c = cc // Cg
    mean = tl.load(MEAN + n * G + grp_c, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + n * G + grp_c, mask=cmask, other=0.0)
    wv, bv = _channel_params(W, B, cc, cmask, HAS_W, HAS_B)
    c1 = tl.load(C1 + n * G + grp_c, mask=cmask, other=0.0)
    c2 = tl.load(C2 + n * G + grp_c, mask=cmask, other=0.0)
    p_lo = sp * P_CHUNK
    p_hi = tl.minimum(p_lo + P_CHUNK, S)
    nn = n
    ci = cc
    if INT64:
        nn = n.to(tl.int64)
        ci = cc.to(tl.int64)
    xrow = nn * xs_sn + ci * xs_sc
    drow = nn * dy_sn + ci * dy_sc
    orow = nn * dx_sn + ci * dx_sc
    if HAS_DSUM:
        srow = nn * ds_sn + ci * ds_sc
    for p0 in range(p_lo, p_hi, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        mask = (pp < p_hi)[:, None] & cmask[None, :]
        if INT64:
            pp = pp.to(tl.int64)
        x = tl.load(XS + (pp[:, None] * xs_ss + xrow[None, :]), mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DY + (pp[:, None] * dy_ss + drow[None, :]), mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        if ACT != 0:
            dz = dz * _act_grad(xhat * wv[None, :] + bv[None, :], ACT)
        dx = (dz * wv[None, :] - c1[None, :] - xhat * c2[None, :]) * rstd[None, :]
        if HAS_DSUM:
            dx += tl.load(DSUM + (pp[:, None] * ds_ss + srow[None, :]), mask=mask, other=0.0).to(tl.float32)
        if _INTERP and DX.dtype.element_ty == tl.bfloat16:
            dx = _bf16_rne(dx)
        tl.store(DX + (pp[:, None] * dx_ss + orow[None, :]), dx.to(DX.dtype.element_ty), mask=mask)
