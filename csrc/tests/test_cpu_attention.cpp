// Unit tests of mrt::CpuDecodeAttention: the SIMD path against the scalar path on a random paged
// cache (under the sanitizer build this also checks every index the kernel reads), thread-count
// invariance, and the constructor's input checks. The dense-oracle tests are in tests/test_cpu_kernel.py.
#include "cpu_attention.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.h"

using Vec = std::vector<int64_t>;

namespace {

struct Case {
  int64_t rows = 11, hkv = 2, grp = 3, dh = 32, bs = 5, blocks = 24;
  Vec row_ptr{0}, item_rows, block_ptr{0}, item_blocks, lens;
  std::vector<float> q, k, v;
  // chain: bs 16 and nested segments (an MRT trace's forks at increasing positions), which the plan
  // runs as one unit with the rows that leave it masked; joined: the forks' own suffixes are whole
  // blocks, so they join the unit as segments of their rows' lane range
  explicit Case(unsigned seed, bool chain = false, bool joined = false) {
    if (chain) bs = 16;
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    q.resize(rows * hkv * grp * dh);
    k.resize(blocks * bs * hkv * dh);
    v.resize(k.size());
    for (auto* a : {&q, &k, &v})
      for (float& x : *a) x = nd(rng);
    auto add = [&](Vec rs, int64_t n) {
      item_rows.insert(item_rows.end(), rs.begin(), rs.end());
      row_ptr.push_back(static_cast<int64_t>(item_rows.size()));
      for (int64_t b = 0; b < (n + bs - 1) / bs; ++b) item_blocks.push_back(static_cast<int64_t>(rng() % blocks));
      block_ptr.push_back(static_cast<int64_t>(item_blocks.size()));
      lens.push_back(n);
    };
    for (int64_t r = 0; r < rows; ++r) add({r}, 1 + static_cast<int64_t>(rng() % (3 * bs)));
    if (chain) {
      add({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 2 * bs);
      add({1, 2}, joined ? 2 * bs : bs + 3);   // a fork's own suffix: joins only if whole blocks
      add({3, 4, 5, 6, 7, 8, 9, 10}, bs);
      add({4, 6, 7}, bs);                       // lanes 3, 5, 8, 9, 10 attend neither side of it
      add({5, 8, 9, 10}, 3 * bs);               // (this one is the heavy child)
      add({9, 10}, bs - 4);                     // the chain's last segment may end mid-block
      return;
    }
    add({0, 3, 4, 7, 10}, 2 * bs);
    add({1, 2, 3, 4, 5, 6, 7, 8, 9}, 3 * bs);
  }
  mrt::CpuDecodeAttention plan() const {
    return mrt::CpuDecodeAttention(rows, hkv * grp, hkv, dh, bs, blocks, row_ptr, item_rows, block_ptr,
                                   item_blocks, lens);
  }
  std::vector<float> run(mrt::CpuDecodeAttention& p, int threads, bool simd) const {
    std::vector<float> out(q.size());
    p.run(q.data(), hkv * grp * dh, dh, k.data(), v.data(), out.data(), mrt::KvDtype::kFloat32, 0.2f, threads, simd, true);
    return out;
  }
};

// the SIMD path within 1e-5 of the scalar path; neither changes a bit with the thread count
void check_paths(const Case& c, mrt::CpuDecodeAttention& p) {
  const auto scalar = c.run(p, 1, false);
  CHECK(c.run(p, 3, false) == scalar);
  for (float x : scalar) CHECK(std::isfinite(x));
  if (!mrt::CpuDecodeAttention::simd_available()) return;
  const auto simd = c.run(p, 2, true);
  CHECK(c.run(p, 1, true) == simd);
  double worst = 0;
  for (size_t i = 0; i < simd.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(simd[i] - scalar[i])));
  CHECK(worst < 1e-5);
}

}  // namespace

int main() {
  {
    Case c(1);
    auto p = c.plan();
    CHECK_EQ(p.num_items(), c.rows + 2);
    check_paths(c, p);
  }
  {  // a chain of nested segments: one unit, the same results on both paths and any thread count;
     // its whole leaf child joins it, the suffix of bs + 3 keys does not
    Case c(2, true);
    auto p = c.plan();
    CHECK_EQ(p.num_items(), c.rows + 6);
    CHECK_EQ(p.num_units(), c.rows + 2);
    check_paths(c, p);
  }
  {  // the suffix of whole blocks joins too: every shared item in one unit
    Case c(3, true, true);
    auto p = c.plan();
    CHECK_EQ(p.num_units(), c.rows + 1);
    check_paths(c, p);
  }
  {  // input checks
    Case c(2);
    auto make = [&](Vec row_ptr, Vec rows, Vec block_ptr, Vec blocks, Vec lens, int64_t dh = 32) {
      return mrt::CpuDecodeAttention(3, 6, 2, dh, 5, 24, row_ptr, rows, block_ptr, blocks, lens);
    };
    (void)make({0, 3}, {0, 1, 2}, {0, 1}, {4}, {5});
    CHECK_THROWS(make({0, 3}, {0, 1, 2}, {0, 1}, {4}, {5}, 12), std::invalid_argument);  // head_dim
    CHECK_THROWS(make({0, 2}, {0, 1}, {0, 1}, {4}, {5}), std::invalid_argument);          // row 2 in no item
    CHECK_THROWS(make({0, 3}, {0, 1, 3}, {0, 1}, {4}, {5}), std::invalid_argument);       // row out of range
    CHECK_THROWS(make({0, 3}, {0, 1, 2}, {0, 1}, {24}, {5}), std::invalid_argument);      // block out of range
    CHECK_THROWS(make({0, 3}, {0, 1, 2}, {0, 1}, {4}, {6}), std::invalid_argument);       // len > 1 block
    CHECK_THROWS(make({0, 3}, {0, 1, 2}, {0, 2}, {4, 5}, {5}), std::invalid_argument);    // len fits 1 block
    CHECK_THROWS(make({0, 3}, {0, 1, 2}, {0, 1, 1}, {4}, {5}), std::invalid_argument);    // ptr sizes
  }
  return check::failures();
}
