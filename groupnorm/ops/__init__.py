"""Kernels, launchers and the autograd-registered custom ops (no nn.Module here)."""

from .group_norm import bwd, fwd
from .routes import ROUTES, available_routes, current_route, register_route, use_route

__all__ = ["fwd", "bwd", "ROUTES", "available_routes", "current_route", "register_route", "use_route"]
