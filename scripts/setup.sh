#!/usr/bin/env bash
# Set up groupnorm from a fresh clone: the offline Fashion-MNIST data, torch, and the package
# with its test/ONNX/Triton extras. Safe to run again (each step is skipped when done).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Real data that ships offline: Debian's dataset-fashion-mnist (60k/10k images).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PY=${PYTHON:-python3}
# Bring your own torch (e.g. a CUDA build) and it is kept. Otherwise take 2.13.0: on this
# project's machines that is a local CPU wheel; a looser spec would pull a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# Triton runs the GPU kernels on CUDA and, with TRITON_INTERPRET=1, their CPU tests.
# 3.7.0 is the release tested with torch 2.13 here; a CUDA torch brings its own.
if ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install -q "triton==3.7.0" || echo "setup: triton not installed; the Triton route and its tests are skipped"
fi
"$PY" -m pip install -q -e ".[test,onnx]"
