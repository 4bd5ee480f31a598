"""Differential tests of the GroupNorm op against the float64 reference and torch.

Every CPU-capable route is tested (the reference route always; the fast CPU route when it is
registered). The Triton route has its own interpreter-run tests in test_triton_route.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import groupnorm
from groupnorm import GroupNorm, group_norm, reference, use_route
from groupnorm.ops import routes
from groupnorm.testing import LAYOUTS, TOL, assert_close_to_ref, group_norm_ref, make_input

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ACTS = (None, "silu", "gelu", "relu")


def cpu_routes() -> list[str]:
    probe = torch.zeros(1, 1)
    return [r for r in routes.available_routes() if routes.ROUTES[r].supports(probe, None, None, "none") is None]


ROUTES = cpu_routes()

# (shape, G), each with the edge case it covers
CASES = [
    ((2, 8, 5, 5), 4),            # plain 2-D
    ((3, 6, 7), 1),               # G=1 (LayerNorm over (C, L)), 1-D
    ((2, 6, 4, 3), 6),            # G=C (InstanceNorm)
    ((2, 63, 3, 2), 21),          # odd C/G = 3
    ((1, 16, 1, 1), 4),           # N=1 and H*W=1: each group has C/G values only
    ((2, 8, 3, 4, 5), 2),         # 3-D (volumes)
    ((4, 12), 3),                 # no spatial dims
    ((2, 4, 1), 4),               # one value per group: var = 0, y = bias
]


def _case_id(c):
    return "x".join(map(str, c[0])) + f"-G{c[1]}"


def _params(C, dtype, affine=True, seed=1):
    if not affine:
        return None, None
    g = torch.Generator().manual_seed(seed)
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) and seed % 2 else dtype
    w = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + 1).to(pdt)
    b = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(pdt)
    return w, b


def _check(route, shape, G, dtype, layout, activation=None, residual=False, return_sum=False, affine=True,
           seed=0, scale=1.0, shift=0.0, tol_scale=1.0):
    """Forward and backward of one call against the float64 reference (autograd)."""
    gen = torch.Generator().manual_seed(seed)
    x = make_input(shape, dtype, layout, generator=gen, scale=scale, shift=shift).requires_grad_()
    r = make_input(shape, dtype, layout, generator=gen).requires_grad_() if residual else None
    w, b = _params(shape[1], dtype, affine, seed + 1)
    if w is not None:
        w.requires_grad_(), b.requires_grad_()
    with use_route(route):
        out = group_norm(x, G, w, b, 1e-5, activation=activation, residual=r, return_sum=return_sum)
    y, s = out if return_sum else (out, None)
    # output keeps dtype, shape and memory format
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)

    w64 = w.detach().double().requires_grad_() if w is not None else None
    b64 = b.detach().double().requires_grad_() if b is not None else None
    # the reference gets x (and the residual) in their own dtype: it rounds x + residual in that
    # dtype exactly as the op does, then works in float64
    x_ref = x.detach().clone().requires_grad_() if r is not None else x.detach().double().requires_grad_()
    r_ref = r.detach().clone().requires_grad_() if r is not None else None
    ref = group_norm_ref(x_ref, G, w64, b64, 1e-5, activation, r_ref)
    assert_close_to_ref(y, ref, dtype, "y", scale=tol_scale)
    if s is not None:
        assert s.dtype == dtype
        torch.testing.assert_close(s, x.detach() + r.detach(), atol=0, rtol=0)

    gen2 = torch.Generator().manual_seed(seed + 7)
    dy = torch.randn(shape, generator=gen2, dtype=torch.float64)
    ds = torch.randn(shape, generator=gen2, dtype=torch.float64) if s is not None else None
    loss = (y.double() * dy).sum() + ((s.double() * ds).sum() if s is not None else 0)
    loss.backward()
    # the op's incoming gradient is dy rounded to the dtype; so is the reference's
    dy_q = dy.to(dtype).double()
    ref_loss = (ref * dy_q).sum()
    ref_loss.backward()
    # dx is a difference of terms of size rstd*|dy*w| (tiny groups with near-equal values have
    # a large rstd and cancel), and the parameter gradients sum over the group: scale the
    # tolerance by the largest of those magnitudes
    with torch.no_grad():
        normalized = x_ref.detach() + r_ref.detach() if r_ref is not None else x_ref.detach()
        rstd = reference.forward(normalized.double(), None, None, None, G, 1e-5)[2]
        wmax = w.detach().abs().max().item() if w is not None and w.numel() else 1.0
        cond = rstd.max().item() * dy.abs().max().item() * wmax if rstd.numel() else 1.0

    def close(got, want, what):
        sc = tol_scale * (max(1.0, want.abs().max().item(), cond) if want.numel() else 1.0)
        assert_close_to_ref(got, want, dtype, what, scale=sc)

    gx_ref = x_ref.grad.double()
    if ds is not None:
        gx_ref = gx_ref + ds.to(dtype).double()
    close(x.grad, gx_ref, "dx")
    if r is not None:
        close(r.grad, gx_ref, "dresidual")
    if w is not None:
        assert w.grad.dtype == w.dtype
        close(w.grad, w64.grad, "dweight")
        close(b.grad, b64.grad, "dbias")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grid_against_float64_reference(route, case, dtype, layout):
    shape, G = case
    # cycle the epilogue over the grid so every case meets every epilogue on some dtype/layout
    i = (CASES.index(case) + DTYPES.index(dtype) + LAYOUTS.index(layout)) % 4
    _check(route, shape, G, dtype, layout, activation=ACTS[i], residual=i >= 2, return_sum=i == 3)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("residual,return_sum", [(False, False), (True, False), (True, True)])
def test_every_epilogue(route, dtype, activation, residual, return_sum):
    for layout in ("contiguous", "channels_last"):
        _check(route, (2, 12, 4, 5), 3, dtype, layout, activation, residual, return_sum)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_affine_and_half_with_fp32_params(route, dtype):
    _check(route, (2, 8, 3, 3), 2, dtype, "contiguous", affine=False)
    # seed 0 -> params in x's dtype, seed 1 -> fp32 params with a half x (see _params)
    _check(route, (2, 8, 3, 3), 2, dtype, "channels_last", seed=1)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_matches_torch_group_norm(route, layout, dtype):
    x = make_input((3, 32, 6, 7), dtype, layout).requires_grad_()
    w, b = _params(32, dtype)
    w.requires_grad_(), b.requires_grad_()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = group_norm(x, 8, w, b, route=route)
    y2 = F.group_norm(x2, 8, w2, b2)
    torch.testing.assert_close(y, y2, **TOL[dtype])
    g = torch.randn_like(y)
    y.backward(g), y2.backward(g)
    for a, e in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(a, e, atol=TOL[dtype]["atol"] * 10, rtol=TOL[dtype]["rtol"] * 10)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 3),
    groups=st.integers(1, 6),
    cpg=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    activation=st.sampled_from(ACTS),
    residual=st.booleans(),
    route=st.sampled_from(ROUTES),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(n, groups, cpg, spatial, dtype, layout, activation, residual, route, seed):
    _check(route, (n, groups * cpg, *spatial), groups, dtype, layout, activation, residual,
           return_sum=residual and seed % 2 == 0, seed=seed)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_fp64(route, activation):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(2, 6, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, r, w, b):
        y, s = group_norm(x, 3, w, b, activation=activation, residual=r, return_sum=True, route=route)
        return y, s

    assert torch.autograd.gradcheck(f, (x, r, w, b))
    # channels-last and no-affine variant
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: group_norm(x, 2, activation=activation, route=route), (xc,))


# Large-mean inputs: a naive E[x^2]-E[x]^2 loses every digit here; the two-pass method does not.
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype,shift", [(torch.float32, 1e3), (torch.bfloat16, 1e3), (torch.float16, 1e3),
                                         (torch.float32, 1e4)], ids=str)
def test_large_mean(route, dtype, shift):
    # Even an exact method rounds the fp32 mean: its error (ulp(shift)/2) shifts every x - mean.
    # So the fp32 tolerance grows with the condition number shift/std, to 4 ulps of the shift:
    # 4.8e-4 at 1e3 and 4.8e-3 at 1e4, while E[x^2]-E[x]^2 is off by ~6e-2 at 1e3 and NaN at 1e4.
    tol_scale = max(1.0, 4 * torch.finfo(torch.float32).eps * shift / TOL[dtype]["atol"])
    for layout in ("contiguous", "channels_last"):
        _check(route, (2, 16, 8, 8), 4, dtype, layout, shift=shift, tol_scale=tol_scale)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_bitwise_deterministic(route, dtype):
    outs = []
    for _ in range(3):
        x = make_input((4, 64, 9, 9), dtype, "channels_last").requires_grad_()
        r = make_input((4, 64, 9, 9), dtype, "contiguous", generator=torch.Generator().manual_seed(5))
        w, b = (t.requires_grad_() for t in _params(64, dtype))
        y, s = group_norm(x, 8, w, b, activation="silu", residual=r, return_sum=True, route=route)
        (y.float().square().sum() + s.float().sum()).backward()
        outs.append((y, s, x.grad, w.grad, b.grad))
    for later in outs[1:]:
        for a, e in zip(outs[0], later):
            assert torch.equal(a, e)


@pytest.mark.parametrize("route", ROUTES)
def test_layernorm_and_instancenorm_equivalence(route):
    x = make_input((3, 12, 5, 4), torch.float64, "contiguous")
    # G=1 is LayerNorm over (C, *) (with a per-channel affine in place of an elementwise one)
    torch.testing.assert_close(group_norm(x, 1, route=route), F.layer_norm(x, x.shape[1:]))
    # G=C is InstanceNorm
    torch.testing.assert_close(group_norm(x, 12, route=route), F.instance_norm(x))
    torch.testing.assert_close(group_norm(x, group_size=1, route=route), F.instance_norm(x))


@pytest.mark.parametrize("route", ROUTES)
def test_nan_inf_propagate_like_torch(route):
    x = make_input((2, 8, 4, 4), torch.float32, "contiguous")
    x[0, 0, 1, 1] = float("nan")
    x[1, 5, 0, 0] = float("inf")
    w, b = _params(8, torch.float32)
    ours, theirs = group_norm(x, 4, w, b, route=route), F.group_norm(x, 4, w, b)
    assert torch.equal(ours.isnan(), theirs.isnan())
    # groups untouched by the bad values are unaffected
    torch.testing.assert_close(ours[0, 2:], theirs[0, 2:])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 0, 3), (2, 8, 0), (0, 8)])
def test_empty(route, shape):
    x = torch.randn(shape, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    y = group_norm(x, 4, w, b, activation="silu", route=route)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    # an empty sum is zero (torch returns NaN for zero-size spatial dims; zero is the exact answer)
    assert torch.equal(w.grad, torch.zeros(8)) and torch.equal(b.grad, torch.zeros(8))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("eps", [0.0, -1e-9, -10.0])
def test_eps_edge_values_behave_as_torch(route, eps):
    x = make_input((2, 8, 3, 3), torch.float32, "contiguous")
    x[0, :2] = 1.0  # a constant group: var = 0, so eps <= 0 divides by zero or takes sqrt(< 0)
    torch.testing.assert_close(group_norm(x, 4, eps=eps, route=route), F.group_norm(x, 4, eps=eps),
                               equal_nan=True)


def test_opcheck():
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    r = torch.randn(2, 8, 3, 3, requires_grad=True)
    for args in [
        (x, w, b, None, 4, 1e-5, "none", "auto"),
        (x, w, b, r, 2, 1e-5, "silu", "auto"),
        (x, None, None, None, 8, 1e-5, "gelu", "reference"),
        (x.detach().to(memory_format=torch.channels_last).requires_grad_(), w, b, r, 4, 1e-5, "relu", "auto"),
    ]:
        torch.library.opcheck(torch.ops.groupnorm.fwd.default, args)
    with torch.no_grad():
        y, mean, rstd, s = torch.ops.groupnorm.fwd(x, w, b, r, 4, 1e-5, "silu", "auto")
    dy, ds = torch.randn_like(y, requires_grad=True), torch.randn_like(y, requires_grad=True)
    torch.library.opcheck(torch.ops.groupnorm.bwd.default,
                          (dy, ds, s.requires_grad_(), w, b, mean, rstd, 4, 1e-5, "silu", "auto"))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.norm = GroupNorm(4, 16, activation="silu")
        self.norm2 = GroupNorm(None, 16, group_size=8)

    def forward(self, x):
        h = self.conv(x)
        y, s = self.norm(h, residual=h * 0.5, return_sum=True)
        return self.norm2(y + s)


def test_torch_compile_fullgraph_no_graph_break():
    torch.manual_seed(0)
    m = _Block()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    cm = torch.compile(m, fullgraph=True)  # fullgraph=True raises on any graph break
    y = cm(x)
    y.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_eager = m(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-4)
    explain = torch._dynamo.explain(m)(x)
    assert explain.graph_break_count == 0


def test_autocast_keeps_half_with_fp32_math():
    """Under autocast a half input stays half (math and statistics in fp32 inside); an fp32
    input stays fp32. torch's CUDA autocast instead lists group_norm as an fp32 op (its output
    is fp32); on CPU torch also keeps bf16. See README "Autocast"."""
    conv = torch.nn.Conv2d(4, 8, 1)
    m = GroupNorm(2, 8)
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = m(h)
        assert y.dtype == torch.bfloat16
        assert m(h.float()).dtype == torch.float32
    ref = group_norm_ref(h.detach(), 2, m.weight.detach(), m.bias.detach())
    assert_close_to_ref(y, ref, torch.bfloat16)


def test_route_selection_and_forcing():
    assert "reference" in groupnorm.available_routes()
    x = torch.randn(2, 4, 3)
    with use_route("reference"):
        assert routes.current_route() == "reference"
        y = group_norm(x, 2)
    assert routes.current_route() == "auto"
    torch.testing.assert_close(y, F.group_norm(x, 2))
    with pytest.raises(ValueError, match="unknown route 'nope'.*available"):
        with use_route("nope"):
            pass
    with pytest.raises(ValueError, match="unknown route 'nope'"):
        group_norm(x, 2, route="nope")
    if "triton" in routes.ROUTES and routes.ROUTES["triton"].supports(x, None, None, "none") is not None:
        # forcing a route that cannot take the call says why
        with pytest.raises(RuntimeError, match="route 'triton' cannot run this call"):
            group_norm(x, 2, route="triton")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("activation", ACTS)
def test_double_backward_gradgradcheck(activation, route):
    # on the cpu route the backward is a C++ autograd node, whose own backward (create_graph)
    # goes through the Python op groupnorm::bwd and its reference double backward
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    f = lambda x, r, w, b: group_norm(x, 2, w, b, activation=activation, residual=r, return_sum=True,  # noqa: E731
                                      route=route)
    assert torch.autograd.gradgradcheck(f, (x, r, w, b))


# ---- module ---------------------------------------------------------------------------------

def test_state_dict_round_trip_with_torch():
    t = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        t.weight.normal_(), t.bias.normal_()
    ours = GroupNorm(4, 16)
    ours.load_state_dict(t.state_dict())  # strict: same names and shapes
    x = torch.randn(3, 16, 5, 5)
    torch.testing.assert_close(ours(x), t(x))
    back = torch.nn.GroupNorm(4, 16)
    back.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == t.state_dict().keys()
    torch.testing.assert_close(back(x), t(x))
    # bias=False (torch >= 2.5) and affine=False keep torch's parameter set
    for kw in ({"bias": False}, {"affine": False}):
        assert GroupNorm(4, 16, **kw).state_dict().keys() == torch.nn.GroupNorm(4, 16, **kw).state_dict().keys()
        assert repr(GroupNorm(4, 16, **kw)) == repr(torch.nn.GroupNorm(4, 16, **kw))


def test_module_repr_reset_and_group_size():
    m = GroupNorm(4, 16, eps=1e-6, activation="silu")
    assert repr(m) == "GroupNorm(4, 16, eps=1e-06, affine=True, bias=True, activation='silu')", repr(m)
    assert repr(GroupNorm(4, 16)) == repr(torch.nn.GroupNorm(4, 16))
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(16)) and torch.equal(m.bias, torch.zeros(16))
    assert GroupNorm(None, 16, group_size=4).num_groups == 4
    m16 = GroupNorm(2, 8, dtype=torch.bfloat16)
    assert m16.weight.dtype == torch.bfloat16
    assert m16(torch.randn(2, 8, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- the error catalogue --------------------------------------------------------------------

X = torch.randn(2, 6, 4, 4)


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        # C % G != 0 lists the valid G
        (lambda: group_norm(X, 4), ValueError, r"num_channels=6 is not divisible by num_groups=4.*\[1, 2, 3, 6\]"),
        (lambda: group_norm(X, 0), ValueError, r"num_groups must be positive, got num_groups=0"),
        (lambda: group_norm(X, -2), ValueError, r"num_groups must be positive"),
        (lambda: group_norm(X, 2, group_size=3), ValueError, r"exactly one of num_groups and group_size"),
        (lambda: group_norm(X), ValueError, r"exactly one of num_groups and group_size"),
        (lambda: group_norm(X, group_size=4), ValueError, r"not divisible by group_size=4.*\[1, 2, 3, 6\]"),
        (lambda: group_norm(X, 2.0), TypeError, r"num_groups must be an int"),
        (lambda: group_norm(torch.randn(6), 2), ValueError, r"at least 2 dims, got shape \(6,\)"),
        (lambda: group_norm(X, 2, torch.ones(5)), ValueError, r"weight must have shape \(C,\) = \(6,\), got \(5,\)"),
        (lambda: group_norm(X, 2, None, torch.ones(6, 1)), ValueError, r"bias must have shape"),
        (lambda: group_norm(X, 2, torch.ones(6, dtype=torch.float64)), TypeError, r"weight dtype torch.float64 does not match"),
        (lambda: group_norm(X.half(), 2, torch.ones(6, dtype=torch.bfloat16)), TypeError, r"allowed: torch.float16, torch.float32"),
        (lambda: group_norm(X, 2, torch.ones(6, device="meta")), ValueError, r"weight is on meta but x is on cpu"),
        (lambda: group_norm(X.long(), 2), TypeError, r"got torch.int64"),
        (lambda: group_norm(X > 0, 2), TypeError, r"got torch.bool"),
        (lambda: group_norm(X, 2, residual=torch.randn(2, 6, 4)), ValueError, r"residual shape \(2, 6, 4\) must equal x shape \(2, 6, 4, 4\)"),
        (lambda: group_norm(X, 2, residual=X.double()), TypeError, r"residual dtype torch.float64 must equal"),
        (lambda: group_norm(X, 2, activation="tanh"), ValueError, r"unknown activation='tanh'"),
        (lambda: group_norm(X, 2, return_sum=True), ValueError, r"return_sum=True needs a residual"),
        (lambda: GroupNorm(4, 6), ValueError, r"num_channels=6 is not divisible by num_groups=4"),
        (lambda: GroupNorm(2, 6, activation="swishy"), ValueError, r"unknown activation"),
        # sparse input: a clear message instead of an error from deep inside a kernel
        (lambda: group_norm(torch.randn(2, 6, 3).to_sparse(), 2), TypeError, r"dense \(strided\) tensor, got layout torch.sparse_coo; use x.to_dense\(\)"),
        (lambda: GroupNorm(2, 6)(torch.randn(2, 4, 3)), ValueError, r"GroupNorm\(2, 6\) expects 6 channels \(dim 1\), got input of shape \(2, 4, 3\)"),
    ],
)
def test_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_every_route_is_tested_here():
    # the grid above runs every registered route that takes CPU tensors
    assert "reference" in ROUTES
    assert ROUTES == cpu_routes()


@pytest.mark.parametrize("route", ROUTES)
def test_output_is_not_a_view_inplace_ops_work(route):
    # nn.ReLU(inplace=True) after the norm is common; a view output would make autograd refuse it
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    y = group_norm(x, 4, route=route)
    assert y._base is None
    torch.relu_(y).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.relu(F.group_norm(x2, 4)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("route", ROUTES)
def test_eager_twin_matches_custom_op_bitwise(route):
    # plain eager calls run the route behind an autograd.Function (no torch.library dispatch),
    # or, on a route that has one (cpu), behind its native C++ autograd node; anything that
    # traces runs the custom op: all must give the very same bits
    from groupnorm.ops import group_norm as op

    assert op._eager(torch.zeros(1))
    x = torch.randn(2, 4, 3, requires_grad=True)
    node = op.group_norm_op(x, None, None, None, 2, 1e-5, "none", route)[0].grad_fn.name()
    assert ("GNFunction" in node) == (routes.ROUTES[route].forward_autograd is not None), node
    results = []
    for call in (op._EagerFn.apply, op.fwd, op.group_norm_op):
        x = make_input((2, 8, 5, 5), torch.float32, "channels_last").requires_grad_()
        r = make_input((2, 8, 5, 5), torch.float32, "contiguous", generator=torch.Generator().manual_seed(2))
        w, b = (t.requires_grad_() for t in _params(8, torch.float32))
        y, _, _, s = call(x, w, b, r, 4, 1e-5, "gelu", route)
        (y.square().sum() + s.sum()).backward()
        results.append((y, s, x.grad, w.grad, b.grad))
    for first, *others in zip(*results):
        assert all(torch.equal(first, o) for o in others)


@pytest.mark.filterwarnings("error:There is a performance drop")  # the vmap rules must be used
@pytest.mark.parametrize("route", ROUTES)
def test_torch_func_transforms(route):
    # torch.func.grad / jacrev / vmap work and agree with autograd (torch.library's generated
    # autograd does not support them: the eager autograd.Functions carry these calls)
    g = torch.Generator().manual_seed(3)
    x = make_input((2, 6, 4), torch.float64, generator=g)
    w, b = _params(6, torch.float64)

    def f(t, w):
        return group_norm(t, 3, w, b, activation="silu", route=route)

    gx, gw = torch.func.grad(lambda t, w: f(t, w).square().sum(), argnums=(0, 1))(x, w)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ex, ew = torch.autograd.grad(f(xr, wr).square().sum(), [xr, wr])
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)
    xs = x[:1, :, :2]
    jac = torch.func.jacrev(lambda t: f(t, w))(xs)
    ref = torch.autograd.functional.jacobian(lambda t: f(t, w), xs)
    torch.testing.assert_close(jac, ref)
    xb = make_input((3, 2, 6, 4), torch.float64, generator=g)
    torch.testing.assert_close(torch.func.vmap(lambda t: f(t, w))(xb), torch.stack([f(t, w) for t in xb]))
    # per-sample gradients (differentially private training): vmap over grad, for the input
    # and for the shared weight (a (B, C) result: each sample's own dW)
    loss = lambda t, w: f(t, w).square().sum()  # noqa: E731
    for argnums in (0, 1):
        ps = torch.func.vmap(torch.func.grad(loss, argnums=argnums), in_dims=(0, None))(xb, w)
        torch.testing.assert_close(ps, torch.stack([torch.func.grad(loss, argnums=argnums)(t, w) for t in xb]))
    # batched weights (the per-sample loop of the vmap rule) and a batched residual with its sum
    wb = torch.randn(3, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(f)(xb, wb), torch.stack([f(t, u) for t, u in zip(xb, wb)]))
    rb = torch.randn(xb.shape, generator=g, dtype=torch.float64)
    fr = lambda t, r: group_norm(t, 3, w, residual=r, return_sum=True, route=route)  # noqa: E731
    got = torch.func.vmap(fr)(xb, rb)
    for k in range(2):
        torch.testing.assert_close(got[k], torch.stack([fr(t, r)[k] for t, r in zip(xb, rb)]))
    # (N, C) input: no spatial dims
    x2 = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    f2 = lambda t, w: group_norm(t, 3, w, b, route=route).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f2, argnums=1), in_dims=(0, None))(x2, w),
                               torch.stack([torch.func.grad(f2, argnums=1)(t, w) for t in x2]))
    # forward mode: torch.func.jvp / jacfwd against F.group_norm + F.silu
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    _, t = torch.func.jvp(lambda t: f(t, w), (x,), (v,))
    _, t_ref = torch.func.jvp(lambda t: F.silu(F.group_norm(t, 3, w, b)), (x,), (v,))
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(torch.func.jacfwd(lambda t: f(t, w))(xs), ref)


@pytest.mark.parametrize("route", ROUTES)
def test_forward_mode_ad_gradcheck(route):
    # torch.autograd.forward_ad (dual tensors), with every input differentiable, the residual
    # and the returned sum; a dual input that does not require grad must not take the
    # inference shortcut (it would drop the tangent)
    g = torch.Generator().manual_seed(4)
    x, r = (make_input((2, 6, 3), torch.float64, generator=g).requires_grad_() for _ in range(2))
    w, b = (t.requires_grad_() for t in _params(6, torch.float64))
    fn = lambda x, w, b, r: group_norm(x, 3, w, b, activation="gelu", residual=r, return_sum=True, route=route)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, r), check_forward_ad=True, check_backward_ad=False)
    import torch.autograd.forward_ad as fwAD
    tan = torch.randn(x.shape, generator=g, dtype=torch.float64)
    _, t_ref = torch.func.jvp(lambda t: F.group_norm(t, 3), (x.detach(),), (tan,))
    with fwAD.dual_level():
        y = group_norm(fwAD.make_dual(x.detach(), tan), 3, route=route)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, t_ref)


def test_broken_triton_disables_only_its_route_with_a_warning(monkeypatch):
    # an installed Triton that does not match torch raises something other than
    # ModuleNotFoundError on import: the other routes must keep working, and the user is told
    real_import = routes.importlib.import_module

    def fake_import(name, *args):
        if name.endswith("triton_gn"):
            raise ImportError("cannot import name 'x' from 'triton' (incompatible release)")
        return real_import(name, *args)

    monkeypatch.setattr(routes.importlib, "import_module", fake_import)
    monkeypatch.setattr(routes, "_loaded", False)
    monkeypatch.setattr(routes, "ROUTES", {k: v for k, v in routes.ROUTES.items() if k != "triton"})
    with pytest.warns(UserWarning, match="Triton route is disabled.*incompatible release"):
        names = routes.available_routes()
    assert "triton" not in names and "reference" in names
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(group_norm(x, 2), F.group_norm(x, 2))


def test_route_registry_changes_are_seen():
    # _by_priority keeps its sorted list while ROUTES holds the same Route objects: a route
    # added, replaced or deleted afterwards must still be seen by "auto" and available_routes
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    calls = []

    def fwd(x, weight, bias, residual, num_groups, eps, activation):
        calls.append(x.shape)
        return routes.ROUTES["reference"].forward(x, weight, bias, residual, num_groups, eps, activation)

    before = routes.available_routes()
    try:
        routes.register_route("probe", fwd, routes.ROUTES["reference"].backward,
                              lambda x, weight, residual, activation: None, priority=10**6)
        assert routes.available_routes()[0] == "probe"
        with torch.no_grad():
            group_norm(x, 2)
        assert calls == [x.shape]
        # replaced by a route that declines every call: "auto" falls through to the others
        routes.register_route("probe", fwd, routes.ROUTES["reference"].backward,
                              lambda x, weight, residual, activation: "never", priority=10**6)
        with torch.no_grad():
            group_norm(x, 2)
        assert calls == [x.shape]
    finally:
        routes.ROUTES.pop("probe", None)
    assert routes.available_routes() == before
