// GroupNorm forward CPU kernels: contiguous (NC*) and channels-last (N*C) layouts.
//
// Statistics: per group, blocks of ~8-16K elements are reduced with a two-pass
// (mean, then centred sum of squares) while the block is in L1/L2, and the block summaries
// are merged in block order with Chan's formula. So x is read once from memory for the
// statistics and once for the output, and E[x^2]-E[x]^2 is never formed.
#include "group_norm_cpu.h"

#include <vector>

namespace gn {
namespace {

template <typename T>
using AccT = typename Acc<T>::type;

// s = T(x + r) for len contiguous elements (the residual sum, rounded to x's dtype)
template <typename T>
void add_round(const T* x, const T* r, T* s, int64_t len) {
  using V = typename IO<T>::V;
  constexpr int64_t kV = V::size();
  int64_t i = 0;
  for (; i + kV <= len; i += kV) IO<T>::store(s + i, IO<T>::load(x + i) + IO<T>::load(r + i));
  if (i < len) store_n(s + i, load_n(x + i, len - i) + load_n(r + i, len - i), len - i);
}

// mean of len values, summed as k + sum(x - k) with k = the first value: the shifted terms
// are of the size of the spread, not of the mean, so a large mean loses no digits here
template <typename T>
AccT<T> block_mean(const T* p, int64_t len) {
  using V = typename IO<T>::V;
  constexpr int64_t kV = V::size();
  const AccT<T> k = static_cast<AccT<T>>(p[0]);
  const V vk(k);
  V a0(0), a1(0), a2(0), a3(0);
  int64_t i = 0;
  for (; i + 4 * kV <= len; i += 4 * kV) {  // the lanes' order does not matter to a sum
    V x0, x1, x2, x3;
    load_pair(p + i, x0, x1);
    load_pair(p + i + 2 * kV, x2, x3);
    a0 += x0 - vk;
    a1 += x1 - vk;
    a2 += x2 - vk;
    a3 += x3 - vk;
  }
  for (; i + kV <= len; i += kV) a0 += IO<T>::load(p + i) - vk;
  if (i < len) a1 += keep_n(load_n(p + i, len - i) - vk, len - i);
  return k + hsum((a0 + a1) + (a2 + a3)) / AccT<T>(len);
}

template <typename T>
AccT<T> block_sqdev(const T* p, int64_t len, AccT<T> m) {
  using V = typename IO<T>::V;
  constexpr int64_t kV = V::size();
  const V vm(m);
  V a0(0), a1(0), a2(0), a3(0);
  int64_t i = 0;
  for (; i + 4 * kV <= len; i += 4 * kV) {
    V x0, x1, x2, x3;
    load_pair(p + i, x0, x1);
    load_pair(p + i + 2 * kV, x2, x3);
    const V d0 = x0 - vm, d1 = x1 - vm, d2 = x2 - vm, d3 = x3 - vm;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
  }
  for (; i + kV <= len; i += kV) {
    V d = IO<T>::load(p + i) - vm;
    a0 = at::vec::fmadd(d, d, a0);
  }
  if (i < len) {
    V d = keep_n(load_n(p + i, len - i) - vm, len - i);
    a1 = at::vec::fmadd(d, d, a1);
  }
  return hsum((a0 + a1) + (a2 + a3));
}

// mean and M2 of the len values at p from their shifted sums sd = sum(x - k) and
// sq = sum((x - k)^2): M2 = sq - sd^2 / len, unless k was far from the mean (sq > 2 M2, see
// block_stats), then exactly in two passes over p (still in L1/L2)
template <typename T>
void stats_from_shifted(const T* p, int64_t len, AccT<T> k, AccT<T> sd, AccT<T> sq, AccT<T>& mean,
                        AccT<T>& m2) {
  using S = AccT<T>;
  const S dm = sd / S(len);
  const S m2v = sq - sd * dm;
  if (m2v * S(2) >= sq && sq > S(0)) {
    mean = k + dm;
    m2 = m2v;
  } else {
    mean = block_mean(p, len);
    m2 = block_sqdev(p, len, mean);
  }
}

// Block statistics in one pass over memory: with d = x - k, mean = k + sum(d) / len and
// M2 = sum(d^2) - sum(d)^2 / len. The subtraction cancels log2(sum(d^2) / M2) bits, so the
// shift k must be near the block mean: the caller passes the mean of the group's previous
// blocks (for the first block, the mean of its first values). When k was not near
// (sum(d^2) > 2 M2, i.e. |mean - k| > std: a trend or an outlier at the block's start, a
// constant block, NaN), the block is redone by the exact two passes above while it is still
// in L1/L2. So at most 1 bit is lost, and E[x^2] - E[x]^2 of unshifted data is never formed.
template <typename T>
void block_stats(const T* p, int64_t len, AccT<T> k, AccT<T>& mean, AccT<T>& m2) {
  using S = AccT<T>;
  using V = typename IO<T>::V;
  constexpr int64_t kV = V::size();
  const V vk(k);
  V s0(0), s1(0), s2(0), s3(0), q0(0), q1(0), q2(0), q3(0);
  auto acc = [](const V& d, V& sa, V& qa) {
    sa += d;
    qa = at::vec::fmadd(d, d, qa);
  };
  int64_t i = 0;
  for (; i + 4 * kV <= len; i += 4 * kV) {
    V x0, x1, x2, x3;
    load_pair(p + i, x0, x1);
    load_pair(p + i + 2 * kV, x2, x3);
    acc(x0 - vk, s0, q0);
    acc(x1 - vk, s1, q1);
    acc(x2 - vk, s2, q2);
    acc(x3 - vk, s3, q3);
  }
  for (; i + kV <= len; i += kV) acc(IO<T>::load(p + i) - vk, s0, q0);
  if (i < len) acc(keep_n(load_n(p + i, len - i) - vk, len - i), s1, q1);
  stats_from_shifted(p, len, k, hsum((s0 + s1) + (s2 + s3)), hsum((q0 + q1) + (q2 + q3)), mean, m2);
}

// mean of the first min(len, 16) values: the shift of a group's first block_stats
template <typename T>
AccT<T> head_mean(const T* p, int64_t len) {
  const int64_t n = std::min<int64_t>(len, 16);
  AccT<T> s = 0;
  for (int64_t i = 0; i < n; i++) s += static_cast<AccT<T>>(p[i]);
  return s / AccT<T>(n);
}

// y = act((x - mean) * scale + shift) for a contiguous row sharing one (mean, scale, shift)
template <typename T, int ACT>
void apply_row(const T* src, T* dst, int64_t len, AccT<T> mean, AccT<T> scale, AccT<T> shift,
               const T* pf) {
  using V = typename IO<T>::V;
  constexpr int64_t kV = V::size();
  const V vm(mean), vs(scale), vb(shift);
  auto pairs = [&](auto nan_safe) {  // whole pairs of vectors; returns where they end
    int64_t j = 0;
    for (; j + 2 * kV <= len; j += 2 * kV) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      if constexpr (sizeof(T) == 2) _mm_prefetch(reinterpret_cast<const char*>(pf + j), _MM_HINT_T1);
#endif
      V x0, x1;
      load_pair(src + j, x0, x1);
      store_pair<decltype(nan_safe)::value>(dst + j, act_fwd<ACT>(at::vec::fmadd(x0 - vm, vs, vb)),
                                            act_fwd<ACT>(at::vec::fmadd(x1 - vm, vs, vb)));
    }
    return j;
  };
  int64_t i;
  // bf16: a finite group mean means no NaN/Inf in the row (src is part of the group), and
  // finite scale/shift no NaN weight/bias: then no NaN with a payload can reach the rounding
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (std::isfinite(mean) && std::isfinite(scale) && std::isfinite(shift)) i = pairs(std::false_type{});
    else i = pairs(std::true_type{});
  } else {
    i = pairs(std::true_type{});  // the other types' stores have no NaN test to skip
  }
  for (; i + kV <= len; i += kV)
    IO<T>::store(dst + i, act_fwd<ACT>(at::vec::fmadd(IO<T>::load(src + i) - vm, vs, vb)));
  if (i < len)
    store_n(dst + i, act_fwd<ACT>(at::vec::fmadd(load_n(src + i, len - i) - vm, vs, vb)), len - i);
}

template <typename S>
inline void finish_stats(S mean, S m2, int64_t D, S eps, S* mean_o, S* rstd_o) {
  // D > 0 here (empty tensors never reach the kernels)
  S var = m2 / S(D);
  *mean_o = mean;
  *rstd_o = S(1) / std::sqrt(var + eps);
}

// ---------------------------------------------------------------- contiguous (N, C, *)

// One sweep over D positions that writes the output of the group at `src` (kOut) and takes
// the statistics of the group at `nxt`: the next group of the task, the next D values in
// memory. So the next group's x is loaded for its statistics while this group's x is
// re-read (from L1/L2) for its output, instead of a separate statistics sweep: the two
// loops' load stalls overlap and x is read from memory once. The statistics are those of
// block_stats (one pass per 8192-value block with shift k = the mean so far, the first
// block's k the mean of its first 16 values; an exact two-pass redo when k was far), summed
// per position in an order fixed by D and HW alone: a task's first group gets its
// statistics from this same function with kOut = false, so results do not depend on how the
// groups are split among threads. scale/shift: per channel of the output group.
template <typename T, int ACT, bool kOut, bool kNanSafe, bool kNT = false>
void out_and_stats(const T* src, T* dst, const T* nxt, int64_t D, int64_t HW, AccT<T> mean,
                   const AccT<T>* scale, const AccT<T>* shift, AccT<T>& nmean, AccT<T>& nm2) {
  using S = AccT<T>;
  using V = typename IO<T>::V;
  constexpr int64_t kV = V::size();
  constexpr int64_t kB = 8192;
  double cnt = 0;
  S gm = 0, gm2 = 0;
  const V vm(mean);
  for (int64_t off = 0; off < D; off += kB) {
    const int64_t stop = std::min(off + kB, D), len = stop - off;
    const S k = off == 0 ? head_mean(nxt + off, len) : gm;
    const V vk(k);
    V s0(0), s1(0), s2(0), s3(0), q0(0), q1(0), q2(0), q3(0);
    auto acc = [&](const V& v, V& sa, V& qa) {
      const V d = v - vk;
      sa += d;
      qa = at::vec::fmadd(d, d, qa);
    };
    auto out2 = [&](int64_t i, const V& vs, const V& vb) {
      V x0, x1;
      load_pair(src + i, x0, x1);
      store_pair<kNanSafe, kNT>(dst + i, act_fwd<ACT>(at::vec::fmadd(x0 - vm, vs, vb)),
                           act_fwd<ACT>(at::vec::fmadd(x1 - vm, vs, vb)));
    };
    for (int64_t i = off; i < stop;) {  // channel segments of the output group
      const int64_t c = i / HW, seg = std::min(stop, (c + 1) * HW);
      V vs(S(0)), vb(S(0));
      if constexpr (kOut) {
        vs = V(scale[c]);
        vb = V(shift[c]);
      }
      for (; i + 4 * kV <= seg; i += 4 * kV) {
        V n0, n1, n2, n3;
        load_pair(nxt + i, n0, n1);
        load_pair(nxt + i + 2 * kV, n2, n3);
        if constexpr (kOut) {
          out2(i, vs, vb);
          out2(i + 2 * kV, vs, vb);
        }
        acc(n0, s0, q0);
        acc(n1, s1, q1);
        acc(n2, s2, q2);
        acc(n3, s3, q3);
      }
      while (i < seg) {  // the segment's last < 4 vectors, in memory order
        const int64_t k = std::min(kV, seg - i);
        if constexpr (kOut) store_n(dst + i, act_fwd<ACT>(at::vec::fmadd(load_n(src + i, k) - vm, vs, vb)), k);
        const V d = keep_n(load_n(nxt + i, k) - vk, k);
        s0 += d;
        q0 = at::vec::fmadd(d, d, q0);
        i += k;
      }
    }
    S bmean, bm2;
    stats_from_shifted(nxt + off, len, k, hsum((s0 + s1) + (s2 + s3)), hsum((q0 + q1) + (q2 + q3)), bmean, bm2);
    chan_combine(cnt, gm, gm2, double(len), bmean, bm2);
  }
  nmean = gm;
  nm2 = gm2;
}

template <typename T, int ACT>
void fwd_nchw(const T* x, const T* r, T* s, T* y, ParamView<AccT<T>> w, ParamView<AccT<T>> b,
              AccT<T>* mean_o, AccT<T>* rstd_o, int64_t N, int64_t C, int64_t HW, int64_t G,
              AccT<T> eps) {
  using S = AccT<T>;
  const int64_t Cg = C / G, D = Cg * HW;
  constexpr int64_t kB = 8192;  // block: the second (centred) pass re-reads it from L1
  // out_and_stats (one sweep per group: this group's output + the next group's statistics)
  // where it measured faster than two sweeps per group (A/B, session 4): groups <= 256 KiB,
  // whose x is still in L2 when its output is written one group later (1.03-1.29x), and
  // tensors >= 64 MiB, beyond what stays in cache, where each sweep costs a DRAM pass
  // (1.13-1.23x). Between the two (e.g. 512 KiB-1 MiB groups of an 8 MiB tensor) the separate
  // sweeps re-read a group from L2 right after its statistics and win (fused: 0.89-0.99x).
  // Half types with an activation keep the separate sweeps too: their output loop is
  // compute-bound and already hides the next group's prefetch (fused SiLU bf16: 0.93x).
  const int64_t group_bytes = D * int64_t(sizeof(T));
  const bool one_sweep = !r && (ACT == kNone || sizeof(T) >= 4) &&
                         (group_bytes <= (int64_t(256) << 10) || N * G * group_bytes >= (int64_t(64) << 20));
  // Tensors >= 64 MiB (every sweep a DRAM pass): the output goes out with non-temporal stores,
  // which write y without first reading each of its lines (a regular store's
  // read-for-ownership): 1.27x bf16 / 1.49x fp32 on (4,512,128,128) into a preallocated y,
  // 1.02-1.08x when y is freshly allocated (page faults dominate), in-process A/B, session 7.
  // y then leaves the caches, where a tensor this size would not stay anyway. AVX-512 only,
  // and only when every full-vector store is 64-byte aligned (y aligned, groups and channel
  // rows multiples of 64 bytes); the rest of the output (a task's last group, row tails)
  // uses regular stores. sfence at the end of each task orders the streamed lines.
  const bool nt = want_stream<T>(y, N * G * group_bytes, HW * int64_t(sizeof(T)));
  if (one_sweep) {
    at::parallel_for(0, N * G, 1, [&](int64_t beg, int64_t end) {
      std::vector<S> scl(Cg), shf(Cg);
      S mean, m2;
      out_and_stats<T, ACT, false, true>(nullptr, nullptr, x + beg * D, D, HW, S(0), nullptr, nullptr, mean, m2);
      for (int64_t ng = beg; ng < end; ng++) {
        finish_stats(mean, m2, D, eps, mean_o + ng, rstd_o + ng);
        const S mu = mean, rs = rstd_o[ng];
        const int64_t g = ng % G, base = ng * D;
        bool finite = std::isfinite(mu) && std::isfinite(rs);
        for (int64_t ci = 0; ci < Cg; ci++) {
          const int64_t c = g * Cg + ci;
          scl[ci] = rs * (w ? w[c] : S(1));
          shf[ci] = b ? b[c] : S(0);
          finite = finite && std::isfinite(scl[ci]) && std::isfinite(shf[ci]);
        }
        if (ng + 1 < end) {
          // bf16 with finite statistics and affine: rounding without the NaN test (apply_row)
          auto sweep = [&](auto nan_safe) {
            with_flag(nt, [&](auto nt_t) {
              out_and_stats<T, ACT, true, decltype(nan_safe)::value, decltype(nt_t)::value>(
                  x + base, y + base, x + base + D, D, HW, mu, scl.data(), shf.data(), mean, m2);
            });
          };
          if constexpr (std::is_same_v<T, BFloat16>) {
            if (finite) sweep(std::false_type{});
            else sweep(std::true_type{});
          } else {
            sweep(std::true_type{});  // the other types' stores have no NaN test to skip
          }
        } else {
          for (int64_t ci = 0; ci < Cg; ci++)
            apply_row<T, ACT>(x + base + ci * HW, y + base + ci * HW, HW, mu, scl[ci], shf[ci], x + base + D + ci * HW);
        }
      }
      fence_streamed(nt);
    });
    return;
  }
  at::parallel_for(0, N * G, 1, [&](int64_t beg, int64_t end) {
    for (int64_t ng = beg; ng < end; ng++) {
      const int64_t base = ng * D;  // the group is one contiguous run of D values
      const T* src = (r ? s : x) + base;
      double cnt = 0;
      S mean = 0, m2 = 0;
      for (int64_t off = 0; off < D; off += kB) {
        const int64_t len = std::min(kB, D - off);
        if (r) add_round(x + base + off, r + base + off, s + base + off, len);
        S bmean, bm2;
        block_stats(src + off, len, off == 0 ? head_mean(src, len) : mean, bmean, bm2);
        chan_combine(cnt, mean, m2, double(len), bmean, bm2);
      }
      finish_stats(mean, m2, D, eps, mean_o + ng, rstd_o + ng);
      const S rs = rstd_o[ng];
      const int64_t g = ng % G;
      for (int64_t ci = 0; ci < Cg; ci++) {
        const int64_t c = g * Cg + ci;
        const S sc = rs * (w ? w[c] : S(1));
        const S sh = b ? b[c] : S(0);
        // half types: while this group is written from L1/L2, the next one (the next D
        // values in memory) is prefetched into L2, a line per 32 values written: its
        // statistics pass then reads from L2 instead of stalling on L3 / DRAM (1.2-1.4x on
        // the bf16 forward; the fp32 output pass is no longer compute-bound enough to hide
        // the extra traffic: no gain there, and a loss on tensors larger than L3)
        apply_row<T, ACT>(src + ci * HW, y + base + ci * HW, HW, mean, sc, sh, x + base + D + ci * HW);
      }
    }
  });
}

// a[c] = sum over rr < R of a[rr * C + c] (rr in order), vectorized: the R pixel copies of the
// per-channel sums folded into the first C entries before the scalar per-group sums (which
// then add C values per sub-block instead of R * C: for small C that scalar tail was a large
// share of the statistics time). Fixed order: deterministic.
template <typename S>
inline void fold_rows(S* a, int64_t C, int64_t R) {
  constexpr int64_t kV = Vectorized<S>::size();
  for (int64_t rr = 1; rr < R; rr++) {
    const S* b = a + rr * C;
    for_vec<kV>(C, [&](int64_t i, int64_t k) { sta(a + i, lda(a + i, k) + lda(b + i, k), k); });
  }
}

// ---------------------------------------------------------------- channels-last (N, *, C)
template <typename T, int ACT>
void fwd_cl(const T* x, const T* r, T* s, T* y, ParamView<AccT<T>> w, ParamView<AccT<T>> b,
            AccT<T>* mean_o, AccT<T>* rstd_o, int64_t N, int64_t C, int64_t P, int64_t G,
            AccT<T> eps) {
  using S = AccT<T>;
  using V = typename IO<T>::V;
  constexpr int64_t kV = V::size();
  const int64_t Cg = C / G;
  // A sample that fits in L2 (2 MiB) is done by one task (statistics, then the output while the
  // sample is still in L2); otherwise samples are cut into pixel blocks, statistics merged
  // in block order, and the output written by a second parallel sweep. Shape-only choice.
  const int64_t sample_bytes = P * C * int64_t(sizeof(T)) * (r ? 3 : 1);
  const bool fused = N >= 2 && sample_bytes <= (int64_t(2) << 20);
  const int64_t nblk = fused ? 1 : cl_blocks(N, P);
  // pixels per sub-block: ~64K values (128-256 KiB, L2-resident for the exact redo); the
  // per-sub-block bookkeeping (folds, per-group sums, Chan merges) is then amortized over 4x
  // more values than with 16K (1.02-1.14x on the channels-last forward, session 4)
  const int64_t Q = std::max<int64_t>(64, 65536 / C);
  std::vector<S> part_mean(N * nblk * G), part_m2(N * nblk * G);

  const int64_t R = cl_pixels_per_row(C), RC = R * C;
  // The statistics' column walk reads 1-4 lines per row per column step, RC values apart:
  // the hardware prefetchers do not run far enough ahead of that stride, and the loop stalled
  // on its loads (perf: most samples on the first use of each load). So each step prefetches
  // the same columns this many rows ahead (2.5-8 KiB for bf16): bf16 1.2-1.3x on the
  // statistics sweep; 2 or 4 rows less, 16 rows or an extra L2 prefetch 32-64 rows ahead no
  // more (session 7). Prefetches past the sub-block or the tensor are harmless (no faults).
  constexpr int64_t kClPrefetchRows = 8;
  // tensors >= 64 MiB: the output sweep streams y (non-temporal stores), as fwd_nchw does
  // and for the same reason, where every row's full vectors are 64-byte aligned
  const bool nt = want_stream<T>(y, N * P * C * int64_t(sizeof(T)), C * int64_t(sizeof(T)));
  const int64_t Qr = (Q + R - 1) / R * R;  // sub-block: a whole number of R-pixel rows

  struct Scratch {
    std::vector<S> sumc, sqc, meanc, gmean, gm2, bmean, bm2, perm;
    std::vector<double> gcnt;
    // apply's per-channel constants of sample apply_n (kept across that sample's blocks)
    std::vector<S> ac;
    int64_t apply_n = -1;
    bool fold = false, finite = true;
  };

  // statistics of pixels [p0, p1) of sample n -> gmean / gm2 (Chan-merged sub-blocks)
  auto stats = [&, C, G, Cg, P, R, RC, Qr](Scratch& sc, int64_t n, int64_t p0, int64_t p1, S* out_mean, S* out_m2) {
    sc.sumc.resize(RC); sc.sqc.resize(RC); sc.meanc.resize(RC);
    sc.gmean.assign(G, S(0)); sc.gm2.assign(G, S(0)); sc.bmean.resize(G); sc.bm2.resize(G);
    sc.gcnt.assign(G, 0.0);
    S* __restrict sumc = sc.sumc.data();
    S* __restrict sqc = sc.sqc.data();
    S* __restrict meanc = sc.meanc.data();
    for (int64_t q0 = p0; q0 < p1; q0 += Qr) {
      const int64_t nq = std::min(Qr, p1 - q0);
      const int64_t off = (n * P + q0) * C;
      if (r) add_round(x + off, r + off, s + off, nq * C);
      const T* src = (r ? s : x) + off;
      const int64_t full = nq / R, rem = nq % R;  // whole R-pixel rows, then a partial one
      const S inv = S(1) / S(nq * Cg);
      auto fold_groups = [&](const S* a, int64_t g) {  // a group's channels, in channel order
        S acc = 0;
        for (int64_t ci = 0; ci < Cg; ci++) acc += a[g * Cg + ci];
        return acc;
      };
      // One pass (as block_stats): per-channel sums of d = x - k_g and d^2 over the
      // sub-block's pixels, k_g = the group's mean so far (first sub-block: the mean of its
      // first <= 8 pixels' values of the group), M2 = sum(d^2) - sum(d)^2 / count.
      const int64_t hp = std::min<int64_t>(nq, 8);
      if (sc.gcnt[0] == 0) {
        // (every group is new in a task's first sub-block) per-channel sums of the first hp
        // pixels as vectors, then per group: a scalar chain over hp * Cg values per group
        // here was 14% of the statistics sweep on (1, 320, 64, 64) (16 tasks of 256 pixels)
        for_vec<kV>(C, [&](int64_t c, int64_t k) {
          V a = ld(src + c, k);
          for (int64_t pp = 1; pp < hp; pp++) a += ld(src + pp * C + c, k);
          sta(sumc + c, a, k);
        });
      }
      for (int64_t g = 0; g < G; g++) {
        const S k = sc.gcnt[g] == 0 ? fold_groups(sumc, g) / S(hp * Cg) : sc.gmean[g];
        for (int64_t ci = 0; ci < Cg; ci++) meanc[g * Cg + ci] = k;
      }
      repeat_rows(meanc, C, R);
      std::fill(sumc, sumc + RC, S(0));
      std::fill(sqc, sqc + RC, S(0));
      auto f1 = [&](const T* base, int64_t i0 = 0) {  // lanes [i0, ...) of each row
        return [&, base, i0](int64_t rr, int64_t i, int64_t k, V& a, V& q) {
          // a line kClPrefetchRows rows ahead per vector (fp32: one per line; 1.01-1.10x
          // on the fp32 channels-last forward, session 7)
          __builtin_prefetch(base + (rr + kClPrefetchRows) * RC + i0 + i, 0, 3);  // prefetcht0 on x86
          V d = keep_n(ld(base + rr * RC + i0 + i, k) - lda(meanc + i0 + i, k), k);
          a += d;
          q = at::vec::fmadd(d, d, q);
        };
      };
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<T, BFloat16>) {
        // whole rows in BF16x32's lane order (k and the sums permuted alike), 64 values per
        // column step; the partial last row in memory order below
        sc.perm.resize(3 * RC);
        S* __restrict kp = sc.perm.data();
        S* __restrict sp = kp + RC;
        S* __restrict qp = sp + RC;
        to_even_odd(meanc, kp, RC);
        std::fill(sp, sp + 2 * RC, S(0));
        int64_t i = 0;
        auto step = [&](auto nv) {  // nv = 2 or 4 vectors (32 or 64 values) per column step
          constexpr int NV = decltype(nv)::value;
          for (; i + 16 * NV <= RC; i += 16 * NV) {
            V a[NV], q[NV], kk[NV];
            for (int j = 0; j < NV; j++) {
              a[j] = V::loadu(sp + i + 16 * j);
              q[j] = V::loadu(qp + i + 16 * j);
              kk[j] = V::loadu(kp + i + 16 * j);
            }
            for (int64_t rr = 0; rr < full; rr++) {
              for (int j = 0; j < NV; j += 2)
                _mm_prefetch(reinterpret_cast<const char*>(src + (rr + kClPrefetchRows) * RC + i + 16 * j), _MM_HINT_T0);
              for (int j = 0; j < NV; j += 2) {
                __m512 e, o;
                BF16x32::load(src + rr * RC + i + 16 * j, e, o);
                const V d0 = V(e) - kk[j], d1 = V(o) - kk[j + 1];
                a[j] += d0;
                q[j] = at::vec::fmadd(d0, d0, q[j]);
                a[j + 1] += d1;
                q[j + 1] = at::vec::fmadd(d1, d1, q[j + 1]);
              }
            }
            for (int j = 0; j < NV; j++) {
              a[j].store(sp + i + 16 * j);
              q[j].store(qp + i + 16 * j);
            }
          }
        };
        step(std::integral_constant<int, 4>{});
        step(std::integral_constant<int, 2>{});
        if (i < RC) column_sums2<1, V>(sp + i, qp + i, full, RC - i, f1(src, i));  // < 32 lanes
        from_even_odd(sp, sumc, RC);
        from_even_odd(qp, sqc, RC);
      } else
#endif
      {
        column_sums2<4, V>(sumc, sqc, full, RC, f1(src));
      }
      if (rem) column_sums2<4, V>(sumc, sqc, 1, rem * C, f1(src + full * RC));
      fold_rows(sumc, C, R);
      fold_rows(sqc, C, R);
      bool ok = true;
      for (int64_t g = 0; g < G; g++) {
        const S sd = fold_groups(sumc, g), sq = fold_groups(sqc, g);
        const S dm = sd * inv;
        sc.bmean[g] = meanc[g * Cg] + dm;
        sc.bm2[g] = sq - sd * dm;
        ok = ok && sc.bm2[g] * S(2) >= sq && sq > S(0);
      }
      if (!ok) {
        // some k_g was far from its group's mean (a trend, outliers, a constant group, NaN):
        // redo the sub-block exactly in two passes while it is in cache, k_g = the group's
        // first value (pass A: block means; pass B: centred sums of squares)
        for (int64_t g = 0; g < G; g++) {
          const S k = static_cast<S>(src[g * Cg]);
          for (int64_t ci = 0; ci < Cg; ci++) meanc[g * Cg + ci] = k;
        }
        repeat_rows(meanc, C, R);
        std::fill(sumc, sumc + RC, S(0));
        auto fa = [&](const T* base) {
          return [&, base](int64_t rr, int64_t i, int64_t k, V& a) {
            a += keep_n(ld(base + rr * RC + i, k) - lda(meanc + i, k), k);
          };
        };
        column_sums<4, V>(sumc, full, RC, fa(src));
        if (rem) column_sums<4, V>(sumc, 1, rem * C, fa(src + full * RC));
        fold_rows(sumc, C, R);
        for (int64_t g = 0; g < G; g++) {
          const S bm = meanc[g * Cg] + fold_groups(sumc, g) * inv;
          for (int64_t ci = 0; ci < Cg; ci++) meanc[g * Cg + ci] = bm;
        }
        repeat_rows(meanc, C, R);
        std::fill(sumc, sumc + RC, S(0));
        auto fb = [&](const T* base) {
          return [&, base](int64_t rr, int64_t i, int64_t k, V& a) {
            V d = keep_n(ld(base + rr * RC + i, k) - lda(meanc + i, k), k);
            a = at::vec::fmadd(d, d, a);
          };
        };
        column_sums<4, V>(sumc, full, RC, fb(src));
        if (rem) column_sums<4, V>(sumc, 1, rem * C, fb(src + full * RC));
        fold_rows(sumc, C, R);
        for (int64_t g = 0; g < G; g++) {
          sc.bmean[g] = meanc[g * Cg];
          sc.bm2[g] = fold_groups(sumc, g);
        }
      }
      for (int64_t g = 0; g < G; g++)
        chan_combine(sc.gcnt[g], sc.gmean[g], sc.gm2[g], double(nq * Cg), sc.bmean[g], sc.bm2[g]);
    }
    for (int64_t g = 0; g < G; g++) {
      out_mean[g] = sc.gmean[g];
      out_m2[g] = sc.gm2[g];
    }
  };

  // y = act((x - mean_g) * rstd_g * w_c + b_c) for pixels [p0, p1) of sample n
  auto apply = [&, C, G, Cg, P, R, RC](Scratch& sc, int64_t n, int64_t p0, int64_t p1) {
    // per-channel constants (memory order; bf16 also in BF16x32's lane order), set up once
    // per sample: a task's pixel blocks of one sample reuse them (a setup per block was
    // ~8% of the bf16 output sweep of (1, 320, 64, 64), 16 blocks)
    sc.ac.resize(6 * RC);
    S* __restrict mc = sc.ac.data();
    S* __restrict scl = mc + RC;
    S* __restrict bc = scl + RC;
    S* __restrict sclp = bc + RC;
    S* __restrict bcp = sclp + RC;
    S* __restrict mcp = bcp + RC;
    if (sc.apply_n != n) {
      sc.apply_n = n;
      for (int64_t g = 0; g < G; g++) {
        for (int64_t ci = 0; ci < Cg; ci++) {
          const int64_t c = g * Cg + ci;
          mc[c] = mean_o[n * G + g];
          scl[c] = rstd_o[n * G + g] * (w ? w[c] : S(1));
          bc[c] = b ? b[c] : S(0);
        }
      }
      repeat_rows(mc, C, R);
      repeat_rows(scl, C, R);
      repeat_rows(bc, C, R);
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<T, BFloat16>) {
        // finite: as apply_row, no NaN with a payload can reach the rounding.
        // fold: z = x * scale + (shift - mean * scale), one FMA per vector instead of a
        // subtraction and an FMA (the FMA rounds x * scale + folded shift once; what is lost
        // is the folded shift's own rounding, |mean * scale| * 2^-24 <= 1.5e-5 absolute
        // under the bound below, far inside bf16's resolution of an O(1) output; a group
        // mean far from 0 in units of its std keeps the subtraction, as test_large_mean
        // checks). torch's CPU kernel always folds. Only here: the contiguous bf16 forward
        // measured no gain from it (0.98-1.04x, session 7; its loops wait on memory), and
        // other types' outputs would see the folded shift's rounding.
        sc.finite = true;
        sc.fold = true;
        for (int64_t c = 0; c < C; c++) {
          sc.finite = sc.finite && std::isfinite(mc[c]) && std::isfinite(scl[c]) && std::isfinite(bc[c]);
          sc.fold = sc.fold && std::abs(mc[c] * scl[c]) <= S(256);
        }
        sc.fold = sc.fold && sc.finite;
        to_even_odd(mc, mcp, RC);
        to_even_odd(scl, sclp, RC);
        to_even_odd(bc, bcp, RC);
        if (sc.fold)
          for (int64_t i = 0; i < RC; i++) bcp[i] = S(double(bcp[i]) - double(mcp[i]) * double(sclp[i]));
      }
#endif
    }
    const T* src = (r ? s : x) + (n * P) * C;
    T* dst = y + (n * P) * C;
    auto rows = [&](auto row_fn) {
      for (int64_t p = p0; p < p1; p += R) row_fn(src + p * C, dst + p * C, std::min(R, p1 - p) * C);
    };
    auto tail = [&](const T* row, T* out, int64_t i0, int64_t len) {  // memory-order lanes
      for_vec<kV>(len - i0, [&](int64_t i, int64_t k) {
        i += i0;
        V z = act_fwd<ACT>(at::vec::fmadd(ld(row + i, k) - lda(mc + i, k), lda(scl + i, k), lda(bc + i, k)));
        if (nt && k == kV) store_stream(out + i, z);  // rows are 64-byte aligned (want_stream)
        else st(out + i, z, k);
      });
    };
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, BFloat16>) {
      // 32 values per step in BF16x32's lane order, the per-channel constants permuted alike
      auto loop = [&](auto nan_safe, auto fold, auto nt_t) {
        rows([&](const T* row, T* out, int64_t len) {
          int64_t i = 0;
          for (; i + 32 <= len; i += 32) {
            // 1 KiB ahead: the loads of x stalled (as in the statistics sweep); 1.03-1.08x
            // on this sweep, 512 B less, 2-8 KiB or an L2 prefetch no more (session 7)
            _mm_prefetch(reinterpret_cast<const char*>(row + i + 512), _MM_HINT_T0);
            __m512 e, o;
            BF16x32::load(row + i, e, o);
            V ze = V(e), zo = V(o);
            if constexpr (!decltype(fold)::value) {
              ze = ze - V::loadu(mcp + i);
              zo = zo - V::loadu(mcp + i + 16);
            }
            ze = at::vec::fmadd(ze, V::loadu(sclp + i), V::loadu(bcp + i));
            zo = at::vec::fmadd(zo, V::loadu(sclp + i + 16), V::loadu(bcp + i + 16));
            BF16x32::store<decltype(nan_safe)::value, decltype(nt_t)::value>(out + i, act_fwd<ACT>(ze),
                                                                             act_fwd<ACT>(zo));
          }
          tail(row, out, i, len);
        });
      };
      with_flag(nt, [&](auto nt_t) {
        if (sc.fold) loop(std::false_type{}, std::true_type{}, nt_t);
        else if (sc.finite) loop(std::false_type{}, std::false_type{}, nt_t);
        else loop(std::true_type{}, std::false_type{}, nt_t);
      });
      return;
    }
#endif
    rows([&](const T* row, T* out, int64_t len) { tail(row, out, 0, len); });
  };

  if (fused) {
    at::parallel_for(0, N, 1, [&](int64_t beg, int64_t end) {
      Scratch sc;
      for (int64_t n = beg; n < end; n++) {
        stats(sc, n, 0, P, &part_mean[n * G], &part_m2[n * G]);
        for (int64_t g = 0; g < G; g++)
          finish_stats(part_mean[n * G + g], part_m2[n * G + g], Cg * P, eps, mean_o + n * G + g, rstd_o + n * G + g);
        apply(sc, n, 0, P);
      }
      fence_streamed(nt);
    });
    return;
  }

  at::parallel_for(0, N * nblk, 1, [&](int64_t beg, int64_t end) {
    Scratch sc;
    for (int64_t t = beg; t < end; t++) {
      const int64_t n = t / nblk, bi = t % nblk;
      stats(sc, n, P * bi / nblk, P * (bi + 1) / nblk, &part_mean[t * G], &part_m2[t * G]);
    }
  });

  // merge the pixel blocks of each (n, g) in block order
  for (int64_t n = 0; n < N; n++) {
    for (int64_t g = 0; g < G; g++) {
      double cnt = 0;
      S mean = 0, m2 = 0;
      for (int64_t bi = 0; bi < nblk; bi++) {
        const int64_t t = n * nblk + bi;
        const int64_t np = P * (bi + 1) / nblk - P * bi / nblk;
        chan_combine(cnt, mean, m2, double(np * Cg), part_mean[t * G + g], part_m2[t * G + g]);
      }
      finish_stats(mean, m2, Cg * P, eps, mean_o + n * G + g, rstd_o + n * G + g);
    }
  }

  at::parallel_for(0, N * nblk, 1, [&](int64_t beg, int64_t end) {
    Scratch sc;
    for (int64_t t = beg; t < end; t++) {
      const int64_t n = t / nblk, bi = t % nblk;
      apply(sc, n, P * bi / nblk, P * (bi + 1) / nblk);
    }
    fence_streamed(nt);
  });
}

template <typename T, int ACT>
void fwd_dispatch_layout(const at::Tensor& x, const at::Tensor& r, const at::Tensor& s,
                         const at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
                         const at::Tensor& mean, const at::Tensor& rstd, int64_t G, double eps,
                         bool cl) {
  using S = AccT<T>;
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / (N * C);
  const T* xp = x.data_ptr<T>();
  const T* rp = r.defined() ? r.data_ptr<T>() : nullptr;
  T* sp = s.defined() ? s.data_ptr<T>() : nullptr;
  const ParamView<S> wp(w), bp(b);
  if (cl)
    fwd_cl<T, ACT>(xp, rp, sp, y.data_ptr<T>(), wp, bp, mean.data_ptr<S>(), rstd.data_ptr<S>(), N, C, P, G, S(eps));
  else
    fwd_nchw<T, ACT>(xp, rp, sp, y.data_ptr<T>(), wp, bp, mean.data_ptr<S>(), rstd.data_ptr<S>(), N, C, P, G, S(eps));
}

template <typename T>
void fwd_dispatch_act(int64_t act, const at::Tensor& x, const at::Tensor& r, const at::Tensor& s,
                      const at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
                      const at::Tensor& mean, const at::Tensor& rstd, int64_t G, double eps, bool cl) {
  switch (act) {
    case kNone: return fwd_dispatch_layout<T, kNone>(x, r, s, y, w, b, mean, rstd, G, eps, cl);
    case kSilu: return fwd_dispatch_layout<T, kSilu>(x, r, s, y, w, b, mean, rstd, G, eps, cl);
    case kGelu: return fwd_dispatch_layout<T, kGelu>(x, r, s, y, w, b, mean, rstd, G, eps, cl);
    case kRelu: return fwd_dispatch_layout<T, kRelu>(x, r, s, y, w, b, mean, rstd, G, eps, cl);
  }
  TORCH_CHECK(false, "groupnorm cpu: unknown activation code ", act);
}

}  // namespace
}  // namespace gn

// All tensors are dense in the layout given by channels_last (checked by the launcher,
// re-checked here); weight/bias dense, any float dtype (ParamView).
void gn_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                int64_t G, double eps, int64_t act, bool channels_last, const at::Tensor& y,
                const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& sum_out) {
  auto fmt = channels_last ? (x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d)
                           : at::MemoryFormat::Contiguous;
  TORCH_CHECK(x.numel() > 0 && x.is_contiguous(fmt) && y.is_contiguous(fmt), "groupnorm cpu: bad layout");
  at::Tensor r = residual.has_value() ? *residual : at::Tensor();
  at::Tensor s = sum_out.has_value() ? *sum_out : at::Tensor();
  TORCH_CHECK(r.defined() == s.defined(), "groupnorm cpu: residual needs sum_out");
  if (r.defined()) TORCH_CHECK(r.is_contiguous(fmt) && s.is_contiguous(fmt), "groupnorm cpu: bad residual layout");
  at::Tensor w = weight.has_value() ? *weight : at::Tensor();
  at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  TORCH_CHECK(mean.is_contiguous() && rstd.is_contiguous());
  switch (x.scalar_type()) {
    case at::kFloat: return gn::fwd_dispatch_act<float>(act, x, r, s, y, w, b, mean, rstd, G, eps, channels_last);
    case at::kDouble: return gn::fwd_dispatch_act<double>(act, x, r, s, y, w, b, mean, rstd, G, eps, channels_last);
    case at::kBFloat16: return gn::fwd_dispatch_act<c10::BFloat16>(act, x, r, s, y, w, b, mean, rstd, G, eps, channels_last);
    case at::kHalf: return gn::fwd_dispatch_act<c10::Half>(act, x, r, s, y, w, b, mean, rstd, G, eps, channels_last);
    default: TORCH_CHECK(false, "groupnorm cpu: unsupported dtype ", x.scalar_type());
  }
}
