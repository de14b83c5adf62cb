// The AVX-512 kernels of CPU decode attention (see cpu_attention.h for the work-item model).
//
// SIMD layout: one task is (item, KV head, up to kLaneGroups * 16 query vectors). The query
// vectors are the 16 lanes of a vector register, so a key tile of 16 keys gives 16 score vectors
// (one per key) and the online softmax (running max, sum, rescale) is lane-wise: no horizontal
// reductions. Q is transposed once per task; keys and values are broadcast from their rows in the
// cache (bf16 rows are widened into a small buffer per tile first on the float32-FMA path). Scores
// are in log2 units (q is pre-scaled by scale * log2(e)) so the exponential is exp2. A row's own
// tail (an item of that row alone) has keys as lanes instead.
#include "cpu_attention_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

namespace mrt {
namespace attn {

#if MRT_HAVE_X86
namespace {

using cpu::exp2_avx512;

// n values starting at src (float32 or bf16) widened into dst as float32
MRT_AVX512 inline void widen_row(const Ctx& c, const void* base, int64_t idx, float* dst) {
  if (c.dtype == KvDtype::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(base) + idx, sizeof(float) * c.dh);
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(base) + idx;
  for (int64_t d = 0; d < c.dh; d += 16) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d));
    _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
  }
}

struct alignas(64) SimdScratch {
  float qt[kFloatLaneGroups][kMaxHeadDim][kLanes];  // Q^T: [group][d][lane]
  float ot[kFloatLaneGroups][kMaxHeadDim][kLanes];  // O^T accumulators
  float m[kFloatLaneGroups][kLanes], l[kFloatLaneGroups][kLanes];
  float kbuf[kLanes][kMaxHeadDim], vbuf[kLanes][kMaxHeadDim];  // widened bf16 rows
  float p[kLanes][kLanes];                                      // probabilities [key][lane]
  float zero[kMaxHeadDim];
};

// Lane-group accumulators (O^T, running max and sum) of the query-lanes kernels, reset per task.
template <class S>
MRT_AVX512 void init_lane_groups(S& s, int groups, int64_t dh) {
  for (int g = 0; g < groups; ++g) {
    for (int64_t d = 0; d < dh; ++d) _mm512_store_ps(s.ot[g][d], _mm512_setzero_ps());
    _mm512_store_ps(s.m[g], _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
    _mm512_store_ps(s.l[g], _mm512_setzero_ps());
  }
}

// The query-lanes kernels' partial results: o = O / l (16 x 16 blocks of O^T transposed back
// into rows), lse in natural log.
template <class S>
MRT_AVX512 void write_lane_partials(const Ctx& c, int64_t item, int64_t h, int64_t qv0, int64_t qv1, int groups,
                                    const S& s) {
  for (int g = 0; g < groups; ++g) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, qv1 - qv0 - g * kLanes));
    float* o[kLanes];
    for (int lane = 0; lane < lanes; ++lane) {
      int64_t row, head, part;
      c.locate(item, h, qv0 + g * kLanes + lane, &row, &head, &part);
      const float l = s.l[g][lane];
      o[lane] = c.part_o + (part * c.hq + head) * c.dh;
      c.part_lse[part * c.hq + head] = (s.m[g][lane] + std::log2(l)) * kLn2;
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_load_ps(s.l[g]));
    for (int64_t d0 = 0; d0 < c.dh; d0 += kLanes) {
      __m512 r[kLanes];
      for (int i = 0; i < kLanes; ++i) r[i] = _mm512_mul_ps(_mm512_load_ps(s.ot[g][d0 + i]), inv);
      cpu::transpose16x16(r);
      for (int lane = 0; lane < lanes; ++lane) _mm512_storeu_ps(o[lane] + d0, r[lane]);
    }
  }
}

// The key-lanes (one-row) kernels' state: acc [grp][dh], running max and sum per query head.
MRT_AVX512 void init_own(float* acc, float* mrun, float* lrun, int64_t grp, int64_t dh) {
  for (int64_t m = 0; m < grp; ++m) {
    for (int64_t d = 0; d < dh; d += 16) _mm512_storeu_ps(acc + m * dh + d, _mm512_setzero_ps());
    mrun[m] = -std::numeric_limits<float>::infinity();
    lrun[m] = 0.f;
  }
}

// The key-lanes kernels' results for their grp query heads: o [grp][dh] = acc / l and lse [grp]
// in natural log, into a partial slot or straight into the row's output.
MRT_AVX512 void write_own(int64_t grp, int64_t dh, const float* acc, const float* mrun, const float* lrun, float* o,
                          float* lse) {
  for (int64_t m = 0; m < grp; ++m) {
    const __m512 inv = _mm512_set1_ps(1.f / lrun[m]);
    for (int64_t d = 0; d < dh; d += 16)
      _mm512_storeu_ps(o + m * dh + d, _mm512_mul_ps(_mm512_loadu_ps(acc + m * dh + d), inv));
    lse[m] = (mrun[m] + std::log2(lrun[m])) * kLn2;
  }
}



// Cache offset of each key of a tile (keys t0 .. t0+n-1 of the item; a tile may span blocks).
// Every tile's offsets are computed twice (prefetched one tile ahead, then read), so one division
// per tile and a walk through the blocks, not a division per key.
inline void tile_offsets(const Ctx& c, const int64_t* blocks, int64_t t0, int n, int64_t h, int64_t* idx) {
  int64_t b = t0 / c.bs, pos = t0 - b * c.bs;
  for (int j = 0; j < n; ++j) {
    idx[j] = c.kv_index(blocks[b], pos, h);
    if (++pos == c.bs) {
      pos = 0;
      ++b;
    }
  }
}


// Float32 K/V rows of a tile for the float32-FMA kernels: rows in the cache for float32 caches,
// bf16 rows widened into kbuf/vbuf; rows past n point at zeros.
MRT_AVX512 void float_tile_rows(const Ctx& c, const int64_t* blocks, int64_t t0, int n, int64_t h, SimdScratch& s,
                                const float** krow, const float** vrow) {
  int64_t idx[kLanes];
  tile_offsets(c, blocks, t0, n, h, idx);
  for (int j = 0; j < kLanes; ++j) {
    if (j >= n) {
      krow[j] = vrow[j] = s.zero;
    } else if (c.dtype == KvDtype::kFloat32) {
      krow[j] = static_cast<const float*>(c.k) + idx[j];
      vrow[j] = static_cast<const float*>(c.v) + idx[j];
    } else {
      widen_row(c, c.k, idx[j], s.kbuf[j]);
      widen_row(c, c.v, idx[j], s.vbuf[j]);
      krow[j] = s.kbuf[j];
      vrow[j] = s.vbuf[j];
    }
  }
}

// An item's keys in tiles of 16 for the float32 kernels: `load(t0)` points krow/vrow at the tile's
// K/V rows (see float_tile_rows), asks for the next tile ahead of its use, and returns its number
// of keys; the first tile is asked for on construction.
struct FloatTiles {
  const Ctx& c;
  const int64_t* blocks;
  int64_t len, h;
  SimdScratch& s;
  const float* krow[kLanes];
  const float* vrow[kLanes];

  MRT_AVX512 FloatTiles(const Ctx& ctx, int64_t item, int64_t head, SimdScratch& scratch)
      : c(ctx), blocks(ctx.item_blocks + ctx.item_block_ptr[item]), len(ctx.item_len[item]), h(head), s(scratch) {
    prefetch_tile(c, blocks, len, 0, h);
  }
  MRT_AVX512 int load(int64_t t0) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, len - t0));
    float_tile_rows(c, blocks, t0, n, h, s, krow, vrow);
    prefetch_tile(c, blocks, len, t0 + kLanes, h);
    return n;
  }
};

// The lanes of lane group g in [lo, hi) (relative to the task): the ones that attend to a segment
// whose attending query vectors are those (a chain's segments leave rows out)
inline __mmask16 lanes_in(int64_t lo, int64_t hi, int g) {
  lo -= static_cast<int64_t>(g) * kLanes;
  hi -= static_cast<int64_t>(g) * kLanes;
  uint32_t m = 0xFFFFu;
  if (lo > 0) m = lo >= kLanes ? 0u : (m << lo) & 0xFFFFu;
  if (hi < kLanes) m &= hi <= 0 ? 0u : (1u << hi) - 1u;
  return static_cast<__mmask16>(m);
}

// The lane groups [*g0, *g1) of a task of `groups` groups that hold lanes in [lo, hi)
inline void groups_in(int64_t lo, int64_t hi, int groups, int* g0, int* g1) {
  *g0 = lo > 0 ? static_cast<int>(lo / kLanes) : 0;
  *g1 = static_cast<int>(std::min<int64_t>(groups, (hi + kLanes - 1) / kLanes));
}

MRT_AVX512 void task_avx512(const Ctx& c, int64_t item, int64_t h, int64_t qv0, int64_t qv1, SimdScratch& s) {
  const int64_t dh = c.dh;
  const int groups = static_cast<int>((qv1 - qv0 + kLanes - 1) / kLanes);
  // Q^T (pre-scaled), padding lanes zero: 16 x 16 blocks of query rows, transposed
  const __m512 qscale = _mm512_set1_ps(c.qscale);
  for (int g = 0; g < groups; ++g) {
    int64_t qoff[kLanes];
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, qv1 - qv0 - g * kLanes));
    for (int lane = 0; lane < lanes; ++lane) {
      int64_t row, head, part;
      c.locate(item, h, qv0 + g * kLanes + lane, &row, &head, &part);
      qoff[lane] = row * c.q_row_stride + head * c.q_head_stride;
    }
    for (int64_t d0 = 0; d0 < dh; d0 += kLanes) {
      __m512 r[kLanes];
      for (int lane = 0; lane < kLanes; ++lane) {
        if (lane >= lanes)
          r[lane] = _mm512_setzero_ps();
        else if (c.dtype == KvDtype::kFloat32)
          r[lane] = _mm512_mul_ps(_mm512_loadu_ps(static_cast<const float*>(c.q) + qoff[lane] + d0), qscale);
        else
          r[lane] = _mm512_mul_ps(
              cpu::load_bf16x16(static_cast<const uint16_t*>(c.q) + qoff[lane] + d0, 0xFFFF), qscale);
      }
      cpu::transpose16x16(r);
      for (int i = 0; i < kLanes; ++i) _mm512_store_ps(s.qt[g][d0 + i], r[i]);
    }
  }
  init_lane_groups(s, groups, dh);
  FloatTiles tiles(c, item, h, s);
  const float* const* krow = tiles.krow;
  const float* const* vrow = tiles.vrow;
  for (int64_t t0 = 0; t0 < tiles.len; t0 += kLanes) {
    // only the task's lanes in [lo, hi) attend to this tile (a chain's segments leave rows out)
    const Ctx::Span sp = c.span(item, t0);
    const int64_t lo = sp.qv0 - qv0, hi = std::min(sp.qv1, qv1) - qv0;
    if (lo >= hi) {   // none of them: on to the segment's end (whole tiles, or the item's end)
      prefetch_tile(c, tiles.blocks, tiles.len, sp.key_end, h);
      t0 = sp.key_end - kLanes;
      continue;
    }
    const int n = tiles.load(t0);
    const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int g0, g1;
    groups_in(lo, hi, groups, &g0, &g1);
    for (int g = g0; g < g1; ++g) {
      const __mmask16 active = lanes_in(lo, hi, g);
      // the fully unrolled j loops keep the 16 score vectors in registers; keys in two halves
      // of 8, so their row pointers stay in registers too (K is read in place, not copied)
      __m512 sc[kLanes];
#pragma GCC unroll 2
      for (int j0 = 0; j0 < kLanes; j0 += kLanes / 2) {
        const float* kr[kLanes / 2];
        __m512 a[kLanes / 2];
#pragma GCC unroll 8
        for (int j = 0; j < kLanes / 2; ++j) {
          kr[j] = krow[j0 + j];
          a[j] = _mm512_setzero_ps();
        }
        for (int64_t d = 0; d < dh; ++d) {
          const __m512 qd = _mm512_load_ps(s.qt[g][d]);
#pragma GCC unroll 8
          for (int j = 0; j < kLanes / 2; ++j) a[j] = _mm512_fmadd_ps(qd, _mm512_set1_ps(kr[j][d]), a[j]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < kLanes / 2; ++j) sc[j0 + j] = a[j];
      }
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) sc[j] = j < n ? _mm512_mask_blend_ps(active, neg_inf, sc[j]) : neg_inf;
      __m512 mx = sc[0];
#pragma GCC unroll 16
      for (int j = 1; j < kLanes; ++j) mx = _mm512_max_ps(mx, sc[j]);
      const __m512 m_old = _mm512_load_ps(s.m[g]);
      const __m512 m_new = _mm512_max_ps(m_old, mx);
      const __m512 alpha = exp2_avx512(_mm512_sub_ps(m_old, m_new));
      __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) {
        const __m512 p = exp2_avx512(_mm512_sub_ps(sc[j], m_new));
        sum = _mm512_add_ps(sum, p);
        _mm512_store_ps(s.p[j], p);
      }
      _mm512_store_ps(s.m[g], m_new);
      _mm512_store_ps(s.l[g], _mm512_fmadd_ps(_mm512_load_ps(s.l[g]), alpha, sum));
      for (int64_t d0 = 0; d0 < dh; d0 += 16) {
        __m512 acc[16];
#pragma GCC unroll 16
        for (int dd = 0; dd < 16; ++dd) acc[dd] = _mm512_mul_ps(_mm512_load_ps(s.ot[g][d0 + dd]), alpha);
        for (int j = 0; j < n; ++j) {
          const __m512 p = _mm512_load_ps(s.p[j]);
          // vr as one opaque register, so the 16 loads are displacements from it: otherwise GCC keeps
          // the 16 offsets d0 + dd (invariant in j) in registers and, short of registers, reloads
          // some from the stack for every key (a captured fp32 step's shared tasks, re-run hot: 1.07-1.14x
          // with this; inside fork calls, where K/V come from memory, within the noise)
          const float* vr = vrow[j] + d0;
          asm("" : "+r"(vr));
#pragma GCC unroll 16
          for (int dd = 0; dd < 16; ++dd) acc[dd] = _mm512_fmadd_ps(p, _mm512_set1_ps(vr[dd]), acc[dd]);
        }
#pragma GCC unroll 16
        for (int dd = 0; dd < 16; ++dd) _mm512_store_ps(s.ot[g][d0 + dd], acc[dd]);
      }
    }
  }
  write_lane_partials(c, item, h, qv0, qv1, groups, s);
}

#define MRT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// acc + a . (the 32-bit word at p, broadcast): the word is a broadcast memory operand of the dot
// product itself ({1to16}), not a separate broadcast instruction (GCC does not fold one into
// vdpbf16ps as it does into FMAs)
MRT_AVX512_BF16 inline __m512 dp_bcast(__m512 acc, __m512bh a, const void* p) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*static_cast<const uint32_t*>(p)));
  return acc;
}

// 2^x for x <= 0 (or -inf) to ~3e-6 relative: the bf16 kernel's probabilities, which PV rounds to
// bf16 (2^-9) anyway; a degree-4 fit and no upper clamp (x <= 0: every score minus the running
// max) save 3 of exp2_avx512's 11 instructions per 16 scores; NaN gives 0 as in exp2_avx512
constexpr float kProbExp2Coeffs[5] = {0.013520603197216251f, 0.05203742877441495f, 0.24142749325120402f,
                                      0.6930066206638731f, 1.0000025181301366f};
MRT_AVX512 inline __m512 exp2_probs(__m512 x) {
  return cpu::exp2_poly(_mm512_max_ps(x, _mm512_set1_ps(-200.f)), kProbExp2Coeffs);
}

// Keys per softmax chunk of the bf16 kernel: a group's scores of a whole chunk are computed, then
// exponentiated against one running max, then multiplied into O^T; the O^T accumulators are read,
// rescaled and written back once per chunk instead of once per 16 keys.
constexpr int kChunk = 128;

struct alignas(64) Bf16Scratch {
  uint32_t qt[kLaneGroups][kMaxHeadDim / 2][kLanes];  // Q^T as bf16 pairs: [group][d/2][lane]
  float ot[kLaneGroups][kMaxHeadDim][kLanes];         // O^T accumulators
  float m[kLaneGroups][kLanes], l[kLaneGroups][kLanes];
  uint32_t vpair[kChunk / 2][kMaxHeadDim];            // (V[2i][d], V[2i+1][d]) bf16 pairs
  float sc[kChunk][kLanes];                           // one group's scores of a chunk
  uint32_t ppair[kChunk / 2][kLanes];                 // (P_2i, P_2i+1) per lane as bf16 pairs
  uint16_t zero[kMaxHeadDim];
};

// Word indices that interleave the first (lo) or second (hi) 16 words of two vectors a, b:
// (a0, b0, a1, b1, ...) for _mm512_permutex2var_epi16.
struct InterleaveIdx {
  __m512i lo, hi;
};
MRT_AVX512_BF16 inline InterleaveIdx interleave_idx() {
  alignas(64) int16_t lo[32], hi[32];
  for (int i = 0; i < 16; ++i) {
    lo[2 * i] = static_cast<int16_t>(i);
    lo[2 * i + 1] = static_cast<int16_t>(32 + i);
    hi[2 * i] = static_cast<int16_t>(16 + i);
    hi[2 * i + 1] = static_cast<int16_t>(48 + i);
  }
  return {_mm512_load_si512(lo), _mm512_load_si512(hi)};
}

// bf16 K/V rows of a tile, in place in the cache; rows past n point at zeros.
inline void bf16_tile_rows(const Ctx& c, const int64_t* blocks, int64_t t0, int n, int64_t h, const uint16_t* zero,
                           const uint16_t** krow, const uint16_t** vrow) {
  int64_t idx[kLanes];
  tile_offsets(c, blocks, t0, n, h, idx);
  for (int j = 0; j < kLanes; ++j) {
    krow[j] = j < n ? static_cast<const uint16_t*>(c.k) + idx[j] : zero;
    vrow[j] = j < n ? static_cast<const uint16_t*>(c.v) + idx[j] : zero;
  }
}

// V rows of a tile interleaved in pairs, vpair[i][d] = (V[2i][d], V[2i+1][d]): the PV dot products'
// operand. 32 values of d at a time (16 when dh is an odd multiple of 16).
MRT_AVX512_BF16 void pair_v_rows(const uint16_t* const* vrow, int pairs, int64_t dh, const InterleaveIdx& ix,
                                 uint32_t (*vpair)[kMaxHeadDim]) {
  for (int i = 0; i < pairs; ++i) {
    for (int64_t d0 = 0; d0 < dh; d0 += 32) {
      const bool full = dh - d0 >= 32;
      const __mmask32 mk = full ? 0xFFFFFFFFu : 0xFFFFu;
      const __m512i a = _mm512_maskz_loadu_epi16(mk, vrow[2 * i] + d0);
      const __m512i b = _mm512_maskz_loadu_epi16(mk, vrow[2 * i + 1] + d0);
      _mm512_storeu_si512(&vpair[i][d0], _mm512_permutex2var_epi16(a, ix.lo, b));
      if (full) _mm512_storeu_si512(&vpair[i][d0 + 16], _mm512_permutex2var_epi16(a, ix.hi, b));
    }
  }
}

// bfloat16 caches with AVX512_BF16: QK^T and PV are pairwise bf16 dot products accumulated in
// float32 (two products per lane and instruction, twice the FMA rate). q stays unscaled (exact);
// the scale is applied to the float32 scores. P is rounded to bf16 for PV, as PyTorch's fused CPU
// kernel and FlashAttention do; the softmax sum l is kept in float32. Keys go in chunks of
// kChunk (see there); within a chunk, 16 keys at a time for the scores.
MRT_AVX512_BF16 void task_avx512_bf16(const Ctx& c, int64_t item, int64_t h, int64_t qv0, int64_t qv1,
                                      Bf16Scratch& s) {
  const int64_t dh = c.dh, dh2 = dh / 2;
  const int groups = static_cast<int>((qv1 - qv0 + kLanes - 1) / kLanes);
  // Q^T as bf16 pairs: a row's (d, d+1) pairs are its 32-bit words, so 16 x 16 blocks of words
  // transpose like floats; padding lanes zero
  const uint16_t* qbase16 = static_cast<const uint16_t*>(c.q);
  for (int g = 0; g < groups; ++g) {
    const uint16_t* qrow[kLanes];
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, qv1 - qv0 - g * kLanes));
    for (int lane = 0; lane < lanes; ++lane) {
      int64_t row, head, part;
      c.locate(item, h, qv0 + g * kLanes + lane, &row, &head, &part);
      qrow[lane] = qbase16 + row * c.q_row_stride + head * c.q_head_stride;
    }
    for (int64_t w0 = 0; w0 < dh2; w0 += kLanes) {
      const int words = static_cast<int>(std::min<int64_t>(kLanes, dh2 - w0));
      const __mmask16 mk = cpu::tail_mask(words);
      __m512 r[kLanes];
      for (int lane = 0; lane < kLanes; ++lane)
        r[lane] = lane < lanes ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mk, qrow[lane] + 2 * w0))
                               : _mm512_setzero_ps();
      cpu::transpose16x16(r);
      for (int i = 0; i < words; ++i) _mm512_store_ps(reinterpret_cast<float*>(s.qt[g][w0 + i]), r[i]);
    }
  }
  init_lane_groups(s, groups, dh);
  const int64_t len = c.item_len[item];
  const int64_t* blocks = c.item_blocks + c.item_block_ptr[item];
  const __m512 qscale = _mm512_set1_ps(c.qscale);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const InterleaveIdx ix = interleave_idx();
  alignas(64) int16_t pair_idx[32];  // (p0[i], p1[i]) from one vector holding p0 then p1
  for (int i = 0; i < 16; ++i) {
    pair_idx[2 * i] = static_cast<int16_t>(i);
    pair_idx[2 * i + 1] = static_cast<int16_t>(16 + i);
  }
  const __m512i ipair = _mm512_load_si512(pair_idx);
  const uint16_t* krow[kChunk];
  const uint16_t* vrow[kChunk];
  for (int64_t t = 0; t < std::min<int64_t>(len, kChunk); t += kLanes) prefetch_tile(c, blocks, len, t, h);
  for (int64_t c0 = 0, c1 = 0; c0 < len; c0 = c1) {
    // a chunk lies in one segment (of whole tiles, or the item's last), so its keys have one range
    // of attending lanes [lo, hi): the groups outside it sit the chunk out (a chain's segments
    // leave rows out)
    const Ctx::Span sp = c.span(item, c0);
    c1 = std::min<int64_t>(sp.key_end, c0 + kChunk);
    const int64_t lo = sp.qv0 - qv0, hi = std::min(sp.qv1, qv1) - qv0;
    if (lo >= hi) {
      c1 = sp.key_end;
      for (int64_t t = c1; t < std::min<int64_t>(len, c1 + kChunk); t += kLanes) prefetch_tile(c, blocks, len, t, h);
      continue;
    }
    const int nk = static_cast<int>(c1 - c0);
    const int tiles = (nk + kLanes - 1) / kLanes, pairs = (nk + 1) / 2;
    for (int t = 0; t < tiles; ++t)
      bf16_tile_rows(c, blocks, c0 + t * kLanes, std::min(kLanes, nk - t * kLanes), h, s.zero, krow + t * kLanes,
                     vrow + t * kLanes);
    // the next chunk's rows are asked for now: this chunk's arithmetic hides their latency
    for (int64_t t = c1; t < std::min<int64_t>(len, c1 + kChunk); t += kLanes) prefetch_tile(c, blocks, len, t, h);
    pair_v_rows(vrow, pairs, dh, ix, s.vpair);
    int g0, g1;
    groups_in(lo, hi, groups, &g0, &g1);
    for (int g = g0; g < g1; ++g) {
      const __mmask16 active = lanes_in(lo, hi, g);
      __m512 mx = neg_inf;
      for (int t = 0; t < tiles; ++t) {
        const int n = std::min(kLanes, nk - t * kLanes);
        // keys in two halves of 8 so their row pointers stay in registers (K read in place)
        __m512 sc[kLanes];
#pragma GCC unroll 2
        for (int j0 = 0; j0 < kLanes; j0 += kLanes / 2) {
          const uint16_t* kr[kLanes / 2];
          __m512 a[kLanes / 2];
#pragma GCC unroll 8
          for (int j = 0; j < kLanes / 2; ++j) {
            kr[j] = krow[t * kLanes + j0 + j];
            a[j] = _mm512_setzero_ps();
          }
          for (int64_t d2 = 0; d2 < dh2; ++d2) {
            const __m512bh qd = (__m512bh)_mm512_load_si512(s.qt[g][d2]);
#pragma GCC unroll 8
            for (int j = 0; j < kLanes / 2; ++j) a[j] = dp_bcast(a[j], qd, kr[j] + 2 * d2);
          }
#pragma GCC unroll 8
          for (int j = 0; j < kLanes / 2; ++j) sc[j0 + j] = a[j];
        }
#pragma GCC unroll 16
        for (int j = 0; j < kLanes; ++j) {
          sc[j] = j < n ? _mm512_mask_blend_ps(active, neg_inf, _mm512_mul_ps(sc[j], qscale)) : neg_inf;
          mx = _mm512_max_ps(mx, sc[j]);
          _mm512_store_ps(s.sc[t * kLanes + j], sc[j]);
        }
      }
      const __m512 m_old = _mm512_load_ps(s.m[g]);
      const __m512 m_new = _mm512_max_ps(m_old, mx);
      const __m512 alpha = exp2_avx512(_mm512_sub_ps(m_old, m_new));
      __m512 sum = _mm512_setzero_ps();
      for (int i = 0; i < pairs; ++i) {
        // a score past nk (an odd chunk's last pair) is -inf: its p is 0
        const __m512 p0 = exp2_probs(_mm512_sub_ps(_mm512_load_ps(s.sc[2 * i]), m_new));
        const __m512 p1 = exp2_probs(_mm512_sub_ps(_mm512_load_ps(s.sc[2 * i + 1]), m_new));
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // words 0-15: p0, 16-31: p1
        _mm512_store_si512(s.ppair[i], _mm512_permutexvar_epi16(ipair, both));
      }
      _mm512_store_ps(s.m[g], m_new);
      _mm512_store_ps(s.l[g], _mm512_fmadd_ps(_mm512_load_ps(s.l[g]), alpha, sum));
      for (int64_t d0 = 0; d0 < dh; d0 += 16) {
        __m512 acc[16];
#pragma GCC unroll 16
        for (int dd = 0; dd < 16; ++dd) acc[dd] = _mm512_mul_ps(_mm512_load_ps(s.ot[g][d0 + dd]), alpha);
        for (int i = 0; i < pairs; ++i) {
          const __m512bh p = (__m512bh)_mm512_load_si512(s.ppair[i]);
          const uint32_t* vp = &s.vpair[i][d0];
#pragma GCC unroll 16
          for (int dd = 0; dd < 16; ++dd)
            acc[dd] = dp_bcast(acc[dd], p, vp + dd);
        }
#pragma GCC unroll 16
        for (int dd = 0; dd < 16; ++dd) _mm512_store_ps(s.ot[g][d0 + dd], acc[dd]);
      }
    }
  }
  write_lane_partials(c, item, h, qv0, qv1, groups, s);
}
// Horizontal sums of 16 vectors at once: lane j of the result is the sum of a[j]'s 16 lanes
// (pairwise unpack-and-add, then 128-bit lane shuffles; ~30 instructions for all 16).
MRT_AVX512 inline __m512 hsum16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The key-lanes kernels' online softmax over one tile for one query head: the scores of the valid
// keys (the others count as -inf) update the head's running max m and sum l; returns the tile's
// probabilities and sets *alpha, the factor for the head's accumulator.
MRT_AVX512 inline __m512 own_softmax_step(__m512 scores, __mmask16 valid, float* m, float* l, float* alpha) {
  const __m512 sc = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), scores);
  const float m_new = std::max(*m, _mm512_reduce_max_ps(sc));
  *alpha = std::exp2(*m - m_new);
  const __m512 p = exp2_avx512(_mm512_sub_ps(sc, _mm512_set1_ps(m_new)));
  *l = *l * *alpha + _mm512_reduce_add_ps(p);
  *m = m_new;
  return p;
}

// A row's own tail (an item of one row): its few query heads would fill few of 16 query lanes,
// so here the lanes are keys for the scores (16 keys per vector, dot products over d reduced by
// hsum16) and d for the output; the V pairs are shared with the group kernel's layout.
// Needs dh % 32 == 0 and at most 16 query heads per KV head.
MRT_AVX512_BF16 void own_task_avx512_bf16(const Ctx& c, int64_t item, int64_t h, Bf16Scratch& s, float* o,
                                          float* lse) {
  const int64_t dh = c.dh, chunks = dh / 32, grp = c.grp;
  int64_t row, head0, part;
  c.locate(item, h, 0, &row, &head0, &part);
  const uint16_t* q0 = static_cast<const uint16_t*>(c.q) + row * c.q_row_stride + head0 * c.q_head_stride;
  float* acc = &s.ot[0][0][0];  // [grp][dh]
  float mrun[kLanes], lrun[kLanes];
  init_own(acc, mrun, lrun, grp, dh);
  const int64_t len = c.item_len[item];
  const int64_t* blocks = c.item_blocks + c.item_block_ptr[item];
  const __m512 qscale = _mm512_set1_ps(c.qscale);
  const InterleaveIdx ix = interleave_idx();
  const uint16_t* krow[kLanes];
  const uint16_t* vrow[kLanes];
  prefetch_tile(c, blocks, len, 0, h);
  for (int64_t t0 = 0; t0 < len; t0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, len - t0));
    bf16_tile_rows(c, blocks, t0, n, h, s.zero, krow, vrow);
    prefetch_tile(c, blocks, len, t0 + kLanes, h);
    const int pairs = (n + 1) / 2;
    pair_v_rows(vrow, pairs, dh, ix, s.vpair);
    const __mmask16 valid = cpu::tail_mask(n);
    for (int64_t m = 0; m < grp; ++m) {
      const uint16_t* qm = q0 + m * c.q_head_stride;
      __m512 a[kLanes];
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) a[j] = _mm512_setzero_ps();
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(qm + 32 * ch);
#pragma GCC unroll 16
        for (int j = 0; j < kLanes; ++j)
          a[j] = _mm512_dpbf16_ps(a[j], qv, (__m512bh)_mm512_loadu_si512(krow[j] + 32 * ch));
      }
      float alpha;
      const __m512 p = own_softmax_step(_mm512_mul_ps(hsum16(a), qscale), valid, &mrun[m], &lrun[m], &alpha);
      alignas(32) uint32_t pp[kLanes / 2];  // (p_2i, p_2i+1) as bf16 pairs
      _mm256_store_si256(reinterpret_cast<__m256i*>(pp), (__m256i)_mm512_cvtneps_pbh(p));
      const __m512 va = _mm512_set1_ps(alpha);
      for (int64_t d0 = 0; d0 < dh; d0 += 16) {
        __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + m * dh + d0), va);
        for (int i = 0; i < pairs; ++i)
          o = dp_bcast(o, (__m512bh)_mm512_loadu_si512(&s.vpair[i][d0]), pp + i);  // products commute: exact
        _mm512_storeu_ps(acc + m * dh + d0, o);
      }
    }
  }
  write_own(grp, dh, acc, mrun, lrun, o, lse);
}

// The float32 twin of own_task_avx512_bf16 (float32 caches, or bf16 widened per tile): keys as
// lanes for the scores, d as lanes for the output. Needs dh % 16 == 0 and at most 16 query heads
// per KV head.
MRT_AVX512 void own_task_avx512(const Ctx& c, int64_t item, int64_t h, SimdScratch& s, float* o, float* lse) {
  const int64_t dh = c.dh, grp = c.grp;
  int64_t row, head0, part;
  c.locate(item, h, 0, &row, &head0, &part);
  float* qf = &s.qt[0][0][0];   // [grp][dh], pre-scaled
  float* acc = &s.ot[0][0][0];  // [grp][dh]
  float mrun[kLanes], lrun[kLanes];
  init_own(acc, mrun, lrun, grp, dh);
  for (int64_t m = 0; m < grp; ++m) {
    const int64_t qbase = row * c.q_row_stride + (head0 + m) * c.q_head_stride;
    for (int64_t d = 0; d < dh; ++d) qf[m * dh + d] = c.load(c.q, qbase + d) * c.qscale;
  }
  FloatTiles tiles(c, item, h, s);
  const float* const* krow = tiles.krow;
  const float* const* vrow = tiles.vrow;
  for (int64_t t0 = 0; t0 < tiles.len; t0 += kLanes) {
    const int n = tiles.load(t0);
    const __mmask16 valid = cpu::tail_mask(n);
    for (int64_t m = 0; m < grp; ++m) {
      const float* qm = qf + m * dh;
      __m512 a[kLanes];
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) a[j] = _mm512_setzero_ps();
      for (int64_t d0 = 0; d0 < dh; d0 += 16) {
        const __m512 qv = _mm512_loadu_ps(qm + d0);
#pragma GCC unroll 16
        for (int j = 0; j < kLanes; ++j) a[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(krow[j] + d0), a[j]);
      }
      float alpha;
      const __m512 p = own_softmax_step(hsum16(a), valid, &mrun[m], &lrun[m], &alpha);
      alignas(64) float pj[kLanes];
      _mm512_store_ps(pj, p);
      const __m512 va = _mm512_set1_ps(alpha);
      for (int64_t d0 = 0; d0 < dh; d0 += 16) {
        __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + m * dh + d0), va);
        for (int j = 0; j < n; ++j) o = _mm512_fmadd_ps(_mm512_set1_ps(pj[j]), _mm512_loadu_ps(vrow[j] + d0), o);
        _mm512_storeu_ps(acc + m * dh + d0, o);
      }
    }
  }
  write_own(grp, dh, acc, mrun, lrun, o, lse);
}

// One scratch per thread for the life of the thread (the OpenMP workers persist): 160-270 KB, which
// malloc would otherwise map and unmap on every call. Every field but `zero` is written before use.
template <class S>
S& thread_scratch() {
  thread_local std::unique_ptr<S> s;
  if (!s) {
    s.reset(new S);
    std::memset(s->zero, 0, sizeof s->zero);
  }
  return *s;
}

}  // namespace

// Ask for the K/V rows of the tile at t0 (if the item has one) ahead of their use: a tile's 16
// rows are scattered over the cache at a stride the hardware prefetcher does not follow, and
// without this the kernels wait on the first touch of every row.
void prefetch_tile(const Ctx& c, const int64_t* blocks, int64_t len, int64_t t0, int64_t h) {
  if (t0 >= len) return;
  const int n = static_cast<int>(std::min<int64_t>(kLanes, len - t0));
  int64_t idx[kLanes];
  tile_offsets(c, blocks, t0, n, h, idx);
  const int64_t elem = c.dtype == KvDtype::kFloat32 ? 4 : 2, bytes = c.dh * elem;
  const char* kb = static_cast<const char*>(c.k);
  const char* vb = static_cast<const char*>(c.v);
  for (int j = 0; j < n; ++j) {
    for (int64_t off = 0; off < bytes; off += 64) {
      __builtin_prefetch(kb + idx[j] * elem + off);
      __builtin_prefetch(vb + idx[j] * elem + off);
    }
  }
}

// Row output from its partial slots parts[0..np) (item order) and, when own_lse is given, its own
// tail's result already in out_row: the LSE merge with weights computed 16 heads at a time (one
// exp2 per vector) and sums over d in vectors. w: scratch of (np + 1) * 16 floats.
MRT_AVX512 void merge_row_avx512(const float* po, const float* pl, const int64_t* parts, int64_t np, int64_t hq,
                                 int64_t dh, const float* own_lse, float* out_row, float* w) {
  if (np == 0) return;  // the own tail alone: already final
  const int64_t first = own_lse ? 0 : 1;  // weight row 0 is the own tail's
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  for (int64_t h0 = 0; h0 < hq; h0 += 16) {
    const __mmask16 mk = cpu::tail_mask(hq - h0);
    __m512 mx = own_lse ? _mm512_maskz_loadu_ps(mk, own_lse + h0)
                        : _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < np; ++i) mx = _mm512_max_ps(mx, _mm512_maskz_loadu_ps(mk, pl + parts[i] * hq + h0));
    __m512 den = _mm512_setzero_ps();
    for (int64_t i = first; i <= np; ++i) {
      const __m512 x = i == 0 ? _mm512_maskz_loadu_ps(mk, own_lse + h0)
                              : _mm512_maskz_loadu_ps(mk, pl + parts[i - 1] * hq + h0);
      const __m512 wi = exp2_avx512(_mm512_mul_ps(_mm512_sub_ps(x, mx), log2e));
      den = _mm512_add_ps(den, wi);
      _mm512_storeu_ps(w + i * 16, wi);
    }
    alignas(64) float inv[16];
    _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), den));
    const int64_t heads = std::min<int64_t>(16, hq - h0);
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* o = out_row + (h0 + hh) * dh;
      for (int64_t d0 = 0; d0 < dh; d0 += 16) {
        __m512 acc = own_lse ? _mm512_mul_ps(_mm512_loadu_ps(o + d0), _mm512_set1_ps(w[hh]))
                             : _mm512_setzero_ps();
        for (int64_t i = 0; i < np; ++i)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(w[(i + 1) * 16 + hh]),
                                _mm512_loadu_ps(po + (parts[i] * hq + h0 + hh) * dh + d0), acc);
        _mm512_storeu_ps(o + d0, _mm512_mul_ps(acc, _mm512_set1_ps(inv[hh])));
      }
    }
  }
}

// n float32 values to bf16, rounded to nearest even like PyTorch's conversion (NaN stays NaN)
MRT_AVX512 void floats_to_bf16_avx512(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(src + i);
    __m512i r = _mm512_srli_epi32(cpu::round_to_bf16_bits(x), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < n; ++i) dst[i] = cpu::float_to_bf16(src[i]);
}

void group_task(const Ctx& c, int64_t item, int64_t h, int64_t qv0, int64_t qv1, bool bf16_dot) {
  if (bf16_dot) {
    task_avx512_bf16(c, item, h, qv0, qv1, thread_scratch<Bf16Scratch>());
    return;
  }
  SimdScratch& s = thread_scratch<SimdScratch>();
  for (int64_t a = qv0; a < qv1; a += kFloatLaneGroups * kLanes)
    task_avx512(c, item, h, a, std::min<int64_t>(qv1, a + kFloatLaneGroups * kLanes), s);
}

void own_task(const Ctx& c, int64_t item, int64_t h, bool bf16_dot, float* o, float* lse) {
  if (bf16_dot)
    own_task_avx512_bf16(c, item, h, thread_scratch<Bf16Scratch>(), o, lse);
  else
    own_task_avx512(c, item, h, thread_scratch<SimdScratch>(), o, lse);
}
#endif  // MRT_HAVE_X86

}  // namespace attn
}  // namespace mrt
