// Fused bf16 elementwise ops (see cpu_ops.h). AVX-512F only; callers check cpu_ops_available().
#include "cpu_ops.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_common.h"

namespace mrt {

bool cpu_ops_available() {
#if MRT_HAVE_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

#if MRT_HAVE_X86
namespace {

#define MRT_OPS MRT_AVX512BW
using cpu::load_bf16x16;
using cpu::tail_mask;

using cpu::round_to_bf16_bits;

// float32 -> 16 bf16 values, rounded to nearest even (inputs here are finite)
MRT_OPS inline __m256i to_bf16(__m512 x) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bf16_bits(x), 16)); }

MRT_OPS inline void store_bf16(uint16_t* p, __m512 x, __mmask16 m) {
  _mm512_mask_storeu_epi16(p, static_cast<__mmask32>(m), _mm512_castsi256_si512(to_bf16(x)));
}


// 32 bf16 values as two float32 vectors without a cross-lane shuffle (Zen 4 runs the widening
// vpmovzxwd / narrowing vpmovdw of 512-bit vectors at a fraction of the ALU rate): the even-indexed
// values are each 32-bit word shifted up, the odd-indexed ones the word with its low half cleared.
// Elementwise ops work on the halves alike and pack them back the same way.
struct Bf16Pair {
  __m512 even, odd;
};
MRT_OPS inline Bf16Pair load_bf16x32(const uint16_t* p) {
  const __m512i v = _mm512_loadu_si512(p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}

MRT_OPS inline __m512 round_bf16(__m512 x) {  // float32 -> bf16 -> float32, in-lane
  return _mm512_castsi512_ps(round_to_bf16_bits(x));
}

// the two halves rounded to bf16 and interleaved back into 32 values
MRT_OPS inline void store_bf16x32(uint16_t* p, __m512 even, __m512 odd) {
  _mm512_storeu_si512(p, _mm512_or_si512(round_to_bf16_bits(odd), _mm512_srli_epi32(round_to_bf16_bits(even), 16)));
}

MRT_OPS void rms_norm_row(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t h, float eps) {
  __m512 ss = _mm512_setzero_ps(), ss_odd = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= h; i += 32) {
    const Bf16Pair v = load_bf16x32(x + i);
    ss = _mm512_fmadd_ps(v.even, v.even, ss);
    ss_odd = _mm512_fmadd_ps(v.odd, v.odd, ss_odd);
  }
  for (; i < h; i += 16) {
    const __m512 v = load_bf16x16(x + i, tail_mask(h - i));
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const float r = 1.f / std::sqrt(_mm512_reduce_add_ps(_mm512_add_ps(ss, ss_odd)) / static_cast<float>(h) + eps);
  const __m512 vr = _mm512_set1_ps(r);
  // round the normalised value to bf16 first, then scale by the weight in bf16 (transformers)
  for (i = 0; i + 32 <= h; i += 32) {
    const Bf16Pair y = load_bf16x32(x + i), wv = load_bf16x32(w + i);
    store_bf16x32(out + i, _mm512_mul_ps(wv.even, round_bf16(_mm512_mul_ps(y.even, vr))),
                  _mm512_mul_ps(wv.odd, round_bf16(_mm512_mul_ps(y.odd, vr))));
  }
  for (; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    const __m512 yb = round_bf16(_mm512_mul_ps(load_bf16x16(x + i, m), vr));
    store_bf16(out + i, _mm512_mul_ps(load_bf16x16(w + i, m), yb), m);
  }
}

MRT_OPS void rms_norm_row_f32(const float* x, const float* w, float* out, int64_t h, float eps) {
  __m512 ss = _mm512_setzero_ps(), ss2 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= h; i += 32) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    ss = _mm512_fmadd_ps(a, a, ss);
    ss2 = _mm512_fmadd_ps(b, b, ss2);
  }
  for (; i < h; i += 16) {
    const __m512 a = _mm512_maskz_loadu_ps(tail_mask(h - i), x + i);
    ss = _mm512_fmadd_ps(a, a, ss);
  }
  const __m512 vr =
      _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(_mm512_add_ps(ss, ss2)) / static_cast<float>(h) + eps));
  for (i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vr);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), y));
  }
}

MRT_OPS void silu_mul_row(const uint16_t* g, const uint16_t* u, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const Bf16Pair x = load_bf16x32(g + i), up = load_bf16x32(u + i);
    store_bf16x32(out + i, _mm512_mul_ps(round_bf16(cpu::silu_avx512(x.even)), up.even),
                  _mm512_mul_ps(round_bf16(cpu::silu_avx512(x.odd)), up.odd));
  }
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 sb = round_bf16(cpu::silu_avx512(load_bf16x16(g + i, m)));
    store_bf16(out + i, _mm512_mul_ps(sb, load_bf16x16(u + i, m)), m);
  }
}


template <bool kBf16>
MRT_OPS inline __m512 load_any(const void* base, int64_t i) {
  if (kBf16) return load_bf16x16(static_cast<const uint16_t*>(base) + i, 0xFFFF);
  return _mm512_loadu_ps(static_cast<const float*>(base) + i);
}

// one row: out[h][d] = x[h][d] * cos[d] + rot(x[h])[d] * sin[d], rot(v) = (-v[half:], v[:half]);
// mul and add stay separate instructions (no FMA contraction), each rounded like PyTorch's ops
template <bool kBf16>
MRT_OPS void rope_row(const void* x, const void* cos, const void* sin, void* out, int64_t heads, int64_t dh) {
  const int64_t half = dh / 2;
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));  // negation = sign flip (exact)
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t d = 0; d < dh; d += 16) {
      const __m512 v = load_any<kBf16>(x, h * dh + d);
      // the rotated value at d: -x[d + half] in the first half, x[d - half] in the second
      const __m512 r = d < half ? _mm512_castsi512_ps(_mm512_xor_si512(
                                      _mm512_castps_si512(load_any<kBf16>(x, h * dh + d + half)), sign))
                                : load_any<kBf16>(x, h * dh + d - half);
      __m512 a = _mm512_mul_ps(v, load_any<kBf16>(cos, d));
      __m512 b = _mm512_mul_ps(r, load_any<kBf16>(sin, d));
      if (kBf16) {
        a = round_bf16(a);
        b = round_bf16(b);
        store_bf16(static_cast<uint16_t*>(out) + h * dh + d, _mm512_add_ps(a, b), 0xFFFF);
      } else {
        // GCC contracts a * b + c into an FMA in C++ by default: this empty asm makes both products
        // round to float32 first, as PyTorch's separate mul and add kernels do
        asm("" : "+v"(a), "+v"(b));
        _mm512_storeu_ps(static_cast<float*>(out) + h * dh + d, _mm512_add_ps(a, b));
      }
    }
  }
}

MRT_OPS inline __m512 neg(__m512 v) {  // a sign flip: exact
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
}

// bf16 rows with half % 32 == 0: the first and second halves 32 values at a time as even/odd
// pairs (no widening shuffles), the same roundings as rope_row<true>.
MRT_OPS void rope_row_bf16x32(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, uint16_t* out,
                              int64_t heads, int64_t dh) {
  const int64_t half = dh / 2;
  for (int64_t d = 0; d < half; d += 32) {
    const Bf16Pair c1 = load_bf16x32(cos + d), s1 = load_bf16x32(sin + d);
    const Bf16Pair c2 = load_bf16x32(cos + d + half), s2 = load_bf16x32(sin + d + half);
    for (int64_t h = 0; h < heads; ++h) {
      const Bf16Pair a = load_bf16x32(x + h * dh + d), b = load_bf16x32(x + h * dh + d + half);
      // first half: x[d] cos[d] + (-x[d + half]) sin[d]; second: x[d + half] cos[d + half] + x[d] sin[d + half]
      store_bf16x32(out + h * dh + d,
                    _mm512_add_ps(round_bf16(_mm512_mul_ps(a.even, c1.even)),
                                  round_bf16(_mm512_mul_ps(neg(b.even), s1.even))),
                    _mm512_add_ps(round_bf16(_mm512_mul_ps(a.odd, c1.odd)),
                                  round_bf16(_mm512_mul_ps(neg(b.odd), s1.odd))));
      store_bf16x32(out + h * dh + d + half,
                    _mm512_add_ps(round_bf16(_mm512_mul_ps(b.even, c2.even)),
                                  round_bf16(_mm512_mul_ps(a.even, s2.even))),
                    _mm512_add_ps(round_bf16(_mm512_mul_ps(b.odd, c2.odd)),
                                  round_bf16(_mm512_mul_ps(a.odd, s2.odd))));
    }
  }
}

}  // namespace
#endif

void rope(const void* x, int64_t x_stride, const void* cos, const void* sin, void* out, int64_t rows, int64_t heads,
          int64_t dh, bool bf16, int num_threads) {
  if (!cpu_ops_available()) throw std::invalid_argument("rope needs AVX-512F/BW");
  if (rows < 0 || heads <= 0 || dh <= 0 || dh % 32 != 0 || x_stride < heads * dh)
    throw std::invalid_argument("rope: need dh a positive multiple of 32 and x_stride >= heads * dh");
#if MRT_HAVE_X86
  const int64_t es = bf16 ? 2 : 4;
  cpu::parallel_ranges(rows, rows * heads * dh < (1 << 16) ? 1 : num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
    const char* xr = static_cast<const char*>(x) + r * x_stride * es;
    const char* cr = static_cast<const char*>(cos) + r * dh * es;
    const char* sr = static_cast<const char*>(sin) + r * dh * es;
    char* o = static_cast<char*>(out) + r * heads * dh * es;
    if (bf16 && dh % 64 == 0)
      rope_row_bf16x32(reinterpret_cast<const uint16_t*>(xr), reinterpret_cast<const uint16_t*>(cr),
                       reinterpret_cast<const uint16_t*>(sr), reinterpret_cast<uint16_t*>(o), heads, dh);
    else if (bf16) rope_row<true>(xr, cr, sr, o, heads, dh);
    else rope_row<false>(xr, cr, sr, o, heads, dh);
    }
  });
#endif
}

void store_kv_rows(const void* k, int64_t k_stride, const void* v, int64_t v_stride, void* k_cache, void* v_cache,
                   const int64_t* slots, int64_t n, int64_t row, int64_t elem_size, int64_t num_slots,
                   int num_threads) {
  if (n < 0 || row <= 0 || elem_size <= 0 || k_stride < row || v_stride < row)
    throw std::invalid_argument("store_kv_rows: need row > 0 and row strides >= row");
  for (int64_t i = 0; i < n; ++i)
    if (slots[i] < 0 || slots[i] >= num_slots)
      throw std::invalid_argument("store_kv_rows: slot " + std::to_string(slots[i]) + " outside the cache");
  const int64_t bytes = row * elem_size;
  // the cache lines written are cold (a decode row's slot was last touched a step ago, if ever):
  // each write waits for its line, so the rows are split over the threads and the lines a few rows
  // ahead are asked for (for writing) before their turn
  constexpr int64_t kAhead = 8;
  auto prefetch_row = [&](int64_t i) {
    for (int64_t off = 0; off < bytes; off += 64) {
      __builtin_prefetch(static_cast<char*>(k_cache) + slots[i] * bytes + off, 1);
      __builtin_prefetch(static_cast<char*>(v_cache) + slots[i] * bytes + off, 1);
    }
  };
  cpu::parallel_ranges(n, n * bytes < (1 << 15) ? 1 : std::max(1, num_threads), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < std::min(r1, r0 + kAhead); ++i) prefetch_row(i);
    for (int64_t i = r0; i < r1; ++i) {
      if (i + kAhead < r1) prefetch_row(i + kAhead);
      std::memcpy(static_cast<char*>(k_cache) + slots[i] * bytes,
                  static_cast<const char*>(k) + i * k_stride * elem_size, bytes);
      std::memcpy(static_cast<char*>(v_cache) + slots[i] * bytes,
                  static_cast<const char*>(v) + i * v_stride * elem_size, bytes);
    }
  });
}

void rms_norm(const void* x, int64_t x_stride, const void* w, void* out, int64_t out_stride, int64_t rows,
              int64_t hidden, float eps, bool bf16, int num_threads) {
  if (!cpu_ops_available()) throw std::invalid_argument("rms_norm needs AVX-512F/BW");
  if (rows < 0 || hidden <= 0 || x_stride < hidden || out_stride < hidden)
    throw std::invalid_argument("rms_norm: need hidden > 0 and row strides >= hidden");
#if MRT_HAVE_X86
  // one thread below ~128 KB of activations: a second costs more to start than it saves
  cpu::parallel_ranges(rows, rows * hidden < (bf16 ? 1 << 16 : 1 << 15) ? 1 : num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (bf16)
        rms_norm_row(static_cast<const uint16_t*>(x) + r * x_stride, static_cast<const uint16_t*>(w),
                     static_cast<uint16_t*>(out) + r * out_stride, hidden, eps);
      else
        rms_norm_row_f32(static_cast<const float*>(x) + r * x_stride, static_cast<const float*>(w),
                         static_cast<float*>(out) + r * out_stride, hidden, eps);
    }
  });
#endif
}

void silu_mul_bf16(const uint16_t* g, const uint16_t* u, int64_t in_stride, uint16_t* out, int64_t out_stride,
                   int64_t rows, int64_t n, int num_threads) {
  if (!cpu_ops_available()) throw std::invalid_argument("silu_mul_bf16 needs AVX-512F/BW");
  if (rows < 0 || n <= 0 || in_stride < n || out_stride < n)
    throw std::invalid_argument("silu_mul_bf16: need n > 0 and row strides >= n");
#if MRT_HAVE_X86
  cpu::parallel_ranges(rows, rows * n < (1 << 16) ? 1 : num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul_row(g + r * in_stride, u + r * in_stride, out + r * out_stride, n);
  });
#endif
}

}  // namespace mrt
