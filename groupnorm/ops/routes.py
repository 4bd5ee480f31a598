"""Routes: the implementations the op can run, and how one is picked.

A route is a pair of plain functions (no autograd, no nn.Module) with these signatures::

    forward(x, weight, bias, residual, num_groups, eps, activation)
        -> (y, mean, rstd, sum_or_None)          # mean/rstd: (N, G), fp32 (fp64 for fp64 x)
    backward(dy, dsum, xs, weight, bias, mean, rstd, num_groups, activation)
        -> (dx, dweight_or_None, dbias_or_None)  # xs = x, or x + residual

plus ``supports(x, weight, residual, activation) -> None | str`` that returns None when the
route can take the call and otherwise a short reason (used in the error of a forced route).
A route may also give ``forward_autograd`` (same arguments as ``forward``, returns
``(y, mean, rstd, sum_or_empty)`` with its backward already recorded by a native autograd
node): the op uses it for plain eager training calls, where a Python autograd.Function would
cost more than a small tensor's kernels (see ``group_norm_op``).

``"auto"`` walks the routes by descending priority and takes the first that supports the
call; :func:`use_route` (or the ``route=`` argument of ``group_norm``) forces one.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .. import reference


@dataclass(frozen=True)
class Route:
    name: str
    forward: Callable
    backward: Callable
    supports: Callable[..., Optional[str]]
    priority: int
    forward_autograd: Optional[Callable] = None
    # device types "auto" may send to this route (None: any the route supports); a forced
    # route is only asked ``supports``
    auto_devices: Optional[tuple[str, ...]] = None


ROUTES: dict[str, Route] = {}
_forced: Optional[str] = None
# Optional modules that register a route on import; absent or unimportable ones are skipped
# (e.g. no Triton installed), anything else they raise surfaces.
_OPTIONAL = ("groupnorm.ops.cpu", "groupnorm.ops.triton_gn")
_loaded = False


def register_route(name: str, forward: Callable, backward: Callable,
                   supports: Callable[..., Optional[str]], priority: int = 0,
                   forward_autograd: Optional[Callable] = None,
                   auto_devices: Optional[tuple[str, ...]] = None) -> None:
    """Add (or replace) a route. Higher priority is tried first by ``"auto"``."""
    ROUTES[name] = Route(name, forward, backward, supports, priority, forward_autograd, auto_devices)


def _load_optional() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _OPTIONAL:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # only "this optional module (or its optional dependency) is not there" is silent
            if e.name not in (mod, "triton") and not (e.name or "").startswith("triton."):
                raise
        except Exception as e:
            if not mod.endswith("triton_gn"):
                raise
            # a Triton release this code does not work with must not break the other routes
            warnings.warn(f"groupnorm: the Triton route is disabled, importing it failed: {e!r}; "
                          "install the triton release your torch was built with", stacklevel=3)


def _get(name: str) -> Route:
    _load_optional()
    r = ROUTES.get(name)
    if r is None:
        raise ValueError(f"unknown route {name!r}; available: {available_routes()}")
    return r


_order: tuple[tuple[Route, ...], list[Route]] = ((), [])


def _by_priority() -> list[Route]:
    """The routes, highest priority first. The sorted list is kept while ``ROUTES`` holds the
    same Route objects (a tuple of them compares by identity first): sorting on every call
    was ~1.5 us of a tiny tensor's ~14 us call."""
    global _order
    _load_optional()
    current = tuple(ROUTES.values())
    if current != _order[0]:
        _order = (current, sorted(current, key=lambda r: -r.priority))
    return _order[1]


def available_routes() -> list[str]:
    """Names of the registered routes, in the order ``"auto"`` tries them."""
    return [r.name for r in _by_priority()]


@contextlib.contextmanager
def use_route(name: Optional[str]) -> Iterator[None]:
    """Force every ``group_norm`` call in the block onto one route (``None``/"auto": pick).

    Example::

        >>> with groupnorm.use_route("reference"):
        ...     y = groupnorm.group_norm(x, 8)
    """
    global _forced
    if name is not None and name != "auto":
        _get(name)
    prev, _forced = _forced, (None if name == "auto" else name)
    try:
        yield
    finally:
        _forced = prev


def current_route() -> str:
    """The route forced by :func:`use_route`, or ``"auto"``."""
    return _forced or "auto"


def select(route: str, x: torch.Tensor, weight, residual, activation: str) -> Route:
    """The route that runs this call (the launcher's choice)."""
    if route != "auto":
        r = _get(route)
        why = r.supports(x, weight, residual, activation)
        if why is not None:
            raise RuntimeError(
                f"group_norm: route {route!r} cannot run this call ({why}); "
                f"use route='auto' or one of {available_routes()}"
            )
        return r
    dev = "cpu" if x.is_cpu else x.device.type  # x.is_cpu: 0.1 us, x.device.type: 0.7 us
    for r in _by_priority():
        if r.auto_devices is not None and dev not in r.auto_devices:
            continue
        if r.supports(x, weight, residual, activation) is None:
            return r
    raise AssertionError("the reference route supports every call")  # pragma: no cover


register_route("reference", reference.forward, reference.backward,
               lambda x, weight, residual, activation: None, priority=0)
