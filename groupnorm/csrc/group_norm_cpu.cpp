// Python bindings of the groupnorm CPU kernels (built by groupnorm/ops/cpu.py).
#include <torch/extension.h>

#include "group_norm_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "groupnorm CPU kernels (see docs/cpu.md)";
  m.def("forward", &gn_forward, "GroupNorm forward into preallocated outputs");
  m.def("backward", &gn_backward, "GroupNorm backward into preallocated outputs");
}
