// Unit tests of mrt::plan_decode_groups on hand-built fork trees (the Python twin is checked for
// equality with it in tests/test_step_plan.py).
#include "step_plan.h"

#include <algorithm>
#include <vector>

#include "check.h"

using Vec = std::vector<int64_t>;

int main() {
  {  // empty batch
    auto [ptr, rows, shared] = mrt::plan_decode_groups({}, {}, 16);
    CHECK(ptr == Vec{0} && rows.empty() && shared.empty());
  }
  {  // one fork point: 4 rows share 3 full blocks
    std::vector<Vec> tables;
    for (int i = 0; i < 4; ++i) tables.push_back({7, 8, 9, 20 + i});
    auto [ptr, rows, shared] = mrt::plan_decode_groups(tables, {14, 15, 13, 16}, 4);
    CHECK(ptr == (Vec{0, 4}));
    CHECK(shared == Vec{3});
    CHECK(rows == (Vec{0, 1, 2, 3}));
  }
  {  // the block of the token being decoded is never shared
    auto [ptr, rows, shared] = mrt::plan_decode_groups({{1, 2, 3}, {1, 2, 3}}, {9, 9}, 4);
    CHECK(shared == Vec{2});
    auto [p2, r2, s2] = mrt::plan_decode_groups({{1}, {1}}, {4, 4}, 4);
    CHECK(p2 == (Vec{0, 1, 2}) && s2 == (Vec{0, 0}));
  }
  {  // two fork points of one trace (bs 1): deep rows grouped, shallow rows grouped
    std::vector<Vec> tables;
    Vec ctx;
    for (int i = 0; i < 6; ++i) {
      int depth = i % 2 == 0 ? 2 : 6;
      Vec t;
      for (int j = 0; j < depth; ++j) t.push_back(100 + j);
      t.push_back(200 + i);
      t.push_back(300 + i);
      tables.push_back(t);
      ctx.push_back(depth + 2);
    }
    auto [ptr, rows, shared] = mrt::plan_decode_groups(tables, ctx, 1);
    CHECK_EQ(shared.size(), 2u);
    CHECK(ptr.back() == 6);
    Vec sorted_rows(rows);
    std::sort(sorted_rows.begin(), sorted_rows.end());
    CHECK(sorted_rows == (Vec{0, 1, 2, 3, 4, 5}));
  }
  {  // a deep chain (2000 distinct depths) must not overflow any stack
    std::vector<Vec> tables;
    Vec ctx, trunk;
    for (int j = 0; j < 2000; ++j) trunk.push_back(j);
    for (int d = 1; d <= 2000; d += 1) {
      Vec t(trunk.begin(), trunk.begin() + d);
      t.push_back(-d);
      tables.push_back(t);
      ctx.push_back(d + 1);
    }
    auto [ptr, rows, shared] = mrt::plan_decode_groups(tables, ctx, 1);
    CHECK_EQ(ptr.back(), 2000);
  }
  CHECK_THROWS(mrt::plan_decode_groups({{1}}, {1, 2}, 4), std::invalid_argument);
  CHECK_THROWS(mrt::plan_decode_groups({{1}}, {0}, 4), std::invalid_argument);
  CHECK_THROWS(mrt::plan_decode_groups({{1}}, {5}, 4), std::invalid_argument);
  CHECK_THROWS(mrt::plan_decode_groups({{1}}, {1}, 0), std::invalid_argument);
  CHECK_THROWS(mrt::plan_decode_groups({{1}}, {1}, 4, 0), std::invalid_argument);
  CHECK_THROWS(mrt::plan_decode_groups({{}}, {INT64_MAX}, INT64_MAX), std::invalid_argument);
  return CHECK_MAIN_RESULT();
}
