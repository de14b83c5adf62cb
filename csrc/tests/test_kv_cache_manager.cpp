// Unit tests of mrt::KVCacheManager: fork sharing and copies, prefix hits, versions, LRU order,
// all-or-nothing allocation, misuse, and a seeded random stress run checking block accounting
// after every operation (meant to run under ASan + UBSan as well).
#include "kv_cache_manager.h"

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "check.h"

using mrt::KVCacheManager;
using Toks = std::vector<int64_t>;
using Blocks = std::vector<int32_t>;
using Copies = std::vector<std::pair<int32_t, int32_t>>;

static int64_t prefill(KVCacheManager& m, int64_t id, const Toks& t, int64_t version = 0) {
  int64_t hit = m.add_sequence(id, t, version);
  if (hit < static_cast<int64_t>(t.size())) m.append_tokens(id, Toks(t.begin() + hit, t.end()));
  return hit;
}

static void test_fork() {
  KVCacheManager m(16, 4);
  Toks t;
  for (int i = 0; i < 10; ++i) t.push_back(i);
  prefill(m, 0, t);
  CHECK(m.block_table(0) == (Blocks{0, 1, 2}));
  m.fork(0, 1, 6);
  CHECK(m.block_table(1) == (Blocks{0, 3}));
  CHECK(m.take_copies() == (Copies{{1, 3}}));
  CHECK(m.take_copies().empty());
  m.fork(0, 2, 8);
  CHECK(m.block_table(2) == (Blocks{0, 1}));
  CHECK(m.take_copies().empty());
  CHECK_EQ(m.ref_count(0), 3);
  CHECK_EQ(m.num_shared_blocks(), 2);
  CHECK(m.append_tokens(1, {9, 9}) == (Toks{14, 15}));
  CHECK(m.append_decode({2}, {9}) == (Toks{16}));  // new block 4
  for (int64_t s : m.sequence_ids()) m.free_sequence(s);
  CHECK_EQ(m.num_free_blocks(), 16);
  CHECK_EQ(m.num_shared_blocks(), 0);
}

static void test_prefix_and_versions() {
  KVCacheManager m(16, 4);
  Toks t;
  for (int i = 0; i < 10; ++i) t.push_back(i);
  prefill(m, 0, t);
  CHECK_EQ(m.cache_sequence(0), 2);
  CHECK_EQ(m.cache_sequence(0), 0);
  m.free_sequence(0);
  CHECK_EQ(m.num_cached_blocks(), 2);
  CHECK_EQ(m.match_prefix(t), 8);
  CHECK_EQ(m.match_prefix(t, 1), 0);
  CHECK_EQ(m.add_sequence(1, t, 1), 0);
  CHECK_EQ(m.add_sequence(2, t), 8);
  CHECK(m.block_table(2) == (Blocks{0, 1}));
  CHECK_EQ(m.num_cached_blocks(), 0);
  m.free_sequence(2);
  m.drop_version(0);
  CHECK_EQ(m.num_free_blocks(), 16);
  CHECK(m.cached_versions().empty());
}

static void test_lru() {
  KVCacheManager m(6, 2);
  for (int64_t p = 1; p <= 3; ++p) {
    prefill(m, p, {p, p, 9});
    m.cache_sequence(p);
    m.free_sequence(p);
  }
  CHECK_EQ(m.add_sequence(10, {1, 1, 9}), 2);  // refresh prompt 1
  m.free_sequence(10);
  prefill(m, 20, Toks(8, 0));                  // evicts prompt 2
  CHECK_EQ(m.match_prefix({2, 2}), 0);
  CHECK_EQ(m.match_prefix({3, 3}), 2);
  CHECK_EQ(m.match_prefix({1, 1}), 2);
  m.append_tokens(20, {0});                    // evicts prompt 3
  CHECK_EQ(m.match_prefix({3, 3}), 0);
  CHECK_EQ(m.match_prefix({1, 1}), 2);
}

static void test_atomic_and_misuse() {
  KVCacheManager m(4, 2);
  prefill(m, 0, {1, 2, 3, 4});
  m.fork(0, 1, 4);
  prefill(m, 5, {1});
  CHECK_THROWS(m.append_tokens(0, {1, 2, 3}), mrt::OutOfBlocks);
  CHECK_THROWS(m.append_decode({0, 1}, {1, 1}), mrt::OutOfBlocks);
  CHECK_EQ(m.num_tokens(0), 4);
  CHECK_EQ(m.num_tokens(1), 4);
  CHECK_EQ(m.num_free_blocks(), 1);
  CHECK_THROWS(m.add_sequence(0, {1}), std::invalid_argument);
  CHECK_THROWS(m.add_sequence(9, {}), std::invalid_argument);
  CHECK_THROWS(m.append_tokens(0, {}), std::invalid_argument);
  CHECK_THROWS(m.append_tokens(7, {1}), std::invalid_argument);
  CHECK_THROWS(m.append_decode({0, 0}, {1, 1}), std::invalid_argument);
  CHECK_THROWS(m.append_decode({0}, {1, 1}), std::invalid_argument);
  CHECK_THROWS(m.fork(0, 2, 0), std::invalid_argument);
  CHECK_THROWS(m.fork(0, 2, 5), std::invalid_argument);
  CHECK_THROWS(m.fork(0, 1, 1), std::invalid_argument);
  CHECK_THROWS(m.fork(8, 2, 1), std::invalid_argument);
  CHECK_THROWS(m.blocks_needed(0, -1), std::invalid_argument);
  CHECK_THROWS(m.ref_count(4), std::invalid_argument);
  CHECK_THROWS(KVCacheManager(4, 0), std::invalid_argument);
  CHECK_THROWS(KVCacheManager(0, 4), std::invalid_argument);
  CHECK_EQ(m.blocks_needed(0, INT64_MAX), INT64_MAX / 2 + 1);  // no overflow
  m.free_sequence(0);
  CHECK_THROWS(m.free_sequence(0), std::invalid_argument);
}

// Random engine-like operations; after each, every block is exactly one of: free, cached, held.
static void test_random_accounting() {
  std::mt19937_64 rng(1234);
  for (int round = 0; round < 20; ++round) {
    const int64_t nb = 8 + rng() % 40, bs = 1 + rng() % 4;
    KVCacheManager m(nb, bs);
    int64_t next = 0;
    for (int step = 0; step < 400; ++step) {
      std::vector<int64_t> live = m.sequence_ids();
      const int op = static_cast<int>(rng() % 6);
      try {
        if (op == 0 || live.empty()) {
          Toks t(1 + rng() % (4 * bs), 0);
          for (auto& x : t) x = static_cast<int64_t>(rng() % 2);
          prefill(m, next++, t, static_cast<int64_t>(rng() % 2));
        } else {
          const int64_t s = live[rng() % live.size()];
          if (op == 1 && m.num_tokens(s) > 0) {
            m.fork(s, next++, 1 + static_cast<int64_t>(rng() % m.num_tokens(s)));
          } else if (op == 2) {
            m.append_decode({s}, {static_cast<int64_t>(rng() % 2)});
          } else if (op == 3) {
            m.cache_sequence(s);
            m.free_sequence(s);
          } else if (op == 4) {
            m.free_sequence(s);
          } else {
            m.take_copies();
            if (rng() % 20 == 0) m.drop_version(static_cast<int64_t>(rng() % 2));
          }
        }
      } catch (const mrt::OutOfBlocks&) {
      }
      std::set<int32_t> held;
      for (int64_t s : m.sequence_ids()) {
        const Blocks& b = m.block_table(s);
        held.insert(b.begin(), b.end());
        CHECK_EQ(static_cast<int64_t>(b.size()), (m.num_tokens(s) + bs - 1) / bs);
      }
      CHECK_EQ(static_cast<int64_t>(held.size()) + m.num_available_blocks(), nb);
    }
    for (int64_t s : m.sequence_ids()) m.free_sequence(s);
    m.clear_prefix_cache();
    CHECK_EQ(m.num_free_blocks(), nb);
  }
}

int main() {
  test_fork();
  test_prefix_and_versions();
  test_lru();
  test_atomic_and_misuse();
  test_random_accounting();
  return CHECK_MAIN_RESULT();
}
