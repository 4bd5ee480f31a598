r"""Model surgery: put GroupNorm (and Weight Standardization) into models that exist.

Four converters, each walking the whole module tree (``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``, any nesting) and returning a :class:`ConversionReport`:

* :func:`convert`: BatchNorm1d/2d/3d and SyncBatchNorm → :class:`groupnorm.GroupNorm`.
* :func:`convert_to_batchnorm`: GroupNorm (this package's or ``torch.nn``'s) → BatchNorm,
  the reverse direction, for comparisons.
* :func:`fuse`: ``torch.nn.GroupNorm`` → :class:`groupnorm.GroupNorm`, and a GroupNorm
  directly followed by SiLU/GELU/ReLU in an ``nn.Sequential`` → one fused module (same
  outputs).
* :func:`convert_ws`: Conv1d/2d/3d → :class:`groupnorm.ws.WSConv1d`/``2d``/``3d``
  (Weight Standardization).

Common rules:

* The model is changed **in place** (pass ``inplace=False`` to convert a deep copy) and
  ``report.model`` is the converted model. It is a new object only when the root module
  itself was replaced (e.g. ``convert(nn.BatchNorm2d(8))``), so always use
  ``report.model``.
* Parameters are **reused**, not copied: the new module holds the very ``weight``/``bias``
  ``nn.Parameter`` objects of the old one, so device, dtype, ``requires_grad`` and an
  optimizer built before the conversion all stay valid. New parameters (and modules
  without any) take the device and dtype of the old module's buffers. Each new module
  keeps the old one's train/eval mode.
* A module instance reached through several paths (weight sharing) becomes **one** new
  instance used at all of them; the report lists the other paths as ``aliases``.
* Hooks registered on a replaced module are not carried over.

The group-count rule of :func:`convert` (``fallback="divisor"``, the default): with
``num_groups=G``, a BatchNorm with C channels gets the **largest divisor of C not above
G** (G=32: C=30 → 30, C=48 → 24, a prime C=37 → 1, C=1 → 1); with
``group_size=S``, the **smallest divisor of C not below S** channels per group (never
smaller groups than asked; S > C → one group). ``fallback="error"`` raises instead of
adapting. Every adapted choice is listed in the report.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._validate import divisors, normalize_activation, resolve_groups
from .modules import GroupNorm
from .ws import WSConv1d, WSConv2d, WSConv3d

logger = logging.getLogger("groupnorm.conversion")


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------

@dataclass
class Replacement:
    """One replaced module instance."""

    path: str  #: first qualified name where the instance was found ("" for the root)
    source: str  #: class name of the old module, e.g. ``"BatchNorm2d"``
    target: str  #: class name of the new module, e.g. ``"GroupNorm"``
    num_channels: Optional[int] = None  #: C (out_channels for convs)
    num_groups: Optional[int] = None  #: G of the new GroupNorm (None for other targets)
    note: str = ""  #: what was adapted or dropped, e.g. ``"C=30 not divisible by 32"``
    aliases: list[str] = field(default_factory=list)  #: further paths of a shared instance


@dataclass
class ConversionReport:
    """What a converter did. ``str(report)`` is a readable table; ``bool(report)`` is True
    when something was replaced."""

    model: nn.Module  #: the converted model (use this, see the module docstring)
    kind: str  #: e.g. ``"BatchNorm -> GroupNorm"``
    searched: str = "matching"  #: what the converter looks for, e.g. ``"BatchNorm"``
    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason)

    @property
    def paths(self) -> list[str]:
        """Every path that now holds a new module (aliases included)."""
        return [p for r in self.replaced for p in [r.path, *r.aliases]]

    def __len__(self) -> int:
        return len(self.replaced)

    def __bool__(self) -> bool:
        return bool(self.replaced)

    def __str__(self) -> str:
        if not self.replaced:
            lines = [f"{self.kind}: no {self.searched} modules found; the model is unchanged"]
        else:
            lines = [f"{self.kind}: replaced {len(self.replaced)} module(s)"]
            for r in self.replaced:
                desc = f"  {r.path or '<root>'}: {r.source} -> {r.target}"
                if r.num_channels is not None:
                    desc += f" (C={r.num_channels}" + (f", G={r.num_groups})" if r.num_groups else ")")
                if r.note:
                    desc += f"  [{r.note}]"
                if r.aliases:
                    desc += f"  (shared, also at {', '.join(r.aliases)})"
                lines.append(desc)
        for path, why in self.skipped:
            lines.append(f"  skipped {path or '<root>'}: {why}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Tree walking
# --------------------------------------------------------------------------------------

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _replace_modules(
    model: nn.Module,
    make: Callable[[str, nn.Module], Union[None, str, tuple[nn.Module, Replacement]]],
    kind: str,
    inplace: bool,
    searched: str = "matching",
) -> ConversionReport:
    """Replace every module for which ``make(path, module)`` returns ``(new, record)``; a
    string it returns is the reason a candidate was skipped, listed in the report.

    ``make`` is called once per module *instance*; later paths to the same instance get the
    same new module. Subtrees of replaced modules are not entered.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"groupnorm.convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport(model=model, kind=kind, searched=searched)
    new_of: dict[int, tuple[nn.Module, Replacement]] = {}
    visited: set[int] = set()

    def visit(path: str, module: nn.Module) -> Optional[nn.Module]:
        key = id(module)
        if key in new_of:
            new, rec = new_of[key]
            rec.aliases.append(path)
            return new
        if key in visited:  # a shared, unreplaced subtree: already walked
            return None
        visited.add(key)
        made = make(path, module)
        if isinstance(made, str):
            report.skipped.append((path, made))
            return None
        if made is not None:
            new, rec = made
            new_of[key] = (new, rec)
            report.replaced.append(rec)
            return new
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new = visit(_join(path, name), child)
            if new is not None:
                # _modules holds the children of Sequential, ModuleList and ModuleDict alike
                module._modules[name] = new
        return None

    root = visit("", model)
    if root is not None:
        report.model = root
    return report


def _logged(report: ConversionReport) -> ConversionReport:
    logger.info("%s", report)
    return report


def _factory(module: nn.Module) -> dict:
    """device and dtype of a module's first parameter or floating buffer (else defaults)."""
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    for t in list(module.buffers(recurse=False)):
        return {"device": t.device}
    return {}


def _finish(new: nn.Module, old: nn.Module) -> nn.Module:
    new.train(old.training)
    return new


# --------------------------------------------------------------------------------------
# BatchNorm -> GroupNorm
# --------------------------------------------------------------------------------------

def choose_groups(
    num_channels: int,
    num_groups: Optional[int] = None,
    group_size: Optional[int] = None,
    fallback: str = "divisor",
) -> int:
    """The G that :func:`convert` uses for C channels (see the module docstring for the rule).

    >>> choose_groups(64, 32), choose_groups(30, 32), choose_groups(31, 32), choose_groups(48, group_size=20)
    (32, 30, 1, 2)
    """
    if fallback not in ("divisor", "error"):
        raise ValueError(f"groupnorm.convert: fallback must be 'divisor' or 'error', got {fallback!r}")
    if num_channels <= 0:
        raise ValueError(f"groupnorm.convert: num_channels must be positive, got {num_channels}")
    if (num_groups is None) == (group_size is None):
        resolve_groups(num_channels, num_groups, group_size)  # raises the package's message
    for name, v in (("num_groups", num_groups), ("group_size", group_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"groupnorm.convert: {name} must be a positive int, got {v!r}")
    if fallback == "error":
        return resolve_groups(num_channels, num_groups, group_size)
    ds = divisors(num_channels)
    if num_groups is not None:
        return max(d for d in ds if d <= num_groups)
    size = min([d for d in ds if d >= group_size], default=num_channels)
    return num_channels // size


def convert(
    model: nn.Module,
    num_groups: Optional[int] = None,
    *,
    group_size: Optional[int] = None,
    fallback: str = "divisor",
    eps: Optional[float] = None,
    affine: Optional[bool] = None,
    inplace: bool = True,
) -> ConversionReport:
    """Replace every BatchNorm1d/2d/3d, SyncBatchNorm and FrozenBatchNorm2d (torchvision's and
    detectron2's, as in detection backbones) in ``model`` by :class:`GroupNorm`.

    Args:
        model: any module tree (it may itself be a BatchNorm).
        num_groups: requested G; default 32 (as in Wu & He) unless ``group_size`` is given.
        group_size: requested channels per group instead of ``num_groups``.
        fallback: ``"divisor"`` (default): when C does not divide, use the largest divisor of C
            not above G (or the smallest group size not below ``group_size``); ``"error"``:
            raise a ``ValueError`` naming the module instead.
        eps: GroupNorm eps; default: each BatchNorm's own eps.
        affine: default (``None``): affine exactly when the BatchNorm was, reusing its
            ``weight``/``bias`` Parameters; ``True``/``False`` force it (new parameters are
            initialised to ones/zeros).
        inplace: ``False`` converts a deep copy and leaves ``model`` untouched.

    Running statistics (``running_mean``/``running_var``, ``track_running_stats``) and
    ``momentum`` have no GroupNorm counterpart and are dropped (noted in the report). A
    FrozenBatchNorm2d's weight/bias buffers become the initial values of trainable GroupNorm
    parameters (``affine=False`` drops them). An
    uninitialised ``LazyBatchNorm`` is skipped (run a forward pass first).

    Returns:
        :class:`ConversionReport`; ``report.model`` is the converted model.

    Example::

        >>> report = groupnorm.convert(resnet, num_groups=32)
        >>> print(report)            # every replaced path with its C and G
        >>> model = report.model
    """
    if num_groups is not None and group_size is not None:
        raise ValueError(
            "groupnorm.convert: pass num_groups or group_size, not both "
            f"(got num_groups={num_groups}, group_size={group_size}); e.g. convert(model, group_size=16)"
        )
    if num_groups is None and group_size is None:
        num_groups = 32
    choose_groups(max(num_groups or 1, group_size or 1), num_groups, group_size, fallback)  # check args

    def groups_for(path: str, m: nn.Module, C: int) -> int:
        try:
            return choose_groups(C, num_groups, group_size, fallback)
        except ValueError as e:
            raise ValueError(f"groupnorm.convert: cannot convert {path or '<root>'} ({type(m).__name__}({C})): {e}") from e

    def make(path: str, m: nn.Module):
        if _is_frozen_bn(m):
            return _from_frozen(path, m)
        if not isinstance(m, _BatchNorm):
            return None
        C = m.num_features
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            return f"{type(m).__name__} is uninitialised (run one forward pass first)"
        G = groups_for(path, m, C)
        want_affine = m.affine if affine is None else affine
        new = GroupNorm(G, C, eps=m.eps if eps is None else eps, affine=want_affine, **_factory(m))
        notes = []
        asked = f"group_size={group_size}" if group_size is not None else f"num_groups={num_groups}"
        if (group_size is not None and C // G != group_size) or (num_groups is not None and G != num_groups):
            notes.append(f"C={C} does not fit {asked}; used G={G} ({C // G} channels/group)")
        if want_affine and m.affine:
            new.weight, new.bias = m.weight, m.bias  # the same Parameters
        elif want_affine:
            notes.append("BatchNorm had no affine; new weight=1, bias=0")
        elif m.affine:
            notes.append("affine dropped (affine=False)")
        if m.track_running_stats:
            notes.append("running stats dropped")
        rec = Replacement(path, type(m).__name__, "GroupNorm", C, G, "; ".join(notes))
        return _finish(new, m), rec

    def _from_frozen(path: str, m: nn.Module):
        # torchvision's / detectron2's FrozenBatchNorm2d: the detection backbones' BN, with
        # weight, bias and running stats as buffers. GN (trainable, as in the paper's
        # detection experiments) starts from the frozen weight/bias values.
        C = m.weight.numel()
        G = groups_for(path, m, C)
        want_affine = True if affine is None else affine
        new = GroupNorm(G, C, eps=getattr(m, "eps", 1e-5) if eps is None else eps, affine=want_affine,
                        device=m.weight.device, dtype=m.weight.dtype)
        notes = ["frozen running stats dropped"]
        if want_affine:
            with torch.no_grad():
                new.weight.copy_(m.weight)
                new.bias.copy_(m.bias)
            notes.append("frozen weight/bias copied into trainable GroupNorm parameters")
        return _finish(new, m), Replacement(path, type(m).__name__, "GroupNorm", C, G, "; ".join(notes))

    return _logged(_replace_modules(model, make, "BatchNorm -> GroupNorm", inplace, "BatchNorm"))


def _is_frozen_bn(m: nn.Module) -> bool:
    """A FrozenBatchNorm2d (torchvision.ops.misc, detectron2): recognised by name and buffers,
    so neither library needs to be installed."""
    return (type(m).__name__ == "FrozenBatchNorm2d" and not isinstance(m, _BatchNorm)
            and all(isinstance(getattr(m, k, None), torch.Tensor) for k in ("weight", "bias", "running_mean", "running_var")))


# --------------------------------------------------------------------------------------
# GroupNorm -> BatchNorm
# --------------------------------------------------------------------------------------

class _BatchNormActMixin:
    """A BatchNorm that accepts :class:`GroupNorm`'s call signature (residual, activation)."""

    activation: Optional[str]

    def forward(self, x, residual=None, return_sum=False):
        s = x if residual is None else x + residual
        y = super().forward(s)
        if self.activation == "silu":
            y = torch.nn.functional.silu(y)
        elif self.activation == "gelu":
            y = torch.nn.functional.gelu(y)
        elif self.activation == "relu":
            y = torch.relu(y)
        if return_sum:
            if residual is None:
                raise ValueError("return_sum=True needs a residual to sum with x; pass residual=...")
            return y, s
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` + optional residual pre-add and activation (what
    :func:`convert_to_batchnorm` puts in place of a :class:`GroupNorm`)."""

    def __init__(self, *args, activation: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        act = normalize_activation(activation)
        self.activation = None if act == "none" else act


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` + optional residual pre-add and activation."""

    def __init__(self, *args, activation: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        act = normalize_activation(activation)
        self.activation = None if act == "none" else act


class BatchNormAct3d(_BatchNormActMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` + optional residual pre-add and activation."""

    def __init__(self, *args, activation: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        act = normalize_activation(activation)
        self.activation = None if act == "none" else act


_BN_OF_NDIM = {2: 1, 3: 1, 4: 2, 5: 3}  # input ndim -> BatchNorm{d}d


def _input_ndims(model: nn.Module, example_inputs, targets: Sequence[nn.Module]) -> dict[int, int]:
    seen: dict[int, set[int]] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, _k=id(m): seen.setdefault(_k, set()).add(args[0].dim()))
        for m in targets
    ]
    try:
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            else:
                model(*(example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)))
    finally:
        for h in handles:
            h.remove()
    return {k: next(iter(v)) if len(v) == 1 else -1 for k, v in seen.items()}


def convert_to_batchnorm(
    model: nn.Module,
    dim: Optional[int] = None,
    *,
    example_inputs=None,
    momentum: Optional[float] = 0.1,
    track_running_stats: bool = True,
    eps: Optional[float] = None,
    inplace: bool = True,
) -> ConversionReport:
    """Replace every GroupNorm (``groupnorm.GroupNorm`` or ``torch.nn.GroupNorm``) by BatchNorm.

    For comparisons (e.g. the batch-size study): the reverse of :func:`convert`. GroupNorm
    does not know whether it normalizes 1-D, 2-D or 3-D data, so pass ``dim`` (1, 2 or 3:
    BatchNorm1d/2d/3d for all) or ``example_inputs`` (one forward pass records each
    GroupNorm's input rank: (N, C) and (N, C, L) → 1d, (N, C, H, W) → 2d, 5-D → 3d).

    A :class:`groupnorm.GroupNorm` becomes a :class:`BatchNormAct2d` (etc.): a BatchNorm
    subclass that keeps the fused activation and accepts ``residual=``/``return_sum=``,
    so the model's forward code runs unchanged; a ``torch.nn.GroupNorm`` becomes a plain
    ``nn.BatchNorm2d``. weight/bias Parameters are reused; running stats start fresh.
    """
    if (dim is None) == (example_inputs is None):
        raise ValueError(
            "groupnorm.convert_to_batchnorm: pass exactly one of dim (1, 2 or 3) and example_inputs "
            "(a forward pass records each GroupNorm's input rank)"
        )
    if dim is not None and dim not in (1, 2, 3):
        raise ValueError(f"groupnorm.convert_to_batchnorm: dim must be 1, 2 or 3, got {dim!r}")
    if not inplace:
        model = copy.deepcopy(model)
    ndim_of: dict[int, int] = {}
    if example_inputs is not None:
        targets = [m for m in model.modules() if isinstance(m, (GroupNorm, nn.GroupNorm))]
        ndim_of = _input_ndims(model, example_inputs, targets)

    def make(path: str, m: nn.Module):
        if not isinstance(m, (GroupNorm, nn.GroupNorm)):
            return None
        if dim is not None:
            d = dim
        else:
            nd = ndim_of.get(id(m))
            if nd is None:
                return "not called by the example forward pass; input rank unknown"
            if nd == -1:
                raise ValueError(
                    f"groupnorm.convert_to_batchnorm: {path} is called with inputs of different ranks; "
                    "pass dim= explicitly"
                )
            if nd not in _BN_OF_NDIM:
                raise ValueError(f"groupnorm.convert_to_batchnorm: {path} sees {nd}-D input; BatchNorm needs 2-5 dims")
            d = _BN_OF_NDIM[nd]
        ours = isinstance(m, GroupNorm)
        cls = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}[d] if ours else \
            {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d]
        kw = {"activation": m.activation} if ours else {}
        new = cls(m.num_channels, eps=m.eps if eps is None else eps, momentum=momentum,
                  affine=m.affine, track_running_stats=track_running_stats, **_factory(m), **kw)
        if m.affine:
            new.weight, new.bias = m.weight, m.bias
        rec = Replacement(path, type(m).__name__, cls.__name__, m.num_channels, None,
                          f"was G={m.num_groups}")
        return _finish(new, m), rec

    return _logged(_replace_modules(model, make, "GroupNorm -> BatchNorm", True, "GroupNorm"))


# --------------------------------------------------------------------------------------
# torch.nn.GroupNorm (+ activation) -> fused groupnorm.GroupNorm
# --------------------------------------------------------------------------------------

def _fusable_activation(m: nn.Module) -> Optional[str]:
    if type(m) is nn.SiLU:
        return "silu"
    if type(m) is nn.ReLU:
        return "relu"
    if type(m) is nn.GELU and m.approximate == "none":  # the op's GELU is the exact erf form
        return "gelu"
    return None


def fuse(model: nn.Module, *, activations: bool = True, inplace: bool = True,
         trace: bool = False) -> ConversionReport:
    """Swap ``torch.nn.GroupNorm`` for :class:`groupnorm.GroupNorm` and fuse activations.

    1. Every ``torch.nn.GroupNorm`` (exactly that class, not subclasses, whose forward may
       differ) becomes a :class:`groupnorm.GroupNorm` with the same G, eps and the same
       weight/bias Parameters: same outputs, same ``state_dict`` keys.
    2. With ``activations=True``, inside every ``nn.Sequential`` a GroupNorm without
       activation directly followed by ``nn.SiLU``, ``nn.ReLU`` or ``nn.GELU()`` (exact,
       not ``approximate="tanh"``) absorbs it: the GroupNorm gets ``activation=...`` and the
       activation's slot becomes ``nn.Identity()`` (indices and ``state_dict`` keys stay).
       A GroupNorm instance that is also used elsewhere in the tree is not fused (its other
       uses do not want the activation). Activations applied in ``forward`` code
       (``F.silu(self.norm(x))``, ``self.act(self.norm(x))``) are invisible to module
       surgery: pass ``trace=True``, or build such blocks with ``GroupNorm(activation=...)``.
    3. With ``trace=True`` (and ``activations``), the model is traced with ``torch.fx``
       and every GroupNorm call whose output goes only to an activation (``nn.SiLU`` /
       ``nn.ReLU`` / exact ``nn.GELU`` modules, ``F.silu``, ``F.relu``, ``torch.relu``,
       exact ``F.gelu``, ``.relu()``) absorbs it; the activation call is removed from the
       graph (an activation module shared with other calls keeps working there).
       ``report.model`` is then a ``torch.fx.GraphModule`` with the same submodules and
       ``state_dict`` keys. A model that fx cannot trace (data-dependent control flow)
       raises a ``RuntimeError`` saying so; use ``trace=False`` for it.
    """
    def make(path: str, m: nn.Module):
        if type(m) is not nn.GroupNorm:
            return None
        kw = {"bias": False} if m.affine and m.bias is None else {}  # torch's GroupNorm(bias=False)
        new = GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine, **kw, **_factory(m))
        if m.affine:
            new.weight, new.bias = m.weight, m.bias
        return _finish(new, m), Replacement(path, "torch.nn.GroupNorm", "GroupNorm", m.num_channels, m.num_groups)

    report = _replace_modules(model, make, "GroupNorm fusion", inplace,
                              "torch.nn.GroupNorm or fusable GroupNorm + activation")
    if not activations:
        return report
    root = report.model
    uses: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    rec_of = {r.path: r for r in report.replaced}
    for path, seq in root.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules.keys())
        for a, b in zip(names, names[1:]):
            gn, act_mod = seq._modules[a], seq._modules[b]
            act = _fusable_activation(act_mod) if act_mod is not None else None
            if type(gn) is not GroupNorm or gn.activation or act is None:
                continue
            gpath = _join(path, a)
            if uses[id(gn)] > 1:
                report.skipped.append((gpath, f"shared GroupNorm not fused with the following {type(act_mod).__name__}"))
                continue
            gn.activation = act
            seq._modules[b] = nn.Identity()
            rec = rec_of.get(gpath)
            if rec is None:
                rec = Replacement(gpath, "GroupNorm", "GroupNorm", gn.num_channels, gn.num_groups)
                report.replaced.append(rec)
            rec.target = f"GroupNorm(activation={act!r})"
            rec.note = f"fused {_join(path, b)} ({type(act_mod).__name__}), now nn.Identity"
    if trace:
        _fuse_traced(report)
    return _logged(report)


def _traced_activation(gm: nn.Module, node) -> Optional[str]:
    """The op's activation name for an fx node that applies a fusable activation, else None."""
    import torch.nn.functional as F

    if node.op == "call_module":
        return _fusable_activation(gm.get_submodule(node.target))
    if node.op == "call_function":
        if node.target is F.silu:
            return "silu"
        if node.target in (F.relu, torch.relu):
            return "relu"
        if node.target is F.gelu and node.kwargs.get("approximate", "none") == "none" and len(node.args) == 1:
            return "gelu"
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def _fuse_traced(report: ConversionReport) -> None:
    """Step 3 of :func:`fuse`: GroupNorm -> activation call pairs found by torch.fx."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):  # GroupNorm calls stay call_module nodes (leaves)
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return type(m) is GroupNorm or super().is_leaf_module(m, qualname)

    try:
        gm = torch.fx.GraphModule(report.model, _Tracer().trace(report.model), type(report.model).__name__)
    except Exception as e:
        raise RuntimeError(
            f"fuse(trace=True): torch.fx cannot trace {type(report.model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); use fuse(model) without trace (Sequential "
            "pairs only) or build the blocks with GroupNorm(..., activation=...)") from e
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    rec_of = {r.path: r for r in report.replaced}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not GroupNorm:
            continue
        gn = gm.get_submodule(node.target)
        users = list(node.users)
        if gn.activation or len(users) != 1 or users[0].args[:1] != (node,):
            continue
        act = _traced_activation(gm, users[0])
        if act is None:
            continue
        if calls[node.target] > 1:
            report.skipped.append((node.target, "GroupNorm called more than once; not fused with its activation"))
            continue
        act_node = users[0]
        # a shallow copy with the activation (same Parameter objects, same state_dict keys)
        # takes the GroupNorm's place in the GraphModule only: the traced model's own module
        # is shared with the GraphModule and still has its activation call after it
        fused = copy.copy(gn)
        fused.activation = act
        parent, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        act_node.replace_all_uses_with(node)
        gm.graph.erase_node(act_node)
        changed = True
        rec = rec_of.get(node.target)
        if rec is None:
            rec = Replacement(node.target, "GroupNorm", "GroupNorm", gn.num_channels, gn.num_groups)
            report.replaced.append(rec)
            rec_of[node.target] = rec
        rec.target = f"GroupNorm(activation={act!r})"
        rec.note = f"fused the traced activation call {act_node.name!r} (report.model is a GraphModule)"
    if changed:
        gm.graph.lint()
        gm.recompile()
        report.model = gm


# --------------------------------------------------------------------------------------
# Conv -> Weight-Standardized conv
# --------------------------------------------------------------------------------------

_WS_OF = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}


def convert_ws(
    model: nn.Module,
    *,
    eps: float = 1e-5,
    include: Optional[Callable[[str, nn.Module], bool]] = None,
    inplace: bool = True,
) -> ConversionReport:
    """Replace every ``nn.Conv1d/2d/3d`` by the Weight-Standardized :mod:`groupnorm.ws` conv.

    Exactly these classes are converted (not ``ConvTranspose``, not subclasses, not convs
    that are already WS); the new conv reuses the weight/bias Parameters, so the stored
    weights are unchanged and only the forward standardizes them (see
    :func:`groupnorm.ws.standardize_weight`). ``include(path, conv) -> bool`` restricts the
    conversion, e.g. ``include=lambda p, c: c.in_channels > 3`` to keep the RGB stem plain.
    Typical use: ``convert(model)`` then ``convert_ws(model)`` (GN + WS, Qiao et al. 2019).
    """
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"groupnorm.convert_ws: eps must be a non-negative float, got {eps!r}")

    def make(path: str, m: nn.Module):
        cls = _WS_OF.get(type(m))
        if cls is None:
            return None
        if include is not None and not include(path, m):
            return "excluded by include="
        new = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                  dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                  padding_mode=m.padding_mode, eps=eps, device="meta")
        new.weight = m.weight
        new.bias = m.bias
        return _finish(new, m), Replacement(path, type(m).__name__, cls.__name__, m.out_channels, None,
                                            f"eps={eps}")

    return _logged(_replace_modules(model, make, "Conv -> WSConv", inplace, "Conv1d/Conv2d/Conv3d"))


__all__ = [
    "convert",
    "convert_to_batchnorm",
    "fuse",
    "convert_ws",
    "choose_groups",
    "ConversionReport",
    "Replacement",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
]
