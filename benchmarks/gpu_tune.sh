#!/usr/bin/env bash
# Launch-configuration sweep on a lent GPU (one device call): compile every variant in parallel
# (one process per shape and dtype), then time them with benchmarks/gpu_probe.py. Logs in $OUT.
#   V='[{}, {"warps": 16}]' S="vae-256 big-128" bash benchmarks/gpu_tune.sh
# A variant {"legacy": true} times the heuristics of benchmarks/_legacy_triton_gn.py (see
# gpu_probe.heuristics). Env: WARM_S, BF16_S, FP32_S (time limits, seconds); TESTS=1 also runs
# tests/test_triton_route.py during the compile phase.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/gpu-logs}
mkdir -p "$OUT"
V=${V:-'[{}, {"pixel_major": true}, {"split": 16}, {"split": 32}, {"split": 64}, {"split": 128}, {"tile": 2048}, {"tile": 8192}, {"warps": 4}, {"warps": 16}, {"split": 64, "warps": 4}, {"items": 1}, {"items": 2}, {"items": 4}]'}
S=${S:-"vae-256 vae-512 unet3d-128 resnet50-gn-56 big-128 liger-1d maskrcnn-head sd-unet-64"}
t0=$(date +%s)
if [ "${TESTS:-0}" = 1 ]; then  # the Triton tests, compiled on the GPU, while the variants compile
  timeout "${WARM_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs -n 6 tests/test_triton_route.py >"$OUT/tests.log" 2>&1 &
fi
for s in $S; do for d in bf16 fp32; do
  timeout "${WARM_S:-150}" python3 benchmarks/gpu_probe.py --warm --no-host --only "$s" --dtype $d --variants "$V" >>"$OUT/warm.log" 2>&1 &
done; done
wait
echo "warm done $(( $(date +%s) - t0 )) s"; grep -c "<!--" "$OUT/warm.log"; tail -3 "$OUT/tests.log" 2>/dev/null
# shellcheck disable=SC2086
timeout "${BF16_S:-110}" python3 benchmarks/gpu_probe.py --no-host --only $S --dtype bf16 --budget-s $(( ${BF16_S:-110} - 20 )) --variants "$V" 2>&1 | tee "$OUT/probe_bf16.md" | cut -c1-200
echo "bf16 done $(( $(date +%s) - t0 )) s"
# shellcheck disable=SC2086
timeout "${FP32_S:-100}" python3 benchmarks/gpu_probe.py --no-host --only $S --dtype fp32 --budget-s $(( ${FP32_S:-100} - 20 )) --variants "$V" 2>&1 | tee "$OUT/probe_fp32.md" | cut -c1-200
echo "done $(( $(date +%s) - t0 )) s"
