"""Tests of the ``"triton"`` route: compiled kernels on CUDA tensors when a GPU is present,
else CPU tensors in Triton's interpreter (CI has no GPU).

How the interpreter is switched on, robustly under pytest-xdist:

* ``triton.jit`` decides *when a kernel is defined* whether it is compiled or interpreted,
  so the launcher (``groupnorm.ops.triton_gn``) defines the kernels lazily at the first
  launch, and re-imports the kernel module if ``TRITON_INTERPRET`` changed since then.
  It therefore does not matter which modules a worker imported before this one.
* ``TRITON_INTERPRET=1`` is set by a module-scoped autouse fixture, i.e. only while this
  module's tests run. Setting it at import time would leak into every test module collected
  by the same process (collection imports all of them before any test runs) and make
  ``"auto"`` route every CPU call of the other test files through the (slow) interpreter.
  Exporting it in CI is therefore neither needed nor wanted for the whole test run.

The compiled path is checked too, without a GPU: ``test_kernels_compile_for_sm90`` compiles
every kernel specialization the launcher produces for the tested cases down to an sm_90
cubin (Triton's bundled ptxas), in a subprocess where the interpreter is off.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

pytest.importorskip("triton")

import groupnorm  # noqa: E402
from groupnorm.ops import routes  # noqa: E402
from groupnorm.ops import triton_gn as T  # noqa: E402
from groupnorm.reference import group_norm_ref  # noqa: E402
from groupnorm.testing import TOL, make_input  # noqa: E402

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# Where the kernels run: compiled, on the GPU, when there is one (unless the interpreter is
# asked for explicitly); else interpreted on CPU tensors. Every test below runs either way;
# the few that only make sense on one side say so in their skip reason.
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sizes too large for the interpreter); "
                                "runs on GPU machines, see benchmarks/results/gpu-*.md")


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    mp = pytest.MonkeyPatch()
    if CUDA:  # compiled kernels: nothing to switch on
        yield
        return
    mp.setenv("TRITON_INTERPRET", "1")
    # Speed only: the interpreter checks every int32 add/mul for overflow (a device_assert
    # each, ~10x the run time of these tests); the test tensors are far from 2^31 elements,
    # the int64 path is forced in its own cases, and test_kernels_compile_for_sm90 compiles
    # the int32 path for real. Skipped silently if a Triton version moves the attribute.
    builder = getattr(importlib.import_module("triton.runtime.interpreter"), "interpreter_builder", None)
    opts = getattr(builder, "options", None)
    if opts is not None and dataclasses.is_dataclass(opts) and hasattr(opts, "sanitize_overflow"):
        mp.setattr(builder, "options", dataclasses.replace(opts, sanitize_overflow=False))
    yield
    mp.undo()


# Forced configurations: the split-group path (tiny tiles so that small test groups are cut
# into several chunks) and the several-groups-per-program path (3 groups per program, so the
# last program also has out-of-range items).
SPLIT = dict(split=3, tile=16)
ITEMS = dict(items=3)


def _make(shape, dtype, layout, g, device="cpu"):
    if layout == "transposed":
        # spatial dims that cannot merge into one stride: the launcher falls back to a copy
        return make_input((*shape[:2], shape[3], shape[2]), dtype, generator=g, device=device).transpose(2, 3)
    return make_input(shape, dtype, layout, generator=g, device=device)


def run_case(shape, G, dtype=f32, layout="contiguous", act=None, residual=False, params="same",
             cfg=None, seed=0, poison=None):
    """Forward + backward through the triton route vs the float64 reference (autograd)."""
    g = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, g, DEV)
    if poison is not None:
        x = x.clone()
        x.view(-1)[0] = poison  # lands in group 0 of sample 0 (x is contiguous here)
    C = shape[1]
    pdtype = {"same": dtype, "fp32": f32}.get(params, dtype)
    w = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + 1).to(DEV, pdtype) if params else None
    b = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(DEV, pdtype) if params in ("same", "fp32") else None
    r = make_input(shape, dtype, generator=g, device=DEV) if residual else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(DEV, dtype)
    ds = torch.randn(shape, generator=g, dtype=torch.float64).to(DEV, dtype) if residual else None

    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    xt, wt, bt, rt = leaves
    with T.config_override(**cfg) if cfg else nullcontext():
        out = groupnorm.group_norm(xt, G, wt, bt, activation=act, residual=rt,
                                   return_sum=residual, route="triton")
        y, s = out if residual else (out, None)
        outs, gouts = ([y, s], [dy, ds]) if residual else ([y], [dy])
        grads = torch.autograd.grad(outs, [t for t in leaves if t is not None], gouts)

    # float64 reference; the residual sum is rounded to x's dtype as the op does
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    x64, w64, b64, r64 = ref
    xin = x64
    if residual:
        exact = x64 + r64
        xin = exact + ((x + r).double() - exact).detach()
    y64 = group_norm_ref(xin, G, w64, b64, activation=act)
    outs64, gouts64 = ([y64, xin], [dy.double(), ds.double()]) if residual else ([y64], [dy.double()])
    grads64 = torch.autograd.grad(outs64, [t for t in ref if t is not None], gouts64)

    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=groupnorm.reference.memory_format_of(x)), "layout kept"
    torch.testing.assert_close(y.double(), y64, **tol, equal_nan=True, msg=lambda m: f"y: {m}")
    if residual:
        assert torch.equal(s, x + r), "sum = x + residual rounded to x's dtype"
    names = [n for n, t in zip("x w b r".split(), (x, w, b, r)) if t is not None]
    for name, got, want, leaf in zip(names, grads, grads64, [t for t in (x, w, b, r) if t is not None]):
        assert got.dtype == leaf.dtype, f"d{name} dtype"
        scale = max(1.0, want[want.isfinite()].abs().max().item() if want.isfinite().any() else 1.0)
        t = TOL[dtype] if name in "xr" else TOL[max(leaf.dtype, dtype, key=lambda d: TOL[d]["atol"])]
        torch.testing.assert_close(got.double(), want, atol=t["atol"] * scale, rtol=t["rtol"],
                                   equal_nan=True, msg=lambda m, name=name: f"d{name}: {m}")
    return y, s, grads


def _cfg_of(shape, G, layout, cfg):
    """The configuration the launcher picks (group kernels' or pixel-major kernels')."""
    N, C = shape[:2]
    S = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
    with T.config_override(**cfg):
        if layout == "channels_last" and T.use_pixel_major(_make(shape, f32, layout, None).view(N, C, S), C, C // G, S):
            return T.pick_cl_config(N, C, S, 132)
        return T.pick_config(N, G, C // G, S, layout == "channels_last" and S > 1, 132)


# (id, shape, G, dtype, layout, activation, residual, params, forced config)
CASES = [
    # every layout x dtype, with the activations, the residual and the three program
    # shapes (default / split groups / several groups per program) spread over them
    ("nchw-f32", (2, 12, 5, 6), 4, f32, "contiguous", None, False, "same", None),
    ("nchw-f16-silu-res-split", (2, 12, 5, 6), 4, f16, "contiguous", "silu", True, "same", SPLIT),
    ("nchw-bf16-gelu-items-w32", (2, 12, 5, 6), 4, bf16, "contiguous", "gelu", False, "fp32", ITEMS),
    ("cl-f32-relu-res-split", (2, 12, 5, 6), 4, f32, "channels_last", "relu", True, "same", SPLIT),
    ("cl-f16-silu-w32", (2, 12, 5, 6), 4, f16, "channels_last", "silu", False, "fp32", None),
    ("cl-bf16-res-items-group", (2, 12, 5, 6), 4, bf16, "channels_last", None, True, "same", dict(ITEMS, pixel_major=False)),
    ("cl3d-f32-gelu-items-group", (2, 6, 3, 4, 5), 3, f32, "channels_last", "gelu", False, "same", dict(ITEMS, pixel_major=False)),
    ("cl3d-f16-relu-res-split-w32", (2, 6, 3, 4, 5), 3, f16, "channels_last", "relu", True, "fp32", SPLIT),
    ("cl3d-bf16-silu", (2, 6, 3, 4, 5), 3, bf16, "channels_last", "silu", False, "same", None),
    ("strided-f32-silu-res", (2, 12, 5, 6), 4, f32, "strided", "silu", True, "same", None),
    ("strided-f16-gelu-split", (2, 12, 5, 6), 4, f16, "strided", "gelu", False, "same", SPLIT),
    ("strided-bf16-relu-items-w32", (2, 12, 5, 6), 4, bf16, "strided", "relu", False, "fp32", ITEMS),
    # weight and bias None (plain normalization, w = 1, b = 0 in the kernels)
    ("no-params", (2, 8, 4, 4), 2, f32, "contiguous", "silu", False, None, None),
    # weight without bias, with an activation (z = xhat * w)
    ("weight-only-gelu-group", (2, 8, 4, 4), 2, f16, "channels_last", "gelu", False, "weight", dict(SPLIT, pixel_major=False)),
    # the same through the pixel-major channels-last kernels
    ("weight-only-gelu-pixel", (2, 8, 4, 4), 2, f16, "channels_last", "gelu", False, "weight", dict(SPLIT, pixel_major=True)),
    # G=1 (LayerNorm over (C, L)), 1-D input, one group per sample cut into chunks
    ("G1-1d-split", (2, 6, 20), 1, f32, "contiguous", None, True, "same", SPLIT),
    # G=C (InstanceNorm): Cg=1, the channel axis of the tile is a single channel
    ("GC-cl-items-group", (2, 6, 4, 3), 6, f16, "channels_last", "silu", False, "fp32", dict(ITEMS, pixel_major=False)),
    # G=C=10 through the pixel-major kernels: more groups than one block of 8 (with a tail)
    ("GC10-cl-pixel-split", (2, 10, 3, 4), 10, bf16, "channels_last", "relu", True, "fp32", dict(split=2, tile=16)),
    # odd C/G=3 (masked channel lanes) in channels-last with a residual
    ("odd-Cg-cl-res", (2, 15, 3, 3), 5, f32, "channels_last", "gelu", True, "same", None),
    # C/G=60 (SDXL-like) with few groups, split, channel tiles smaller than the group
    ("Cg60-cl-split-group", (1, 120, 6, 5), 2, bf16, "channels_last", "silu", False, "fp32",
     dict(split=4, tile=16, pixel_major=False)),
    # C/G=10 (SD UNet 320 channels / 32 groups) in channels-last: the pixel-major kernels by
    # default, split into pixel chunks of tiles narrower than a pixel row
    ("Cg10-cl-pixel-split", (2, 40, 5, 6), 4, f16, "channels_last", "silu", True, "same", dict(split=4, tile=32)),
    # no spatial dims: (N, C) input, S=1
    ("2d-input-items", (5, 12), 3, f32, "contiguous", "relu", False, "same", ITEMS),
    # H*W=1: each group holds only its C/G channel values
    ("HW1-f16", (3, 16, 1, 1), 4, f16, "channels_last", None, True, "same", None),
    # spatial dims that do not merge into one stride (copy fallback)
    ("transposed-copy", (2, 8, 3, 5), 4, f32, "transposed", "silu", False, "same", None),
    # 64-bit offsets forced on a small tensor (the path of tensors >= 2^31 elements)
    ("int64-cl-res-split", (2, 8, 5, 3), 4, bf16, "channels_last", "gelu", True, "same", dict(SPLIT, int64=True)),
    ("int64-nchw-items", (2, 8, 5, 3), 4, f32, "contiguous", None, False, "same", dict(ITEMS, int64=True)),
    # default configuration that splits by itself: 2 groups of 20480 values (< 2 * #SMs groups)
    ("default-split-N1", (1, 2, 128, 160), 2, f32, "contiguous", "silu", False, "same", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_vs_float64_reference(case):
    _, shape, G, dtype, layout, act, residual, params, cfg = case
    if cfg and "split" in cfg:
        assert _cfg_of(shape, G, layout, cfg).split > 1, "the forced config must really split"
    run_case(shape, G, dtype, layout, act, residual, params, cfg)


def test_default_config_splits_few_big_groups():
    assert _cfg_of((1, 2, 128, 160), 2, "contiguous", {}).split > 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the interpreter: inf - inf
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_inf_propagate_to_their_group_only(poison):
    # NaN/Inf in group 0 of sample 0 turn that group into NaN (as in the reference) and
    # leave the other groups and samples exact; in both program shapes
    for cfg in (None, SPLIT):
        y, _, _ = run_case((2, 8, 4, 5), 4, f32, "contiguous", "silu", False, "same", cfg, poison=poison)
        assert y[0, :2].isnan().all() and y[0, 2:].isfinite().all() and y[1].isfinite().all()


@pytest.mark.parametrize("cfg", [None, SPLIT, dict(ITEMS, pixel_major=False), dict(SPLIT, pixel_major=False)],
                         ids=["pixel-major", "pixel-major-split", "group-items", "group-split"])
def test_bitwise_deterministic(cfg):
    # two runs give identical bits: fixed-order reductions, no atomics
    a = run_case((2, 12, 6, 5), 4, bf16, "channels_last", "silu", True, "fp32", cfg, seed=3)
    b = run_case((2, 12, 6, 5), 4, bf16, "channels_last", "silu", True, "fp32", cfg, seed=3)
    for u, v in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]]):
        assert torch.equal(u, v)


def test_only_the_sum_is_used():
    # dy is None in the autograd backward (zeros are passed): dx = dsum
    x = make_input((2, 8, 3, 3), f32, device=DEV).requires_grad_()
    r = make_input((2, 8, 3, 3), f32, generator=torch.Generator().manual_seed(1), device=DEV)
    _, s = groupnorm.group_norm(x, 4, residual=r, return_sum=True, route="triton")
    (gx,) = torch.autograd.grad(s.sum(), [x])
    assert torch.equal(gx, torch.ones_like(x))


def test_expanded_upstream_gradient():
    # y.sum() gives an expanded dy (all strides 0), addressed in place
    x = make_input((2, 8, 3, 3), f16, "channels_last", device=DEV).requires_grad_()
    w = torch.randn(8, device=DEV, requires_grad=True)
    groupnorm.group_norm(x, 4, w, activation="gelu", route="triton").float().sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    group_norm_ref(x64, 4, w64, activation="gelu").sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[f16])
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-3, rtol=1e-3)


def test_strided_parameters():
    # weight/bias that are views with stride 2 (read densely after a copy; dense gradients)
    x = make_input((2, 8, 3, 4), f32, "channels_last", device=DEV)
    wb = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEV)
    base = wb.float().requires_grad_()
    y = groupnorm.group_norm(x, 4, base[0, ::2], base[1, ::2], activation="silu", route="triton")
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, [base], dy)
    base64 = wb.clone().requires_grad_()
    y64 = group_norm_ref(x.double(), 4, base64[0, ::2], base64[1, ::2], activation="silu")
    (g64,) = torch.autograd.grad(y64, [base64], dy.double())
    torch.testing.assert_close(y.double(), y64, **TOL[f32])
    torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 0), (2, 8, 0, 4)], ids=["N0", "L0", "H0"])
def test_empty_inputs_launch_nothing(shape):
    # N=0 and empty spatial dims: empty outputs, NaN statistics (mean of nothing), zero dW/dB
    x = torch.randn(shape, device=DEV, requires_grad=True)
    w = torch.randn(8, device=DEV, requires_grad=True)
    b = torch.randn(8, device=DEV, requires_grad=True)
    y = groupnorm.group_norm(x, 4, w, b, route="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()
    _, mean, rstd, _ = T.forward(x.detach(), w, b, None, 4, 1e-5, "none")
    assert mean.shape == (shape[0], 4) and rstd.shape == (shape[0], 4)


# ----------------------------------------------------------------------------- routing


def test_cpu_tensors_are_declined_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 4, 3)
    assert "CUDA" in T.supports(x, None, None, "none")
    assert routes.select("auto", x, None, None, "none").name != "triton"
    with pytest.raises(RuntimeError, match="not a CUDA tensor"):
        groupnorm.group_norm(x, 2, route="triton")


def test_auto_never_sends_cpu_tensors_to_the_interpreter(monkeypatch):
    # with TRITON_INTERPRET=1 a forced route="triton" takes CPU tensors (this file's tests),
    # but "auto" keeps them on the CPU routes: the interpreter is a testing tool
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 4, 3)
    assert T.supports(x, None, None, "none") is None
    assert routes.select("auto", x, None, None, "none").name != "triton"
    assert routes.select("triton", x, None, None, "none").name == "triton"


def test_declines_float64():
    assert "float64" in T.supports(torch.randn(2, 4, 3, dtype=torch.float64, device=DEV), None, None, "none")


def test_route_is_registered_with_priority_20():
    assert "triton" in routes.available_routes()
    assert routes.ROUTES["triton"].priority == 20


@pytest.mark.skipif(CUDA, reason="switches the interpreter on for CPU tensors; runs where there is no GPU (CI)")
def test_kernels_redefined_when_interpreter_setting_changes(monkeypatch):
    # a worker that imported the kernel module with the interpreter off still gets
    # interpreted kernels once TRITON_INTERPRET=1 is set
    monkeypatch.delenv("TRITON_INTERPRET")
    K = importlib.reload(importlib.import_module("groupnorm.ops._triton_kernels"))
    assert K.INTERPRET is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run_case((2, 4, 3, 3), 2)
    assert sys.modules["groupnorm.ops._triton_kernels"].INTERPRET is True


def test_pick_config_program_shapes():
    # few big groups (VAE: 1 x 32 groups of 8M values) are split over at least 2 waves of SMs,
    # in chunks of at most MAX_CHUNK values
    c = T.pick_config(1, 32, 8, 1024 * 1024, False, 132)
    assert c.split * 32 >= 2 * 132 and 8 * c.s_chunk <= T.MAX_CHUNK
    assert (c.split - 1) * c.s_chunk < 1024 * 1024 <= c.split * c.s_chunk
    # fewer, smaller groups: the 2-waves rule alone (big-128: 4 x 32 groups of 16 x 16384)
    assert T.pick_config(4, 32, 16, 128 * 128, False, 132).split == 2
    # many tiny groups (Mask R-CNN head: 512 x 32 groups of 8 x 49): one group per program
    # (measured faster than several per program on an H200); `items` still forces sharing
    c = T.pick_config(512, 32, 8, 49, True, 132)
    assert c.split == 1 and c.items == 1
    assert T.pick_config(512, 32, 8, 49, True, 132, items=4).items == 4
    # channels-last tiles span the group's channels (the contiguous axis), NCHW tiles the positions
    assert T.pick_config(16, 32, 60, 1024, True, 132).block_c == 64
    assert T.pick_config(16, 32, 60, 1024, False, 132).block_s == 1024
    # SDXL (2 x 32 groups of 60 x 1024): split, with tiles short enough to make the chunks
    c = T.pick_config(2, 32, 60, 1024, False, 132)
    assert c.split >= 4 and c.block_s >= 32
    # small groups are not split (launch-bound): SD UNet 8x8 (2 x 32 groups of 40 x 64)
    assert T.pick_config(2, 32, 40, 64, False, 132).split == 1
    # many groups that each fit one tile get 1024-element tiles (measured faster on an H100):
    # ResNet-50 stage 5, 32 x 32 groups of 64 x 49; fewer groups keep the 4096 tile
    c = T.pick_config(32, 32, 64, 49, False, 132)
    assert c.block_c * c.block_s == 1024 and c.split == 1
    assert T.pick_config(2, 32, 64, 49, False, 132).block_c * T.pick_config(2, 32, 64, 49, False, 132).block_s == 4096


def test_sixteen_warps_only_where_measured_faster():
    big, small = T.BIG_TENSOR, T.BIG_TENSOR - 1
    tile = T.pick_config(4, 32, 16, 128 * 128, False, 132)  # 4096-element tiles, 8 warps
    assert tile.num_warps == 8
    assert T._warps(tile, big, backward=False, fast_bwd=False).num_warps == 16
    assert T._warps(tile, small, backward=False, fast_bwd=False).num_warps == 8
    # backward: only the paths measured faster with 16 warps
    assert T._warps(tile, big, backward=True, fast_bwd=True).num_warps == 16
    assert T._warps(tile, big, backward=True, fast_bwd=False).num_warps == 8
    # pixel-major backward: all but the 16-bit ones with SiLU fused (those measured 0.79-0.99x)
    assert T.pixel_major_bwd_wants_16_warps("none", 2) and T.pixel_major_bwd_wants_16_warps("silu", 4)
    assert not T.pixel_major_bwd_wants_16_warps("silu", 2)
    # smaller tiles keep their warps; an explicit override wins
    few = T.pick_config(32, 32, 64, 49, False, 132)
    assert T._warps(few, big, backward=False, fast_bwd=False).num_warps == few.num_warps < 8
    with T.config_override(warps=4):
        assert T._warps(tile, big, backward=False, fast_bwd=False).num_warps == 8


@pytest.mark.parametrize("N,expect", [(1, True), (8, False)], ids=["few-groups", "many-groups"])
def test_pixel_major_for_few_channels_last_groups(N, expect):
    # C/G=8 (vector-loadable) channels-last: pixel-major only when N*G <= #SMs/4 (a VAE's 32
    # groups of 8M values: 3x faster on an H100), the group kernels otherwise
    x = make_input((N, 256, 4, 4), f32, "channels_last").view(N, 256, 16)
    assert T.use_pixel_major(x, 256, 8, 16) is expect


# ----------------------------------------------------------------------------- real sizes (GPU)

# Shapes of the benchmark's design points at full size, each through the default
# configuration the launcher picks for a real card: (shape, G)
REAL = [
    ((2, 320, 64, 64), 32),     # SD UNet: C/G=10, pixel-major in channels-last
    ((2, 1920, 32, 32), 32),    # SDXL: C/G=60, few groups, split
    ((32, 2048, 7, 7), 32),     # ResNet-50 stage 5: many small groups
    ((512, 256, 7, 7), 32),     # Mask R-CNN head: tiny groups, several per program
    ((1, 256, 512, 512), 32),   # VAE decoder: 32 groups of 2M values, split over the SMs
    ((2, 32, 32, 32, 32), 8),   # 3-D UNet
    ((128, 2048, 64), 512),     # 1-D, C/G=4
]


@needs_cuda
@pytest.mark.parametrize("dtype", [f32, bf16, f16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,G", REAL, ids=["x".join(map(str, s)) for s, _ in REAL])
def test_real_sizes_vs_float64_reference(shape, G, dtype, layout):
    if layout == "channels_last" and len(shape) == 3:
        pytest.skip("1-D input has no channels-last layout")
    run_case(shape, G, dtype, layout, "silu", residual=(dtype == bf16), params="same")


@needs_cuda
def test_int64_offsets_beyond_2_31_elements():
    # 2^31 + 2^11 elements (4 GiB of bf16): offsets past 2^31 must not wrap. The last group
    # of the last sample (the farthest addresses) is checked against the float64 reference.
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    N, C, G, L = 2, 16, 8, 2**26 + 64
    x = torch.randn(N, C, L, device="cuda", dtype=bf16)
    w = torch.randn(C, device="cuda", dtype=bf16)
    b = torch.randn(C, device="cuda", dtype=bf16)
    assert x.numel() > 2**31
    y = groupnorm.group_norm(x, G, w, b, route="triton")
    Cg = C // G
    ref = group_norm_ref(x[-1:, -Cg:].double(), 1, w[-Cg:].double(), b[-Cg:].double())
    torch.testing.assert_close(y[-1:, -Cg:].double(), ref, **TOL[bf16])
    ref0 = group_norm_ref(x[:1, :Cg].double(), 1, w[:Cg].double(), b[:Cg].double())
    torch.testing.assert_close(y[:1, :Cg].double(), ref0, **TOL[bf16])


@needs_cuda
def test_compile_and_autocast_on_cuda():
    # torch.compile(fullgraph) keeps the op as one node and runs the triton route; CUDA
    # autocast does not cast it (fp32 in -> fp32 out, bf16 in -> bf16 out, fp32 statistics)
    x = make_input((4, 64, 16, 16), f32, "channels_last", device="cuda").requires_grad_()
    w = torch.randn(64, device="cuda", requires_grad=True)
    fn = torch.compile(lambda t, w: groupnorm.group_norm(t, 8, w, activation="silu"), fullgraph=True)
    y = fn(x, w)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double()
    y64 = group_norm_ref(x64, 8, w64, activation="silu")
    (gx64,) = torch.autograd.grad(y64.sum(), [x64])
    torch.testing.assert_close(y.double(), y64, **TOL[f32])
    torch.testing.assert_close(gx.double(), gx64, **TOL[f32])
    with torch.autocast("cuda", dtype=bf16):
        assert groupnorm.group_norm(x, 8, w).dtype == f32
        assert groupnorm.group_norm(x.detach().to(bf16), 8).dtype == bf16
    assert routes.select("auto", x, w, None, "silu").name == "triton"


# ----------------------------------------------------------------------------- compiled path


def _compile_cases():
    """(forward args, backward args, config override) covering every kernel specialization."""
    return [
        ((2, 12, 5, 6), 4, f16, "contiguous", "silu", True, "same", {}),
        ((2, 12, 5, 6), 4, bf16, "channels_last", "gelu", False, "fp32", dict(SPLIT, pixel_major=False)),
        ((2, 40, 6, 5), 4, f16, "channels_last", "silu", True, "same", {}),   # pixel-major
        ((2, 6, 3, 4, 5), 3, bf16, "channels_last", "gelu", False, "weight",
         dict(pixel_major=True, split=2, tile=16, int64=True)),
        ((2, 6, 3, 4, 5), 3, f32, "channels_last", "relu", True, "same", dict(SPLIT, int64=True)),
        ((2, 6, 4, 3), 6, f16, "channels_last", None, False, None, ITEMS),   # Cg=1 specializes to 1
        ((5, 12), 12, f32, "contiguous", None, False, "weight", {}),         # S=1, Cg=1
        ((1, 2, 128, 160), 2, bf16, "contiguous", "silu", True, "fp32", {}),   # default split
        ((2, 12, 5, 6), 4, f32, "contiguous", "gelu", False, "same", dict(ITEMS, int64=True)),
        ((2, 12, 5, 6), 4, f16, "strided", "silu", False, "weight", SPLIT),   # act without bias
        # 16 warps (what big tensors get, see triton_gn._warps): group and pixel-major kernels
        ((2, 12, 5, 6), 4, bf16, "contiguous", "silu", True, "same", dict(SPLIT, warps=16)),
        ((2, 40, 6, 5), 4, bf16, "channels_last", None, False, "same", dict(warps=16)),
    ]


def _compile_main() -> int:  # pragma: no cover - runs in the subprocess below
    """Record the launcher's kernel calls (nothing runs), compile each for sm_90."""
    import time

    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    K = importlib.import_module("groupnorm.ops._triton_kernels")
    assert not K.INTERPRET
    calls = []

    class _Rec:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.name, a, kw))

    class _Fake:
        def __getattr__(self, name):
            return _Rec(name)

    T._kernels = lambda: _Fake()
    for shape, G, dtype, layout, act, residual, params, cfg in _compile_cases():
        g = torch.Generator().manual_seed(0)
        x = make_input(shape, dtype, layout, generator=g)
        C = shape[1]
        pd = f32 if params == "fp32" else dtype
        w = torch.randn(C).to(pd) if params else None
        b = torch.randn(C).to(pd) if params in ("same", "fp32") else None
        r = torch.randn(shape).to(dtype) if residual else None
        with T.config_override(**cfg):
            y, mean, rstd, s = T.forward(x, w, b, r, G, 1e-5, act or "none")
            T.backward(torch.randn(shape).to(dtype), r, s if s is not None else x, w, b,
                       torch.zeros(shape[0], G), torch.ones(shape[0], G), G, act or "none")
    seen = set()
    t0 = time.time()
    for name, args, kw in calls:
        fn = getattr(K, name)
        kw = dict(kw)
        num_warps = kw.pop("num_warps")
        sig, const, attrs = {}, {}, {}
        for i, an in enumerate(fn.arg_names):
            v = kw[an] if an in kw else args[i]
            if an in kw:
                sig[an], const[an] = "constexpr", v
                continue
            # the JIT's own specialization: type, constexpr for ints equal to 1, and the
            # divisibility-by-16 attribute (aligned pointers, strides) that enables vector loads
            ty, attr = native_specialize_impl(BaseBackend, v, False, True, True)
            if ty == "constexpr":
                sig[an], const[an] = "constexpr", attr
            else:
                sig[an] = ty
                if attr:
                    attrs[(i,)] = CUDABackend.parse_attr(attr)
        key = (name, tuple(sorted(sig.items())), tuple(sorted(const.items())), tuple(sorted(attrs)), num_warps)
        if key in seen:
            continue
        seen.add(key)
        out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                             target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert len(out.asm["cubin"]) > 0
    print(f"compiled {len(seen)} kernel specializations for sm_90 in {time.time() - t0:.1f}s")
    return 0


@pytest.mark.skipif(CUDA, reason="on a GPU every other test here compiles and runs the kernels for real")
def test_kernels_compile_for_sm90():
    # the interpreter is permissive; the real compiler (down to cubin, no GPU needed) is not
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, __file__, "--compile"], env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and "ptxas" in p.stderr and "not found" in p.stderr:
        pytest.skip("no ptxas shipped with this Triton")
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert "compiled" in p.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--compile"]:  # pragma: no cover
    sys.exit(_compile_main())
