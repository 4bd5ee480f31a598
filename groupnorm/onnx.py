r"""ONNX export of models that use ``groupnorm``.

The op is the ``torch.library`` custom op ``groupnorm::fwd``, which no exporter knows by
itself. This module provides the ONNX translations for torch's default (``dynamo=True``)
exporter, which needs the ``onnxscript`` package:

* **opset >= 21**: one standard ``GroupNormalization`` node (ai.onnx opset 21 takes
  per-channel scale/bias, like PyTorch; ``stash_type=1``: statistics in fp32), followed by
  the fused activation (``Sigmoid``/``Mul`` for SiLU, ``Gelu`` for exact GELU, ``Relu``).
* **opset 18-20**: opset 18's ``GroupNormalization`` took *per-group* scale and bias, so it
  cannot express PyTorch's per-channel affine; the op is decomposed instead:
  ``Reshape(N, G, -1) -> ReduceMean -> Sub -> Mul -> ReduceMean -> Add(eps) -> Sqrt ->
  Reciprocal -> Mul -> Reshape(shape of x) -> Mul(weight) -> Add(bias)``, then the
  activation (GELU: the ``Gelu`` op from opset 20, before that ``0.5 * x * (1 + Erf(x /
  sqrt 2))``).
* **opset < 18**: :class:`UnsupportedOpsetError` (the decomposition uses opset 18's
  ``ReduceMean`` with axes as an input, and the standard node needs 21).

In both, a fused residual becomes an ``Add`` before the normalization (its result is also
the op's ``sum`` output), half-precision inputs are normalized in fp32 and cast back, and
batch and spatial sizes may be dynamic (only the group count G is baked into the graph).

Example::

    >>> import groupnorm.onnx
    >>> groupnorm.onnx.export(model, (x,), "model.onnx", opset=21,
    ...                       dynamic_shapes=({0: "batch", 2: "height", 3: "width"},))

``torch.jit.trace`` needs nothing from here: the custom op is recorded as a call to
``groupnorm::fwd`` and the traced module runs (and saves/loads) in any process that has
imported ``groupnorm``. The legacy TorchScript exporter (``dynamo=False``) is supported
through :func:`register_torchscript_symbolic` (called by :func:`export` when needed).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

MIN_OPSET = 18
#: First ai.onnx opset whose ``GroupNormalization`` has per-channel scale/bias.
GROUPNORM_NODE_OPSET = 21
DEFAULT_OPSET = 21


class UnsupportedOpsetError(ValueError):
    """The requested ONNX opset cannot express ``groupnorm`` (it needs opset >= 18)."""


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"groupnorm.onnx: opset must be an int, got {type(opset).__name__} {opset!r}")
    if opset < MIN_OPSET:
        raise UnsupportedOpsetError(
            f"groupnorm.onnx: opset {opset} is not supported; GroupNorm exports to opset >= {MIN_OPSET} "
            f"(opset {GROUPNORM_NODE_OPSET}+ emits the standard GroupNormalization node, opset "
            f"{MIN_OPSET}-{GROUPNORM_NODE_OPSET - 1} a ReduceMean decomposition). Use opset={DEFAULT_OPSET} "
            "unless your runtime needs an older one."
        )
    return opset


def _require_onnxscript():
    try:
        import onnxscript  # noqa: F401
        from onnxscript import ir  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "groupnorm.onnx: ONNX export with torch's default (dynamo) exporter needs the "
            "'onnxscript' and 'onnx' packages: pip install 'groupnorm[onnx]' "
            "(or pip install onnx onnxscript onnxruntime)"
        ) from e


# --------------------------------------------------------------------------------------
# onnxscript translations (dynamo exporter)
# --------------------------------------------------------------------------------------

def _make_translation(opset: int) -> Callable:
    """Build the trace-only onnxscript function translating ``groupnorm::fwd`` at ``opset``."""
    _require_onnxscript()
    import onnxscript
    from onnxscript import ir

    op = onnxscript.values.Opset("", opset)
    use_node = opset >= GROUPNORM_NODE_OPSET
    half = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

    def _const(value: float, dtype):
        return op.Constant(value=ir.tensor(value, dtype=dtype))

    def _activation(y, activation: str, dtype):
        if activation == "none":
            return y
        if activation == "silu":
            return op.Mul(y, op.Sigmoid(y))
        if activation == "relu":
            return op.Relu(y)
        if activation == "gelu":
            if opset >= 20:  # Gelu became an ai.onnx op in opset 20; approximate="none" = erf form
                return op.Gelu(y, approximate="none")
            inner = op.Erf(op.Div(y, _const(1.4142135623730951, dtype)))
            return op.Mul(op.Mul(y, _const(0.5, dtype)), op.Add(inner, _const(1.0, dtype)))
        raise ValueError(f"groupnorm.onnx: unknown activation {activation!r}")

    def groupnorm_fwd(
        x: onnxscript.onnx_types.TensorType,
        weight: Optional[onnxscript.onnx_types.TensorType] = None,
        bias: Optional[onnxscript.onnx_types.TensorType] = None,
        residual: Optional[onnxscript.onnx_types.TensorType] = None,
        num_groups: int = 1,
        eps: float = 1e-5,
        activation: str = "none",
        route: str = "auto",
    ):
        rank = len(x.shape)
        in_dtype = x.dtype
        s = op.Add(x, residual) if residual is not None else x  # rounded to x's dtype, as in the op
        # statistics and affine in fp32 for half inputs (the op's accumulation dtype)
        acc = ir.DataType.FLOAT if in_dtype in half else in_dtype
        h = op.Cast(s, to=acc) if acc != in_dtype else s
        C = op.Shape(x, start=1, end=2)
        w = op.Cast(weight, to=acc) if weight is not None else None
        b = op.Cast(bias, to=acc) if bias is not None else None

        grouped = op.Reshape(h, op.Constant(value_ints=[0, num_groups, -1]))
        axes = op.Constant(value_ints=[2])
        mean = op.ReduceMean(grouped, axes, keepdims=1)
        diff = op.Sub(grouped, mean)
        var = op.ReduceMean(op.Mul(diff, diff), axes, keepdims=1)
        rstd = op.Reciprocal(op.Sqrt(op.Add(var, _const(eps, acc))))

        if use_node:
            scale = w if w is not None else op.Expand(_const(1.0, acc), C)
            shift = b if b is not None else op.Expand(_const(0.0, acc), C)
            y = op.GroupNormalization(h, scale, shift, epsilon=eps, num_groups=num_groups, stash_type=1)
        else:
            y = op.Reshape(op.Mul(diff, rstd), op.Shape(h))
            if rank > 2:  # (C,) -> (C, 1, ..., 1) to broadcast over the spatial dims
                trailing = op.Constant(value_ints=list(range(1, rank - 1)))
                w = op.Unsqueeze(w, trailing) if w is not None else None
                b = op.Unsqueeze(b, trailing) if b is not None else None
            if w is not None:
                y = op.Mul(y, w)
            if b is not None:
                y = op.Add(y, b)
        y = _activation(y, activation, acc)
        if acc != in_dtype:
            y = op.Cast(y, to=in_dtype)
        # (N, G) statistics like the op's; unused by models, removed by the exporter's optimizer
        squeeze_axes = op.Constant(value_ints=[2])
        mean_out = op.Squeeze(mean, squeeze_axes)
        rstd_out = op.Squeeze(rstd, squeeze_axes)
        if residual is not None:
            s_out = s
        else:
            s_out = op.ConstantOfShape(op.Constant(value_ints=[0]), value=ir.tensor([0], dtype=in_dtype))
        return y, mean_out, rstd_out, s_out

    # real annotation objects (this module uses postponed annotations) so the exporter can
    # infer the ONNX signature: tensors, then the int/float/str attributes
    T = onnxscript.onnx_types.TensorType
    groupnorm_fwd.__annotations__ = {
        "x": T, "weight": Optional[T], "bias": Optional[T], "residual": Optional[T],
        "num_groups": int, "eps": float, "activation": str, "route": str,
    }
    groupnorm_fwd.__name__ = f"groupnorm_fwd_opset{opset}"
    return groupnorm_fwd


def translation_table(opset: int = DEFAULT_OPSET) -> dict:
    """``custom_translation_table`` for :func:`torch.onnx.export` (``dynamo=True``) at ``opset``.

    Use it directly if you call ``torch.onnx.export`` yourself::

        torch.onnx.export(model, (x,), dynamo=True, opset_version=21,
                          custom_translation_table=groupnorm.onnx.translation_table(21))
    """
    opset = _check_opset(opset)
    import groupnorm.ops  # noqa: F401  (registers torch.ops.groupnorm)

    return {torch.ops.groupnorm.fwd.default: _make_translation(opset)}


# --------------------------------------------------------------------------------------
# TorchScript exporter (dynamo=False)
# --------------------------------------------------------------------------------------

_registered_ts_opsets: set[int] = set()


def _ts_symbolic(g, x, weight, bias, residual, num_groups, eps, activation, route):
    from torch.onnx import symbolic_helper as sh

    G = sh._get_const(num_groups, "i", "num_groups")
    e = sh._get_const(eps, "f", "eps")
    act = sh._get_const(activation, "s", "activation")

    def _none(v):
        return v is None or sh._is_none(v)

    s = x if _none(residual) else g.op("Add", x, residual)
    grouped = g.op("Reshape", s, g.op("Constant", value_t=torch.tensor([0, G, -1], dtype=torch.int64)))
    axes = g.op("Constant", value_t=torch.tensor([2], dtype=torch.int64))
    mean = g.op("ReduceMean", grouped, axes, keepdims_i=1)
    diff = g.op("Sub", grouped, mean)
    var = g.op("ReduceMean", g.op("Mul", diff, diff), axes, keepdims_i=1)
    eps_t = g.op("Constant", value_t=torch.tensor(e, dtype=torch.float32))
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, eps_t)))
    y = g.op("Reshape", g.op("Mul", diff, rstd), g.op("Shape", s))
    rank = sh._get_tensor_rank(x)
    if rank is None:
        raise RuntimeError("groupnorm.onnx: the TorchScript exporter needs the rank of x to be known")
    if rank > 2:
        trailing = g.op("Constant", value_t=torch.tensor(list(range(1, rank - 1)), dtype=torch.int64))
        weight = weight if _none(weight) else g.op("Unsqueeze", weight, trailing)
        bias = bias if _none(bias) else g.op("Unsqueeze", bias, trailing)
    if not _none(weight):
        y = g.op("Mul", y, weight)
    if not _none(bias):
        y = g.op("Add", y, bias)
    if act == "silu":
        y = g.op("Mul", y, g.op("Sigmoid", y))
    elif act == "relu":
        y = g.op("Relu", y)
    elif act == "gelu":
        c = lambda v: g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32))  # noqa: E731
        inner = g.op("Erf", g.op("Div", y, c(1.4142135623730951)))
        y = g.op("Mul", g.op("Mul", y, c(0.5)), g.op("Add", inner, c(1.0)))
    sq = g.op("Constant", value_t=torch.tensor([2], dtype=torch.int64))
    s_out = s if not _none(residual) else g.op("Constant", value_t=torch.zeros(0))
    return y, g.op("Squeeze", mean, sq), g.op("Squeeze", rstd, sq), s_out


def register_torchscript_symbolic(opset: int = 18) -> None:
    """Teach the legacy exporter (``torch.onnx.export(..., dynamo=False)``) the op.

    It emits the opset-18 decomposition (fp32 models) whatever ``opset`` >= 18 is asked.
    """
    opset = _check_opset(opset)
    if opset in _registered_ts_opsets:
        return
    import groupnorm.ops  # noqa: F401

    torch.onnx.register_custom_op_symbolic("groupnorm::fwd", _ts_symbolic, opset)
    _registered_ts_opsets.add(opset)


# --------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------

def export(
    model: torch.nn.Module,
    args: tuple = (),
    f: Optional[str | os.PathLike] = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_shapes: Any = None,
    dynamo: bool = True,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_axes: Optional[Mapping] = None,
    kwargs: Optional[dict] = None,
    **export_kwargs: Any,
):
    """Export ``model`` (which may use ``groupnorm`` anywhere) to ONNX.

    A thin wrapper of :func:`torch.onnx.export` that adds this package's translation.

    Args:
        model: the module; exported in its current mode (call ``model.eval()`` first).
        args: example positional inputs.
        f: path to write, or ``None`` to only return the ``torch.onnx.ONNXProgram``.
        opset: ai.onnx opset, >= 18 (21, the default, emits ``GroupNormalization``).
        dynamic_shapes: as in :func:`torch.export.export`, e.g.
            ``({0: "batch", 2: "h", 3: "w"},)`` for one 4-D input (strings become
            ``torch.export.Dim.AUTO``-style named dims).
        dynamo: ``True`` (default, needs onnxscript) or ``False`` for the legacy TorchScript
            exporter (uses ``input_names``/``output_names``/``dynamic_axes``; always emits
            the opset-18 decomposition).
        **export_kwargs: passed on to :func:`torch.onnx.export` (e.g. ``optimize``,
            ``verify``). Note torch's default ``external_data=True``: the weights are
            written to ``f + ".data"`` beside the model (keep the two together); pass
            ``external_data=False`` for one self-contained file (models under 2 GB).

    Returns:
        The ``torch.onnx.ONNXProgram`` (dynamo) or ``None`` (legacy exporter).

    Raises:
        UnsupportedOpsetError: for an opset below 18.
    """
    opset = _check_opset(opset)
    if dynamo:
        _require_onnxscript()
        table = dict(export_kwargs.pop("custom_translation_table", None) or {})
        table.update(translation_table(opset))
        return torch.onnx.export(
            model, args, f, kwargs=kwargs, opset_version=opset, dynamo=True,
            dynamic_shapes=dynamic_shapes, custom_translation_table=table,
            input_names=input_names, output_names=output_names, **export_kwargs,
        )
    if f is None:
        raise ValueError("groupnorm.onnx.export: the legacy exporter (dynamo=False) needs a path f")
    register_torchscript_symbolic(opset)
    return torch.onnx.export(
        model, args, f, kwargs=kwargs, opset_version=opset, dynamo=False,
        input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        **export_kwargs,
    )


__all__ = [
    "export",
    "translation_table",
    "register_torchscript_symbolic",
    "UnsupportedOpsetError",
    "MIN_OPSET",
    "DEFAULT_OPSET",
]
