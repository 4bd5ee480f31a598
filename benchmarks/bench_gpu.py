"""GPU benchmark: groupnorm's Triton route vs torch eager, torch.compile (Inductor) and
Liger-Kernel's GroupNorm (when ``liger_kernel`` imports).

    python benchmarks/bench_gpu.py                          # full sweep, markdown on stdout
    python benchmarks/bench_gpu.py --quick                  # bf16 only, fewer repetitions
    python benchmarks/bench_gpu.py --only vae-256 sd-unet-8 --dtype fp16 --layout cl --dir fwd
    python benchmarks/bench_gpu.py --out benchmarks/results/gpu-h100.md   # also write a file
    python benchmarks/bench_gpu.py --no-compile --no-liger  # skip the slow/optional baselines

Shapes: ``benchmarks/shapes.py`` (GPU_SHAPES). Each shape is swept over dtype (fp16, bf16,
fp32), layout (NCHW, channels-last), epilogue (plain GroupNorm, fused SiLU) and direction:

* ``fwd``      y = group_norm(x, G, w, b[, activation="silu"])
* ``bwd``      the backward alone (dx, dw, db) of a forward done once, outside the timing
* ``fwd+bwd``  both

The baselines compute the same thing: ``F.group_norm`` (then ``F.silu``) in eager mode and
under ``torch.compile``, and Liger's ``LigerGroupNormFunction`` (then ``F.silu``; it makes
channels-last input contiguous itself).

Columns:

* ``ms``: median over repetitions of CUDA-event times of the GPU work; before each
  repetition a 256 MiB buffer is zeroed so that every repetition starts with a cold L2
  (``--no-flush`` to skip), then a ~4 ms ``torch.cuda._sleep`` lets the host enqueue the whole
  call before the GPU reaches it, so host-side (Python, launch) overhead is excluded for every
  implementation alike. That overhead is measured apart by ``benchmarks/gpu_probe.py``.
* ``GB/s``: minimum bytes / time. Minimum bytes: fwd = read x + write y; bwd = read x and
  dy + write dx; plus the per-channel parameters/gradients and the (N, G) statistics.
* ``%copy``: GB/s as a share of the copy bandwidth measured in the same run
  (``dst.copy_(src)`` of 1 GiB, bytes read + written), i.e. of what this card really does.
* ``xEager``, ``xCompile``, ``xLiger``: baseline time / our time (> 1: we are faster).
* ``err``: max |ours - eager| of the forward output (a correctness spot check).

At the end a summary checks the goals of the Triton issue (bandwidth share on shapes of
32 MB or more, geometric-mean speed-ups, worst case vs torch, fused SiLU vs eager GN+SiLU).
Numbers are only ever written from a run on a real GPU; without CUDA the script exits.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import GPU_SHAPES  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("nchw", "cl")
DIRS = ("fwd", "bwd", "fwd+bwd")
ACTS = ("none", "silu")
BIG = 32 * 2**20  # "shapes of 32 MB or more" (x's bytes)


def _fail(msg: str) -> None:
    sys.exit(f"bench_gpu.py: {msg}")


# ----------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, reps: int, warmup: int, flush: bool):
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if flush else None

    def __call__(self, fn) -> float:
        """Median milliseconds of ``fn()`` (CUDA events)."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.flush is not None:
                self.flush.zero_()
            # keep the GPU busy (~4 ms) while the host enqueues fn: the events then time the
            # kernels, not Python/launch overhead (reported apart by benchmarks/gpu_probe.py)
            torch.cuda._sleep(8_000_000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def copy_bandwidth(timer: Timer) -> float:
    """GB/s of dst.copy_(src) for 1 GiB (bytes read + written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**30 / ms / 1e6


# ----------------------------------------------------------------------------- implementations


def _liger():
    try:
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
    except Exception:  # not installed, or broken on this stack
        return None
    return LigerGroupNormFunction


def make_impls(G: int, act: str, use_compile: bool, use_liger: bool) -> dict:
    import groupnorm

    post = F.silu if act == "silu" else (lambda t: t)

    def ours(x, w, b):
        return groupnorm.group_norm(x, G, w, b, activation=None if act == "none" else act, route="triton")

    def eager(x, w, b):
        return post(F.group_norm(x, G, w, b))

    impls = {"ours": ours, "eager": eager}
    if use_compile:
        impls["compile"] = torch.compile(eager, dynamic=False)
    liger = _liger() if use_liger else None
    if liger is not None:
        impls["liger"] = lambda x, w, b: post(liger.apply(x, w, b, x.shape[1], G, 1e-5))
    return impls


def min_bytes(shape, G: int, dtype: torch.dtype, direction: str) -> int:
    e = torch.finfo(dtype).bits // 8
    n = math.prod(shape)
    N, C = shape[0], shape[1]
    params, stats = 2 * C * e, 2 * N * G * 4
    fwd = 2 * n * e + params + stats          # x, y, w + b, mean + rstd
    bwd = 3 * n * e + 2 * params + stats      # x, dy, dx, w + b, dw + db, mean + rstd
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def warm(impls: dict, x, w, b, dirs, label: str) -> None:
    """Each implementation once per direction (compiles and caches its kernels), untimed."""
    for k, fn in impls.items():
        for direction in dirs:
            try:
                time_direction(fn, x, w, b, direction, lambda f: f())
            except Exception as e:
                print(f"warm: {k} failed on {label} {direction}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch.cuda.synchronize()


def time_direction(fn, x, w, b, direction: str, timer: Timer) -> float:
    if direction == "fwd":
        with torch.no_grad():
            return timer(lambda: fn(x, w, b))
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    dy = torch.randn_like(x)
    if direction == "bwd":
        y = fn(xs, ws, bs)
        return timer(lambda: torch.autograd.grad(y, (xs, ws, bs), dy, retain_graph=True))
    return timer(lambda: torch.autograd.grad(fn(xs, ws, bs), (xs, ws, bs), dy))


# ----------------------------------------------------------------------------- main


def environment() -> list[str]:
    import triton

    p = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
    except Exception:
        driver = "unknown"
    liger = _liger()
    return [
        f"- card: {p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)",
        f"- driver: {driver}; CUDA (torch): {torch.version.cuda}",
        f"- torch {torch.__version__}, triton {triton.__version__}, liger_kernel: "
        f"{'imported' if liger is not None else 'not available'}",
        f"- python {platform.python_version()}, date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="shape names from benchmarks/shapes.py GPU_SHAPES")
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None)
    ap.add_argument("--layout", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    ap.add_argument("--dir", nargs="+", choices=DIRS, default=list(DIRS))
    ap.add_argument("--act", nargs="+", choices=ACTS, default=list(ACTS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="bf16 only, 10 repetitions")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel baseline")
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between repetitions")
    ap.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new (shape, dtype, layout) case after this many seconds; the "
                         "report says which were left out (fits the sweep into a GPU lease)")
    ap.add_argument("--warm", action="store_true",
                    help="run every case once, untimed, and exit: fills Triton's/Inductor's on-disk "
                         "caches so that a timed run that follows compiles nothing (run several "
                         "--shard processes at once to compile in parallel)")
    ap.add_argument("--shard", default="0/1", help="I/N: only every N-th case, starting at the I-th")
    args = ap.parse_args(argv)
    shard_i, shard_n = (int(v) for v in args.shard.split("/"))
    t_start = time.monotonic()

    if not torch.cuda.is_available():
        _fail("no CUDA device (torch.cuda.is_available() is False). This benchmark times the "
              "Triton kernels on an NVIDIA GPU; run it on a GPU machine. Without one, GPU speed "
              "stays unmeasured (the kernels are still checked on CPU by tests/test_triton_route.py "
              "under TRITON_INTERPRET=1).")
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError:
        _fail("triton is not installed (pip install triton)")
    import groupnorm
    from groupnorm.ops import routes

    if "triton" not in routes.available_routes():
        _fail("the 'triton' route is not registered (groupnorm.ops.triton_gn failed to import)")

    dtypes = args.dtype or (["bf16"] if args.quick else list(DTYPES))
    reps = args.reps or (10 if args.quick else 30)
    timer = Timer(reps, warmup=3, flush=not args.no_flush)
    shapes = [s for s in GPU_SHAPES if not args.only or s[0] in args.only]
    if args.only and len(shapes) != len(set(args.only)):
        _fail(f"unknown shape in --only; known: {[s[0] for s in GPU_SHAPES]}")

    copy_gbs = copy_bandwidth(timer) if not args.warm else float("nan")
    head = ["# GPU benchmark: groupnorm Triton route", "", *environment(),
            f"- copy bandwidth (1 GiB dst.copy_(src), read + write): {copy_gbs:.0f} GB/s",
            f"- {reps} repetitions, median; L2 flushed: {not args.no_flush}", ""]
    print("\n".join(head), flush=True)
    cols = ["shape", "dtype", "layout", "act", "dir", "ms", "GB/s", "%copy", "xEager", "xCompile", "xLiger", "err"]
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print("\n".join(table), flush=True)
    rows, skipped = [], []
    case = -1
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    for name, shape, G in shapes:
        C = shape[1]
        for dname in dtypes:
            dtype = DTYPES[dname]
            for layout in args.layout:
                case += 1
                if case % shard_n != shard_i:
                    continue
                if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
                    skipped.append(f"{name} {dname} {layout}")
                    continue
                x = torch.randn(shape, dtype=dtype, device="cuda")
                if layout == "cl":
                    if x.dim() not in (4, 5):
                        continue  # 1-D shapes have no channels-last layout
                    x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
                w = torch.randn(C, dtype=dtype, device="cuda")
                b = torch.randn(C, dtype=dtype, device="cuda")
                for act in args.act:
                    impls = make_impls(G, act, not args.no_compile, not args.no_liger)
                    if args.warm:
                        warm(impls, x, w, b, args.dir, f"{name} {dname} {layout} {act}")
                        continue
                    try:
                        with torch.no_grad():
                            err = (impls["ours"](x, w, b).float() - impls["eager"](x, w, b).float()).abs().max().item()
                    except Exception as e:  # report and go on: one broken case must not end the sweep
                        line = f"| {name} | {dname} | {layout} | {act} | FAILED: {type(e).__name__}: {str(e)[:300]} |"
                        table.append(line)
                        print(line, flush=True)
                        continue
                    for direction in args.dir:
                        t = {}
                        for k, fn in impls.items():
                            try:
                                t[k] = time_direction(fn, x, w, b, direction, timer)
                            except Exception as e:  # a baseline that cannot run this case
                                print(f"<!-- {k} failed on {name} {dname} {layout} {act} {direction}: "
                                      f"{type(e).__name__}: {str(e)[:200]} -->", flush=True)
                        if "ours" not in t:
                            continue
                        gbs = min_bytes(shape, G, dtype, direction) / t["ours"] / 1e6
                        row = dict(shape=name, dtype=dname, layout=layout, act=act, dir=direction,
                                   ms=t["ours"], gbs=gbs, pct=100 * gbs / copy_gbs,
                                   bytes=x.numel() * x.element_size(),
                                   **{f"x{k}": t[k] / t["ours"] for k in ("eager", "compile", "liger") if k in t},
                                   err=err)
                        rows.append(row)

                        def r(k):
                            return f"{row[k]:.2f}" if k in row else "n/a"

                        line = (f"| {name} | {dname} | {layout} | {act} | {direction} | {row['ms']:.4f} | "
                                f"{gbs:.0f} | {row['pct']:.0f}% | {r('xeager')} | {r('xcompile')} | "
                                f"{r('xliger')} | {err:.1e} |")
                        table.append(line)
                        print(line, flush=True)
                del x, w, b
                torch.cuda.empty_cache()

    if args.warm:
        print(f"warm: done in {time.monotonic() - t_start:.0f} s (shard {args.shard})", flush=True)
        return 0
    summary = summarize(rows)
    if skipped:
        summary += ["", f"Not measured (past --budget-s {args.budget_s:.0f}): " + ", ".join(skipped)]
    print("\n".join(summary), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(head + table + summary) + "\n")
        print(f"\nwritten: {args.out}")
    return 0


def _geo(v):
    return math.exp(sum(math.log(t) for t in v) / len(v)) if v else float("nan")


def summarize(rows: list[dict]) -> list[str]:
    """The issue's goals, checked on the rows of this run."""
    out = ["", "## Goals (from this run)", ""]

    def check(label, ok, detail):
        out.append(f"- [{'x' if ok else ' '}] {label}: {detail}")

    big = [r for r in rows if r["bytes"] >= BIG and r["act"] == "none"]
    for d, goal in (("fwd", 85), ("bwd", 75)):
        sel = [r for r in big if r["dir"] == d]
        if sel:
            worst = min(sel, key=lambda r: r["pct"])
            check(f"{d} >= {goal}% of copy bandwidth on shapes >= 32 MB", worst["pct"] >= goal,
                  f"worst {worst['pct']:.0f}% ({worst['shape']} {worst['dtype']} {worst['layout']})")
    plain = [r for r in rows if r["act"] == "none"]
    for k, goal in (("xeager", 1.5), ("xcompile", 1.2)):
        v = [r[k] for r in plain if k in r]
        if v:
            check(f"geometric mean {k} >= {goal}", _geo(v) >= goal, f"{_geo(v):.2f} over {len(v)} rows")
    v = [r["xeager"] for r in plain if "xeager" in r and r["layout"] == "cl" and r["dtype"] in ("fp16", "bf16")]
    if v:
        check("geometric mean xEager >= 2 on channels-last half precision", _geo(v) >= 2, f"{_geo(v):.2f}")
    v = [r for r in plain if "xliger" in r]
    if v:
        worst = min(v, key=lambda r: r["xliger"])
        check(">= Liger on every shape", worst["xliger"] >= 1.0,
              f"worst {worst['xliger']:.2f} ({worst['shape']} {worst['dtype']} {worst['layout']} {worst['dir']})")
    v = [r for r in rows if "xeager" in r]
    if v:
        worst = min(v, key=lambda r: r["xeager"])
        check("never below 0.95x torch", worst["xeager"] >= 0.95,
              f"worst {worst['xeager']:.2f} ({worst['shape']} {worst['dtype']} {worst['layout']} {worst['act']} {worst['dir']})")
    v = [r["xeager"] for r in rows if r["act"] == "silu" and "xeager" in r]
    if v:
        check("fused GN+SiLU >= 2x eager GN then SiLU (geometric mean)", _geo(v) >= 2, f"{_geo(v):.2f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
