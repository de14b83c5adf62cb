// CPU decode attention over the paged KV cache: the plan (tasks, partial slots, merge order), the
// scalar reference path and run(). The AVX-512 kernels are in cpu_attention_kernels.cpp; see
// cpu_attention.h for the work-item model.
#include "cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "cpu_attention_kernels.h"
#include "cpu_common.h"

namespace mrt {
namespace {

using attn::Ctx;
using attn::kLaneGroups;
using attn::kLanes;
using attn::kLn2;
using attn::kLog2e;
using attn::kMaxHeadDim;
using cpu::parallel_for;

// Reference path: one query vector at a time, online softmax over the item's keys.
void task_scalar(const Ctx& c, int64_t item, int64_t h, int64_t qv0, int64_t qv1) {
  std::vector<float> qf(c.dh), acc(c.dh);
  const int64_t len = c.item_len[item];
  const int64_t* blocks = c.item_blocks + c.item_block_ptr[item];
  for (int64_t qv = qv0; qv < qv1; ++qv) {
    int64_t row, head, part;
    c.locate(item, h, qv, &row, &head, &part);
    const int64_t qbase = row * c.q_row_stride + head * c.q_head_stride;
    for (int64_t d = 0; d < c.dh; ++d) qf[d] = c.load(c.q, qbase + d) * c.qscale;
    std::fill(acc.begin(), acc.end(), 0.f);
    float m = -std::numeric_limits<float>::infinity(), l = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      const Ctx::Span sp = c.span(item, t);
      if (qv < sp.qv0 || qv >= sp.qv1) {  // a chain's segment of other rows
        t = sp.key_end - 1;
        continue;
      }
      const int64_t kb = c.kv_index(blocks[t / c.bs], t % c.bs, h);
      float s = 0.f;
      for (int64_t d = 0; d < c.dh; ++d) s += qf[d] * c.load(c.k, kb + d);
      const float mn = std::max(m, s);
      const float alpha = std::exp2(m - mn), p = std::exp2(s - mn);
      l = l * alpha + p;
      for (int64_t d = 0; d < c.dh; ++d) acc[d] = acc[d] * alpha + p * c.load(c.v, kb + d);
      m = mn;
    }
    float* o = c.part_o + (part * c.hq + head) * c.dh;
    for (int64_t d = 0; d < c.dh; ++d) o[d] = acc[d] / l;
    c.part_lse[part * c.hq + head] = (m + std::log2(l)) * kLn2;
  }
}

// Partial buffers outlive their plan in a small pool: the engine builds a plan per step, and a
// fresh buffer of a few MB pays a page fault per 4 KB (the OS zeroes each page) in the step's first
// layer. Contents are never read before a run writes them, so a reused buffer needs no clearing.
struct BufferPool {
  std::mutex mutex;
  std::vector<std::vector<float>> buffers;  // at most 8
};

BufferPool& buffer_pool() {
  static BufferPool pool;
  return pool;
}

std::vector<float> take_buffer(size_t n) {
  std::vector<float> v;
  {
    BufferPool& pool = buffer_pool();
    std::lock_guard<std::mutex> lock(pool.mutex);
    if (!pool.buffers.empty()) {
      v = std::move(pool.buffers.back());
      pool.buffers.pop_back();
    }
  }
  if (v.size() < n) v.resize(n);
  return v;
}

void give_buffer(std::vector<float>&& v) {
  if (v.empty()) return;
  BufferPool& pool = buffer_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  if (pool.buffers.size() < 8) pool.buffers.push_back(std::move(v));
}

}  // namespace

CpuDecodeAttention::~CpuDecodeAttention() {
  give_buffer(std::move(part_o_));
  give_buffer(std::move(part_lse_));
}

bool CpuDecodeAttention::simd_available() {
#if MRT_HAVE_X86
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

bool CpuDecodeAttention::bf16_dot_available() {
#if MRT_HAVE_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

CpuDecodeAttention::CpuDecodeAttention(int64_t num_rows, int64_t num_heads, int64_t num_kv_heads,
                                       int64_t head_dim, int64_t block_size, int64_t num_cache_blocks,
                                       std::vector<int64_t> item_row_ptr, std::vector<int64_t> item_rows,
                                       std::vector<int64_t> item_block_ptr, std::vector<int64_t> item_blocks,
                                       std::vector<int64_t> item_len)
    : num_rows_(num_rows), hq_(num_heads), hkv_(num_kv_heads), dh_(head_dim), bs_(block_size),
      num_cache_blocks_(num_cache_blocks), item_row_ptr_(std::move(item_row_ptr)),
      item_rows_(std::move(item_rows)), item_block_ptr_(std::move(item_block_ptr)),
      item_blocks_(std::move(item_blocks)), item_len_(std::move(item_len)) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("CpuDecodeAttention: " + what); };
  if (num_rows < 0 || num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0)
    bad("need num_rows >= 0 and num_heads a positive multiple of num_kv_heads");
  if (head_dim <= 0 || head_dim % 16 != 0 || head_dim > kMaxHeadDim)
    bad("head_dim must be a multiple of 16 in [16, " + std::to_string(kMaxHeadDim) + "], got " +
        std::to_string(head_dim));
  if (block_size <= 0 || num_cache_blocks <= 0) bad("block_size and num_cache_blocks must be positive");
  const int64_t items = static_cast<int64_t>(item_len_.size());
  if (static_cast<int64_t>(item_row_ptr_.size()) != items + 1 ||
      static_cast<int64_t>(item_block_ptr_.size()) != items + 1)
    bad("item_row_ptr and item_block_ptr must have len(item_len) + 1 entries");
  if (item_row_ptr_.front() != 0 || item_row_ptr_.back() != static_cast<int64_t>(item_rows_.size()) ||
      item_block_ptr_.front() != 0 || item_block_ptr_.back() != static_cast<int64_t>(item_blocks_.size()))
    bad("item_row_ptr / item_block_ptr must start at 0 and end at the length of their arrays");
  for (int64_t i = 0; i < items; ++i) {
    const int64_t nr = item_row_ptr_[i + 1] - item_row_ptr_[i];
    const int64_t nb = item_block_ptr_[i + 1] - item_block_ptr_[i];
    if (nr <= 0 || nb <= 0) bad("item " + std::to_string(i) + " has no rows or no blocks");
    if (item_len_[i] <= (nb - 1) * block_size || item_len_[i] > nb * block_size)
      bad("item " + std::to_string(i) + ": len " + std::to_string(item_len_[i]) + " does not fit its " +
          std::to_string(nb) + " blocks of " + std::to_string(block_size));
  }
  for (int64_t b : item_blocks_)
    if (b < 0 || b >= num_cache_blocks) bad("block id " + std::to_string(b) + " outside the cache");
  std::vector<int64_t> count(num_rows, 0);
  for (int64_t r : item_rows_) {
    if (r < 0 || r >= num_rows) bad("row " + std::to_string(r) + " outside [0, num_rows)");
    ++count[r];
  }
  for (int64_t r = 0; r < num_rows; ++r)
    if (count[r] == 0) bad("row " + std::to_string(r) + " is in no item");
  num_items_ = items;
  build_units();
  const int64_t units = static_cast<int64_t>(item_len_.size());
  // partial slots: one per (unit, row), a row's in unit order (units follow their first item)
  std::fill(count.begin(), count.end(), 0);
  for (int64_t r : item_rows_) ++count[r];
  row_part_ptr_.assign(num_rows + 1, 0);
  for (int64_t r = 0; r < num_rows; ++r) row_part_ptr_[r + 1] = row_part_ptr_[r] + count[r];
  row_parts_.resize(item_rows_.size());
  std::vector<int64_t> fill(row_part_ptr_.begin(), row_part_ptr_.end() - 1);
  for (int64_t p = 0; p < static_cast<int64_t>(item_rows_.size()); ++p) row_parts_[fill[item_rows_[p]]++] = p;
  // tasks: (unit, KV head, chunk of query vectors); big units are split so both cores get work
  const int64_t grp = hq_ / hkv_, chunk = kLanes * kLaneGroups;
  for (int64_t u = 0; u < units; ++u) {
    const int64_t m = (item_row_ptr_[u + 1] - item_row_ptr_[u]) * grp;
    for (int64_t h = 0; h < hkv_; ++h)
      for (int64_t a = 0; a < m; a += chunk) tasks_.push_back({u, h, a, std::min(m, a + chunk)});
  }
  // a task's work: lane groups x keys over its unit's segments, counting only the groups that attend
  auto work = [&](const Task& t) {
    int64_t w = 0;
    for (int64_t k = seg_ptr_[t.item]; k < seg_ptr_[t.item + 1]; ++k) {
      const int64_t keys = (k + 1 < seg_ptr_[t.item + 1] ? seg_key_[k + 1] : item_len_[t.item]) - seg_key_[k];
      const int64_t from = std::max(t.qv_begin, seg_lane_[k] * grp), to = std::min(t.qv_end, seg_lane_end_[k] * grp);
      if (from < to) w += ((to - t.qv_begin + kLanes - 1) / kLanes - (from - t.qv_begin) / kLanes) * keys;
    }
    return w;
  };
  // most work first, so the last tasks to start are short
  std::stable_sort(tasks_.begin(), tasks_.end(), [&](const Task& a, const Task& b) { return work(a) > work(b); });
  own_item_.assign(num_rows, -1);
  std::vector<char> is_own(units, 0);
  for (int64_t u = 0; u < units; ++u) {
    if (item_row_ptr_[u + 1] - item_row_ptr_[u] != 1) continue;
    const int64_t r = item_rows_[item_row_ptr_[u]];
    if (own_item_[r] < 0) {
      own_item_[r] = u;
      is_own[u] = 1;
    }
  }
  for (const Task& t : tasks_)
    if (!is_own[t.item]) shared_tasks_.push_back(t);
  rest_part_ptr_.assign(num_rows + 1, 0);
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t i = row_part_ptr_[r]; i < row_part_ptr_[r + 1]; ++i) {
      const int64_t p = row_parts_[i];
      if (own_item_[r] < 0 || p != item_row_ptr_[own_item_[r]]) rest_parts_.push_back(p);
    }
    rest_part_ptr_[r + 1] = static_cast<int64_t>(rest_parts_.size());
    max_parts_ = std::max(max_parts_, row_part_ptr_[r + 1] - row_part_ptr_[r]);
  }
  part_o_ = take_buffer(item_rows_.size() * hq_ * dh_);
  part_lse_ = take_buffer(item_rows_.size() * hq_);
}

// Chains: an item of two or more rows continues the chain of the latest earlier item (of whole
// blocks and whole 16-key tiles) that holds all its rows, if it is that item's child with the most
// rows; a chain is one unit: its keys the items' keys in turn, its rows ordered by how deep into
// the chain they go, so each item's rows are a suffix of them (the lanes below it sit that item
// out). A chain item's other children that have no children of their own and are whole tiles and
// blocks (each fork's own suffix, shared by its branches) join the unit too, ahead of the chain's
// keys: their rows all leave the chain at one depth, so ordered by (depth, child) each child's rows
// are a lane range of their own. A row then gets one partial per chain instead of one per
// prefix-tree segment: an MRT trace's forks at increasing positions and their suffixes are one
// unit. Every other item is a unit of its own.
void CpuDecodeAttention::build_units() {
  const int64_t items = num_items_;
  auto rows_of = [&](int64_t i) { return item_rows_.data() + item_row_ptr_[i]; };
  auto nrows = [&](int64_t i) { return item_row_ptr_[i + 1] - item_row_ptr_[i]; };
  auto whole = [&](int64_t i) { return item_len_[i] % bs_ == 0 && item_len_[i] % kLanes == 0; };
  std::vector<int64_t> parent(items, -1), heavy(items, -1), stamp(num_rows_, -1);
  std::vector<std::vector<int64_t>> row_items(num_rows_);   // multi-row items holding the row, in order
  for (int64_t i = 0; i < items; ++i) {
    if (nrows(i) < 2) continue;
    const std::vector<int64_t>& cand = row_items[rows_of(i)[0]];
    int checked = 0;
    for (auto a = cand.rbegin(); a != cand.rend() && checked < 8; ++a, ++checked) {
      // keys after a partial block would not line up, nor a segment starting inside a 16-key tile
      if (!whole(*a)) continue;
      for (int64_t j = 0; j < nrows(*a); ++j) stamp[rows_of(*a)[j]] = *a;
      bool subset = true;
      for (int64_t j = 0; j < nrows(i) && subset; ++j) subset = stamp[rows_of(i)[j]] == *a;
      if (subset) {
        parent[i] = *a;
        break;
      }
    }
    for (int64_t j = 0; j < nrows(i); ++j) row_items[rows_of(i)[j]].push_back(i);
    if (parent[i] >= 0 && (heavy[parent[i]] < 0 || nrows(i) > nrows(heavy[parent[i]]))) heavy[parent[i]] = i;
  }
  // a child joins its parent's unit only if its rows meet no sibling's (any items may come in, not
  // only a prefix tree's): then its rows are exactly those that leave the chain at its parent with it
  std::vector<char> has_child(items, 0), overlaps(items, 0);
  std::vector<int64_t> seen_parent(num_rows_, -1), seen_kid(num_rows_, -1);
  for (int64_t i = 0; i < items; ++i) {
    if (parent[i] < 0) continue;
    has_child[parent[i]] = 1;
    for (int64_t j = 0; j < nrows(i); ++j) {
      const int64_t r = rows_of(i)[j];
      if (seen_parent[r] == parent[i]) overlaps[i] = overlaps[seen_kid[r]] = 1;
      seen_parent[r] = parent[i];
      seen_kid[r] = i;
    }
  }
  std::vector<char> joins(items, 0);                 // inside a unit headed by another item
  std::vector<std::vector<int64_t>> light(items);   // the children that join their parent's unit
  for (int64_t i = 0; i < items; ++i) {
    if (parent[i] < 0) continue;
    if (heavy[parent[i]] == i) {
      joins[i] = 1;
    } else if (!has_child[i] && !overlaps[i] && whole(i)) {
      joins[i] = 1;
      light[parent[i]].push_back(i);
    }
  }
  std::vector<int64_t> u_row_ptr{0}, u_rows, u_block_ptr{0}, u_blocks, u_len;
  std::vector<int64_t> depth(num_rows_, 0), child(num_rows_, 0), lane(num_rows_, 0);
  seg_ptr_.assign(1, 0);
  seg_key_.clear();
  seg_lane_.clear();
  seg_lane_end_.clear();
  for (int64_t i = 0; i < items; ++i) {
    if (joins[i]) continue;
    std::vector<int64_t> chain{i}, joined;
    while (heavy[chain.back()] >= 0) chain.push_back(heavy[chain.back()]);
    for (int64_t x : chain) joined.insert(joined.end(), light[x].begin(), light[x].end());
    const int64_t* r0 = rows_of(i);
    for (int64_t j = 0; j < nrows(i); ++j) depth[r0[j]] = 0, child[r0[j]] = -1;
    for (int64_t x : chain)
      for (int64_t j = 0; j < nrows(x); ++j) ++depth[rows_of(x)[j]];
    for (int64_t q = 0; q < static_cast<int64_t>(joined.size()); ++q)
      for (int64_t j = 0; j < nrows(joined[q]); ++j) child[rows_of(joined[q])[j]] = q;
    std::vector<int64_t> lanes(r0, r0 + nrows(i));
    std::stable_sort(lanes.begin(), lanes.end(), [&](int64_t a, int64_t b) {
      return depth[a] != depth[b] ? depth[a] < depth[b] : child[a] < child[b];
    });
    for (int64_t j = 0; j < nrows(i); ++j) lane[lanes[j]] = j;
    u_rows.insert(u_rows.end(), lanes.begin(), lanes.end());
    u_row_ptr.push_back(static_cast<int64_t>(u_rows.size()));
    int64_t keys = 0;
    auto add_segment = [&](int64_t x, int64_t lane0, int64_t lane1) {
      seg_key_.push_back(keys);
      seg_lane_.push_back(lane0);
      seg_lane_end_.push_back(lane1);
      u_blocks.insert(u_blocks.end(), item_blocks_.begin() + item_block_ptr_[x],
                      item_blocks_.begin() + item_block_ptr_[x + 1]);
      keys += item_len_[x];
    };
    // the joined children first: every segment but the unit's last must be whole, as they are
    for (int64_t x : joined) {
      int64_t lo = nrows(i), hi = 0;
      for (int64_t j = 0; j < nrows(x); ++j) {
        lo = std::min(lo, lane[rows_of(x)[j]]);
        hi = std::max(hi, lane[rows_of(x)[j]] + 1);
      }
      add_segment(x, lo, hi);
    }
    for (int64_t x : chain) add_segment(x, nrows(i) - nrows(x), nrows(i));
    seg_ptr_.push_back(static_cast<int64_t>(seg_key_.size()));
    u_block_ptr.push_back(static_cast<int64_t>(u_blocks.size()));
    u_len.push_back(keys);
  }
  item_row_ptr_.swap(u_row_ptr);
  item_rows_.swap(u_rows);
  item_block_ptr_.swap(u_block_ptr);
  item_blocks_.swap(u_blocks);
  item_len_.swap(u_len);
}

// The first K/V tile of the tasks a thread is likely to take after task i (tasks go out in order
// from one counter): most tasks are short (a row's own tail is one or two tiles), so asking for a
// task's rows only when it starts leaves the kernel waiting on memory for most of it.
void CpuDecodeAttention::prefetch_next_tasks(const Ctx& c, const std::vector<Task>& tasks, int64_t i,
                                             int threads) const {
#if MRT_HAVE_X86
  const int64_t last = std::min<int64_t>(static_cast<int64_t>(tasks.size()) - 1, i + threads);
  for (int64_t j = i + 1; j <= last; ++j) {
    const Task& t = tasks[j];
    attn::prefetch_tile(c, item_blocks_.data() + item_block_ptr_[t.item], item_len_[t.item], 0, t.head);
  }
#else
  (void)c, (void)tasks, (void)i, (void)threads;
#endif
}

// The same for the own tails of the rows the merge pass hands out next.
void CpuDecodeAttention::prefetch_next_rows(const Ctx& c, int64_t r, int threads) const {
#if MRT_HAVE_X86
  const int64_t last = std::min<int64_t>(num_rows_ - 1, r + threads);
  for (int64_t j = r + 1; j <= last; ++j) {
    const int64_t it = own_item_[j];
    if (it < 0) continue;
    for (int64_t h = 0; h < hkv_; ++h)
      attn::prefetch_tile(c, item_blocks_.data() + item_block_ptr_[it], item_len_[it], 0, h);
  }
#else
  (void)c, (void)r, (void)threads;
#endif
}

void CpuDecodeAttention::run(const void* q, int64_t q_row_stride, int64_t q_head_stride, const void* k_cache,
                             const void* v_cache, void* out_ptr, KvDtype dtype, float scale, int num_threads,
                             bool simd, bool bf16_dot, bool out_bf16) {
  if (dtype != KvDtype::kFloat32 && dtype != KvDtype::kBFloat16) throw std::invalid_argument("unsupported dtype");
  if (simd && !simd_available()) throw std::invalid_argument("the SIMD path needs AVX-512F");
  Ctx c{q, k_cache, v_cache, dtype, scale * kLog2e, hq_, hkv_, hq_ / hkv_, dh_, bs_, q_row_stride, q_head_stride,
        item_row_ptr_.data(), item_rows_.data(), item_block_ptr_.data(), item_blocks_.data(),
        item_len_.data(), part_o_.data(), part_lse_.data(), seg_ptr_.data(), seg_key_.data(), seg_lane_.data(),
        seg_lane_end_.data()};
  const int threads = std::max(1, num_threads);
  const int64_t hq = hq_, dh = dh_, grp = c.grp;
#if MRT_HAVE_X86
  const bool use_bf16 = simd && bf16_dot && dtype == KvDtype::kBFloat16 && bf16_dot_available();
  if (simd) {
    // the key-lanes kernel for single-row items (bf16 dot products need pairs of 16-value chunks)
    const bool own_kernel = grp <= kLanes && (!use_bf16 || dh_ % 32 == 0);
    const std::vector<Task>& tasks = own_kernel ? shared_tasks_ : tasks_;
    // one task: a group item's query vectors, or a single-row item that is not its row's own tail
    auto run_task = [&](int64_t i) {
      prefetch_next_tasks(c, tasks, i, threads);
      const Task& t = tasks[i];
      if (own_kernel && item_row_ptr_[t.item + 1] - item_row_ptr_[t.item] == 1) {
        int64_t row, head0, part;   // the item's one partial slot, its KV head's query heads
        c.locate(t.item, t.head, 0, &row, &head0, &part);
        attn::own_task(c, t.item, t.head, use_bf16, part_o_.data() + (part * hq + head0) * dh,
                       part_lse_.data() + part * hq + head0);
      } else {
        attn::group_task(c, t.item, t.head, t.qv_begin, t.qv_end, use_bf16);
      }
    };
    parallel_for(static_cast<int64_t>(tasks.size()), threads, run_task);
    // per row: its own tail into the output, then the LSE merge with its partials
    const float* po = part_o_.data();
    const float* pl = part_lse_.data();
    parallel_for(num_rows_, threads, [&](int64_t r) {
      thread_local std::vector<float> w, own_lse, rowbuf;
      w.resize((max_parts_ + 1) * 16);
      own_lse.resize(hq);
      if (out_bf16) rowbuf.resize(hq * dh);
      float* orow = out_bf16 ? rowbuf.data() : static_cast<float*>(out_ptr) + r * hq * dh;
      const int64_t own = own_kernel ? own_item_[r] : -1;
      if (own >= 0) {
        prefetch_next_rows(c, r, threads);
        for (int64_t h = 0; h < hkv_; ++h)
          attn::own_task(c, own, h, use_bf16, orow + h * grp * dh, own_lse.data() + h * grp);
      }
      const std::vector<int64_t>& ptr = own_kernel ? rest_part_ptr_ : row_part_ptr_;
      const int64_t* parts = (own_kernel ? rest_parts_ : row_parts_).data() + ptr[r];
      const int64_t np = ptr[r + 1] - ptr[r];
      attn::merge_row_avx512(po, pl, parts, np, hq, dh, own >= 0 ? own_lse.data() : nullptr, orow, w.data());
      if (out_bf16) attn::floats_to_bf16_avx512(orow, hq * dh, static_cast<uint16_t*>(out_ptr) + r * hq * dh);
    });
    return;
  }
#else
  (void)bf16_dot;
#endif
  parallel_for(num_tasks(), threads, [&](int64_t i) {
    const Task& t = tasks_[i];
    task_scalar(c, t.item, t.head, t.qv_begin, t.qv_end);
  });
  // LSE merge of each row's partials in item order
  const float* po = part_o_.data();
  const float* pl = part_lse_.data();
  parallel_for(num_rows_, threads, [&](int64_t r) {
    thread_local std::vector<float> rowbuf;
    if (out_bf16) rowbuf.resize(hq * dh);
    float* orow = out_bf16 ? rowbuf.data() : static_cast<float*>(out_ptr) + r * hq * dh;
    const int64_t a = row_part_ptr_[r], b = row_part_ptr_[r + 1];
    for (int64_t h = 0; h < hq; ++h) {
      float* o = orow + h * dh;
      if (b - a == 1) {
        std::memcpy(o, po + (row_parts_[a] * hq + h) * dh, sizeof(float) * dh);
        continue;
      }
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = a; i < b; ++i) mx = std::max(mx, pl[row_parts_[i] * hq + h]);
      float den = 0.f;
      std::fill(o, o + dh, 0.f);
      for (int64_t i = a; i < b; ++i) {
        const int64_t p = row_parts_[i];
        const float w = std::exp(pl[p * hq + h] - mx);
        den += w;
        const float* src = po + (p * hq + h) * dh;
        for (int64_t d = 0; d < dh; ++d) o[d] += w * src[d];
      }
      const float inv = 1.f / den;
      for (int64_t d = 0; d < dh; ++d) o[d] *= inv;
    }
    if (out_bf16) {
      uint16_t* dst = static_cast<uint16_t*>(out_ptr) + r * hq * dh;
      for (int64_t i = 0; i < hq * dh; ++i) dst[i] = cpu::float_to_bf16(orow[i]);
    }
  });
}

}  // namespace mrt
