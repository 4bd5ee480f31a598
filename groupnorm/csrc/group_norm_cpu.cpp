// Operator registration of the groupnorm CPU kernels (built by groupnorm/ops/cpu.py, called
// as torch.ops.groupnorm_cpu.*). torch/library.h instead of torch/extension.h (pybind11)
// keeps the one-time build short.
//
// fwd / bwd make the inputs dense in the output layout (the parameters too, in their own
// dtype: the kernels convert per read, ParamView) and allocate the outputs here (the same
// steps in Python cost ~20 us per call, several times the kernel on small tensors); fwd_out
// writes into a given y.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include "group_norm_cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

// A fresh output of >= 32 MiB is a new mmap (glibc's largest mmap threshold; smaller blocks
// are recycled from the heap, already mapped), which the kernel then page-faults 4 KiB at a
// time while writing it: 64 MiB took 22 ms to fill fresh vs 4.4 ms preallocated on the 2-core
// benchmark machine. Where the system grants transparent huge pages on request (THP
// "madvise", a common default), asking for them faults it 2 MiB at a time (7 ms). Advisory:
// if refused, nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.nbytes() < (size_t(32) << 20)) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + t.nbytes()) & ~(kHuge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// groupnorm.reference.memory_format_of: the layout an output of x's shape keeps
at::MemoryFormat format_of(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

at::ScalarType acc_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// weight / bias as the kernels read them: any floating dtype (converted per read), dense
c10::optional<at::Tensor> dense_param(const c10::optional<at::Tensor>& p) {
  if (!p.has_value() || !p->defined()) return c10::nullopt;
  return p->contiguous();
}

// The forward into y (x's output layout, as memory_format_of says): mean, rstd and the sum
// (an empty tensor without residual: an op's outputs must not alias) are allocated here.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_fwd_into(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, int64_t G, double eps, int64_t act, const at::Tensor& y) {
  const auto fmt = format_of(x);
  const auto acc = acc_of(x);
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor mean = at::empty({x.size(0), G}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({x.size(0), G}, x.options().dtype(acc));
  c10::optional<at::Tensor> r, s;
  if (residual.has_value() && residual->defined()) {
    r = residual->contiguous(fmt);
    s = at::empty_like(xc, xc.options(), fmt);
    advise_huge_pages(*s);
  }
  gn_forward(xc, dense_param(weight), dense_param(bias), r, G, eps, act,
             fmt != at::MemoryFormat::Contiguous, y, mean, rstd, s);
  return {mean, rstd, s.has_value() ? *s : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_fwd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, int64_t G, double eps, int64_t act) {
  at::Tensor y = at::empty_like(x, x.options(), format_of(x));
  advise_huge_pages(y);
  auto [mean, rstd, s] = gn_fwd_into(x, weight, bias, residual, G, eps, act, y);
  return {y, mean, rstd, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_bwd(
    const at::Tensor& dy, const c10::optional<at::Tensor>& dsum, const at::Tensor& xs,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t G, int64_t act) {
  const auto fmt = format_of(xs);
  const auto acc = acc_of(xs);
  at::Tensor xc = xs.contiguous(fmt);
  at::Tensor dyc = dy.to(xs.scalar_type()).contiguous(fmt);
  c10::optional<at::Tensor> dsc;
  if (dsum.has_value() && dsum->defined()) dsc = dsum->to(xs.scalar_type()).contiguous(fmt);
  at::Tensor dx = at::empty_like(xc, xc.options(), fmt);
  advise_huge_pages(dx);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  // dW / dB in the parameters' dtype, dense; empty when there is no parameter
  at::Tensor dw = has_w ? at::empty(weight->sizes(), weight->options()) : at::empty({0}, xs.options());
  at::Tensor db = has_b ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, xs.options());
  gn_backward(dyc, dsc, xc, dense_param(weight), dense_param(bias), mean.to(acc).contiguous(),
              rstd.to(acc).contiguous(), G, act, fmt != at::MemoryFormat::Contiguous, dx,
              has_w ? c10::optional<at::Tensor>(dw) : c10::nullopt,
              has_b ? c10::optional<at::Tensor>(db) : c10::nullopt);
  return {dx, dw, db};
}

c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// The eager training path of the cpu route: forward and backward as one C++ autograd
// Function. The Python autograd.Function it replaces costs ~40-50 us per forward+backward
// (Python frames in the engine, ctx handling), several times the kernels on small tensors.
// groupnorm/ops/group_norm.py uses it only in plain eager mode (no torch.func transform, no
// forward AD, no tracing); a backward that must itself be differentiable (create_graph)
// calls the Python op groupnorm::bwd, whose registered autograd differentiates the reference
// backward, as the Python path does.
struct GNFunction : public torch::autograd::Function<GNFunction> {
  // optional tensors: absent ones are not autograd inputs (an undefined at::Tensor would be)
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const c10::optional<at::Tensor>& w,
                                                const c10::optional<at::Tensor>& b,
                                                const c10::optional<at::Tensor>& r, int64_t G, double eps,
                                                int64_t act) {
    auto [y, mean, rstd, s] = gn_fwd(x, w, b, r, G, eps, act);
    const bool has_r = r.has_value() && r->defined();
    ctx->save_for_backward({has_r ? s : x, w.value_or(at::Tensor()), b.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["G"] = G;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["has_r"] = has_r;
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // an unused output (often the sum) gets no zero tensor
    return {y, mean, rstd, s};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &xs = saved[0], &w = saved[1], &b = saved[2], &mean = saved[3], &rstd = saved[4];
    const int64_t G = ctx->saved_data["G"].toInt(), act = ctx->saved_data["act"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool has_r = ctx->saved_data["has_r"].toBool();
    at::Tensor dy = grads[0];
    if (!dy.defined()) dy = at::zeros_like(xs);  // only the returned sum was used downstream
    const at::Tensor& ds = grads[3];
    c10::optional<at::Tensor> dsum;
    if (has_r && ds.defined() && ds.numel() == xs.numel()) dsum = ds;
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      static const char* kActName[] = {"none", "silu", "gelu", "relu"};
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("groupnorm::bwd", "")
                           .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                               const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                               const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                               const at::Tensor&, const at::Tensor&, int64_t, double, c10::string_view,
                               c10::string_view)>();
      std::tie(dx, dw, db) = op.call(dy, dsum, xs, opt(w), opt(b), mean, rstd, G, eps, kActName[act], "cpu");
    } else {
      std::tie(dx, dw, db) = gn_bwd(dy, dsum, xs, opt(w), opt(b), mean, rstd, G, act);
    }
    return {dx, w.defined() ? dw : at::Tensor(), b.defined() ? db : at::Tensor(), has_r ? dx : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_fwd_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, int64_t G, double eps, int64_t act) {
  auto out = GNFunction::apply(x, weight, bias, residual, G, eps, act);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY(groupnorm_cpu, m) {
  m.def("fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, int G, float eps, int act) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        &gn_fwd);
  // benchmarks: the forward into a preallocated y (a fresh large y is page-faulted, and the
  // allocator, not the kernel, would be timed)
  m.def("fwd_out(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, int G, float eps, int act, "
        "Tensor(a!) y) -> (Tensor, Tensor, Tensor)",
        &gn_fwd_into);
  m.def("bwd(Tensor dy, Tensor? dsum, Tensor xs, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, int G, int act) -> (Tensor, Tensor, Tensor)",
        &gn_bwd);
  // fwd with its backward recorded by a C++ autograd node (eager training, see GNFunction)
  m.def("fwd_autograd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, int G, float eps, int act) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        &gn_fwd_autograd);
}
