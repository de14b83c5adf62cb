// CPU decode attention over the paged KV cache, for decode rows that share prefix blocks.
//
// A step's decode attention is a list of work items: an item is a run of `len` keys (its blocks,
// in order) and the decode rows that all attend to exactly those keys. The torch backend makes one
// item per prefix-tree segment (the blocks a set of forks share, read once for all of them) and one
// per row for its own tail. Every (item, row) yields a partial result (o, lse); a row's partials
// are then LSE-merged in a fixed order per row, so the result does not depend on the thread count
// or timing. On the SIMD paths a row's own tail (its first item of that row alone) is computed in
// that merge pass, straight into the row's output, instead of as a task with a partial. Items whose
// row sets nest (a segment and the deeper segment of a subset of its rows: an MRT trace's forks at
// increasing positions) are chained into one unit that a task runs through in one pass, the rows
// that leave the chain masked for its later keys, so such a row gets one partial per chain; the
// chain's other children that end the tree there (each fork's own suffix) join it as segments of
// their rows' lane range.
//
// Why C++: on a CPU the work is many small attention problems (a few to a few hundred query
// vectors against 16 to a few thousand keys). PyTorch's fused kernel pays a fixed cost per problem
// and gathers blocks into padded copies first; here the blocks are read in place, query vectors
// of one KV head are the SIMD lanes (so the softmax needs no horizontal reductions), and the
// partials never leave the cache. The AVX-512 path is chosen at run time; a scalar path with the
// same results (to rounding) runs anywhere and is what the tests compare it with.
#pragma once

#include <cstdint>
#include <vector>

namespace mrt {
namespace attn {
struct Ctx;  // what a kernel task reads (cpu_attention_kernels.h)
}  // namespace attn

enum class KvDtype : int { kFloat32 = 0, kBFloat16 = 1 };

class CpuDecodeAttention {
 public:
  // item i covers the keys of item_blocks[item_block_ptr[i] .. item_block_ptr[i+1]) (block ids
  // into a cache of num_cache_blocks blocks of block_size tokens), its first item_len[i] tokens,
  // for the decode rows item_rows[item_row_ptr[i] .. item_row_ptr[i+1]). Every decode row
  // 0..num_rows-1 must appear in at least one item. Throws std::invalid_argument on bad input.
  CpuDecodeAttention(int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     int64_t block_size, int64_t num_cache_blocks, std::vector<int64_t> item_row_ptr,
                     std::vector<int64_t> item_rows, std::vector<int64_t> item_block_ptr,
                     std::vector<int64_t> item_blocks, std::vector<int64_t> item_len);
  ~CpuDecodeAttention();  // hands its partial buffers to the next plan

  // q [num_rows, H, Dh] of `dtype` with the given row and head strides (elements; Dh contiguous),
  // both caches [num_cache_blocks, block_size, Hkv, Dh] contiguous of `dtype`; out [num_rows, H, Dh]
  // contiguous, float32, or bfloat16 (rounded to nearest even) when `out_bf16`. Not re-entrant:
  // one plan's partial buffers serve one run at a time (the engine runs a step's layers in turn).
  // `simd` = false forces the scalar path; `bf16_dot` = false keeps bfloat16 caches on the float32
  // FMA path instead of AVX512_BF16 dot products (which round P to bf16).
  void run(const void* q, int64_t q_row_stride, int64_t q_head_stride, const void* k_cache,
           const void* v_cache, void* out, KvDtype dtype, float scale, int num_threads, bool simd,
           bool bf16_dot, bool out_bf16 = false);

  int64_t num_items() const { return num_items_; }
  int64_t num_units() const { return static_cast<int64_t>(item_len_.size()); }  // items after chaining
  int64_t num_tasks() const { return static_cast<int64_t>(tasks_.size()); }
  static bool simd_available();
  static bool bf16_dot_available();

 private:
  struct Task {
    int64_t item, head, qv_begin, qv_end;  // item: a unit; query vectors (row-in-unit * group + head-in-group)
  };
  int64_t num_rows_, hq_, hkv_, dh_, bs_, num_cache_blocks_;
  // the items as given, then (build_units) the units the tasks run: chains of items with nested
  // rows, or single items; seg_*: each unit's segments (first key, attending rows [lane, lane_end))
  std::vector<int64_t> item_row_ptr_, item_rows_, item_block_ptr_, item_blocks_, item_len_;
  std::vector<int64_t> seg_ptr_, seg_key_, seg_lane_, seg_lane_end_;
  int64_t num_items_ = 0;
  void build_units();
  std::vector<int64_t> row_part_ptr_, row_parts_;  // partial slots of each row, in item order
  std::vector<Task> tasks_;
  // A row's own tail (its first item of that row alone) is computed in the merge pass on the
  // SIMD paths, straight into the row's output: no task, no partial written and read back.
  std::vector<int64_t> own_item_;                   // per row: that item, or -1
  std::vector<int64_t> rest_part_ptr_, rest_parts_;  // row_parts_ without the own item's slot
  std::vector<Task> shared_tasks_;                  // tasks_ without the own items
  int64_t max_parts_ = 0;                           // most partial slots of one row
  void prefetch_next_tasks(const attn::Ctx& c, const std::vector<Task>& tasks, int64_t i, int threads) const;
  void prefetch_next_rows(const attn::Ctx& c, int64_t r, int threads) const;
  std::vector<float> part_o_, part_lse_;            // [P, H, Dh], [P, H]; P = item_rows.size()
};

}  // namespace mrt
