"""CPU benchmark: groupnorm's automatic route vs torch native GroupNorm (same process).

    python benchmarks/bench_cpu.py                # full table (markdown) on stdout
    python benchmarks/bench_cpu.py --quick        # fewer repetitions
    python benchmarks/bench_cpu.py --only big-128 --dtype bf16 --layout cl
    python benchmarks/bench_cpu.py --memory       # peak-memory comparison (subprocesses, median of 5 per cell)
    python benchmarks/bench_cpu.py --overhead     # per-call cost on small tensors (OVERHEAD_SHAPES)

Shapes: ``benchmarks/shapes.py`` (CPU_SHAPES), each in fp32/bf16 x NCHW/channels-last, rows:

* ``fwd``          group_norm(x, G, w, b)               vs F.group_norm
* ``fwd+bwd``      the same, then backward (dx, dw, db)  vs F.group_norm + backward
* ``silu fwd``     group_norm(..., activation="silu")   vs F.silu(F.group_norm(...)) (eager)
* ``silu fwd+bwd`` the same with backward
* ``res+silu fwd+bwd`` group_norm(x, residual=r, activation="silu") vs F.silu(F.group_norm(x + r))

"speedup (median)" = ref median / ours median; "speedup (best)" = ref min / ours min. The
machine these runs are made on is shared with other jobs; the best-of-N ratio is the less
noisy one there (a preempted run only ever adds time), the median is what the issue asks for.

Timing: torch.set_num_threads(2); every repetition runs ours and torch's back to back (the
order alternates), after warm-up; the table gives medians. A row runs ``--reps`` repetitions,
or more (up to 10x) until it has timed at least 0.3 s, so fast rows have many samples. "ours" and "torch" are the public
APIs with their allocations (what a user gets). The GB/s column is the forward *kernel* alone
writing into a preallocated output (bytes = read x + write y), because a fresh 64 MiB
allocation is page-faulted and would measure the allocator, not the kernel; "copy GB/s" is
``y.copy_(x)`` on the same preallocated tensors (the bandwidth ceiling for that size).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import CPU_SHAPES, OVERHEAD_SHAPES  # noqa: E402

import groupnorm  # noqa: E402
from groupnorm.ops import cpu as gcpu  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "cl": None}


def cl_format(shape):
    return torch.channels_last if len(shape) == 4 else torch.channels_last_3d


def make(shape, dtype, layout, requires_grad=False):
    x = torch.randn(shape, dtype=dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=cl_format(shape))
    return x.requires_grad_(requires_grad)


class T:
    """Timings of one function: median and best (min) in seconds."""

    def __init__(self, ts):
        self.med, self.min = statistics.median(ts), min(ts)


# Fast rows get more repetitions than --reps: at least this many seconds of timed runs per
# row (up to 10x --reps), so that a few preempted runs on the shared machine cannot move the
# median. Slow rows (the 64-128 MiB tensors) keep --reps.
MIN_ROW_SECONDS = 0.3


def _reps_for(seconds_per_rep: float, reps: int) -> int:
    return max(reps, min(10 * reps, int(MIN_ROW_SECONDS / max(seconds_per_rep, 1e-9)))) | 1  # odd


def bench_pair(fa, fb, reps, warmup=3):
    """Timings of fa and fb, run interleaved (alternating order)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fa(); fb()
    reps = _reps_for((time.perf_counter() - t0) / warmup, reps)
    ta, tb = [], []
    for i in range(reps):
        for f, t in ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta)):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return T(ta), T(tb)


def bench_one(f, reps, warmup=3):
    t0 = time.perf_counter()
    for _ in range(warmup):
        f()
    reps = _reps_for((time.perf_counter() - t0) / warmup, reps)
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        t.append(time.perf_counter() - t0)
    return T(t)


def rows_for(name, shape, G, dtype_name, layout, reps):
    dtype = DTYPES[dtype_name]
    N, C = shape[0], shape[1]
    numel = 1
    for s in shape:
        numel *= s
    HW = numel // (N * C)
    esize = torch.empty(0, dtype=dtype).element_size()
    eps = 1e-5
    x = make(shape, dtype, layout)
    w = torch.randn(C, dtype=dtype)
    b = torch.randn(C, dtype=dtype)
    r = make(shape, dtype, layout)
    dy = make(shape, dtype, layout)
    out = []

    # kernel bandwidth (preallocated output) and the copy ceiling for the same tensors
    y_pre = torch.empty_like(x)
    # interleaved, like every other pair: the copy is the ceiling measured at the same moment
    t_k, t_c = bench_pair(lambda: gcpu.forward(x, w, b, None, G, eps, "none", out=y_pre), lambda: y_pre.copy_(x), reps)
    gbs = (2 * numel * esize / t_k.med / 1e9, 2 * numel * esize / t_k.min / 1e9)
    copy_gbs = (2 * numel * esize / t_c.med / 1e9, 2 * numel * esize / t_c.min / 1e9)
    del y_pre

    # --- kernel level: our launcher vs torch's ATen ops, no autograd (both allocate outputs)
    nat_fwd = lambda xx: torch.native_group_norm(xx, w, b, N, C, HW, G, eps)  # noqa: E731

    def nat_bwd(g, xx, m, rs):
        return torch.ops.aten.native_group_norm_backward(g, xx, m, rs, w, N, C, HW, G, [True, True, True])

    def k_ours(act, res, bwd):
        def run():
            y, m, rs, s = gcpu.forward(x, w, b, r if res else None, G, eps, act)
            if bwd:
                gcpu.backward(dy, None, s if res else x, w, b, m, rs, G, act)
        return run

    def k_torch(act, res, bwd):
        def run():
            xs = torch.add(x, r) if res else x
            z, m, rs = nat_fwd(xs)
            y = F.silu(z) if act == "silu" else z
            if bwd:
                g = torch.ops.aten.silu_backward(dy, z) if act == "silu" else dy
                nat_bwd(g, xs, m, rs)
        return run

    # --- API level: the public ops with autograd, what a user calls
    xg = x.detach().clone().requires_grad_(True)
    wg = w.detach().clone().requires_grad_(True)
    bg = b.detach().clone().requires_grad_(True)
    rg = r.detach().clone().requires_grad_(True)

    def a_ours(act, res, bwd):
        def run():
            xg.grad = wg.grad = bg.grad = rg.grad = None
            with torch.set_grad_enabled(bwd):
                y = groupnorm.group_norm(xg, G, wg, bg, activation=act if act != "none" else None,
                                         residual=rg if res else None)
            if bwd:
                y.backward(dy)
        return run

    def a_torch(act, res, bwd):
        def run():
            xg.grad = wg.grad = bg.grad = rg.grad = None
            with torch.set_grad_enabled(bwd):
                y = F.group_norm(xg + rg if res else xg, G, wg, bg)
                if act == "silu":
                    y = F.silu(y)
            if bwd:
                y.backward(dy)
        return run

    # backward alone (kernel level): ours vs aten::native_group_norm_backward on saved stats
    _, m0, rs0, _ = gcpu.forward(x, w, b, None, G, eps, "none")
    _, m1, rs1 = nat_fwd(x)  # torch's own saved stats (its dtype conventions)
    kb_o, kb_t = bench_pair(lambda: gcpu.backward(dy, None, x, w, b, m0, rs0, G, "none"),
                            lambda: nat_bwd(dy, x, m1, rs1), reps)

    for direction, act, res, bwd, vs in (
        ("fwd", "none", False, False, "torch GN"),
        ("bwd", "none", False, True, "torch GN"),
        ("fwd+bwd", "none", False, True, "torch GN"),
        ("silu fwd", "silu", False, False, "GN->SiLU"),
        ("silu fwd+bwd", "silu", False, True, "GN->SiLU"),
        ("res+silu fwd+bwd", "silu", True, True, "add->GN->SiLU"),
    ):
        if direction == "bwd":
            ka, kb = kb_o, kb_t
            aa = ab = None  # the public API has no backward-only call
        else:
            ka, kb = bench_pair(k_ours(act, res, bwd), k_torch(act, res, bwd), reps)
            aa, ab = bench_pair(a_ours(act, res, bwd), a_torch(act, res, bwd), reps)
        # a median far above the best run of the same row means the shared machine preempted it
        noisy = any(t is not None and t.med > 1.5 * t.min for t in (ka, kb, aa, ab))
        out.append(dict(shape=name, dims=shape, G=G, dtype=dtype_name, layout=layout, dir=direction, vs=vs,
                        k_ours=ka.med * 1e3, k_ref=kb.med * 1e3, k_ratio=kb.med / ka.med,
                        k_best=kb.min / ka.min, noisy=noisy,
                        a_ours=aa.med * 1e3 if aa else None, a_ref=ab.med * 1e3 if ab else None,
                        a_ratio=ab.med / aa.med if aa else None, a_best=ab.min / aa.min if aa else None,
                        gbs=gbs if direction == "fwd" else None,
                        copy_gbs=copy_gbs if direction == "fwd" else None))
    return out


def fmt_table(rows):
    lines = ["| shape | dtype | layout | row (ref) | kernel ms ours / ref | kernel speedup median (best) "
             "| API ms ours / ref | API speedup median (best) | fwd kernel GB/s median (best) | copy GB/s median (best) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gb = (f"{r['gbs'][0]:.1f} ({r['gbs'][1]:.1f}) | {r['copy_gbs'][0]:.1f} ({r['copy_gbs'][1]:.1f})"
              if r["gbs"] is not None else " | ")
        lines.append(
            f"| {r['shape']} {tuple(r['dims'])} G={r['G']} | {r['dtype']} | {r['layout']} | {r['dir']} ({r['vs']})"
            f"{' ‡' if r['noisy'] else ''} | "
            f"{r['k_ours']:.3f} / {r['k_ref']:.3f} | {r['k_ratio']:.2f}x ({r['k_best']:.2f}x) | "
            + (f"{r['a_ours']:.3f} / {r['a_ref']:.3f} | {r['a_ratio']:.2f}x ({r['a_best']:.2f}x) | "
               if r["a_ours"] is not None else "n/a | n/a | ")
            + f"{gb} |")
    return "\n".join(lines)


def header():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- machine: {cpu}, {os.cpu_count()} cores, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}\n"
            f"- torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}\n"
            f"- load average at start (shared machine): {' '.join(f'{v:.1f}' for v in os.getloadavg())}\n")


# ----------------------------------------------------------------------------- memory
_MEM_CHILD = r"""
import resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, {bench!r})
import groupnorm
torch.set_num_threads(2)
shape, G, dtype, layout, impl = {args!r}
dtype = getattr(torch, dtype)
x = torch.randn(shape, dtype=dtype)
if layout == "cl":
    x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
dy = torch.randn_like(x)
w = torch.randn(shape[1], dtype=dtype, requires_grad=True); b = torch.randn(shape[1], dtype=dtype, requires_grad=True)
x.requires_grad_(True)
fn = (lambda: groupnorm.group_norm(x, G, w, b)) if impl == "ours" else (lambda: F.group_norm(x, G, w, b))
# warm-up on a small tensor with the same call pattern (affine parameters, an explicit
# gradient tensor): loads the extension and pays the autograd engine's one-time costs (~34 MiB
# of RSS on the first backward with an explicit gradient, as much for torch as for ours), so
# the measured growth is the call's own memory
# (in the cell's layout: the channels-last kernels allocate their per-thread scratch in the
# OpenMP threads, whose malloc arenas a first call creates)
small = torch.randn(2, shape[1], *([4] * (len(shape) - 2)), dtype=dtype)
if layout == "cl":
    small = small.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
small.requires_grad_(True)
(groupnorm.group_norm(small, G, w, b) if impl == "ours" else F.group_norm(small, G, w, b)).backward(torch.randn_like(small))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn().backward(dy)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from bench_cpu import alloc_peak
x.grad = w.grad = b.grad = None
print((after - before) / 1024, alloc_peak(lambda: fn().backward(dy)))
"""


def alloc_peak(fn) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn()``, above the level at its start.

    Every allocation and free through c10's CPU allocator as the profiler records them
    (``profile_memory=True``: one event per call, with its size and time), summed in time
    order. Exact and repeatable, unlike RSS (which moves in 128 KiB heap steps); it does not
    see memory that bypasses the allocator (the C++ kernels' per-thread scratch vectors: ours
    hold O(C) floats per thread, torch's kernels likewise)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def memory_rows(shapes, reps: int = 5):
    """Peak memory of one forward+backward in a fresh process: ours vs torch, two ways.

    RSS growth (MiB): comes in steps of 128 KiB (the heap grows and mmaps in such steps), so
    one process per cell moves by +-0.125 MiB for either implementation: each cell is measured
    ``reps`` times (fresh processes, ours and torch alternating) and the medians are shown.
    Allocator peak (bytes, ``alloc_peak``): exact, the same in every process; a second call in
    the same process, after the RSS one."""
    lines = ["| shape | dtype | layout | ours peak +MiB | torch peak +MiB | ours - torch MiB | tensor MiB "
             "| ours allocator peak B | torch allocator peak B | ours - torch B |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, shape, G in shapes:
        for dt in ("float32", "bfloat16"):
            for layout in ("nchw", "cl"):
                res = {"ours": [], "torch": []}
                alloc = {"ours": set(), "torch": set()}
                for _ in range(reps):
                    for impl in ("ours", "torch"):
                        code = _MEM_CHILD.format(bench=str(Path(__file__).resolve().parent),
                                                 args=(shape, G, dt, layout, impl))
                        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                        rss, peak = p.stdout.strip().splitlines()[-1].split()
                        res[impl].append(float(rss))
                        alloc[impl].add(int(peak))
                mo, mt = statistics.median(res["ours"]), statistics.median(res["torch"])
                mib = math.prod(shape) * (4 if dt == "float32" else 2) / 2**20
                # the allocator peak is the same in every process; if not, show the largest
                ao, at = max(alloc["ours"]), max(alloc["torch"])
                lines.append(f"| {name} {shape} | {dt} | {layout} | {mo:.2f} | {mt:.2f} | {mo - mt:+.2f} | {mib:.1f} "
                             f"| {ao} | {at} | {ao - at:+d} |")
    return "\n".join(lines)


def overhead_rows(reps: int) -> str:
    """Per-call microseconds through the public APIs on small fp32 tensors: each repetition
    times a batch of 200 calls of ours and of torch's, interleaved; medians."""
    out = ["| shape | call | ours us | torch us | ratio torch/ours |", "|---|---|---:|---:|---:|"]
    for name, shape, G in OVERHEAD_SHAPES:
        C = shape[1]
        x = torch.randn(shape)
        w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
        xr = x.clone().requires_grad_()
        dy = torch.randn_like(x)
        m_ours, m_torch = groupnorm.GroupNorm(G, C), torch.nn.GroupNorm(G, C)
        cases = {
            "functional, no grad": (lambda: groupnorm.group_norm(x, G, w.detach(), b.detach()),
                                    lambda: F.group_norm(x, G, w.detach(), b.detach())),
            "module, inference_mode": (lambda: m_ours(x), lambda: m_torch(x)),
            "functional fwd+bwd": (lambda: torch.autograd.grad(groupnorm.group_norm(xr, G, w, b), (xr, w, b), dy),
                                   lambda: torch.autograd.grad(F.group_norm(xr, G, w, b), (xr, w, b), dy)),
        }
        for label, (fo, ft) in cases.items():
            batch = lambda f: (lambda: [f() for _ in range(200)])  # noqa: E731
            ctx = torch.inference_mode() if "inference" in label else torch.enable_grad()
            with ctx:
                to, tt = bench_pair(batch(fo), batch(ft), reps)
            uo, ut = 1e6 * to.med / 200, 1e6 * tt.med / 200
            out.append(f"| {name} {shape} G={G} | {label} | {uo:.1f} | {ut:.1f} | {ut / uo:.2f}x |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="7 repetitions instead of 21")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated shape names")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--layout", default="nchw,cl")
    ap.add_argument("--memory", action="store_true", help="peak-memory table instead of timings")
    ap.add_argument("--overhead", action="store_true", help="per-call cost on small tensors instead")
    ap.add_argument("--min-copy-gbs", type=float, default=15.0,
                    help="re-measure a (shape, dtype, layout) group whose best copy ran slower than this")
    a = ap.parse_args()
    torch.set_num_threads(2)
    shapes = [s for s in CPU_SHAPES if a.only is None or s[0] in a.only.split(",")]
    if a.memory:
        print(header())
        print(memory_rows(shapes, a.reps or 5))
        return
    if a.overhead:
        gcpu.load_extension()
        print(header())
        print(overhead_rows(a.reps or 15))
        return
    reps = a.reps or (7 if a.quick else 21)
    gcpu.load_extension()
    print(header() + f"- repetitions: at least {reps} per row (more for fast rows, up to {10 * reps}: >= {MIN_ROW_SECONDS} s of timed runs), median, interleaved with the reference\n")
    rows = []
    for name, shape, G in shapes:
        for dt in a.dtype.split(","):
            for layout in a.layout.split(","):
                # A copy of the same tensors is timed first: far below its normal speed means
                # other jobs hold the cores; wait and measure the group again (3 tries max,
                # the try with the fastest copy is kept, and the table says how fast that was).
                best = None
                for attempt in range(3):
                    got = rows_for(name, shape, G, dt, layout, reps)
                    if best is None or got[0]["copy_gbs"][1] > best[0]["copy_gbs"][1]:
                        best = got
                    if best[0]["copy_gbs"][1] >= a.min_copy_gbs:
                        break
                    time.sleep(5)
                rows += best
                print(fmt_table(rows[-6:]).split("\n", 2)[2], file=sys.stderr, flush=True)
    print(fmt_table(rows))
    print("\n‡ = a median more than 1.5x the best run of the same row (preempted by other jobs); "
          f"rows whose copy GB/s is below {a.min_copy_gbs:g} were measured while other jobs held the cores "
          "(3 tries) and their times are scheduler slices, not kernel times")
    for key in ("k_ratio", "k_best", "a_ratio", "a_best"):
        worst = min((r for r in rows if r[key] is not None), key=lambda r: r[key])
        print(f"- worst {key}: {worst[key]:.2f}x ({worst['shape']} {worst['dtype']} {worst['layout']} {worst['dir']})")
    print(f"- load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
