// plan_decode_groups: see step_plan.h; the numbered steps follow mrt_engine/step_plan_py.py.
#include "step_plan.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace mrt {

namespace {

struct Group {
  int64_t lo, hi, shared;  // sorted positions [lo, hi)
};

// Step 3: best grouping of sorted rows [lo, hi) over their run tree (iterative: trees can be deep).
std::vector<Group> tree_groups(const std::vector<int64_t>& lcp, int64_t lo, int64_t hi,
                               int64_t min_shared) {
  if (hi - lo == 1) return {{lo, hi, 0}};
  struct Frame {
    int64_t lo, hi, h;
    std::vector<std::pair<int64_t, int64_t>> children;
    size_t next = 0;
    int64_t saving = 0;
    std::vector<Group> groups;
  };
  auto open_frame = [&lcp](int64_t a, int64_t b) {
    Frame f;
    f.lo = a;
    f.hi = b;
    f.h = *std::min_element(lcp.begin() + a, lcp.begin() + (b - 1));
    int64_t start = a;
    for (int64_t k = a; k < b - 1; ++k) {
      if (lcp[k] == f.h) {
        f.children.emplace_back(start, k + 1);
        start = k + 1;
      }
    }
    f.children.emplace_back(start, b);
    return f;
  };
  std::vector<Frame> stack;
  stack.push_back(open_frame(lo, hi));
  bool have_result = false;
  int64_t res_saving = 0;
  std::vector<Group> res_groups;
  while (!stack.empty()) {
    Frame& f = stack.back();
    if (have_result) {  // a child just finished: fold it in
      f.saving += res_saving;
      f.groups.insert(f.groups.end(), res_groups.begin(), res_groups.end());
      have_result = false;
    }
    if (f.next < f.children.size()) {
      auto [a, b] = f.children[f.next++];
      if (b - a == 1) {
        have_result = true;
        res_saving = 0;
        res_groups.assign(1, Group{a, b, 0});
      } else {
        stack.push_back(open_frame(a, b));  // invalidates f; the loop re-reads back()
      }
      continue;
    }
    const int64_t whole = f.h * (f.hi - f.lo - 1);
    have_result = true;
    if (f.h >= min_shared && whole >= f.saving) {
      res_saving = whole;
      res_groups.assign(1, Group{f.lo, f.hi, f.h});
    } else {
      res_saving = f.saving;
      res_groups = std::move(f.groups);
    }
    stack.pop_back();
  }
  return res_groups;
}

// Step 4: regroup runs of adjacent single-row groups until nothing changes.
std::vector<Group> merge_singletons(const std::vector<int64_t>& lcp, std::vector<Group> groups,
                                    int64_t min_shared) {
  bool changed = true;
  while (changed) {
    changed = false;
    std::vector<Group> out;
    out.reserve(groups.size());
    size_t i = 0;
    while (i < groups.size()) {
      size_t j = i;
      while (j < groups.size() && groups[j].hi - groups[j].lo == 1) ++j;
      if (j - i >= 2) {
        std::vector<Group> sub = tree_groups(lcp, groups[i].lo, groups[j - 1].hi, min_shared);
        changed = changed || sub.size() < j - i;
        out.insert(out.end(), sub.begin(), sub.end());
        i = j;
      } else {
        out.push_back(groups[i]);
        ++i;
      }
    }
    groups.swap(out);
  }
  return groups;
}

}  // namespace

std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>> plan_decode_groups(
    const std::vector<std::vector<int64_t>>& block_tables, const std::vector<int64_t>& context_lens,
    int64_t block_size, int64_t min_shared_blocks) {
  if (block_size < 1) {
    throw std::invalid_argument("block_size must be a positive int, got " +
                                std::to_string(block_size));
  }
  if (min_shared_blocks < 1) {
    throw std::invalid_argument("min_shared_blocks must be an int >= 1, got " +
                                std::to_string(min_shared_blocks));
  }
  if (block_tables.size() != context_lens.size()) {
    throw std::invalid_argument("block_tables and context_lens differ in length: " +
                                std::to_string(block_tables.size()) + " vs " +
                                std::to_string(context_lens.size()));
  }
  const int64_t n = static_cast<int64_t>(block_tables.size());
  std::vector<int64_t> usable(n);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t c = context_lens[r];
    if (c < 1) {
      throw std::invalid_argument("context_lens[" + std::to_string(r) +
                                  "] must be an int >= 1, got " + std::to_string(c));
    }
    const int64_t have = static_cast<int64_t>(block_tables[r].size());
    // have * bs < c, written as a division so a huge block_size cannot overflow
    if (have < c / block_size + (c % block_size ? 1 : 0)) {
      throw std::invalid_argument("block_tables[" + std::to_string(r) + "] has " +
                                  std::to_string(have) + " blocks, too few for context_len " +
                                  std::to_string(c) + " at block_size " +
                                  std::to_string(block_size));
    }
    usable[r] = (c - 1) / block_size;  // step 1
  }
  if (n == 0) return {{0}, {}, {}};

  // step 2: sort by usable prefix, ties by row index
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  auto prefix_less = [&](int64_t a, int64_t b) {
    const auto& ta = block_tables[a];
    const auto& tb = block_tables[b];
    if (std::lexicographical_compare(ta.begin(), ta.begin() + usable[a], tb.begin(),
                                     tb.begin() + usable[b])) {
      return true;
    }
    if (std::lexicographical_compare(tb.begin(), tb.begin() + usable[b], ta.begin(),
                                     ta.begin() + usable[a])) {
      return false;
    }
    return a < b;
  };
  std::sort(order.begin(), order.end(), prefix_less);
  std::vector<int64_t> lcp(n - 1);
  for (int64_t i = 0; i + 1 < n; ++i) {
    const auto& ta = block_tables[order[i]];
    const auto& tb = block_tables[order[i + 1]];
    const int64_t m = std::min(usable[order[i]], usable[order[i + 1]]);
    int64_t k = 0;
    while (k < m && ta[k] == tb[k]) ++k;
    lcp[i] = k;
  }

  std::vector<Group> groups = tree_groups(lcp, 0, n, min_shared_blocks);       // step 3
  groups = merge_singletons(lcp, std::move(groups), min_shared_blocks);        // step 4

  std::vector<int64_t> ptr{0}, shared;
  ptr.reserve(groups.size() + 1);
  shared.reserve(groups.size());
  for (const Group& g : groups) {
    ptr.push_back(g.hi);
    shared.push_back(g.shared);
  }
  return {std::move(ptr), std::move(order), std::move(shared)};
}

}  // namespace mrt
