// Shared helpers of the groupnorm CPU kernels (see docs/cpu.md for the design).
//
// Every kernel reads its inputs as x's storage type T (float, double, BFloat16, Half) and
// does all math in acc_t = float (double for double) with ATen's Vectorized<acc_t>, which
// this translation unit is compiled for ONE CPU capability (-DCPU_CAPABILITY_AVX512 etc.,
// chosen at run time by groupnorm/ops/cpu.py from torch.backends.cpu.get_cpu_capability()).
//
// Determinism: every reduction has a fixed order that depends on the shape only (never on
// the number of threads or on timing): vector lanes are summed in lane order, blocks are
// combined in block order, per-thread work items write their own partial slots.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace gn {

// Forced inlining for the small helpers called inside the vector loops: GCC left sigmoid /
// act_grad out of line in some instantiations (the channels-last backward), and a call in a
// loop spills every live zmm register (all are caller-saved): the fused SiLU channels-last
// backward ran 2x slower than it should (docs/cpu.md, session 4).
#if defined(__GNUC__)
#define GN_INLINE inline __attribute__((always_inline))
#else
#define GN_INLINE inline
#endif

using at::vec::Vectorized;
using c10::BFloat16;
using c10::Half;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

enum Act : int { kNone = 0, kSilu = 1, kGelu = 2, kRelu = 3 };

// A per-channel parameter (weight or bias) of any floating dtype, read as S. The kernels read
// it once per channel, outside the vector loops, so the converting read costs nothing, and the
// launcher need not allocate an S copy (bf16 parameters: 2 C floats held through the backward,
// above torch's peak; benchmarks/bench_cpu.py --memory). Null: no parameter.
template <typename S>
struct ParamView {
  const void* p = nullptr;
  at::ScalarType t = at::kFloat;
  ParamView() = default;
  explicit ParamView(const at::Tensor& v) {
    if (!v.defined()) return;
    TORCH_CHECK(v.is_contiguous(), "groupnorm cpu: parameters must be contiguous");
    t = v.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
                "groupnorm cpu: unsupported parameter dtype ", t);
    p = v.data_ptr();
  }
  explicit operator bool() const { return p != nullptr; }
  S operator[](int64_t c) const {
    switch (t) {
      case at::kDouble: return S(static_cast<const double*>(p)[c]);
      case at::kBFloat16: return S(float(static_cast<const BFloat16*>(p)[c]));
      case at::kHalf: return S(float(static_cast<const Half*>(p)[c]));
      default: return S(static_cast<const float*>(p)[c]);
    }
  }
};

// ---- loads / stores of kV = Vectorized<acc>::size() elements, converting to/from acc ----
template <typename T> struct IO;

template <> struct IO<float> {
  using V = Vectorized<float>;
  static inline V load(const float* p) { return V::loadu(p); }
  static inline void store(float* p, const V& v) { v.store(p); }
  static inline void store2(float* p, const V& a, const V& b) { a.store(p); b.store(p + V::size()); }
};

template <> struct IO<double> {
  using V = Vectorized<double>;
  static inline V load(const double* p) { return V::loadu(p); }
  static inline void store(double* p, const V& v) { v.store(p); }
  static inline void store2(double* p, const V& a, const V& b) { a.store(p); b.store(p + V::size()); }
};

template <> struct IO<BFloat16> {
  using V = Vectorized<float>;
  static inline V load(const BFloat16* p) {
    V v;
    at::vec::load_fp32_from_bf16(p, v);
    return v;
  }
  static inline void store(BFloat16* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
#else
    alignas(64) float tmp[V::size()];
    v.store(tmp);
    for (int i = 0; i < V::size(); i++) p[i] = BFloat16(tmp[i]);  // round to nearest even
#endif
  }
  // 2 * kV values (AVX-512 pairs go through BF16x32 instead: see store_pair)
  static inline void store2(BFloat16* p, const V& a, const V& b) {
    store(p, a);
    store(p + V::size(), b);
  }
};

template <> struct IO<Half> {
  using V = Vectorized<float>;
  static inline V load(const Half* p) {
    V v;
    at::vec::load_fp32_from_fp16(p, v);
    return v;
  }
  static inline void store(Half* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_fp16(__m512(v)));
#else
    alignas(64) float tmp[V::size()];
    v.store(tmp);
    for (int i = 0; i < V::size(); i++) p[i] = Half(tmp[i]);
#endif
  }
  static inline void store2(Half* p, const V& a, const V& b) {
    store(p, a);
    store(p + V::size(), b);
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// 32 bf16 values at a time without shuffles. A bf16 is the high half of its fp32, so one
// 64-byte load of 32 bf16 gives the even-indexed values as `v << 16` and the odd-indexed ones
// as `v & 0xFFFF0000`: two fp32 vectors in 1 load + 2 ALU ops (load_fp32_from_bf16 costs a
// zero-extending shuffle + shift per 16 values, and the shuffles all go to one port). The
// lanes are in another order than memory, which sums and per-channel-constant affines do not
// care about. The store reverses it: each vector is rounded to nearest even in its high 16
// bits, then `even >> 16 | odd & 0xFFFF0000` is one 64-byte store (ATen's cvtfp32_bf16 adds a
// pack and a cross-lane permute). NaN stores 0xFFFF, bitwise as ATen's vectorized conversion.
struct BF16x32 {
  static constexpr int64_t size() { return 32; }
  static inline void load(const BFloat16* p, __m512& even, __m512& odd) {
    const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(p));
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
  }
  // the bf16 of a (round to nearest even; NaN -> 0xFFFF) in the high 16 bits of each lane.
  // kNanSafe = false skips the NaN test: exact for every value but a NaN whose payload
  // carries into the sign (x86's default NaN 0xFFC00000, the only NaN arithmetic on non-NaN
  // operands creates, rounds to a NaN as well), so a caller whose inputs are known NaN-free
  // may use it.
  template <bool kNanSafe = true>
  static inline __m512i round_hi(__m512 a) {
    const __m512i u = _mm512_castps_si512(a);
    // u + 0x7FFF, plus 1 where bit 16 (the bf16's last bit) is set: 3 instructions
    const __m512i r0 = _mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF));
    const __m512i r = _mm512_mask_add_epi32(r0, _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000)), r0,
                                            _mm512_set1_epi32(1));
    if constexpr (!kNanSafe) return r;
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_set1_epi32(-1));
  }
  template <bool kNanSafe = true, bool kNT = false>
  static inline void store(BFloat16* p, __m512 even, __m512 odd) {
    const __m512i e = _mm512_srli_epi32(round_hi<kNanSafe>(even), 16);
    // ternary-logic table 0xEA = (A & B) | C: (odd & 0xFFFF0000) | e
    const __m512i v = _mm512_ternarylogic_epi32(round_hi<kNanSafe>(odd), _mm512_set1_epi32(int(0xFFFF0000u)), e, 0xEA);
    if constexpr (kNT) _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
    else _mm512_storeu_si512(reinterpret_cast<void*>(p), v);
  }
};
#endif

// One full vector stored with a non-temporal hint (p aligned to the store's width: 64 bytes
// for float, 32 for bf16): for outputs of tensors >= 64 MiB, written without reading each
// line first (kStreamBytes). The same values as IO<T>::store; other types/ISAs store normally.
constexpr int64_t kStreamBytes = int64_t(64) << 20;
template <typename T>
inline void store_stream(T* p, const typename IO<T>::V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
    return;
  }
  if constexpr (std::is_same_v<T, BFloat16>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
    return;
  }
#endif
  IO<T>::store(p, v);
}
// whether an output of `bytes` at y, whose full-vector stores all land on multiples of
// `stride_bytes` from y, is streamed (store_stream / store_pair<.., true>)
template <typename T>
inline bool want_stream(const void* y, int64_t bytes, int64_t stride_bytes) {
#if defined(CPU_CAPABILITY_AVX512)
  return (std::is_same_v<T, float> || std::is_same_v<T, BFloat16>) && bytes >= kStreamBytes &&
         reinterpret_cast<uintptr_t>(y) % 64 == 0 && stride_bytes % 64 == 0;
#else
  (void)y; (void)bytes; (void)stride_bytes;
  return false;
#endif
}
// f(std::true_type{}) if flag else f(std::false_type{}): a runtime choice (e.g. want_stream's)
// as a compile-time argument of the loop f instantiates
template <typename F>
inline void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}
// after a task's non-temporal stores: order them before whatever reads the output next
inline void fence_streamed(bool streamed) {
#if defined(CPU_CAPABILITY_AVX512)
  if (streamed) _mm_sfence();
#else
  (void)streamed;
#endif
}

// Two acc vectors from 2 * kV consecutive values: bf16 on AVX-512 in BF16x32's lane order
// (even-, then odd-indexed values; 2 * kV = 32), every other case in memory order. For
// position-free per-lane work (sums, affines constant over the run) and for store_pair,
// which writes such a pair back in memory order; kNanSafe as BF16x32::round_hi (ignored by
// the other types, whose stores have no NaN test to skip).
template <typename T>
inline void load_pair(const T* p, typename IO<T>::V& a, typename IO<T>::V& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, BFloat16>) {
    __m512 e, o;
    BF16x32::load(p, e, o);
    a = e;
    b = o;
    return;
  }
#endif
  a = IO<T>::load(p);
  b = IO<T>::load(p + IO<T>::V::size());
}

template <bool kNanSafe = true, bool kNT = false, typename T>
inline void store_pair(T* p, const typename IO<T>::V& a, const typename IO<T>::V& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, BFloat16>) {
    BF16x32::store<kNanSafe, kNT>(p, a, b);
    return;
  }
  if constexpr (kNT && std::is_same_v<T, float>) {
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + 16, b);
    return;
  }
#endif
  IO<T>::store2(p, a, b);
}

// Per-lane arrays (channels-last per-channel constants and sums) in BF16x32's lane order:
// every whole 32-value chunk of [0, len) as its 16 even-indexed values then its 16 odd ones;
// a tail shorter than 32 stays in memory order (the 16-lane code reads it).
template <typename S>
inline void to_even_odd(const S* a, S* out, int64_t len) {
  int64_t c0 = 0;
  for (; c0 + 32 <= len; c0 += 32)
    for (int64_t j = 0; j < 16; j++) {
      out[c0 + j] = a[c0 + 2 * j];
      out[c0 + 16 + j] = a[c0 + 2 * j + 1];
    }
  for (; c0 < len; c0++) out[c0] = a[c0];
}
template <typename S>
inline void from_even_odd(const S* in, S* a, int64_t len) {
  int64_t c0 = 0;
  for (; c0 + 32 <= len; c0 += 32)
    for (int64_t j = 0; j < 16; j++) {
      a[c0 + 2 * j] = in[c0 + j];
      a[c0 + 2 * j + 1] = in[c0 + 16 + j];
    }
  for (; c0 < len; c0++) a[c0] = in[c0];
}

// Partial (tail) versions: n < kV elements; lanes >= n read as 0 and are not written.
template <typename T>
inline typename IO<T>::V load_n(const T* p, int64_t n) {
  T tmp[IO<T>::V::size()];
  for (int64_t i = 0; i < IO<T>::V::size(); i++) tmp[i] = i < n ? p[i] : T(0);
  return IO<T>::load(tmp);
}
template <typename T>
inline void store_n(T* p, const typename IO<T>::V& v, int64_t n) {
  T tmp[IO<T>::V::size()];
  IO<T>::store(tmp, v);
  for (int64_t i = 0; i < n; i++) p[i] = tmp[i];
}

// Keep lanes < n of v, zero the others (so that a tail adds nothing to a sum).
template <typename V>
inline V keep_n(const V& v, int64_t n) {
  return V::set(V(0), v, n);
}

// Fixed-order horizontal sum (lane 0 first).
template <typename V>
inline typename V::value_type hsum(const V& v) {
  alignas(64) typename V::value_type tmp[V::size()];
  v.store(tmp);
  typename V::value_type s = 0;
  for (int i = 0; i < V::size(); i++) s += tmp[i];
  return s;
}

// v as a rounded value: the compiler may not fuse the product that made it into a later add
// (GCC's default -ffp-contract=fast would turn `a * b - c` into an FMA, which skips the
// product's rounding). The backward needs it where c was computed from the rounded product:
// a one-value group's dz * w - c1 is then exactly 0, as in the reference. The empty asm costs
// nothing but the FMA it prevents (one instruction per vector); -ffp-contract=off for the
// whole build would drop half the backward's FMAs (measured 0.91-1.04x, docs/cpu.md).
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
inline at::vec::Vectorized<float> rounded(at::vec::Vectorized<float> v) { __m512 r = v; asm("" : "+v"(r)); return r; }
inline at::vec::Vectorized<double> rounded(at::vec::Vectorized<double> v) { __m512d r = v; asm("" : "+v"(r)); return r; }
#elif defined(__GNUC__) && defined(CPU_CAPABILITY_AVX2)
inline at::vec::Vectorized<float> rounded(at::vec::Vectorized<float> v) { __m256 r = v; asm("" : "+x"(r)); return r; }
inline at::vec::Vectorized<double> rounded(at::vec::Vectorized<double> v) { __m256d r = v; asm("" : "+x"(r)); return r; }
#else
template <typename V>
inline V rounded(V v) {  // other builds: through memory (no FMA spans a store and a load)
  alignas(64) typename V::value_type tmp[V::size()];
  v.store(tmp);
#if defined(__GNUC__)
  asm volatile("" : : "r"(tmp) : "memory");
#endif
  return V::loadu(tmp);
}
#endif

// ---- activations (acc precision). gelu is the exact erf form. ----
// float: exp_u20 (<= 20 ulp, well inside the fp32 tolerance) and a reciprocal by rcp14 + one
// Newton step (AVX-512); a vector division costs ~10 cycles and dominated the fused
// activation. double: exact exp and division.
template <typename V>
GN_INLINE V fast_exp(const V& v) {
  if constexpr (std::is_same_v<typename V::value_type, float>) return v.exp_u20();
  else return v.exp();
}

// 1 / d for d in [1, 2] (the sigmoid denominator below)
template <typename V>
GN_INLINE V recip_1_2(const V& d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    __m512 r = _mm512_rcp14_ps(d);
    // r * (2 - d * r)
    return V(_mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f))));
  }
#endif
  using S = typename V::value_type;
  return V(S(1)) / d;
}

#if defined(CPU_CAPABILITY_AVX512)
// exp(t) for t <= 0 (the activations only need exp(-|z|) and exp(-z^2/2)), in 11 AVX-512
// instructions instead of exp_u20's 19: n = round(t / ln2), r = t - n ln2 (ln2 split in two
// for accuracy), exp_u20's degree-5 polynomial on r in [-ln2/2, ln2/2] (same accuracy), and
// vscalefps multiplies by 2^n exactly (no integer exponent arithmetic). t is clamped at -104,
// where exp underflows to 0 in fp32 anyway, so -inf gives 0 (and NaN gives 0: the callers
// multiply by z, so NaN still propagates).
GN_INLINE __m512 exp_nonpos_avx512(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), t);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.00828929059f), r, _mm512_set1_ps(0.0418978221f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166676521f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.499991506f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999999701f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// exp(t) for t <= 0
template <typename V>
GN_INLINE V exp_nonpos(const V& t) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<typename V::value_type, float>) return V(exp_nonpos_avx512(t));
#endif
  return fast_exp(t);
}

// sigmoid(z) without overflow: e = exp(-|z|) in [0, 1]; 1/(1+e) for z >= 0, e/(1+e) else.
// NaN z gives a finite value here, but every caller multiplies by z, so NaN propagates.
template <typename V>
GN_INLINE V sigmoid(const V& z) {
  using S = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, float>) {
    // the same with mask registers (ATen's compare/blendv go through vector masks: 4 more ops)
    const __m512 zz = z;
    const __m512 e = exp_nonpos_avx512(_mm512_or_ps(zz, _mm512_set1_ps(-0.f)));  // exp(-|z|)
    const __m512 r = recip_1_2(V(_mm512_add_ps(e, _mm512_set1_ps(1.f))));
    const __mmask16 pos = _mm512_cmp_ps_mask(zz, _mm512_setzero_ps(), _CMP_GE_OQ);
    return V(_mm512_mul_ps(_mm512_mask_blend_ps(pos, e, _mm512_set1_ps(1.f)), r));
  }
#endif
  V e = fast_exp(z.abs().neg());
  V r = recip_1_2(V(S(1)) + e);
  return V::blendv(e * r, r, z >= V(S(0)));
}

template <int ACT, typename V>
GN_INLINE V act_fwd(const V& z) {
  using S = typename V::value_type;
  if constexpr (ACT == kSilu) {
    return z * sigmoid(z);
  } else if constexpr (ACT == kGelu) {
    return z * V(S(0.5)) * (V(S(1)) + (z * V(S(M_SQRT1_2))).erf());
  } else if constexpr (ACT == kRelu) {
    return at::vec::maximum(z, V(S(0)));  // NaN-propagating, like torch.relu
  } else {
    return z;
  }
}

// d act(z) / dz, exactly as groupnorm.reference._act_grad
template <int ACT, typename V>
GN_INLINE V act_grad(const V& z) {
  using S = typename V::value_type;
  if constexpr (ACT == kSilu) {
    V sig = sigmoid(z);
    return sig * (V(S(1)) + z * (V(S(1)) - sig));
  } else if constexpr (ACT == kGelu) {
    V cdf = V(S(0.5)) * (V(S(1)) + (z * V(S(M_SQRT1_2))).erf());
    V pdf = exp_nonpos(z * z * V(S(-0.5))) * V(S(0.3989422804014327));  // 1/sqrt(2 pi)
    return cdf + z * pdf;
  } else if constexpr (ACT == kRelu) {
    return (z > V(S(0))) & V(S(1));  // NaN > 0 is false -> 0, as the reference
  } else {
    return V(S(1));
  }
}

// Loads / stores of k <= kV lanes (k == kV in the main loops, where the branch folds away).
template <typename T>
GN_INLINE typename IO<T>::V ld(const T* p, int64_t k) {
  return k == IO<T>::V::size() ? IO<T>::load(p) : load_n(p, k);
}
template <typename T>
GN_INLINE void st(T* p, const typename IO<T>::V& v, int64_t k) {
  if (k == IO<T>::V::size()) IO<T>::store(p, v);
  else store_n(p, v, k);
}
template <typename S>
GN_INLINE Vectorized<S> lda(const S* p, int64_t k) {  // acc-typed scratch arrays
  return k == Vectorized<S>::size() ? Vectorized<S>::loadu(p) : Vectorized<S>::loadu(p, k);
}
template <typename S>
GN_INLINE void sta(S* p, const Vectorized<S>& v, int64_t k) {
  if (k == Vectorized<S>::size()) v.store(p);
  else v.store(p, k);
}

// body(i, k) over [0, len) in steps of kV (k = kV), then one tail step (k = len - i)
template <int64_t kV, typename F>
inline void for_vec(int64_t len, F&& body) {
  int64_t i = 0;
  for (; i + kV <= len; i += kV) body(i, kV);
  if (i < len) body(i, len - i);
}

// Channels-last rows are short when C is small; the kernels process R consecutive pixels
// (R * C contiguous values) per inner loop, with the per-channel arrays repeated R times.
inline int64_t cl_pixels_per_row(int64_t C) { return std::max<int64_t>(1, 512 / C); }

template <typename S>
inline void repeat_rows(S* a, int64_t C, int64_t R) {
  for (int64_t r = 1; r < R; r++) std::copy(a, a + C, a + r * C);
}

// acc[i] += sum over rows r < nrows of f(r, i, k, a) for i in [0, len): f adds row r's
// contribution for lanes [i, i + k) (zero beyond k) to the register accumulator a. Columns
// of NC vectors are summed with the row loop innermost, so partial sums stay in registers
// (accumulating row by row into memory stalls on store-to-load forwarding / 4K aliasing).
// The order is fixed (per lane, rows in order): deterministic.
template <int NC, typename V, typename F>
inline void column_sums(typename V::value_type* acc, int64_t nrows, int64_t len, F&& f) {
  constexpr int64_t kV = V::size();
  int64_t i = 0;
  for (; i + NC * kV <= len; i += NC * kV) {
    V a[NC];
    for (int j = 0; j < NC; j++) a[j] = V::loadu(acc + i + j * kV);
    for (int64_t r = 0; r < nrows; r++)
      for (int j = 0; j < NC; j++) f(r, i + j * kV, kV, a[j]);
    for (int j = 0; j < NC; j++) a[j].store(acc + i + j * kV);
  }
  for (; i < len; i += kV) {
    const int64_t k = std::min<int64_t>(kV, len - i);
    V a0 = lda(acc + i, k);
    for (int64_t r = 0; r < nrows; r++) f(r, i, k, a0);
    sta(acc + i, a0, k);
  }
}

// the same with two accumulators per lane (backward: sum dz and sum dz * xhat)
template <int NC, typename V, typename F>
inline void column_sums2(typename V::value_type* acc, typename V::value_type* acc2, int64_t nrows,
                         int64_t len, F&& f) {
  constexpr int64_t kV = V::size();
  int64_t i = 0;
  for (; i + NC * kV <= len; i += NC * kV) {
    V a[NC], q[NC];
    for (int j = 0; j < NC; j++) {
      a[j] = V::loadu(acc + i + j * kV);
      q[j] = V::loadu(acc2 + i + j * kV);
    }
    for (int64_t r = 0; r < nrows; r++)
      for (int j = 0; j < NC; j++) f(r, i + j * kV, kV, a[j], q[j]);
    for (int j = 0; j < NC; j++) {
      a[j].store(acc + i + j * kV);
      q[j].store(acc2 + i + j * kV);
    }
  }
  for (; i < len; i += kV) {
    const int64_t k = std::min<int64_t>(kV, len - i);
    V a0 = lda(acc + i, k), q0 = lda(acc2 + i, k);
    for (int64_t r = 0; r < nrows; r++) f(r, i, k, a0, q0);
    sta(acc + i, a0, k);
    sta(acc2 + i, q0, k);
  }
}

// Chan et al. combination of (count, mean, M2) summaries, in a fixed order.
template <typename S>
inline void chan_combine(double& n_a, S& mean_a, S& m2_a, double n_b, S mean_b, S m2_b) {
  if (n_b == 0) return;
  if (n_a == 0) {
    n_a = n_b; mean_a = mean_b; m2_a = m2_b;
    return;
  }
  double n = n_a + n_b;
  S delta = mean_b - mean_a;
  S fb = S(n_b / n);
  mean_a = mean_a + delta * fb;
  m2_a = m2_a + m2_b + delta * delta * S(n_a * n_b / n);
  n_a = n;
}

// Number of pixel blocks per sample for the channels-last kernels: a function of the shape
// only (so the reduction order never depends on the thread count), enough work items for
// 2-16 threads, and few enough partial sums to cost no memory worth mentioning.
inline int64_t cl_blocks(int64_t N, int64_t P) {
  int64_t want = N >= 16 ? 1 : (16 + N - 1) / N;
  return std::max<int64_t>(1, std::min<int64_t>(want, P));
}

}  // namespace gn

// entry points (defined in group_norm_cpu_fwd.cpp / group_norm_cpu_bwd.cpp)
void gn_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                int64_t G, double eps, int64_t act, bool channels_last, const at::Tensor& y,
                const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& sum_out);

void gn_backward(const at::Tensor& dy, const c10::optional<at::Tensor>& dsum, const at::Tensor& xs,
                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                 const at::Tensor& mean, const at::Tensor& rstd, int64_t G, int64_t act,
                 bool channels_last, const at::Tensor& dx, const c10::optional<at::Tensor>& dw,
                 const c10::optional<at::Tensor>& db);
