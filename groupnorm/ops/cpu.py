"""The ``"cpu"`` route: GroupNorm kernels in C++ (ATen ``Vectorized``, OpenMP) for CPU tensors.

The kernels (``groupnorm/csrc/*.cpp``) are compiled on first use with
:func:`torch.utils.cpp_extension.load` for the CPU capability torch itself runs with
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or the portable default), so
the build never uses an instruction the machine lacks. The first call that compiles prints
one line to stderr; the build is cached under ``~/.cache/groupnorm/`` (override with
``GROUPNORM_BUILD_DIR``) and keyed by a hash of the sources, flags and torch version.
Concurrent first calls (e.g. ``pytest -n 2``) are serialized by torch's file lock.

If the build is impossible (no compiler, no ninja, a compile error) or disabled with
``GROUPNORM_CPU_EXT=0``, the route warns once and declines every call (``supports`` gives
the reason), so ``"auto"`` falls back to the pure-PyTorch ``"reference"`` route.

Design and measurements: ``docs/cpu.md``; benchmark: ``benchmarks/bench_cpu.py``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from .. import reference
from .routes import register_route

Tensor = torch.Tensor

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("group_norm_cpu.cpp", "group_norm_cpu_fwd.cpp", "group_norm_cpu_bwd.cpp")
_HEADERS = ("group_norm_cpu.h",)
_ACT = {"none": 0, "silu": 1, "gelu": 2, "relu": 3}
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_ext = None
_ext_error: Optional[str] = None
_lock = threading.Lock()


def _capability_flags() -> tuple[str, list[str]]:
    """(capability, compiler flags) matching the capability torch dispatches its own kernels to."""
    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64"):
        if cap == "AVX512":
            return cap, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        if cap == "AVX2":
            return cap, ["-mavx2", "-mfma", "-mf16c", "-mbmi2",
                         "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]


def _build_spec() -> tuple[str, Path, list[str]]:
    cap, flags = _capability_flags()
    flags = ["-O3", "-fopenmp", "-DNDEBUG", *flags]
    h = hashlib.sha256()
    for f in _SOURCES + _HEADERS:
        h.update((_CSRC / f).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    name = f"groupnorm_cpu_{cap.lower()}_{h.hexdigest()[:12]}"
    root = os.environ.get("GROUPNORM_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "groupnorm")
    return name, Path(root) / name, flags


def load_extension():
    """The compiled kernels (building them on first use), or None if unavailable."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    with _lock:
        if _ext is not None or _ext_error is not None:
            return _ext
        if os.environ.get("GROUPNORM_CPU_EXT", "1") == "0":
            _ext_error = "disabled by GROUPNORM_CPU_EXT=0"
            return None
        try:
            from torch.utils import cpp_extension

            name, build_dir, flags = _build_spec()
            build_dir.mkdir(parents=True, exist_ok=True)
            if not (build_dir / f"{name}.so").exists():
                print(f"groupnorm: compiling the CPU kernels once (about a minute); cached in {build_dir}",
                      file=sys.stderr, flush=True)
            cpp_extension.load(  # registers torch.ops.groupnorm_cpu.{fwd,fwd_out,bwd,fwd_autograd}
                name=name,
                sources=[str(_CSRC / f) for f in _SOURCES],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
            _ext = torch.ops.groupnorm_cpu
        except Exception as e:  # no compiler / ninja, compile error, ...: fall back, never crash
            _ext_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(
                f"groupnorm: the C++ CPU kernels are unavailable ({_ext_error}); "
                "CPU calls use the pure-PyTorch 'reference' route instead",
                RuntimeWarning, stacklevel=2,
            )
            _ext = None
    return _ext


def supports(x: Tensor, weight, residual, activation: str) -> Optional[str]:
    if not x.is_cpu:
        return f"tensor on {x.device.type}, not CPU"
    if x.layout != torch.strided:
        return f"layout {x.layout} is not strided"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} not supported"
    if x.dim() < 2:
        return "input needs shape (N, C, *)"
    if activation not in _ACT:
        return f"activation {activation!r} not supported"
    if residual is not None and (residual.dtype != x.dtype or residual.device != x.device):
        return "residual must have x's dtype and device"
    if load_extension() is None:
        return f"C++ kernels unavailable ({_ext_error})"
    return None


def forward(x, weight, bias, residual, num_groups, eps, activation="none", *, out=None):
    """Route forward. ``out`` (benchmarks only): a preallocated ``y`` of x's layout."""
    if x.numel() == 0:  # N = 0 or an empty spatial dim: nothing to compute
        return reference.forward(x, weight, bias, residual, num_groups, eps, activation)
    # the C++ op makes x dense in its output layout (a copy only for exotic strided views,
    # which then give a contiguous output, as memory_format_of says) and allocates the outputs
    # (y too, unless ``out`` is given); the kernels read the parameters in their own dtype
    ext = load_extension()
    args = (x, weight, bias, residual, num_groups, float(eps), _ACT[activation])
    if out is None:
        y, mean, rstd, s = ext.fwd(*args)
    else:
        y, (mean, rstd, s) = out, ext.fwd_out(*args, out)
    return y, mean, rstd, (s if residual is not None else None)


def backward(dy, dsum, xs, weight, bias, mean, rstd, num_groups, activation="none"):
    if xs.numel() == 0:
        return reference.backward(dy, dsum, xs, weight, bias, mean, rstd, num_groups, activation)
    # layout, dtype casts and allocation in the C++ op (see forward)
    dx, dw, db = load_extension().bwd(dy, dsum, xs, weight, bias, mean, rstd, num_groups, _ACT[activation])
    return dx, (dw if weight is not None else None), (db if bias is not None else None)


def forward_autograd(x, weight, bias, residual, num_groups, eps, activation="none"):
    """forward + a C++ autograd node for the backward (eager training; None: not this call)."""
    if x.numel() == 0:
        return None  # the reference math, through the Python autograd path
    return load_extension().fwd_autograd(x, weight, bias, residual, num_groups, float(eps), _ACT[activation])


register_route("cpu", forward, backward, supports, priority=10, forward_autograd=forward_autograd)
