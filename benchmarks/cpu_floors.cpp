// What the memory system of this machine allows a GroupNorm forward, without GroupNorm:
// the access patterns of the possible forward designs timed on plain fp32 arrays (no torch).
// Built and run by benchmarks/bench_cpu_floors.py, which prints the table; see docs/cpu.md.
//
//   cpu_floors N P C threads reps
//
// x, y: N samples of P pixels x C channels (channels-last rows of C floats). Each thread takes
// a contiguous range of the N * P rows, as the kernels' pixel blocks do. Every repetition
// first sweeps an 8 MiB buffer (L2 is then cold, x is in L3 or memory, as in a network where
// other layers ran in between), then runs one variant; variants are interleaved, rotating
// their order each repetition; each time printed is a median.
#include <immintrin.h>
#include <omp.h>

#ifndef __AVX512F__
#error "cpu_floors.cpp is written with AVX-512 intrinsics (as the kernels' fast paths); build it with -march=native on an AVX-512 machine"
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

float g_sink;

// sum and sum of squares of n floats (the statistics sweep: a pure read)
float read_sweep(const float* x, long n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, q0 = a0, q1 = a0;
  long i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 d0 = _mm512_loadu_ps(x + i), d1 = _mm512_loadu_ps(x + i + 16);
    a0 = _mm512_add_ps(a0, d0);
    a1 = _mm512_add_ps(a1, d1);
    q0 = _mm512_fmadd_ps(d0, d0, q0);
    q1 = _mm512_fmadd_ps(d1, d1, q1);
  }
  float r = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(q0, q1)));
  for (; i < n; i++) r += x[i];
  return r;
}

// y = x * s + t (the output sweep: ordinary stores, i.e. y's lines are read for ownership)
void apply_sweep(const float* x, float* y, long n) {
  const __m512 s = _mm512_set1_ps(1.1f), t = _mm512_set1_ps(0.3f);
  long i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(_mm512_loadu_ps(x + i), s, t));
  for (; i < n; i++) y[i] = x[i] * 1.1f + 0.3f;
}

// the same with non-temporal stores (y bypasses the caches: what a next layer would then miss)
void apply_nt(const float* x, float* y, long n) {
  const __m512 s = _mm512_set1_ps(1.1f), t = _mm512_set1_ps(0.3f);
  long i = 0;
  const long head = std::min<long>(n, ((64 - (reinterpret_cast<uintptr_t>(y) & 63)) & 63) / 4);
  for (; i < head; i++) y[i] = x[i] * 1.1f + 0.3f;
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(y + i, _mm512_fmadd_ps(_mm512_loadu_ps(x + i), s, t));
  for (; i < n; i++) y[i] = x[i] * 1.1f + 0.3f;
  _mm_sfence();
}

// channel slab: channels [c0, c0 + W) of P rows of C floats, read (column walk) then written
float slab(const float* x, float* y, long P, long C, long c0, long W) {
  const __m512 s = _mm512_set1_ps(1.1f), t = _mm512_set1_ps(0.3f);
  float r = 0;
  for (long c = c0; c + 16 <= c0 + W; c += 16) {
    __m512 a = _mm512_setzero_ps(), q = a;
    for (long p = 0; p < P; p++) {
      __m512 d = _mm512_loadu_ps(x + p * C + c);
      a = _mm512_add_ps(a, d);
      q = _mm512_fmadd_ps(d, d, q);
    }
    r += _mm512_reduce_add_ps(_mm512_add_ps(a, q));
  }
  for (long p = 0; p < P; p++)
    for (long c = c0; c + 16 <= c0 + W; c += 16)
      _mm512_storeu_ps(y + p * C + c, _mm512_fmadd_ps(_mm512_loadu_ps(x + p * C + c), s, t));
  return r;
}

const char* kNames[] = {
    "copy (memcpy)",
    "read x once (statistics sweep alone)",
    "write y from x (output sweep alone)",
    "two sweeps: read x, then read x + write y",
    "one sweep: per 64 KiB chunk read, then write (L2 reuse)",
    "two sweeps, output with non-temporal stores",
    "channel slabs: 64 channels x all pixels of a sample",
};
constexpr int kVariants = 7;

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s N P C threads reps\n", argv[0]);
    return 2;
  }
  const long N = std::atol(argv[1]), P = std::atol(argv[2]), C = std::atol(argv[3]);
  const int T = std::atoi(argv[4]), reps = std::atoi(argv[5]);
  const long n = N * P * C;
  float* x = static_cast<float*>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64));
  float* y = static_cast<float*>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64));
  for (long i = 0; i < n; i++) x[i] = y[i] = float(i % 7);
  std::vector<char> flush(8 << 20);
  const long W = std::min<long>(C, 64) / 16 * 16;

  auto once = [&](int v) {
#pragma omp parallel num_threads(T)
    for (size_t i = omp_get_thread_num() * 64; i < flush.size(); i += 64 * T) flush[i]++;
    const auto t0 = std::chrono::steady_clock::now();
    if (v == 6) {
      float r = 0;
      const long slabs = W ? C / W : 0;
#pragma omp parallel for num_threads(T) schedule(static) reduction(+ : r)
      for (long k = 0; k < N * slabs; k++) r += slab(x + (k / slabs) * P * C, y + (k / slabs) * P * C, P, C, (k % slabs) * W, W);
      g_sink += r;
    } else {
#pragma omp parallel num_threads(T)
      {
        const int t = omp_get_thread_num();
        const long r0 = N * P * t / T, r1 = N * P * (t + 1) / T;
        const float* xs = x + r0 * C;
        float* ys = y + r0 * C;
        const long m = (r1 - r0) * C;
        float r = 0;
        switch (v) {
          case 0: std::memcpy(ys, xs, m * 4); break;
          case 1: r = read_sweep(xs, m); break;
          case 2: apply_sweep(xs, ys, m); break;
          case 3: r = read_sweep(xs, m); apply_sweep(xs, ys, m); break;
          case 4:
            for (long i = 0; i < m; i += 16384) {
              const long l = std::min<long>(16384, m - i);
              r += read_sweep(xs + i, l);
              apply_sweep(xs + i, ys + i, l);
            }
            break;
          case 5: r = read_sweep(xs, m); apply_nt(xs, ys, m); break;
        }
#pragma omp atomic
        g_sink += r;
      }
    }
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  };

  std::vector<std::vector<double>> ts(kVariants);
  for (int v = 0; v < kVariants; v++) once(v);  // warm-up: page faults, thread pool
  for (int r = 0; r < reps; r++)
    for (int k = 0; k < kVariants; k++) {
      const int v = (k + r) % kVariants;
      ts[v].push_back(once(v));
    }
  for (int v = 0; v < kVariants; v++) {
    std::sort(ts[v].begin(), ts[v].end());
    std::printf("%d\t%s\t%.2f\n", v, kNames[v], ts[v][ts[v].size() / 2]);
  }
  return g_sink == 12345.f;  // keep the sums alive
}
