#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): what the card and stack are, the Triton
# route's tests compiled and run for real, then the GPU benchmark, all logs under $OUT.
#
#   bash benchmarks/gpu_session.sh [bench_gpu.py args...]
#
# Env: OUT (log folder, default benchmarks/results/gpu-logs), TESTS_S / BENCH_S (time limits,
# seconds), SKIP_TESTS=1. Liger-Kernel is used as a baseline when its wheel is carried in .whl/.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ date -u; nvidia-smi; python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_triton_route.py 2>&1 | tee "$OUT/tests.log" | tail -40
fi
timeout "${BENCH_S:-300}" python3 benchmarks/bench_gpu.py "$@" --out "$OUT/gpu.md" 2>&1 | tee "$OUT/bench.log" | tail -60
