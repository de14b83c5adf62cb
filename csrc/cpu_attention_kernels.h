// The SIMD kernels of CpuDecodeAttention, internal to the extension: the context a task reads and
// the entry points the plan's run() calls (cpu_attention.cpp holds the plan, the scalar reference
// path and the merge order; cpu_attention_kernels.cpp the AVX-512 kernels and their layout).
#pragma once

#include <cstdint>

#include "cpu_attention.h"
#include "cpu_common.h"

namespace mrt {
namespace attn {

constexpr int kLanes = 16;
// query vectors per task: up to kLaneGroups * 16. The bf16 kernel keeps all of a task's groups
// (pairs V once per chunk of keys for all of them: 128 vectors measured 1.03-1.04x over 64 at the
// Qwen2.5-0.5B shape); the float32 kernel takes them kFloatLaneGroups at a time: its Q^T and O^T
// are twice as large per group (4 groups of them fill L1 at dh 64) and passes of 128 measured 0.99x
constexpr int kLaneGroups = 8;
constexpr int kFloatLaneGroups = 4;
constexpr int kMaxHeadDim = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Ctx {
  const void* q;
  const void* k;
  const void* v;
  KvDtype dtype;
  float qscale;  // scale * log2(e)
  int64_t hq, hkv, grp, dh, bs;
  int64_t q_row_stride, q_head_stride;  // in elements; q's last dimension is contiguous
  const int64_t* item_row_ptr;
  const int64_t* item_rows;
  const int64_t* item_block_ptr;
  const int64_t* item_blocks;
  const int64_t* item_len;
  float* part_o;
  float* part_lse;
  // An item here may be a chain of the plan's items (see cpu_attention.h): its keys are their keys
  // in turn, its rows ordered so each one's rows are a contiguous range; segment k of item i
  // (seg_ptr[i] <= k < seg_ptr[i + 1]) starts at key seg_key[k] and is attended by the rows
  // seg_lane[k] <= row < seg_lane_end[k] (of the item's rows). Every segment but an item's last
  // starts and ends on a 16-key tile and a block boundary.
  const int64_t* seg_ptr;
  const int64_t* seg_key;
  const int64_t* seg_lane;
  const int64_t* seg_lane_end;

  struct Span {
    int64_t qv0, qv1;   // the query vectors that attend to the segment
    int64_t key_end;    // the segment's end (its next segment's first key, or the item's length)
  };
  // the segment of item `item` holding its key t
  Span span(int64_t item, int64_t t) const {
    int64_t k = seg_ptr[item];
    while (k + 1 < seg_ptr[item + 1] && seg_key[k + 1] <= t) ++k;
    const int64_t end = k + 1 < seg_ptr[item + 1] ? seg_key[k + 1] : item_len[item];
    return {seg_lane[k] * grp, seg_lane_end[k] * grp, end};
  }

  // query vector qv of item `item` under KV head h: its decode row and query head
  void locate(int64_t item, int64_t h, int64_t qv, int64_t* row, int64_t* head, int64_t* part) const {
    const int64_t j = qv / grp;
    *part = item_row_ptr[item] + j;
    *row = item_rows[*part];
    *head = h * grp + qv % grp;
  }
  float load(const void* base, int64_t idx) const {
    return dtype == KvDtype::kFloat32 ? static_cast<const float*>(base)[idx]
                                      : cpu::bf16_to_float(static_cast<const uint16_t*>(base)[idx]);
  }
  int64_t kv_index(int64_t block, int64_t tok, int64_t h) const { return ((block * bs + tok) * hkv + h) * dh; }
};

#if MRT_HAVE_X86
// Query vectors [qv0, qv1) of a group item under KV head h, into the item's partial slots; the
// AVX512_BF16 dot-product kernel when `bf16_dot` (bf16 caches), else the float32-FMA one.
void group_task(const Ctx& c, int64_t item, int64_t h, int64_t qv0, int64_t qv1, bool bf16_dot);

// A single-row item under KV head h with keys as lanes: o [grp][dh] and lse [grp] (natural log)
// of the row's grp query heads of that KV head. Needs grp <= 16, and dh % 32 == 0 when bf16_dot.
void own_task(const Ctx& c, int64_t item, int64_t h, bool bf16_dot, float* o, float* lse);

// Asks for the K/V rows of the item's tile at t0 (if any) ahead of their use.
void prefetch_tile(const Ctx& c, const int64_t* blocks, int64_t len, int64_t t0, int64_t h);

// Row output from its partial slots and (own_lse given) its own tail's result already in out_row.
MRT_AVX512 void merge_row_avx512(const float* po, const float* pl, const int64_t* parts, int64_t np, int64_t hq,
                                 int64_t dh, const float* own_lse, float* out_row, float* w);

// n float32 values to bf16, rounded to nearest even (NaN stays NaN).
MRT_AVX512 void floats_to_bf16_avx512(const float* src, int64_t n, uint16_t* dst);
#endif

}  // namespace attn
}  // namespace mrt
