// Fused full-softmax sampler (see cpu_sampler.h).
#include "cpu_sampler.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_common.h"

namespace mrt {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

struct Logits {
  const void* base;
  bool bf16;
  int64_t vocab, stride;
  float at(int64_t row, int64_t i) const {
    const int64_t k = row * stride + i;
    return bf16 ? cpu::bf16_to_float(static_cast<const uint16_t*>(base)[k]) : static_cast<const float*>(base)[k];
  }
};

// Per logits row: max, first argmax, and the block sums of exp((x - max) * inv_t). The max is
// subtracted before the scaling: at a small temperature x * inv_t is large (1e7 at T = 1e-6, where
// a float32 ulp is 1), and max * inv_t - x * inv_t would carry rounding errors of that size into
// the weights and the logprob (which then came out positive).
struct RowStats {
  float max = 0.f, total = 0.f;
  int64_t argmax = 0;
};

void row_stats_scalar(const Logits& x, int64_t row, float it, int64_t block, float* bsum, RowStats* st) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t arg = 0;
  for (int64_t i = 0; i < x.vocab; ++i) {
    const float v = x.at(row, i);
    if (v > mx) mx = v, arg = i;
  }
  st->argmax = arg;
  st->max = mx;
  float total = 0.f;
  for (int64_t b0 = 0, b = 0; b0 < x.vocab; b0 += block, ++b) {
    float s = 0.f;
    for (int64_t i = b0; i < std::min(x.vocab, b0 + block); ++i) s += std::exp((x.at(row, i) - mx) * it);
    bsum[b] = s;
    total += s;
  }
  st->total = total;
}

#if MRT_HAVE_X86
using cpu::tail_mask;

MRT_AVX512BW inline __m512 load16(const Logits& x, int64_t row, int64_t i, __mmask16 m) {
  if (x.bf16) return cpu::load_bf16x16(static_cast<const uint16_t*>(x.base) + row * x.stride + i, m);
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x.base) + row * x.stride + i);
}

// exp((x - max) * it) for ids [b0, end) into w (the same arithmetic as the block sums)
MRT_AVX512BW inline __m512 weight16(const Logits& x, int64_t row, int64_t i, __mmask16 m, __m512 vmx, __m512 a) {
  return cpu::exp2_avx512(_mm512_mul_ps(_mm512_sub_ps(load16(x, row, i, m), vmx), a));
}

MRT_AVX512BW void block_weights_avx512(const Logits& x, int64_t row, int64_t b0, int64_t end, float it, float mx,
                                       float* w) {
  const __m512 a = _mm512_set1_ps(it * kLog2e), vmx = _mm512_set1_ps(mx);
  for (int64_t i = b0; i < end; i += 16) {
    const __mmask16 m = tail_mask(end - i);
    _mm512_mask_storeu_ps(w + (i - b0), m, weight16(x, row, i, m, vmx, a));
  }
}

MRT_AVX512BW void row_stats_avx512(const Logits& x, int64_t row, float it, int64_t block, float* bsum,
                                   RowStats* st) {
  const int64_t V = x.vocab;
  __m512 vmx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 m = tail_mask(V - i);
    vmx = _mm512_mask_max_ps(vmx, m, vmx, load16(x, row, i, m));
  }
  const float mx = _mm512_reduce_max_ps(vmx);
  int64_t arg = 0;  // the first id holding the max, as torch.argmax
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 m = tail_mask(V - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, load16(x, row, i, m), _mm512_set1_ps(mx), _CMP_EQ_OQ);
    if (hit) {
      arg = i + __builtin_ctz(hit);
      break;
    }
  }
  st->argmax = arg;
  st->max = mx;
  // exp((x - max) * it) = 2^((x - max) * (it * log2e))
  const __m512 a = _mm512_set1_ps(it * kLog2e), vmax = _mm512_set1_ps(mx);
  float total = 0.f;
  for (int64_t b0 = 0, b = 0; b0 < V; b0 += block, ++b) {
    const int64_t end = std::min(V, b0 + block);
    __m512 s = _mm512_setzero_ps();
    for (int64_t i = b0; i < end; i += 16) {
      const __mmask16 m = tail_mask(end - i);
      const __m512 w = weight16(x, row, i, m, vmax, a);
      s = _mm512_add_ps(s, _mm512_maskz_mov_ps(m, w));
    }
    bsum[b] = _mm512_reduce_add_ps(s);
    total += bsum[b];
  }
  st->total = total;
}
#endif

void block_weights(const Logits& x, int64_t row, int64_t b0, int64_t end, float it, float mx, bool simd, float* w) {
#if MRT_HAVE_X86
  if (simd) return block_weights_avx512(x, row, b0, end, it, mx, w);
#endif
  (void)simd;
  for (int64_t i = b0; i < end; ++i) w[i - b0] = std::exp((x.at(row, i) - mx) * it);
}

}  // namespace

void sample_full_softmax(const void* logits, bool bf16, int64_t num_logit_rows, int64_t vocab, int64_t row_stride,
                         const float* inv_t, int64_t num_rows, const int64_t* rows, const float* u,
                         const uint8_t* greedy, int64_t* tokens, float* logprobs, int num_threads, bool simd) {
  if (num_logit_rows < 0 || vocab <= 0 || row_stride < vocab || num_rows < 0)
    throw std::invalid_argument("sample_full_softmax: need vocab > 0 and row_stride >= vocab");
  for (int64_t r = 0; r < num_rows; ++r)
    if (rows[r] < 0 || rows[r] >= num_logit_rows)
      throw std::invalid_argument("sample_full_softmax: logits row " + std::to_string(rows[r]) + " out of range");
  for (int64_t m = 0; m < num_logit_rows; ++m)
    if (!(inv_t[m] > 0.f) || !std::isfinite(inv_t[m]))
      throw std::invalid_argument("sample_full_softmax: inv_t must be positive and finite");
#if MRT_HAVE_X86
  if (simd && !__builtin_cpu_supports("avx512bw"))
    throw std::invalid_argument("sample_full_softmax: the SIMD path needs AVX-512BW");
#else
  if (simd) throw std::invalid_argument("sample_full_softmax: the SIMD path needs x86-64 AVX-512");
#endif
  const Logits x{logits, bf16, vocab, row_stride};
  // blocks of C ~ sqrt(V) ids, the PyTorch sampler's blocking
  int64_t C = 1;
  if (vocab > 1) {
    C = static_cast<int64_t>(std::sqrt(static_cast<double>(vocab - 1)));
    while (C * C > vocab - 1) --C;
    while ((C + 1) * (C + 1) <= vocab - 1) ++C;
    C += 1;
  }
  const int64_t B = (vocab + C - 1) / C;
  std::vector<float> bsum(static_cast<size_t>(num_logit_rows * B));
  std::vector<RowStats> stats(static_cast<size_t>(num_logit_rows));
  cpu::parallel_for(num_logit_rows, num_threads, [&](int64_t m) {
#if MRT_HAVE_X86
    if (simd) return row_stats_avx512(x, m, inv_t[m], C, &bsum[m * B], &stats[m]);
#endif
    row_stats_scalar(x, m, inv_t[m], C, &bsum[m * B], &stats[m]);
  });
  cpu::parallel_for(num_rows, num_threads, [&](int64_t r) {
    const int64_t m = rows[r];
    const RowStats& st = stats[m];
    const float it = inv_t[m];
    int64_t tok;
    if (greedy[r]) {
      tok = st.argmax;
    } else {
      // u < 1 with 23 bits: target < total, so the block found has positive weight
      const float target = u[r] * st.total;
      const float* bs = &bsum[m * B];
      float cum = 0.f, before = 0.f;
      int64_t b = B - 1;
      for (int64_t k = 0; k < B; ++k) {
        cum += bs[k];
        if (cum > target) {
          b = k;
          break;
        }
        before = cum;
      }
      const float rest = target - before;
      const int64_t b0 = b * C, end = std::min(vocab, b0 + C);
      std::vector<float> w(static_cast<size_t>(end - b0));
      block_weights(x, m, b0, end, it, st.max, simd, w.data());
      float cc = 0.f;
      int64_t last = b0;  // the last id of positive weight: rounding never lands on a zero weight
      tok = -1;
      for (int64_t i = b0; i < end; ++i) {
        cc += w[i - b0];
        if (w[i - b0] > 0.f) last = i;
        if (cc > rest) {
          tok = i;
          break;
        }
      }
      if (tok < 0) tok = last;
    }
    tokens[r] = tok;
    logprobs[r] = (x.at(m, tok) - st.max) * it - std::log(st.total);
  });
}

}  // namespace mrt
