"""GPU probe for tuning the Triton route's launch heuristics (one device call).

Prints, per shape / dtype / layout: the GPU time of the launcher's forward and backward
(``triton_gn.forward`` / ``backward``, no autograd) under the default configuration and under
forced ``config_override`` variants (tile, split), next to torch eager's; then the host-side
cost of one call through each layer (launcher, functional API, eager torch).

GPU times come from ``bench_gpu.Timer`` and exclude host overhead: each timed region is
queued behind a ``torch.cuda._sleep`` so that the CPU has enqueued everything before the GPU
reaches it.

    python benchmarks/gpu_probe.py [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import Timer  # noqa: E402
from shapes import GPU_SHAPES  # noqa: E402

import groupnorm  # noqa: E402
from groupnorm.ops import triton_gn as T  # noqa: E402

TIMER = None  # bench_gpu.Timer: the one GPU timing function (flush, sleep, CUDA events, median)


def gpu_ms(fn):
    return TIMER(fn)


def host_us(fn, reps=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        if len(out) % 20 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return 1e6 * statistics.median(out)


def main():
    global TIMER
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--variants", help='JSON list of config_override dicts, e.g. \'[{}, {"pixel_major": true}]\'')
    ap.add_argument("--host-only", action="store_true", help="only the host-cost table")
    ap.add_argument("--no-host", action="store_true", help="skip the host-cost table")
    ap.add_argument("--warm", action="store_true",
                    help="run every variant once, untimed (fills Triton's on-disk cache: run one such "
                         "process per shape at once to compile in parallel before the timed run)")
    args = ap.parse_args()
    TIMER = Timer(reps=15, warmup=3, flush=True) if not args.warm else (lambda f: f())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    variants = [dict()] + [dict(tile=t) for t in (1024, 2048, 8192, 16384)] + \
               [dict(split=s) for s in (1, 4, 16, 64)] + [dict(split=16, tile=t) for t in (2048, 8192)]
    if args.variants:
        variants = json.loads(args.variants)
    t0 = time.monotonic()
    print("| shape | layout | dir | eager ms | default ms | best ms | best variant | default cfg |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    by_name = {s[0]: s for s in GPU_SHAPES}
    for name, shape, G in [] if args.host_only else [by_name[n] for n in args.only] if args.only else GPU_SHAPES:
        if time.monotonic() - t0 > args.budget_s:
            print(f"<!-- {name}: past --budget-s -->")
            continue
        for layout in ("nchw", "cl"):
            if layout == "cl" and len(shape) not in (4, 5):
                continue
            x = torch.randn(shape, dtype=dtype, device="cuda")
            if layout == "cl":
                x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
            C = shape[1]
            w = torch.randn(C, dtype=dtype, device="cuda")
            b = torch.randn(C, dtype=dtype, device="cuda")
            dy = torch.randn_like(x)
            y, mean, rstd, _ = T.forward(x, w, b, None, G, 1e-5, "none")
            fx = lambda: T.forward(x, w, b, None, G, 1e-5, "none")
            bx = lambda: T.backward(dy, None, x, w, b, mean, rstd, G, "none")
            ex = lambda: F.group_norm(x, G, w, b)
            xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
            yg = F.group_norm(xg, G, wg, bg)
            eb = lambda: torch.autograd.grad(yg, (xg, wg, bg), dy, retain_graph=True)
            N, C_, Cg, S = T._geometry(x, G)
            xv = T._ncs(x, N, C, S)
            # the printed configuration is pick_config's, before triton_gn._warps (16 warps for big tensors)
            if T.use_pixel_major(xv, C, Cg, S):
                dcfg = T.pick_cl_config(N, C, S, T._num_sms(x.device))
            else:
                dcfg = T.pick_config(N, G, Cg, S, xv.stride(1) == 1 and S > 1, T._num_sms(x.device))
            for d, fn, efn in (("fwd", fx, ex), ("bwd", bx, eb)):
                if args.warm:
                    for v in variants:
                        try:
                            with heuristics(v) as over, T.config_override(**over):
                                fn()
                        except Exception as exc:
                            print(f"<!-- {name} {layout} {d} {v}: {type(exc).__name__}: {str(exc)[:150]} -->")
                    torch.cuda.synchronize()
                    continue
                e_ms = gpu_ms(efn)
                res, first = [], None
                for v in variants:
                    try:
                        with heuristics(v) as over, T.config_override(**over):
                            out = fn()[0].float()  # y or dx: checked against the first variant's
                            first = out if first is None else first
                            diff = (out - first).abs().max().item()
                            res.append((gpu_ms(fn), v, diff))
                    except Exception as exc:
                        print(f"<!-- {name} {layout} {d} {v}: {type(exc).__name__}: {str(exc)[:150]} -->")
                base = res[0][0]
                best = min(res, key=lambda r: r[0])
                every = "; ".join(f"{json.dumps(v)} {t:.4f} (maxdiff {e:.1e})" for t, v, e in res[1:]) if args.variants else ""
                print(f"| {name} | {layout} | {d} | {e_ms:.4f} | {base:.4f} | {best[0]:.4f} | {best[1]} | {dcfg} | {every}", flush=True)
            del x, dy, y
            torch.cuda.empty_cache()

    if args.warm or args.no_host:
        return
    # host-side cost per call (no sync): where launch-bound shapes lose their time
    x = torch.randn(2, 320, 64, 64, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(320, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(320, dtype=torch.bfloat16, device="cuda")
    xr = x.detach().requires_grad_()
    dy = torch.randn_like(x)
    rows = {
        "launcher T.forward": lambda: T.forward(x, w, b, None, 32, 1e-5, "none"),
        "groupnorm.group_norm (no grad)": lambda: groupnorm.group_norm(x, 32, w, b),
        "F.group_norm (no grad)": lambda: F.group_norm(x, 32, w, b),
        "groupnorm fwd+bwd (autograd)": lambda: torch.autograd.grad(groupnorm.group_norm(xr, 32, w, b), [xr], dy),
        "F.group_norm fwd+bwd (autograd)": lambda: torch.autograd.grad(F.group_norm(xr, 32, w, b), [xr], dy),
    }
    print("\n| host cost per call, (2,320,64,64) bf16 | us | kernel launches stubbed, us | direct launches (prototype), us |\n|---|---|---|---|")
    for k, fn in rows.items():
        real, stub, direct = host_us(fn), "n/a", "n/a"
        if k.startswith(("groupnorm", "launcher")):
            with stubbed_launches():
                stub = f"{host_us(fn):.1f}"
            try:
                with direct_launches():
                    direct = f"{host_us(fn):.1f}"
            except Exception as e:  # a prototype on Triton internals: report, do not abort
                direct = f"failed: {type(e).__name__}: {str(e)[:120]}"
        print(f"| {k} | {real:.1f} | {stub} | {direct} |", flush=True)
    launch_anatomy()
    launch_timing(x, w, b, xr, dy)
    # the direct launches must compute the same thing (same compiled kernels, same arguments)
    try:
        check_direct(x, w, b, xr, dy)
    except Exception as e:
        print(f"direct launches failed: {type(e).__name__}: {e}")


def launch_anatomy() -> None:
    """Where one Triton launch's host time goes: an empty kernel of 12 arguments launched with
    12 tensors, 1 tensor + 11 ints and 12 ints (Triton's launcher asks the driver about every
    tensor argument with cuPointerGetAttribute), that driver call alone through ctypes, a
    1-element torch op and a small CUDA allocation (the launcher's partial buffers)."""
    import ctypes

    import triton
    import triton.language as tl
    globals().setdefault("tl", tl)  # Triton resolves the kernel's names in the module's globals

    @triton.jit
    def _empty(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, N: tl.constexpr):
        pass

    t = [torch.empty(64, device="cuda") for _ in range(12)]
    ints = list(range(3, 15))
    rows = {
        "empty kernel, 12 tensor args": lambda: _empty[(1,)](*t, N=1),
        "empty kernel, 1 tensor + 11 int args": lambda: _empty[(1,)](t[0], *ints[1:], N=1),
        "empty kernel, 12 int args": lambda: _empty[(1,)](*ints, N=1),
        "torch: t.add_(1) (1 launch)": lambda: t[0].add_(1),
        "torch.empty(4096 fp32, cuda)": lambda: torch.empty(4096, device="cuda"),
        "t.data_ptr() x12": lambda: [a.data_ptr() for a in t],
    }
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        val, ptr = ctypes.c_uint64(), ctypes.c_uint64(t[0].data_ptr())
        rows["cuPointerGetAttribute (ctypes) x12"] = lambda: [cuda.cuPointerGetAttribute(ctypes.byref(val), 2, ptr) for _ in range(12)]
        rows["ctypes no-op baseline x12 (cuDriverGetVersion)"] = lambda: [cuda.cuDriverGetVersion(ctypes.byref(val)) for _ in range(12)]
    except OSError as e:
        print(f"<!-- libcuda via ctypes: {e} -->")
    print("\n| launch anatomy (host, no sync) | us |\n|---|---|")
    for k, fn in rows.items():
        try:
            print(f"| {k} | {host_us(fn, reps=400):.2f} |", flush=True)
        except Exception as e:  # report, do not abort the probe
            print(f"| {k} | failed: {type(e).__name__}: {str(e)[:120]} |", flush=True)


def launch_timing(x, w, b, xr, dy) -> None:
    """Each kernel launch's own wall time (perf_counter around ``kernel[grid](...)``) in a real
    call: inside autograd's backward (its CUDA worker thread) and through the launcher called
    on the main thread; then a cProfile of the launcher's backward on the main thread. (It
    replaced an estimate by subtraction, call time with one kernel real and the rest stubbed
    minus all stubbed, which moved by +-90 us between two runs on an H200 VM.)"""
    import collections
    import cProfile
    import pstats

    times = collections.defaultdict(list)

    class _Timed:
        def __init__(self, jit):
            self.jit, self.name = jit, jit.fn.__name__

        def __getitem__(self, grid):
            f = self.jit[grid]

            def call(*a, **k):
                t = time.perf_counter()
                f(*a, **k)
                times[self.name].append(time.perf_counter() - t)
            return call

    y, mean, rstd, s = T.forward(x, w, b, None, 32, 1e-5, "none")
    s = s if s is not None else x  # the saved input of the backward (no activation: x itself)
    calls = {
        "autograd fwd+bwd": lambda: torch.autograd.grad(groupnorm.group_norm(xr, 32, w, b), [xr], dy),
        "launcher T.forward + T.backward (main thread)": lambda: (
            T.forward(x, w, b, None, 32, 1e-5, "none"), T.backward(dy, None, s, w, b, mean, rstd, 32, "none")),
    }
    print("\n| call | kernel | launch wall time, median us | n |\n|---|---|---|---|")
    for k, fn in calls.items():
        times.clear()
        with _replaced_kernels(_Timed):
            host_us(fn, reps=100)
        for n, v in sorted(times.items()):
            print(f"| {k} | {n} | {1e6 * statistics.median(v):.1f} | {len(v)} |", flush=True)
    fn = lambda: T.backward(dy, None, s, w, b, mean, rstd, 32, "none")  # noqa: E731
    host_us(fn, reps=20)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(100):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    print("\ncProfile, 100 x T.backward (main thread), by own time:\n```")
    pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(22)
    print("```")


def check_direct(x, w, b, xr, dy):
    ref = [T.forward(x, w, b, None, 32, 1e-5, "silu")[0], *torch.autograd.grad(groupnorm.group_norm(xr, 32, w, b), [xr], dy)]
    with direct_launches():
        for _ in range(2):  # the first call compiles through Triton's path, the second is direct
            got = [T.forward(x, w, b, None, 32, 1e-5, "silu")[0], *torch.autograd.grad(groupnorm.group_norm(xr, 32, w, b), [xr], dy)]
    torch.cuda.synchronize()
    print(f"\ndirect launches bitwise equal to Triton's launch path: {all(torch.equal(a, g) for a, g in zip(ref, got))}")


LEGACY = Path(__file__).resolve().parent / "_legacy_triton_gn.py"


@contextlib.contextmanager
def heuristics(variant: dict):
    """A variant's config_override fields; ``{"legacy": true}`` also swaps in the launch
    heuristics (pick_config, pick_cl_config, no _warps) of an earlier triton_gn.py saved as
    benchmarks/_legacy_triton_gn.py (e.g. ``git show REV:groupnorm/ops/triton_gn.py | grep -v
    '^register_route' > benchmarks/_legacy_triton_gn.py``), for an old/new A/B in one process."""
    over = dict(variant)
    if not over.pop("legacy", False):
        yield over
        return
    import importlib.util
    old = sys.modules.get("groupnorm.ops._legacy_triton_gn")
    if old is None:
        spec = importlib.util.spec_from_file_location("groupnorm.ops._legacy_triton_gn", LEGACY)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old
        spec.loader.exec_module(old)
    saved = T.pick_config, T.pick_cl_config, T._warps
    T.pick_config, T.pick_cl_config = old.pick_config, old.pick_cl_config
    T._warps = lambda cfg, *a, **k: cfg
    try:
        yield over
    finally:
        T.pick_config, T.pick_cl_config, T._warps = saved


def _spec(a):
    """What Triton specializes a kernel on, for one argument (dtype and 16-byte alignment of
    pointers; == 1, % 16 and 32-bit range of integers)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0, -2**31 <= a < 2**31)
    return type(a)


class _Direct:
    """Prototype: a kernel launched through its CompiledKernel's C launcher, skipping
    JITFunction.run (binder, cache key, device/stream queries) after the first call with the
    same specialization."""

    def __init__(self, jit):
        import inspect
        self.jit, self.cache = jit, {}
        sig = inspect.signature(jit.fn).parameters
        self.names = list(sig)
        self.defaults = {n: q.default for n, q in sig.items() if q.default is not inspect.Parameter.empty}

    def __getitem__(self, grid):
        return lambda *a, **k: self.launch(grid, a, k)

    def launch(self, grid, args, kw):
        key = (tuple(_spec(a) for a in args), tuple(sorted(kw.items())))
        ck = self.cache.get(key)
        if ck is None:
            ck = self.jit[grid](*args, **kw)
            ck._init_handles()
            self.cache[key] = ck
            return
        full = (*args, *[kw[n] if n in kw else self.defaults[n] for n in self.names[len(args):]])
        g = (*grid, 1, 1)
        stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
        ck.run(g[0], g[1], g[2], stream, ck.function, ck.packed_metadata, None, None, None, *full)


@contextlib.contextmanager
def _replaced_kernels(wrap):
    """Every Triton kernel of the route replaced by ``wrap(kernel)`` for the block, then restored."""
    K = T._kernels()
    saved = {n: getattr(K, n) for n in dir(K) if n.startswith("_gn_")}
    try:
        for n, f in saved.items():
            setattr(K, n, wrap(f))
        yield
    finally:
        for n, f in saved.items():
            setattr(K, n, f)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def direct_launches():
    return _replaced_kernels(_Direct)


def stubbed_launches():
    """Every Triton kernel of the route replaced by a no-op: what is left of a call's host time
    is the launcher's own Python, allocations and autograd, not Triton's launch path."""
    return _replaced_kernels(lambda f: _NoLaunch())

if __name__ == "__main__":
    main()
