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
    args = ap.parse_args()
    TIMER = Timer(reps=15, warmup=3, flush=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    variants = [dict()] + [dict(tile=t) for t in (1024, 2048, 8192, 16384)] + \
               [dict(split=s) for s in (1, 4, 16, 64)] + [dict(split=16, tile=t) for t in (2048, 8192)]
    if args.variants:
        variants = json.loads(args.variants)
    t0 = time.monotonic()
    print("| shape | layout | dir | eager ms | default ms | best ms | best variant | default cfg |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name, shape, G in [] if args.host_only else GPU_SHAPES:
        if args.only and name not in args.only:
            continue
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
            if T.use_pixel_major(xv, C, Cg, S):
                dcfg = T.pick_cl_config(N, C, S, T._num_sms(x.device))
            else:
                dcfg = T.pick_config(N, G, Cg, S, xv.stride(1) == 1 and S > 1, T._num_sms(x.device))
            for d, fn, efn in (("fwd", fx, ex), ("bwd", bx, eb)):
                e_ms = gpu_ms(efn)
                res = []
                for v in variants:
                    try:
                        with T.config_override(**v):
                            res.append((gpu_ms(fn), v))
                    except Exception as exc:
                        print(f"<!-- {name} {layout} {d} {v}: {type(exc).__name__}: {str(exc)[:150]} -->")
                base = res[0][0]
                best = min(res, key=lambda r: r[0])
                every = "; ".join(f"{json.dumps(v)} {t:.4f}" for t, v in res[1:]) if args.variants else ""
                print(f"| {name} | {layout} | {d} | {e_ms:.4f} | {base:.4f} | {best[0]:.4f} | {best[1]} | {dcfg} | {every}", flush=True)
            del x, dy, y
            torch.cuda.empty_cache()

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
    print("\n| host cost per call, (2,320,64,64) bf16 | us |\n|---|---|")
    for k, fn in rows.items():
        print(f"| {k} | {host_us(fn):.1f} |", flush=True)


if __name__ == "__main__":
    main()
