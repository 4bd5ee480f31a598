"""What the memory system allows a CPU GroupNorm forward, measured without GroupNorm.

    python benchmarks/bench_cpu_floors.py [--reps 41] [--only sd-unet-64 ...]

For each shape of the one shape set (``shapes.CPU_SHAPES``; fp32, channels-last geometry:
N samples of H*W pixels x C channels) ``cpu_floors.cpp`` (plain C++ + OpenMP, no torch,
compiled here once with g++) times the access patterns a forward can be built from, on
arrays of the tensor's size: a copy; a read-only sweep (what the statistics cost); the output
sweep alone; two sweeps (statistics, then output: what a channels-last forward must do
when a sample does not fit in a core's L2, since its groups span the whole sample); one
sweep with L2 reuse (each 64 KiB chunk read, then written while in L2: what the contiguous
layout allows, a group being one contiguous run); the two sweeps with non-temporal stores;
and channel slabs (a few groups of a sample over all its pixels, the only way to make a
channels-last sample's unit of statistics fit in L2). Then, in this process, the CPU route's
fp32 forward (NCHW and channels-last, kernel into a preallocated y) and ``y.copy_(x)`` with
the same cold-L2 repetitions. Every number is a median of interleaved repetitions; the
table gives times relative to the copy of the same size (the issue's "% of copy bandwidth"
is copy time / forward time, since a forward moves the bytes of a copy).

Results: ``benchmarks/results/cpu_floors_*.md``; what they mean: docs/cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from shapes import CPU_SHAPES  # noqa: E402

from groupnorm.ops import cpu as gcpu  # noqa: E402

SRC = HERE / "cpu_floors.cpp"


def build() -> Path:
    """Compile cpu_floors.cpp once per source version (cached like the CPU kernels)."""
    tag = hashlib.sha256(SRC.read_bytes()).hexdigest()[:12]
    exe = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "groupnorm" / f"cpu_floors_{tag}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["g++", "-O3", "-march=native", "-fopenmp", str(SRC), "-o", str(tmp)], check=True)
        tmp.replace(exe)  # atomic: a concurrent run never executes a half-written file
    return exe


def floors(exe: Path, N: int, P: int, C: int, threads: int, reps: int) -> list[tuple[str, float]]:
    out = subprocess.run([str(exe), str(N), str(P), str(C), str(threads), str(reps)],
                         check=True, capture_output=True, text=True).stdout
    return [(name, float(us)) for _, name, us in (line.split("\t") for line in out.strip().splitlines())]


def ours_vs_copy(shape, G: int, reps: int) -> dict[str, float]:
    """Median us of the fp32 forward kernel (NCHW, channels-last) and of y.copy_(x), each
    repetition after sweeping 8 MiB (cold L2, as in cpu_floors), order shuffled."""
    flush = torch.zeros(2 << 20)
    fns = {}
    for layout in ("nchw", "cl"):
        x = torch.randn(shape)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
        w, b, y = torch.randn(shape[1]), torch.randn(shape[1]), torch.empty_like(x)
        fns[f"ours fwd {layout}"] = (lambda x=x, w=w, b=b, y=y: gcpu.forward(x, w, b, None, G, 1e-5, "none", out=y))
        if layout == "nchw":
            fns["torch copy_"] = (lambda x=x, y=y: y.copy_(x))
    ts = {k: [] for k in fns}
    for f in fns.values():
        f(), f()
    keys, rng = list(fns), random.Random(0)
    for _ in range(reps):
        rng.shuffle(keys)
        for k in keys:
            flush.add_(1)
            t = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t)
    return {k: 1e6 * statistics.median(v) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--only", nargs="+", help="shape names from benchmarks/shapes.py CPU_SHAPES")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    exe = build()
    print(f"# CPU floors: access patterns of a forward vs a copy, fp32 ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n")
    print(f"- `python benchmarks/bench_cpu_floors.py --reps {a.reps}`; {a.threads} threads; torch {torch.__version__}; "
          f"load average at start {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("- each cell: median time / median time of the copy of the same bytes (x -> y) in the same run; "
          "% of copy bandwidth = 100 / cell\n")
    rows = []
    for name, shape, G in CPU_SHAPES:
        if a.only and name not in a.only:
            continue
        N, C, P = shape[0], shape[1], math.prod(shape[2:])
        fl = floors(exe, N, P, C, a.threads, a.reps)
        ours = ours_vs_copy(shape, G, a.reps)
        rows.append((f"{name} {shape} {N * P * C * 4 / 2**20:.1f} MiB", fl, ours))
    cols = [n for n, _ in rows[0][1][1:]]
    print("| shape | copy us | " + " | ".join(cols) + " | ours fwd NCHW | ours fwd channels-last |")
    print("|---|---:|" + "---:|" * (len(cols) + 2))
    for label, fl, ours in rows:
        copy = fl[0][1]
        tc = ours["torch copy_"]
        print(f"| {label} | {copy:.0f} | " + " | ".join(f"{us / copy:.2f}" for _, us in fl[1:]) +
              f" | {ours['ours fwd nchw'] / tc:.2f} | {ours['ours fwd cl'] / tc:.2f} |", flush=True)
    print("\n(\"ours\" columns: our kernel's median / torch `y.copy_(x)`'s median, measured in this Python process "
          "with the same cold-L2 repetitions; the other columns are cpu_floors.cpp's, relative to its memcpy.)")


if __name__ == "__main__":
    main()
