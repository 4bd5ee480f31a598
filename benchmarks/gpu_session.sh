#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): what the card and stack are, the Triton
# route's tests compiled and run for real, then the GPU benchmark, the host-cost probe and a
# torch.compile subset, all logs under $OUT (at most 8 files: the device tool's limit).
#
#   bash benchmarks/gpu_session.sh
#
# Phase A runs the tests and the benchmark's compile warm-up (`bench_gpu.py --warm`, sharded over
# processes) at the same time: both are CPU-bound Triton/Inductor compilation, and the timed
# phases after it then find every kernel in the on-disk caches. Nothing is timed during phase A.
#
# Env: OUT (log folder, default benchmarks/results/gpu-logs); TESTS_S, WARM_S, BENCH_S, PROBE_S,
# COMPILE_S (time limits, seconds); BENCH_ARGS (default: the full sweep without torch.compile,
# 10 repetitions, a 150 s budget); COMPILE_ARGS (the torch.compile subset; empty: skipped);
# WARM (processes, default 6); SKIP_TESTS=1. Liger-Kernel is a baseline when its wheel is
# carried in .whl/.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
BENCH_ARGS=${BENCH_ARGS:---no-compile --reps 10 --budget-s 150}
COMPILE_ARGS=${COMPILE_ARGS-"--no-liger --reps 10 --dtype bf16 --dir fwd fwd+bwd --only sd-unet-64 resnet-56 vae-256 --budget-s 40"}
WARM=${WARM:-6}
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0)) s] $*"; }

{ date -u; nvidia-smi; python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; nproc; } 2>&1 | tee "$OUT/env.txt"

stamp "phase A: tests + compile warm-up"
pids=()
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TESTS_S:-180}" python3 -m pytest -q -p no:cacheprovider -rs -n 6 tests/test_triton_route.py >"$OUT/tests.log" 2>&1 &
  pids+=($!)
fi
for i in $(seq 0 $((WARM - 1))); do
  # shellcheck disable=SC2086
  timeout "${WARM_S:-180}" python3 benchmarks/bench_gpu.py --warm --shard "$i/$WARM" $BENCH_ARGS >>"$OUT/warm.log" 2>&1 &
  pids+=($!)
done
if [ -n "$COMPILE_ARGS" ]; then
  for i in 0 1; do
    # shellcheck disable=SC2086
    timeout "${WARM_S:-180}" python3 benchmarks/bench_gpu.py --warm --shard "$i/2" $COMPILE_ARGS >>"$OUT/warm.log" 2>&1 &
    pids+=($!)
  done
fi
for p in "${pids[@]}"; do wait "$p"; done
tail -15 "$OUT/tests.log" 2>/dev/null
grep -c "warm: done" "$OUT/warm.log"; grep "failed" "$OUT/warm.log" | head -5

stamp "phase B: benchmark"
# shellcheck disable=SC2086
timeout "${BENCH_S:-210}" python3 benchmarks/bench_gpu.py $BENCH_ARGS --out "$OUT/gpu.md" >"$OUT/bench.log" 2>&1
tail -12 "$OUT/bench.log"

stamp "phase C: host cost per call"
timeout "${PROBE_S:-50}" python3 benchmarks/gpu_probe.py --host-only 2>&1 | tee "$OUT/probe.log"

if [ -n "$COMPILE_ARGS" ]; then
  stamp "phase D: torch.compile subset"
  # shellcheck disable=SC2086
  timeout "${COMPILE_S:-80}" python3 benchmarks/bench_gpu.py $COMPILE_ARGS --out "$OUT/compile.md" >>"$OUT/bench.log" 2>&1
  tail -8 "$OUT/bench.log"
fi
stamp "done"
