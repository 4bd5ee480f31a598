// GroupNorm backward CPU kernels: contiguous (NC*) and channels-last (N*C) layouts.
//
// Two passes over (x, dy): pass 1 reduces, per (n, c), A = sum dz and B = sum dz * xhat
// (dz = dy * act'(z), z recomputed from x); then per (n, g) c1 = sum_c w_c A / D and
// c2 = sum_c w_c B / D, dweight = sum_n B, dbias = sum_n A (fixed order over n);
// pass 2 writes dx = (dz * w - c1 - xhat * c2) * rstd (+ dsum).
// xhat is always formed as (x - mean) * rstd, so a large mean costs no precision.
#include "group_norm_cpu.h"

#include <memory>
#include <vector>

namespace gn {
namespace {

template <typename T>
using AccT = typename Acc<T>::type;

// ---------------------------------------------------------------- contiguous (N, C, *)
template <typename T, int ACT>
void bwd_nchw(const T* dy, const T* dsum, const T* x, ParamView<AccT<T>> w, ParamView<AccT<T>> b,
              const AccT<T>* mean, const AccT<T>* rstd, T* dx, AccT<T>* A, AccT<T>* B,
              int64_t N, int64_t C, int64_t HW, int64_t G) {
  using S = AccT<T>;
  using V = typename IO<T>::V;
  constexpr int64_t kV = V::size();
  const int64_t Cg = C / G, D = Cg * HW;
  // tensors >= 64 MiB: dx is streamed (non-temporal stores), as the forward's output
  const bool nt = want_stream<T>(dx, N * C * HW * int64_t(sizeof(T)), HW * int64_t(sizeof(T)));
  at::parallel_for(0, N * G, 1, [&](int64_t beg, int64_t end) {
    // with an activation, pass 1 keeps dz = dy * act'(z) of the group (fp32, in L2) so that
    // pass 2 needs neither dy nor a second act' evaluation (exp + reciprocal per value)
    std::vector<S> dzbuf(ACT != kNone ? D : 0);
    for (int64_t ng = beg; ng < end; ng++) {
      const int64_t n = ng / G, g = ng % G;
      const S m = mean[ng], rs = rstd[ng];
      const V vm(m), vr(rs);
      S c1 = 0, c2 = 0;
      for (int64_t ci = 0; ci < Cg; ci++) {
        const int64_t c = g * Cg + ci;
        const S wc = w ? w[c] : S(1), bc = b ? b[c] : S(0);
        const V vw(wc), vb(bc);
        const T* xr = x + ng * D + ci * HW;
        const T* dyr = dy + ng * D + ci * HW;
        S* dzp = ACT != kNone ? dzbuf.data() + ci * HW : nullptr;
        V a0(0), a1(0), q0(0), q1(0);
        int64_t i = 0;
        auto dz_of = [&](const V& xh, const V& d) {
          if constexpr (ACT == kNone) return d;
          else return d * act_grad<ACT>(at::vec::fmadd(xh, vw, vb));
        };
        // pairs of vectors (bf16: in BF16x32's lane order, dz kept in that order too: pass 2
        // walks the row with the same steps)
        for (; i + 2 * kV <= HW; i += 2 * kV) {
          V x0, x1, d0, d1;
          load_pair(xr + i, x0, x1);
          load_pair(dyr + i, d0, d1);
          V xh0 = (x0 - vm) * vr, xh1 = (x1 - vm) * vr;
          V dz0 = dz_of(xh0, d0), dz1 = dz_of(xh1, d1);
          if constexpr (ACT != kNone) {
            dz0.store(dzp + i);
            dz1.store(dzp + i + kV);
          }
          a0 += dz0;
          a1 += dz1;
          q0 = at::vec::fmadd(dz0, xh0, q0);
          q1 = at::vec::fmadd(dz1, xh1, q1);
        }
        for (; i + kV <= HW; i += kV) {
          V xh = (IO<T>::load(xr + i) - vm) * vr;
          V dz = dz_of(xh, IO<T>::load(dyr + i));
          if constexpr (ACT != kNone) dz.store(dzp + i);
          a0 += dz;
          q0 = at::vec::fmadd(dz, xh, q0);
        }
        if (i < HW) {
          const int64_t k = HW - i;
          V xh = keep_n((load_n(xr + i, k) - vm) * vr, k);
          V dz = keep_n(dz_of(xh, load_n(dyr + i, k)), k);
          if constexpr (ACT != kNone) dz.store(dzp + i, k);
          a1 += dz;
          q1 = at::vec::fmadd(dz, xh, q1);
        }
        A[n * C + c] = hsum(a0 + a1);
        B[n * C + c] = hsum(q0 + q1);
        c1 += wc * A[n * C + c];
        c2 += wc * B[n * C + c];
      }
      c1 /= S(D);
      c2 /= S(D);
      const V k1(c1), k2(c2);
      for (int64_t ci = 0; ci < Cg; ci++) {
        const int64_t c = g * Cg + ci;
        const S wc = w ? w[c] : S(1);
        const V vw(wc);
        const int64_t off = ng * D + ci * HW;
        const T* xr = x + off;
        const T* dyr = dy + off;
        T* dxr = dx + off;
        const S* dzp = ACT != kNone ? dzbuf.data() + ci * HW : nullptr;
        auto dx_of = [&](const V& xv, const V& dz) {
          V xh = (xv - vm) * vr;
          // the reference's order: (dz * w - c1 - xhat * c2) * rstd (exact 0 for 1-value groups)
          return ((rounded(dz * vw) - k1) - xh * k2) * vr;
        };
        int64_t i = 0;
        auto loop = [&](auto nan_safe, auto nt_t) {  // pairs of vectors, the same steps as pass 1
          for (; i + 2 * kV <= HW; i += 2 * kV) {
            V x0, x1, dz0, dz1;
            load_pair(xr + i, x0, x1);
            if constexpr (ACT != kNone) {
              dz0 = V::loadu(dzp + i);
              dz1 = V::loadu(dzp + i + kV);
            } else {
              load_pair(dyr + i, dz0, dz1);
            }
            V r0 = dx_of(x0, dz0), r1 = dx_of(x1, dz1);
            if (dsum) {
              V s0, s1;
              load_pair(dsum + off + i, s0, s1);
              r0 = r0 + s0;
              r1 = r1 + s1;
            }
            store_pair<decltype(nan_safe)::value, decltype(nt_t)::value>(dxr + i, r0, r1);
          }
        };
        with_flag(nt, [&](auto nt_t) {
          if constexpr (std::is_same_v<T, BFloat16>) {
            // finite statistics and sums: no NaN/Inf in this row's x and dy (they feed A, B, the
            // mean), so no NaN with a payload reaches the rounding; dsum is added unchecked
            const bool finite = !dsum && std::isfinite(m) && std::isfinite(rs) && std::isfinite(c1) &&
                                std::isfinite(c2) && std::isfinite(wc);
            if (finite) loop(std::false_type{}, nt_t);
            else loop(std::true_type{}, nt_t);
          } else {
            loop(std::true_type{}, nt_t);  // the other types' stores have no NaN test to skip
          }
        });
        for (; i + kV <= HW; i += kV) {
          V r = dx_of(IO<T>::load(xr + i), ACT != kNone ? V::loadu(dzp + i) : IO<T>::load(dyr + i));
          if (dsum) r = r + IO<T>::load(dsum + off + i);
          IO<T>::store(dxr + i, r);
        }
        if (i < HW) {
          const int64_t k = HW - i;
          V r = dx_of(load_n(xr + i, k), ACT != kNone ? V::loadu(dzp + i, k) : load_n(dyr + i, k));
          if (dsum) r = r + load_n(dsum + off + i, k);
          store_n(dxr + i, r, k);
        }
      }
    }
    fence_streamed(nt);
  });
}

// ---------------------------------------------------------------- channels-last (N, *, C)
template <typename T, int ACT>
void bwd_cl(const T* dy, const T* dsum, const T* x, ParamView<AccT<T>> w, ParamView<AccT<T>> b,
            const AccT<T>* mean, const AccT<T>* rstd, T* dx, AccT<T>* A, AccT<T>* B,
            int64_t N, int64_t C, int64_t P, int64_t G) {
  using S = AccT<T>;
  using V = typename IO<T>::V;
  constexpr int64_t kV = V::size();
  const int64_t Cg = C / G, D = Cg * P;
  // tensors >= 64 MiB: dx is streamed (non-temporal stores), as the forward's output
  const bool nt = want_stream<T>(dx, N * P * C * int64_t(sizeof(T)), C * int64_t(sizeof(T)));
  // A sample whose x and dy take at most 3 MiB is done by one task (pass 2 re-reads it from
  // L2, or in part from L3); otherwise samples are cut into pixel blocks. 3 MiB, not the
  // L2's 2 MiB: (2, 1280, 16, 16) fp32 (2.6 MB) ran 1.20-1.23x faster as one task per sample
  // than in 16 pixel blocks (their per-block setup and merges); at 3.2-8 MiB per sample
  // ((8, 256, 56, 56), (2, 32, 32, 32, 32)) one task per sample measured the same (0.92-1.07x).
  // Shape-only choice: deterministic.
  const bool fused = N >= 2 && 2 * P * C * int64_t(sizeof(T)) <= (int64_t(3) << 20);
  const int64_t nblk = fused ? 1 : cl_blocks(N, P);
  std::vector<S> PA(N * nblk * C), PB(N * nblk * C), K1(N * C), K2(N * C);

  const int64_t R = cl_pixels_per_row(C), RC = R * C;

  // With an activation, pass 1 keeps dz = dy * act'(z) (fp32, x's layout) when all of it fits
  // in 8 MiB (~ in cache): pass 2 then reads dz instead of dy and skips the second act'
  // (exp + reciprocal per value; a third of the fused backward on (2, 1280, 16, 16)). Larger
  // tensors recompute it: there the extra dz write would cost more memory traffic than the
  // arithmetic it saves (and as much memory as x).
  std::unique_ptr<S[]> dzbuf;  // uninitialized (pass 1 writes every value before pass 2 reads it)
  if (ACT != kNone && N * P * C * int64_t(sizeof(S)) <= (int64_t(8) << 20)) dzbuf.reset(new S[N * P * C]);
  S* const dzs = dzbuf.get();

  // per-channel values of sample n, repeated R times (R pixels per inner loop)
  struct Scratch {
    std::vector<S> mc, rc, wc, bc, k1, k2, la, lb;
    int64_t n = -1;
  };
  auto fill = [&, C, G, Cg, R, RC](Scratch& sc, int64_t n) {
    if (sc.n == n) return;
    sc.n = n;
    for (auto* v : {&sc.mc, &sc.rc, &sc.wc, &sc.bc, &sc.k1, &sc.k2, &sc.la, &sc.lb}) v->resize(RC);
    for (int64_t g = 0; g < G; g++) {
      for (int64_t ci = 0; ci < Cg; ci++) {
        const int64_t c = g * Cg + ci;
        sc.mc[c] = mean[n * G + g];
        sc.rc[c] = rstd[n * G + g];
        sc.wc[c] = w ? w[c] : S(1);
        sc.bc[c] = b ? b[c] : S(0);
      }
    }
    for (auto* v : {&sc.mc, &sc.rc, &sc.wc, &sc.bc}) repeat_rows(v->data(), C, R);
  };

  // pass 1 over pixels [p0, p1) of sample n: partial sums of dz and dz * xhat per channel
  auto pass1 = [&, C, P, R, RC](Scratch& sc, int64_t n, int64_t p0, int64_t p1, S* sa, S* sb) {
    const S* __restrict mc = sc.mc.data(); const S* __restrict rc = sc.rc.data();
    const S* __restrict wc = sc.wc.data(); const S* __restrict bc = sc.bc.data();
    S* __restrict la = sc.la.data();
    S* __restrict lb = sc.lb.data();
    std::fill(la, la + RC, S(0));
    std::fill(lb, lb + RC, S(0));
    // The column walk (column_sums2: a 2-vector column down the rows, stride R * C values)
    // defeats the hardware prefetchers, and over a whole pixel range each column re-fetched
    // its lines from L3. So the rows go in sub-blocks of ~8K values (32 KB of x, of dy),
    // and while one sub-block is walked the next one's lines of x and dy are prefetched into
    // L2, one line of each per row step. Sums per lane still run over the rows in order:
    // bitwise the same result. 1.2-1.9x on the channels-last backward (docs/cpu.md).
    const char* pf = nullptr;      // next line of x to prefetch (dy: the same offset)
    const char* pf_end = nullptr;
    const std::ptrdiff_t pf_dy = reinterpret_cast<const char*>(dy) - reinterpret_cast<const char*>(x);
    auto f = [&](int64_t p) {  // rows of R pixels starting at pixel p
      const T* xr = x + (n * P + p) * C;
      const T* dyr = dy + (n * P + p) * C;
      S* dzr = dzs ? dzs + (n * P + p) * C : nullptr;
      return [&, xr, dyr, dzr](int64_t rr, int64_t i, int64_t k, V& a, V& q) {
        if (pf < pf_end) {
          __builtin_prefetch(pf, 0, 2);  // read, into L2 (prefetcht1 on x86)
          __builtin_prefetch(pf + pf_dy, 0, 2);
          pf += 64;
        }
        V xh = keep_n((ld(xr + rr * RC + i, k) - lda(mc + i, k)) * lda(rc + i, k), k);
        V dz = ld(dyr + rr * RC + i, k);
        if constexpr (ACT != kNone) {
          dz = dz * act_grad<ACT>(at::vec::fmadd(xh, lda(wc + i, k), lda(bc + i, k)));
          if (dzr) sta(dzr + rr * RC + i, dz, k);
        }
        dz = keep_n(dz, k);
        a += dz;
        q = at::vec::fmadd(dz, xh, q);
      };
    };
    const int64_t full = (p1 - p0) / R, rem = (p1 - p0) % R;
    const int64_t QR = std::max<int64_t>(1, 8192 / RC);  // rows per sub-block
    for (int64_t r0 = 0; r0 < full; r0 += QR) {
      const int64_t nr = std::min(QR, full - r0);
      const int64_t next = std::min(QR, full - r0 - nr);  // rows of the next sub-block
      pf = reinterpret_cast<const char*>(x + (n * P + p0 + (r0 + nr) * R) * C);
      pf_end = pf + next * RC * int64_t(sizeof(T));
      column_sums2<2, V>(la, lb, nr, RC, f(p0 + r0 * R));
    }
    pf = pf_end = nullptr;  // the partial row: no prefetch
    if (rem) column_sums2<2, V>(la, lb, 1, rem * C, f(p0 + full * R));
    for (int64_t c = 0; c < C; c++) {
      S a = 0, q = 0;
      for (int64_t rr = 0; rr < R; rr++) {
        a += la[rr * C + c];
        q += lb[rr * C + c];
      }
      sa[c] = a;
      sb[c] = q;
    }
  };

  // per (n, c) totals in block order -> A, B; per (n, g) c1, c2 -> per-channel K1, K2
  auto finalize = [&](int64_t n) {
    for (int64_t c = 0; c < C; c++) {
      S a = 0, q = 0;
      for (int64_t bi = 0; bi < nblk; bi++) {
        a += PA[(n * nblk + bi) * C + c];
        q += PB[(n * nblk + bi) * C + c];
      }
      A[n * C + c] = a;
      B[n * C + c] = q;
    }
    for (int64_t g = 0; g < G; g++) {
      S c1 = 0, c2 = 0;
      for (int64_t ci = 0; ci < Cg; ci++) {
        const int64_t c = g * Cg + ci;
        const S wc = w ? w[c] : S(1);
        c1 += wc * A[n * C + c];
        c2 += wc * B[n * C + c];
      }
      for (int64_t ci = 0; ci < Cg; ci++) {
        K1[n * C + g * Cg + ci] = c1 / S(D);
        K2[n * C + g * Cg + ci] = c2 / S(D);
      }
    }
  };

  // pass 2: dx = (dz * w - c1 - xhat * c2) * rstd (+ dsum), the reference's order
  auto pass2 = [&, C, P, R](Scratch& sc, int64_t n, int64_t p0, int64_t p1) {
    std::copy(&K1[n * C], &K1[n * C] + C, sc.k1.data());
    std::copy(&K2[n * C], &K2[n * C] + C, sc.k2.data());
    repeat_rows(sc.k1.data(), C, R);
    repeat_rows(sc.k2.data(), C, R);
    const S* __restrict mc = sc.mc.data(); const S* __restrict rc = sc.rc.data();
    const S* __restrict wc = sc.wc.data(); const S* __restrict bc = sc.bc.data();
    const S* __restrict k1 = sc.k1.data(); const S* __restrict k2 = sc.k2.data();
    for (int64_t p = p0; p < p1; p += R) {
      const int64_t off = (n * P + p) * C;
      const T* xr = x + off;
      const T* dyr = dy + off;
      const T* dsr = dsum ? dsum + off : nullptr;
      T* dxr = dx + off;
      const S* dzr = dzs ? dzs + off : nullptr;
      for_vec<kV>(std::min(R, p1 - p) * C, [&](int64_t i, int64_t k) {
        V xh = (ld(xr + i, k) - lda(mc + i, k)) * lda(rc + i, k);
        V dz;
        if constexpr (ACT != kNone) {
          if (dzr) dz = lda(dzr + i, k);
          else dz = ld(dyr + i, k) * act_grad<ACT>(at::vec::fmadd(xh, lda(wc + i, k), lda(bc + i, k)));
        } else {
          dz = ld(dyr + i, k);
        }
        V res = ((rounded(dz * lda(wc + i, k)) - lda(k1 + i, k)) - xh * lda(k2 + i, k)) * lda(rc + i, k);
        if (dsr) res = res + ld(dsr + i, k);
        if (nt && k == kV) store_stream(dxr + i, res);
        else st(dxr + i, res, k);
      });
    }
  };

  if (fused) {
    at::parallel_for(0, N, 1, [&](int64_t beg, int64_t end) {
      Scratch sc;
      for (int64_t n = beg; n < end; n++) {
        fill(sc, n);
        pass1(sc, n, 0, P, &PA[n * C], &PB[n * C]);
        finalize(n);
        pass2(sc, n, 0, P);
      }
      fence_streamed(nt);
    });
    return;
  }
  at::parallel_for(0, N * nblk, 1, [&](int64_t beg, int64_t end) {
    Scratch sc;
    for (int64_t t = beg; t < end; t++) {
      const int64_t n = t / nblk, bi = t % nblk;
      fill(sc, n);
      pass1(sc, n, P * bi / nblk, P * (bi + 1) / nblk, &PA[t * C], &PB[t * C]);
    }
  });
  for (int64_t n = 0; n < N; n++) finalize(n);
  at::parallel_for(0, N * nblk, 1, [&](int64_t beg, int64_t end) {
    Scratch sc;
    for (int64_t t = beg; t < end; t++) {
      const int64_t n = t / nblk, bi = t % nblk;
      fill(sc, n);
      pass2(sc, n, P * bi / nblk, P * (bi + 1) / nblk);
    }
    fence_streamed(nt);
  });
}

template <typename T, int ACT>
void bwd_typed(const at::Tensor& dy, const at::Tensor& dsum, const at::Tensor& x,
               const at::Tensor& w, const at::Tensor& b, const at::Tensor& mean,
               const at::Tensor& rstd, int64_t G, bool cl, const at::Tensor& dx,
               const at::Tensor& A, const at::Tensor& B) {
  using S = AccT<T>;
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / (N * C);
  const T* dsp = dsum.defined() ? dsum.data_ptr<T>() : nullptr;
  const ParamView<S> wp(w), bp(b);
  auto f = cl ? bwd_cl<T, ACT> : bwd_nchw<T, ACT>;
  f(dy.data_ptr<T>(), dsp, x.data_ptr<T>(), wp, bp, mean.data_ptr<S>(), rstd.data_ptr<S>(),
    dx.data_ptr<T>(), A.data_ptr<S>(), B.data_ptr<S>(), N, C, P, G);
}

template <typename T>
void bwd_act(int64_t act, const at::Tensor& dy, const at::Tensor& dsum, const at::Tensor& x,
             const at::Tensor& w, const at::Tensor& b, const at::Tensor& mean, const at::Tensor& rstd,
             int64_t G, bool cl, const at::Tensor& dx, const at::Tensor& A, const at::Tensor& B) {
  switch (act) {
    case kNone: return bwd_typed<T, kNone>(dy, dsum, x, w, b, mean, rstd, G, cl, dx, A, B);
    case kSilu: return bwd_typed<T, kSilu>(dy, dsum, x, w, b, mean, rstd, G, cl, dx, A, B);
    case kGelu: return bwd_typed<T, kGelu>(dy, dsum, x, w, b, mean, rstd, G, cl, dx, A, B);
    case kRelu: return bwd_typed<T, kRelu>(dy, dsum, x, w, b, mean, rstd, G, cl, dx, A, B);
  }
  TORCH_CHECK(false, "groupnorm cpu: unknown activation code ", act);
}

}  // namespace
}  // namespace gn

// dy, dsum, xs, dx dense in the layout given by channels_last; weight/bias dense, any float
// dtype (ParamView); dw/db (if given) receive the per-channel sums (any float dtype).
void gn_backward(const at::Tensor& dy, const c10::optional<at::Tensor>& dsum, const at::Tensor& xs,
                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                 const at::Tensor& mean, const at::Tensor& rstd, int64_t G, int64_t act,
                 bool channels_last, const at::Tensor& dx, const c10::optional<at::Tensor>& dw,
                 const c10::optional<at::Tensor>& db) {
  auto fmt = channels_last ? (xs.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d)
                           : at::MemoryFormat::Contiguous;
  TORCH_CHECK(xs.numel() > 0 && xs.is_contiguous(fmt) && dy.is_contiguous(fmt) && dx.is_contiguous(fmt),
              "groupnorm cpu: bad layout");
  at::Tensor ds = dsum.has_value() ? *dsum : at::Tensor();
  if (ds.defined()) TORCH_CHECK(ds.is_contiguous(fmt), "groupnorm cpu: bad dsum layout");
  at::Tensor w = weight.has_value() ? *weight : at::Tensor();
  at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  const int64_t N = xs.size(0), C = xs.size(1);
  // per (n, c) sums of dz (A) and dz * xhat (B), in the accumulation dtype
  at::Tensor A = at::empty({N, C}, mean.options());
  at::Tensor B = at::empty({N, C}, mean.options());
  switch (xs.scalar_type()) {
    case at::kFloat: gn::bwd_act<float>(act, dy, ds, xs, w, b, mean, rstd, G, channels_last, dx, A, B); break;
    case at::kDouble: gn::bwd_act<double>(act, dy, ds, xs, w, b, mean, rstd, G, channels_last, dx, A, B); break;
    case at::kBFloat16: gn::bwd_act<c10::BFloat16>(act, dy, ds, xs, w, b, mean, rstd, G, channels_last, dx, A, B); break;
    case at::kHalf: gn::bwd_act<c10::Half>(act, dy, ds, xs, w, b, mean, rstd, G, channels_last, dx, A, B); break;
    default: TORCH_CHECK(false, "groupnorm cpu: unsupported dtype ", xs.scalar_type());
  }
  // dweight = sum_n B, dbias = sum_n A: a fixed-order sum over n (sum(0) of a contiguous
  // (N, C) tensor reduces each column sequentially for small N; do it explicitly to be sure),
  // written into row 0 of B and A (row 0 of column c is read only for column c): no
  // temporaries, so the backward allocates exactly what torch's does (dx, dw, db, two (N, C)
  // sums; benchmarks/bench_cpu.py --memory)
  if ((dw.has_value() && dw->defined()) || (db.has_value() && db->defined())) {
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "gn_dwdb", [&] {
      scalar_t* a = A.data_ptr<scalar_t>();
      scalar_t* q = B.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; c++) {
        scalar_t s1 = 0, s2 = 0;
        for (int64_t n = 0; n < N; n++) {
          s1 += q[n * C + c];
          s2 += a[n * C + c];
        }
        q[c] = s1;
        a[c] = s2;
      }
    });
    const at::Tensor sw = B[0], sb = A[0];
    if (dw.has_value() && dw->defined()) dw->copy_(sw);
    if (db.has_value() && db->defined()) db->copy_(sb);
  }
}
