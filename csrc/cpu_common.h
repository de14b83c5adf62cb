// Shared pieces of the CPU kernels (decode attention, sampler): x86 feature detection, the
// parallel loop over the process's OpenMP runtime, and the vector exp2. Header-only.
#pragma once

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define MRT_HAVE_X86 1
#include <immintrin.h>
// GCC 12's AVX-512 intrinsics make "undefined" vectors as `__m512 __Y = __Y;`, a false positive
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#else
#define MRT_HAVE_X86 0
#endif

namespace mrt {
namespace cpu {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float32 -> bf16, rounded to nearest even as PyTorch converts; NaN stays a (quiet) NaN
inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// The process's OpenMP runtime, if one is loaded with global symbols (PyTorch's libgomp is): the
// kernel then runs on the same worker threads as the GEMMs around it. Threads of our own would
// compete with those workers, which keep spinning for a while after every PyTorch op (on a 2-core
// machine that made the kernel slower on two threads than on one). Looked up at the first run.
using GompParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
inline GompParallelFn openmp_parallel() {
  static const GompParallelFn fn = reinterpret_cast<GompParallelFn>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  return fn;
}

template <class W>
void run_worker(void* worker) {
  (*static_cast<W*>(worker))();
}

// Run f(task) for task in [0, n) on up to `threads` threads (the caller is one of them); tasks are
// handed out in order from one counter, so which thread runs a task never matters to its result.
template <class F>
void parallel_for(int64_t n, int threads, F&& f) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
  };
  if (threads == 1) {
    worker();
    return;
  }
  if (const GompParallelFn parallel = openmp_parallel()) {
    parallel(&run_worker<decltype(worker)>, &worker, static_cast<unsigned>(threads), 0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int w = 1; w < threads; ++w) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

// f(begin, end) over `threads` equal contiguous ranges of [0, n): for many tiny tasks (a row of an
// elementwise op), where one shared counter per task costs more in cache-line traffic between
// the cores than the task itself.
template <class F>
void parallel_ranges(int64_t n, int threads, F&& f) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  parallel_for(parts, static_cast<int>(parts), [&](int64_t p) { f(n * p / parts, n * (p + 1) / parts); });
}

#if MRT_HAVE_X86
#define MRT_AVX512 __attribute__((target("avx512f")))
#define MRT_AVX512BW __attribute__((target("avx512f,avx512bw")))

// lanes 0 .. n-1 of a 16-lane vector
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// float32 rounded to the nearest bf16 (ties to even, as PyTorch converts finite values), as a
// float32 bit pattern whose low 16 bits are zero; the scalar twin is float_to_bf16 (which also
// keeps NaN a NaN)
MRT_AVX512 inline __m512i round_to_bf16_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                          _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}

// the masked lanes of 16 bf16 values widened to float32 (others 0)
MRT_AVX512BW inline __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
  const __m512i w = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(m), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
}

// In-register transpose of a 16 x 16 float block: r[i][j] becomes r[j][i] (three shuffle stages:
// 32-bit pairs, 64-bit pairs, then 128-bit lanes). Bit patterns pass through untouched, so it
// transposes any 32-bit data (the bf16 kernel moves (even, odd) bf16 pairs with it).
MRT_AVX512 inline void transpose16x16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + c]: in 128-bit lane k, rows 4g .. 4g+3 of column 4k + c
  for (int g = 0; g < 4; ++g) {
    const __m512 *lo = &t[4 * g], *hi = &t[4 * g + 2];
    u[4 * g + 0] = _mm512_shuffle_ps(lo[0], hi[0], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * g + 1] = _mm512_shuffle_ps(lo[0], hi[0], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * g + 2] = _mm512_shuffle_ps(lo[1], hi[1], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * g + 3] = _mm512_shuffle_ps(lo[1], hi[1], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), x1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 y0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    r[12 + c] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}

// 2^x = 2^floor(x) * poly(x - floor(x)) for x already clamped to [-200, 127] (-200 gives exactly
// 0); c: the polynomial's N coefficients from the highest degree down, a fit of 2^f on [0, 1)
template <int N>
MRT_AVX512 inline __m512 exp2_poly(__m512 x, const float (&c)[N]) {
  const __m512 fi = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, fi);
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, fi);
}

// least-squares fit of 2^f on [0, 1) at Chebyshev nodes (relative error 1.04e-7)
constexpr float kExp2Coeffs[7] = {0.00021690608991775662f, 0.0012443081941455603f, 0.009678472764790058f,
                                  0.05548352375626564f,    0.2402298003435135f,    0.6931470036506653f,
                                  1.0f};

// 2^x, x in log2 units; relative error ~1e-7; x <= -200 gives exactly 0 (masked keys are -inf),
// and so does NaN: vmaxps returns its second operand when the first is NaN, and the attention
// kernels rely on it for -inf - -inf (a lane masked out of every key it has met so far: a chain's
// segment of other rows comes first), whose p and rescale factor must be 0
MRT_AVX512 inline __m512 exp2_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-200.f));
  return exp2_poly(_mm512_min_ps(x, _mm512_set1_ps(127.f)), kExp2Coeffs);
}

// x * sigmoid(x) = x / (1 + 2^(-x log2 e))
MRT_AVX512 inline __m512 silu_avx512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f), neg_log2e = _mm512_set1_ps(-1.4426950408889634f);
  return _mm512_div_ps(x, _mm512_add_ps(one, exp2_avx512(_mm512_mul_ps(x, neg_log2e))));
}
#endif  // MRT_HAVE_X86

}  // namespace cpu
}  // namespace mrt
