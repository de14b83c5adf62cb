// Decode step plan: partition decode rows into groups that share leading full KV blocks, so the
// cascade kernel reads each group's shared blocks once. C++ twin of mrt_engine/step_plan_py.py
// (the specification, with the algorithm spelled out); results must be identical.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

namespace mrt {

// (group_ptr [G + 1], group_rows [D], group_num_shared [G]). Throws std::invalid_argument on bad
// input (length mismatch, context_len < 1, table too short, block_size or min_shared_blocks < 1).
std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>> plan_decode_groups(
    const std::vector<std::vector<int64_t>>& block_tables, const std::vector<int64_t>& context_lens,
    int64_t block_size, int64_t min_shared_blocks = 1);

}  // namespace mrt
