// Operator registration of the groupnorm CPU kernels (built by groupnorm/ops/cpu.py, called
// as torch.ops.groupnorm_cpu.forward / .backward). torch/library.h instead of
// torch/extension.h (pybind11) keeps the one-time build short.
#include <torch/library.h>

#include "group_norm_cpu.h"

TORCH_LIBRARY(groupnorm_cpu, m) {
  m.def("forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, int G, float eps, "
        "int act, bool channels_last, Tensor(a!) y, Tensor(b!) mean, Tensor(c!) rstd, "
        "Tensor(d!)? sum_out) -> ()",
        &gn_forward);
  m.def("backward(Tensor dy, Tensor? dsum, Tensor xs, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, int G, int act, bool channels_last, Tensor(a!) dx, Tensor(b!)? dw, "
        "Tensor(c!)? db) -> ()",
        &gn_backward);
}
