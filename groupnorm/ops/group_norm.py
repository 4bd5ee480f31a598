"""The GroupNorm op as two ``torch.library`` custom ops with autograd and fake kernels.

``groupnorm::fwd`` and ``groupnorm::bwd`` are opaque to Dynamo/AOTAutograd (no graph
break under ``torch.compile(fullgraph=True)``), have fake implementations for tracing and
export, and dispatch at run time to a route (see :mod:`groupnorm.ops.routes`).

Custom ops cannot return ``None``, so "absent" outputs are returned as empty tensors of
shape (0,) and turned back into ``None`` here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import reference
from . import routes

Tensor = torch.Tensor


def _none_if_empty(t: Tensor) -> Optional[Tensor]:
    return None if t.dim() == 1 and t.numel() == 0 else t


@torch.library.custom_op("groupnorm::fwd", mutates_args=())
def fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    num_groups: int,
    eps: float,
    activation: str,
    route: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, mean, rstd, sum)``; ``sum`` is empty (0,) without a residual."""
    return _fwd_impl(x, weight, bias, residual, num_groups, eps, activation, route)


def _fwd_impl(x, weight, bias, residual, num_groups, eps, activation, route):
    r = routes.select(route, x, weight, residual, activation)
    y, mean, rstd, s = r.forward(x, weight, bias, residual, num_groups, eps, activation)
    return y, mean, rstd, (s if s is not None else x.new_empty(0))


@fwd.register_fake
def _fwd_fake(x, weight, bias, residual, num_groups, eps, activation, route):
    fmt = reference.memory_format_of(x)
    acc = reference.acc_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=fmt)
    mean = x.new_empty((x.shape[0], num_groups), dtype=acc)
    rstd = x.new_empty((x.shape[0], num_groups), dtype=acc)
    s = torch.empty_like(x, memory_format=fmt) if residual is not None else x.new_empty(0)
    return y, mean, rstd, s


@torch.library.custom_op("groupnorm::bwd", mutates_args=())
def bwd(
    dy: Tensor,
    dsum: Optional[Tensor],
    xs: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    eps: float,
    activation: str,
    route: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias)``; dweight/dbias are empty (0,) without weight/bias."""
    return _bwd_impl(dy, dsum, xs, weight, bias, mean, rstd, num_groups, eps, activation, route)


def _bwd_impl(dy, dsum, xs, weight, bias, mean, rstd, num_groups, eps, activation, route):
    r = routes.select(route, xs, weight, None, activation)
    dx, dw, db = r.backward(dy, dsum, xs, weight, bias, mean, rstd, num_groups, activation)
    # two distinct empties: outputs of a custom op must not alias each other
    return dx, (dw if dw is not None else xs.new_empty(0)), (db if db is not None else xs.new_empty(0))


@bwd.register_fake
def _bwd_fake(dy, dsum, xs, weight, bias, mean, rstd, num_groups, eps, activation, route):
    dx = torch.empty_like(xs, memory_format=reference.memory_format_of(xs))
    dw = torch.empty_like(weight) if weight is not None else xs.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else xs.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, num_groups, eps, activation, route = inputs
    y, mean, rstd, s = output
    ctx.has_residual = residual is not None
    # unused outputs (often the returned sum) get None, not a zero tensor to allocate and read
    ctx.set_materialize_grads(False)
    ctx.num_groups, ctx.eps, ctx.activation, ctx.route = num_groups, eps, activation, route
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s if ctx.has_residual else x, weight, bias, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd, ds, bwd_fn=None):
    xs, weight, bias, mean, rstd = ctx.saved_tensors
    bwd_fn = bwd_fn or bwd
    if dy is None:  # only the returned sum was used downstream
        dy = torch.zeros_like(xs)
    dsum = ds if ctx.has_residual and ds is not None and ds.numel() == xs.numel() else None
    dx, dw, db = bwd_fn(dy, dsum, xs, weight, bias, mean, rstd, ctx.num_groups, ctx.eps, ctx.activation,
                        ctx.route)
    dres = dx if ctx.has_residual else None
    return dx, _none_if_empty(dw), _none_if_empty(db), dres, None, None, None, None


fwd.register_autograd(_backward, setup_context=_setup_context)


def _bwd_setup(ctx, inputs, output):
    dy, dsum, xs, weight, bias, mean, rstd, num_groups, eps, activation, route = inputs
    ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation
    ctx.save_for_backward(dy, dsum, xs, weight, bias)


def _bwd_backward(ctx, gdx, gdw, gdb):
    """Double backward: differentiate the reference backward, with mean and rstd recomputed
    from xs so that their dependence on xs is included (they enter bwd as plain inputs)."""
    saved = ctx.saved_tensors
    leaves = [t.detach().requires_grad_() if t is not None else None for t in saved]
    dy, dsum, xs, weight, bias = leaves
    with torch.enable_grad():
        _, mean, rstd, _ = reference.forward(xs, weight, bias, None, ctx.num_groups, ctx.eps, "none")
        outs = reference.backward(dy, dsum, xs, weight, bias, mean, rstd, ctx.num_groups, ctx.activation)
        pairs = [(o, g) for o, g in zip(outs, (gdx, gdw, gdb))
                 if o is not None and g is not None and g.numel() == o.numel()]
        inputs = [t for t in leaves if t is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                    allow_unused=True, create_graph=torch.is_grad_enabled())
    it = iter(grads)
    gdy, gdsum, gxs, gw, gb = (next(it) if t is not None else None for t in leaves)
    return gdy, gdsum, gxs, gw, gb, None, None, None, None, None, None


bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def _fwd_jvp(ctx, tx, tw, tb, tr, *_):
    """Forward-mode AD (jvp) of the op, from the reference forward (mean and rstd recomputed;
    extra work only under forward AD). The statistics get no tangent.

    Under torch.func.jvp the reference is differentiated with a nested torch.func.jvp. Under
    torch.autograd.forward_ad, dual levels cannot nest, so the double-vjp identity
    J v = d/du <J^T u, v> is used (reverse mode, two reference backward passes)."""
    saved = ctx.saved_tensors
    present = [t for t in saved if t is not None]
    tans = tuple(dt if dt is not None else torch.zeros_like(t)
                 for t, dt in zip(saved, (tx, tw, tb, tr)) if t is not None)

    def f(*ts):
        it = iter(ts)
        x, weight, bias, residual = (next(it) if t is not None else None for t in saved)
        y, _, _, s = reference.forward(x, weight, bias, residual, ctx.num_groups, ctx.eps, ctx.activation)
        return (y,) if s is None else (y, s)

    if _functorch():
        _, jv = torch.func.jvp(f, tuple(present), tans)
    else:
        prim = [t.detach().requires_grad_() for t in present]
        with torch.enable_grad():
            outs = f(*prim)
            us = [torch.zeros_like(o, requires_grad=True) for o in outs]
            jt_u = torch.autograd.grad(outs, prim, us, create_graph=True, allow_unused=True)
            pairs = [(g, v) for g, v in zip(jt_u, tans) if g is not None]
            jv = torch.autograd.grad([g for g, _ in pairs], us, [v for _, v in pairs], allow_unused=True)
        jv = [(t if t is not None else torch.zeros_like(o)).detach() for t, o in zip(jv, outs)]
    # without a residual the sum output is an empty placeholder tensor: its tangent is empty too
    return jv[0], None, None, (jv[1] if len(jv) > 1 else saved[0].new_zeros(0))


# ---- eager path ------------------------------------------------------------------------------
# The torch.library machinery (schema checks, Python dispatch, generated autograd node) costs
# ~35 us per call on CPU: more than the kernel itself for small tensors. In eager mode the
# same route functions run behind these two autograd.Functions instead; everything that traces
# (torch.compile, export/ONNX, jit.trace, fake/dispatch modes) still sees the custom op.
# They are also what runs under torch.func transforms (grad, vjp, jacrev, vmap): the autograd
# that torch.library generates for a custom op does not support them (pytorch/pytorch#168393,
# #179652), an autograd.Function written with setup_context does.


class _EagerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):  # (x, weight, bias, residual, num_groups, eps, activation, route)
        out = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, out)
        if _forward_ad._current_level >= 0:  # only under forward AD: it costs ~8 us per call
            ctx.save_for_forward(*inputs[:4])
        return out

    jvp = staticmethod(_fwd_jvp)

    @staticmethod
    def backward(ctx, dy, dmean, drstd, ds):
        # differentiable (create_graph, or a torch.func transform above): through the backward
        # Function, which has the double backward
        return _backward(ctx, dy, dmean, drstd, ds, bwd_fn=_bwd_fn() if torch.is_grad_enabled() else _bwd_impl)


class _EagerBwd(torch.autograd.Function):
    """The op's backward as a differentiable function (the eager twin of ``groupnorm::bwd``)."""

    @staticmethod
    def forward(ctx, *inputs):  # (dy, dsum, xs, weight, bias, mean, rstd, num_groups, eps, activation, route)
        out = _bwd_impl(*inputs)
        _bwd_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, gdx, gdw, gdb):
        return _bwd_backward(ctx, gdx, gdw, gdb)


# ---- vmap rules ------------------------------------------------------------------------------
# GroupNorm is per sample, so a vmapped call is one call on the batch folded into N:
# (B, N, C, *) -> (B*N, C, *). The per-sample dW/dB of the backward (what vmap(grad(...))
# computes: per-sample gradients) are sums over each sample's own N and positions, taken
# from the reference's dz and xhat. Batched weight/bias: one call per sample.


def _to_front(t, d, B):
    """t with its vmap dim first (an unbatched t is expanded to B copies), then (B*N, ...)."""
    if t is None:
        return None
    t = t.movedim(d, 0) if d is not None else t.expand(B, *t.shape)
    return t.flatten(0, 1)


def _vmap_loop(fn, info, in_dims, args, n_out):
    """One call per sample (vmap's fallback, for batched parameters); outputs stacked on 0."""
    outs = []
    for i in range(info.batch_size):
        outs.append(fn(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims))))
    return tuple(torch.stack([o[k] for o in outs]) for k in range(n_out)), (0,) * n_out


def _fwd_vmap(info, in_dims, x, weight, bias, residual, num_groups, eps, activation, route):
    bx, bw, bb, br = in_dims[:4]
    args = (x, weight, bias, residual, num_groups, eps, activation, route)
    if bw is not None or bb is not None or bx is None:
        return _vmap_loop(_FuncFn.apply, info, in_dims, args, 4)
    B = info.batch_size
    xf = _to_front(x, bx, B)
    y, mean, rstd, s = _FuncFn.apply(xf, weight, bias,
                                     _to_front(residual, br, B) if residual is not None else None,
                                     num_groups, eps, activation, route)
    N = xf.shape[0] // B  # explicit (not -1): N may be 0
    unfold = lambda t: t.unflatten(0, (B, N))  # noqa: E731
    if residual is None:  # the sum is an empty placeholder, not batched
        return (unfold(y), unfold(mean), unfold(rstd), s), (0, 0, 0, None)
    return (unfold(y), unfold(mean), unfold(rstd), unfold(s)), (0, 0, 0, 0)


def _bwd_vmap(info, in_dims, dy, dsum, xs, weight, bias, mean, rstd, num_groups, eps, activation, route):
    bdy, bds, bxs, bw, bb, bm, br = in_dims[:7]
    args = (dy, dsum, xs, weight, bias, mean, rstd, num_groups, eps, activation, route)
    if bw is not None or bb is not None:
        return _vmap_loop(_FuncBwd.apply, info, in_dims, args, 3)
    B = info.batch_size
    dyf, xsf, mf, rf = (_to_front(t, d, B) for t, d in ((dy, bdy), (xs, bxs), (mean, bm), (rstd, br)))
    dsf = _to_front(dsum, bds, B) if dsum is not None else None
    dx, dw, db = _FuncBwd.apply(dyf, dsf, xsf, weight, bias, mf, rf, num_groups, eps, activation, route)
    N, C, S = xsf.shape[0] // B, xsf.shape[1], math.prod(xsf.shape[2:])
    dx = dx.unflatten(0, (B, N))
    if weight is None and bias is None:
        return (dx, dw, db), (0, None, None)
    # per-sample parameter gradients: sums over each sample's N and positions
    dz, xhat, _ = reference.dz_xhat(dyf, xsf, weight, bias, mf, rf, activation)
    per_sample = lambda t: t.reshape(B, N, C, S).sum(dim=(1, 3))  # noqa: E731
    dw = per_sample(dz * xhat).to(weight.dtype) if weight is not None else dw
    db = per_sample(dz).to(bias.dtype) if bias is not None else db
    return (dx, dw, db), (0, 0 if weight is not None else None, 0 if bias is not None else None)


# The same two under torch.func transforms, which require the setup_context form. That form
# costs an inspect.signature bind per call (~20 us), so plain eager calls use the ones above.
class _FuncFn(torch.autograd.Function):

    @staticmethod
    def forward(x, weight, bias, residual, num_groups, eps, activation, route):
        return _fwd_impl(x, weight, bias, residual, num_groups, eps, activation, route)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    backward = _EagerFn.backward
    jvp = staticmethod(_fwd_jvp)
    vmap = staticmethod(_fwd_vmap)


class _FuncBwd(torch.autograd.Function):

    @staticmethod
    def forward(dy, dsum, xs, weight, bias, mean, rstd, num_groups, eps, activation, route):
        return _bwd_impl(dy, dsum, xs, weight, bias, mean, rstd, num_groups, eps, activation, route)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _bwd_setup(ctx, inputs, output)

    backward = _EagerBwd.backward
    vmap = staticmethod(_bwd_vmap)


def _functorch() -> bool:
    return torch._C._are_functorch_transforms_active()


def _bwd_fn():
    return _FuncBwd.apply if _functorch() else _EagerBwd.apply


def _any_requires_grad(*ts) -> bool:
    return any(t is not None and t.requires_grad for t in ts)


def _eager(x: Tensor) -> bool:
    """True when nothing traces the call (torch.func transforms may be active)."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def group_norm_op(x, weight, bias, residual, num_groups, eps, activation, route):
    """``groupnorm::fwd`` with autograd: the custom op when something traces; in plain eager
    mode no autograd node (inference), the route's native node (cpu: a C++ autograd
    Function), or the Python twin ``_EagerFn`` (``_FuncFn`` under torch.func)."""
    if _eager(x):
        if not (torch.is_grad_enabled() and _any_requires_grad(x, weight, bias, residual)) and \
                _forward_ad._current_level < 0:
            # nothing to differentiate (inference): no autograd node at all (~10 us less), and
            # the route's own outputs (the sum is None without a residual: no empty tensor)
            r = routes.select(route, x, weight, residual, activation)
            return r.forward(x, weight, bias, residual, num_groups, eps, activation)
        if _functorch():
            return _FuncFn.apply(x, weight, bias, residual, num_groups, eps, activation, route)
        if _forward_ad._current_level < 0:
            # plain eager training: a route's native autograd node, when it has one (the cpu
            # route: ~40-50 us less per forward+backward than this Python Function)
            r = routes.select(route, x, weight, residual, activation)
            out = r.forward_autograd(x, weight, bias, residual, num_groups, eps, activation) \
                if r.forward_autograd is not None else None
            if out is not None:
                return out
            route = r.name  # chosen once: the Function's forward and backward need not choose again
        return _EagerFn.apply(x, weight, bias, residual, num_groups, eps, activation, route)
    return fwd(x, weight, bias, residual, num_groups, eps, activation, route)
