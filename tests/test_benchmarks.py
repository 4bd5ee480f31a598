"""Smoke tests of the benchmark scripts: each runs on the smallest shape of the set with a few
repetitions and must print a well-formed table. Speed is not checked here (the benchmarks do
that); what fails here is a script that no longer runs or prints nonsense."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 300) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_bench_cpu_prints_every_row_with_ratios():
    out = run("benchmarks/bench_cpu.py", "--only", "sd-unet-16", "--dtype", "fp32", "--layout", "nchw",
              "--reps", "1", "--min-copy-gbs", "0")
    rows = table_rows(out, "sd-unet-16")
    # fwd, bwd, fwd+bwd, silu fwd, silu fwd+bwd, res+silu fwd+bwd
    assert len(rows) == 6, out
    for r in rows:
        ours, ref = (float(v) for v in r[4].split(" / "))
        assert ours > 0 and ref > 0
        assert re.fullmatch(r"[\d.]+x \([\d.]+x\)", r[5]), r


def _has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("g++") is None or not _has_avx512(),
                    reason="cpu_floors.cpp needs g++ and an AVX-512 CPU (the benchmark machine and CI have both)")
def test_bench_cpu_floors_prints_every_pattern():
    out = run("benchmarks/bench_cpu_floors.py", "--only", "sd-unet-16", "--reps", "5")
    header = next(line for line in out.splitlines() if line.startswith("| shape"))
    rows = table_rows(out, "sd-unet-16")
    assert len(rows) == 1
    cells = rows[0]
    assert len(cells) == len(header.split("|")[1:-1])
    # copy time in us, then ratios to the copy: all positive, the read-only sweep cheaper
    # than two sweeps (a read is part of them)
    ratios = [float(c) for c in cells[2:]]
    assert float(cells[1]) > 0 and all(r > 0 for r in ratios)
    assert ratios[0] < ratios[2]


def test_alloc_peak_counts_allocations_and_frees():
    # bench_cpu --memory's exact measure: the peak of bytes held through torch's CPU allocator
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_cpu import alloc_peak
    finally:
        sys.path.pop(0)
    import torch

    mib = 1 << 20

    def two_at_once():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a, b

    def one_after_another():
        a = torch.empty(mib, dtype=torch.uint8)
        del a
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del b

    assert alloc_peak(two_at_once) == 3 * mib
    assert alloc_peak(one_after_another) == 2 * mib  # frees are counted when they happen
