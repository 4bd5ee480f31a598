"""Tests of the ``"cpu"`` route (C++ kernels, groupnorm/csrc) against the float64 reference.

Every call here is forced onto the route with ``use_route("cpu")``; outputs and the three
gradients are compared with ``group_norm_ref`` run in float64 and differentiated by
autograd. The kernels have distinct code paths for: contiguous vs channels-last layouts,
full vectors vs tails (C or H*W not a multiple of the SIMD width), one vs several statistics
blocks per group (groups > 8192 values; channels-last samples cut into pixel blocks and
sub-blocks), the four activations, residual, affine or not; each is reached below.
(tests/test_op.py runs its generic grid on this route too.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import groupnorm
from groupnorm import group_norm, use_route
from groupnorm.ops import routes
from groupnorm.testing import TOL, assert_close_to_ref, group_norm_ref, make_input

cpu = pytest.importorskip("groupnorm.ops.cpu")
if cpu.load_extension() is None:  # pragma: no cover - no compiler on this machine
    pytest.skip(f"C++ CPU kernels unavailable: {cpu._ext_error}", allow_module_level=True)

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
ACTS = (None, "silu", "gelu", "relu")


def _run(x, G, w, b, activation, residual, return_sum, dy, ds):
    """Forward + backward on the cpu route; returns y, s, grads (x, r, w, b)."""
    leaves = [t for t in (x, residual, w, b) if t is not None]
    for t in leaves:
        t.grad = None
    with use_route("cpu"):
        out = group_norm(x, G, w, b, 1e-5, activation=activation, residual=residual, return_sum=return_sum)
    y, s = out if return_sum else (out, None)
    loss = (y.double() * dy).sum() + ((s.double() * ds).sum() if s is not None else 0)
    loss.backward()
    return y, s, [t.grad for t in leaves]


def check(shape, G, dtype=f32, layout="contiguous", activation=None, residual=False, return_sum=False,
          affine=True, param_dtype=None, shift=0.0, seed=0, tol_scale=1.0, pattern=None):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(shape, dtype, layout, generator=gen, shift=shift)
    if pattern is not None:  # values = pattern(randn in float64), same dtype and layout
        x = torch.empty_like(x).copy_(pattern(x.double()))
    x.requires_grad_()
    r = make_input(shape, dtype, layout, generator=gen).requires_grad_() if residual else None
    pdt = param_dtype or dtype
    w = b = None
    if affine:
        w = (torch.randn(shape[1], generator=gen, dtype=f64) * 0.5 + 1).to(pdt).requires_grad_()
        b = (torch.randn(shape[1], generator=gen, dtype=f64) * 0.5).to(pdt).requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=f64)
    ds = torch.randn(shape, generator=gen, dtype=f64) if return_sum else None
    y, s, grads = _run(x, G, w, b, activation, r, return_sum, dy, ds)

    # y keeps dtype, shape and the memory format the reference says
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=groupnorm.reference.memory_format_of(x.detach()))

    # float64 ground truth: x (and residual) as given (the sum is rounded in x's dtype)
    xr = x.detach().clone().requires_grad_() if residual else x.detach().double().requires_grad_()
    rr = r.detach().clone().requires_grad_() if residual else None
    w64 = w.detach().double().requires_grad_() if affine else None
    b64 = b.detach().double().requires_grad_() if affine else None
    ref = group_norm_ref(xr, G, w64, b64, 1e-5, activation, rr)
    assert_close_to_ref(y, ref, dtype, "y", scale=tol_scale)
    if return_sum:
        torch.testing.assert_close(s, x.detach() + r.detach(), atol=0, rtol=0)
    if x.numel() == 0:
        return
    (ref * dy.to(dtype).double()).sum().backward()
    gx = xr.grad.double() + (ds.to(dtype).double() if return_sum else 0)
    # gradients are sums over a group / the batch: scale tolerance by their magnitude
    sc = lambda t: tol_scale * max(1.0, t.abs().max().item())  # noqa: E731
    assert_close_to_ref(grads[0], gx, dtype, "dx", scale=sc(gx))
    if residual:
        assert_close_to_ref(grads[1], gx, dtype, "dresidual", scale=sc(gx))
    if affine:
        assert grads[-2].dtype == pdt and grads[-1].dtype == pdt
        assert_close_to_ref(grads[-2], w64.grad, dtype, "dweight", scale=sc(w64.grad))
        assert_close_to_ref(grads[-1], b64.grad, dtype, "dbias", scale=sc(b64.grad))


def test_auto_picks_cpu_route_for_cpu_tensors():
    x = torch.randn(2, 8, 4, 4)
    assert routes.select("auto", x, None, None, "silu").name == "cpu"
    # and declines what it cannot run, with a reason (so "auto" moves on)
    assert cpu.supports(torch.empty(2, 4, device="meta"), None, None, "none") is not None
    assert cpu.supports(torch.zeros(2, 4, dtype=torch.int32), None, None, "none") is not None


# (shape, G): one edge case each
SHAPES = [
    ((2, 8, 5, 5), 4),          # 2-D, H*W=25: vector + tail in NCHW
    ((3, 6, 7), 1),             # 1-D, G=1 (LayerNorm)
    ((2, 6, 4, 3), 6),          # G=C (InstanceNorm)
    ((2, 63, 3, 2), 21),        # odd C/G=3; channels-last: C=63 is not a multiple of 16
    ((2, 21, 2, 3), 7),         # C=21 < 2 vectors; C/G=3
    ((1, 16, 1, 1), 4),         # N=1 and H*W=1: a group is C/G values only
    ((2, 8, 3, 4, 5), 2),       # 3-D volume (channels_last_3d)
    ((4, 12), 3),               # no spatial dims
    ((2, 4, 1), 4),             # one value per group: var = 0, y = bias
    ((1, 4, 96, 96), 2),        # group of 18432 values: several stats blocks merged (NCHW);
                                # channels-last: 16 pixel blocks x several sub-blocks per sample
    ((3, 32, 7, 7), 8),         # N=3 -> 6 pixel blocks per sample, uneven split of 49 pixels
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape,G", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"G{v}")
def test_shapes_fp32(shape, G, layout):
    check(shape, G, f32, layout)


@pytest.mark.parametrize("dtype", [f32, f64, f16, bf16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTS)
def test_dtypes_layouts_activations(dtype, layout, activation):
    # residual + return_sum on half of them, no affine on the relu ones
    check((2, 12, 5, 7), 4, dtype, layout, activation, residual=activation in ("silu", "gelu"),
          return_sum=activation == "silu", affine=activation != "relu")


@pytest.mark.parametrize("dtype", [f16, bf16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fp32_params_with_half_input(dtype, layout):
    # weight/bias fp32 with a half x: dweight/dbias come back fp32
    check((2, 32, 6, 6), 8, dtype, layout, "silu", param_dtype=f32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_residual_3d_and_channels_last_3d(layout):
    check((2, 16, 3, 4, 5), 4, f32, layout, "gelu", residual=True, return_sum=True)


@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 4), (0, 8)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty(shape, layout):
    # N=0 or an empty spatial dim: empty outputs of the right shape, zero parameter grads
    x = make_input(shape, f32, layout).requires_grad_()
    w = torch.ones(8, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    with use_route("cpu"):
        y = group_norm(x, 4, w, b)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(8)) and torch.equal(b.grad, torch.zeros(8))


@pytest.mark.parametrize("dtype", [f32, bf16, f64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean(dtype, layout):
    # 1000 + randn: block means are shifted sums, variances two-pass / Chan-merged and
    # xhat = (x - mean) * rstd, so a large offset costs no digits (E[x^2] - E[x]^2 would be
    # off by ~6e-2 in fp32). Even an exact method rounds the stored fp32 mean (ulp(1000)/2),
    # which shifts every x - mean: tolerance 4 ulps of the shift, as in test_op.py.
    tol_scale = max(1.0, 4 * torch.finfo(f32).eps * 1000.0 / TOL[dtype]["atol"]) if dtype != f64 else 1.0
    check((2, 16, 8, 8), 4, dtype, layout, "silu", shift=1000.0, tol_scale=tol_scale)
    check((1, 4, 96, 96), 2, dtype, layout, shift=1000.0, tol_scale=tol_scale)  # several blocks merged
    # |mean * rstd * w| just under the bf16 channels-last output's fold bound (256): x * scale +
    # (shift - mean * scale) with a rounded folded shift; C = 64 so whole 32-lane steps run
    check((2, 64, 8, 8), 4, dtype, layout, shift=200.0)


@pytest.mark.parametrize("dtype", [f32, bf16, f64])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape", [(64, 4), (16, 4, 1, 1), (8, 4, 1)])
def test_one_value_groups_have_exactly_zero_dx(dtype, activation, shape):
    # G = C and no spatial extent: each group is one value, xhat = 0, and dx = (dz*w - c1 -
    # xhat*c2)*rstd is 0 exactly (c1 = dz*w). rstd = 1/sqrt(eps) ~ 316 magnifies any rounding
    # difference between dz*w and c1: an FMA fusing dz*w into the subtraction (GCC's default
    # contraction) gave ~1e-5 here, and torch's own kernel gives ~3e-5.
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=f64) * 10).to(dtype).requires_grad_()
    w = torch.randn(shape[1], generator=gen, dtype=f64).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=f64).to(dtype)
    with use_route("cpu"):
        group_norm(x, shape[1], w, None, 1e-5, activation=activation).backward(dy)
    assert torch.equal(x.grad, torch.zeros_like(x)), x.grad.abs().max()


# Patterns that put the statistics' shift far from a block's mean. The statistics are one
# pass (sums of d = x - k and d^2, k = the mean of the group's first values or of its blocks so
# far) and redo a block exactly in two passes when k was far; each pattern forces that:
STAT_PATTERNS = {
    # a trend along every group: later blocks' means are far from the running mean
    "ramp": lambda v: v + torch.linspace(0, 40, v[0, 0].numel(), dtype=f64).reshape(v.shape[2:]).repeat(
        v.shape[0], v.shape[1], *([1] * (v.dim() - 2))),
    # the first values of every channel 50 std away (k = their mean is an outlier)
    "outlier-head": lambda v: v + 50.0 * (torch.arange(v[0, 0].numel()) < 16).reshape(v.shape[2:]).double(),
    # constant groups: variance exactly 0, y = bias
    "constant": lambda v: torch.full_like(v, 3.0),
    # channels of a group at two levels (0 and 100): the spread is between channels
    "two-level": lambda v: v + 100.0 * (torch.arange(v.shape[1]) % 2).double().reshape(1, -1, *([1] * (v.dim() - 2))),
}


@pytest.mark.parametrize("dtype", [f32, bf16, f64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pattern", list(STAT_PATTERNS))
def test_statistics_shift_far_from_mean(dtype, layout, pattern):
    # (2, 6, 37, 3): bf16 groups of 222 values = 64-value steps, a 16-value step and a tail;
    # (1, 4, 96, 96): 18432-value groups, three statistics blocks merged;
    # (2, 64, 48, 48): channels-last, one task per sample cut into three sub-blocks of <= 1024
    # pixels (Chan-merged; the later ones shifted by the mean so far)
    for shape, G in [((2, 6, 37, 3), 3), ((1, 4, 96, 96), 2), ((2, 64, 48, 48), 8)]:
        check(shape, G, dtype, layout, "silu" if pattern == "ramp" else None, pattern=STAT_PATTERNS[pattern])


@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pattern", list(STAT_PATTERNS))
def test_statistics_accuracy(dtype, layout, pattern):
    # The saved mean / rstd themselves, against float64 statistics of the same values: a
    # one-pass sum of squares with a shift far from the mean would lose up to log2(8192 / 16)
    # = 9 bits here (rstd off by ~1e-5 relative, inside y's tolerance but not this one); the
    # exact redo keeps the loss <= 1 bit. (2, 64, 48, 48): several channels-last sub-blocks.
    for shape, G in [((2, 6, 37, 3), 3), ((1, 4, 96, 96), 2), ((2, 64, 48, 48), 8)]:
        x = make_input(shape, dtype, layout, generator=torch.Generator().manual_seed(1))
        x = torch.empty_like(x).copy_(STAT_PATTERNS[pattern](x.double()))
        _, mean, rstd, _ = torch.ops.groupnorm_cpu.fwd(x, None, None, None, G, 1e-5, 0)
        v = x.double().reshape(shape[0], G, -1)
        var = v.var(dim=2, unbiased=False)
        torch.testing.assert_close(mean.double(), v.mean(dim=2), rtol=0, atol=2e-6 * (v.abs().amax(dim=2) + var.sqrt()).max().item())
        torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_inf_propagate_like_torch(dtype, layout):
    # a NaN or Inf poisons its own group only, exactly as torch's native GroupNorm does; a NaN
    # weight its own channel (bf16: the rounding of finite groups skips the NaN test, so the
    # groups with NaN / Inf must take the NaN-safe store). 8x8 pixels: full 32-value bf16 steps.
    x = make_input((2, 8, 8, 8), dtype, layout).clone()
    x[0, 1, 2, 2] = float("nan")
    x[1, 6, 0, 0] = float("inf")
    w, b = torch.randn(8).to(dtype), torch.randn(8).to(dtype)
    w[3] = float("nan")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_route("cpu"):
        y = group_norm(x1, 4, w, b)
    want = torch.nn.functional.group_norm(x2, 4, w, b)
    tol = {} if dtype == f32 else TOL[bf16]
    torch.testing.assert_close(y, want, equal_nan=True, **tol)
    # the backward: the same NaN pattern (and values elsewhere) as torch's
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    want.backward(dy)
    assert torch.equal(x1.grad.isnan(), x2.grad.isnan())
    torch.testing.assert_close(x1.grad, x2.grad, equal_nan=True, **(tol or TOL[f32]))
    assert y[0, :2].isnan().all() and y[1, 6:].isnan().all() and y[:, 3].isnan().all()
    assert y[0, 4:].isfinite().all() and y[1, :3].isfinite().all()
    assert x1.grad[0, 4:].isfinite().all() and x1.grad[0, :4].isnan().all()


def test_outputs_of_32_mib_and_more():
    # y and dx of >= 32 MiB are given transparent huge pages (madvise) before the kernels
    # write them: the path must produce the same values as any other size (checked against
    # torch's own kernels here; a float64 reference of 8M values is slow)
    x = torch.randn(1, 8, 1024, 1024, requires_grad=True)  # 32 MiB
    w, b = torch.randn(8), torch.randn(8)
    with use_route("cpu"):
        y = group_norm(x, 4, w, b, activation="silu")
    x2 = x.detach().clone().requires_grad_()
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x2, 4, w, b))
    torch.testing.assert_close(y, want, **TOL[f32])
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy)
    # both sides sum 4M-value groups in fp32 (in different orders): a looser tolerance
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradient_layouts_differ_from_input(layout):
    # dy non-contiguous (an expanded stride-0 gradient from .sum()) and a residual stored in
    # the other layout than x: the launcher must densify them in x's layout
    x = make_input((2, 8, 6, 6), f32, layout).requires_grad_()
    other = "channels_last" if layout == "contiguous" else "contiguous"
    r = make_input((2, 8, 6, 6), f32, other, generator=torch.Generator().manual_seed(3)).requires_grad_()
    with use_route("cpu"):
        y = group_norm(x, 4, activation="gelu", residual=r)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_()
    rr = r.detach().clone().requires_grad_()
    ref = group_norm_ref(xr, 4, activation="gelu", residual=rr)
    ref.sum().backward()
    torch.testing.assert_close(y, ref.float(), **TOL[f32])
    torch.testing.assert_close(x.grad, xr.grad.float(), **TOL[f32])
    torch.testing.assert_close(r.grad, rr.grad.float(), **TOL[f32])


@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic_across_runs_and_thread_counts(dtype, layout):
    # fixed-order reductions whose partition depends on the shape only: identical bits run to
    # run and whatever the number of threads
    x = make_input((3, 64, 20, 20), dtype, layout).requires_grad_()
    r = make_input((3, 64, 20, 20), dtype, layout, generator=torch.Generator().manual_seed(1))
    w = torch.randn(64, dtype=dtype, requires_grad=True)
    b = torch.randn(64, dtype=dtype, requires_grad=True)
    dy = make_input((3, 64, 20, 20), dtype, layout, generator=torch.Generator().manual_seed(2))
    results = []
    nt = torch.get_num_threads()
    try:
        for threads in (nt, nt, 1):
            torch.set_num_threads(threads)
            x.grad = w.grad = b.grad = None
            with use_route("cpu"):
                y = group_norm(x, 8, w, b, activation="silu", residual=r)
            y.backward(dy)
            results.append([t.clone() for t in (y, x.grad, w.grad, b.grad)])
    finally:
        torch.set_num_threads(nt)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            # compare bits, not values (NaN-safe, -0.0 vs 0.0 distinguished)
            assert torch.equal(a.contiguous().view(-1).view(torch.uint8), c.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_into_preallocated_output(layout):
    # the benchmarks' out= path (groupnorm_cpu::fwd_out) writes y in place and gives the
    # same bits as the allocating path, residual sum included
    from groupnorm.ops import cpu

    x = make_input((2, 8, 5, 4), torch.bfloat16, layout)
    r = make_input((2, 8, 5, 4), torch.bfloat16, layout, generator=torch.Generator().manual_seed(1))
    w = torch.randn(8)
    y, mean, rstd, s = cpu.forward(x, w, None, r, 4, 1e-5, "silu")
    out = torch.full_like(x, float("nan"))
    y2, mean2, rstd2, s2 = cpu.forward(x, w, None, r, 4, 1e-5, "silu", out=out)
    assert y2 is out
    for a, b in ((y, y2), (mean, mean2), (rstd, rstd2), (s, s2)):
        assert torch.equal(a, b)


def test_matches_torch_native_fp32():
    # plain GroupNorm equals torch's own to fp32 rounding, both layouts
    for layout in ("contiguous", "channels_last"):
        x = make_input((4, 64, 9, 9), f32, layout)
        w, b = torch.randn(64), torch.randn(64)
        with use_route("cpu"):
            y = group_norm(x, 16, w, b)
        torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 16, w, b), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 3),
    groups=st.integers(1, 4),
    cpg=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    dtype=st.sampled_from([f32, f64, bf16, f16]),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    activation=st.sampled_from(ACTS),
    residual=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(n, groups, cpg, spatial, dtype, layout, activation, residual, affine, seed):
    check((n, groups * cpg, *spatial), groups, dtype, layout, activation, residual,
          return_sum=residual, affine=affine, seed=seed)


@pytest.mark.parametrize("how", ["no-compiler", "disabled"])
def test_fallback_without_extension(how, tmp_path):
    # no compiler (a fresh build dir and CXX pointing nowhere): one warning, "auto" falls back to
    # the reference route and a forced "cpu" route says why it cannot run, never a crash.
    # GROUPNORM_CPU_EXT=0 is the deliberate opt-out: same fallback, no warning.
    code = (
        "import warnings, torch, groupnorm\n"
        "from groupnorm.ops import routes\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(2, 4, 3, 3)\n"
        "    y = groupnorm.group_norm(x, 2)\n"
        "    assert routes.select('auto', x, None, None, 'none').name == 'reference'\n"
        "    n = sum('unavailable' in str(m.message) for m in w)\n"
        f"    assert n == {1 if how == 'no-compiler' else 0}, [str(m.message) for m in w]\n"
        "torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 2))\n"
        "try:\n"
        "    groupnorm.group_norm(x, 2, route='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e), str(e)\n"
        "else:\n"
        "    raise AssertionError('forced cpu route ran without its kernels')\n"
    )
    env = dict(os.environ)
    if how == "no-compiler":
        env.update(CXX=str(tmp_path / "no-such-c++"), GROUPNORM_BUILD_DIR=str(tmp_path / "build"))
    else:
        env.update(GROUPNORM_CPU_EXT="0")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_native_autograd_node_behaves_like_autograd():
    # eager training on this route records a C++ autograd node (not a Python Function): what
    # autograd users rely on must still hold
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 5, 5, generator=g, requires_grad=True)
    w = torch.randn(8, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)

    def f(t):
        with use_route("cpu"):
            return group_norm(t, 4, w, b, activation="silu")

    y = f(x)
    assert "GNFunction" in y.grad_fn.name()
    (want,) = torch.autograd.grad(y.square().sum(), x)
    # activation checkpointing recomputes the forward in the backward
    (got,) = torch.autograd.grad(checkpoint(f, x, use_reentrant=False).square().sum(), x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # saved-tensor hooks (CPU offload and friends) see the saved tensors
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(), lambda t: t):
        y2 = f(x)
    (got,) = torch.autograd.grad(y2.square().sum(), x)
    assert packed and torch.equal(got, want)
    # retain_graph: the second backward gives the same gradient
    y3 = f(x)
    g1 = torch.autograd.grad(y3.sum(), x, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(y3.sum(), x)[0], g1, atol=0, rtol=0)
    # an input modified in place after the forward is detected, as for torch's own ops
    z = x * 1
    y4 = f(z)
    z.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y4.sum().backward()


@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_outputs_of_64_mib_are_streamed_correctly(dtype, layout):
    # tensors >= 64 MiB: the forward's output and the backward's dx go out with non-temporal
    # stores (AVX-512; kStreamBytes in group_norm_cpu.h); the values must not change. 64 MiB
    # exactly, the threshold; channels-last rows of 64 channels keep every store aligned
    shape = (1, 64, 512, 512) if dtype == f32 else (2, 64, 512, 512)
    check(shape, 32, dtype, layout, "silu" if layout == "contiguous" and dtype == f32 else None)
