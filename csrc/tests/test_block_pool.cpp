// Unit tests of mrt::BlockPool: LIFO numbering, refcounts, shared count, misuse.
#include "block_pool.h"

#include "check.h"

int main() {
  using mrt::BlockPool;
  BlockPool p(4);
  CHECK_EQ(p.num_blocks(), 4);
  CHECK_EQ(p.num_free(), 4);
  for (int i = 0; i < 4; ++i) CHECK_EQ(p.allocate(), i);
  CHECK_THROWS(p.allocate(), mrt::OutOfBlocks);
  p.free(2);
  p.free(1);
  CHECK_EQ(p.allocate(), 1);  // LIFO
  CHECK_EQ(p.allocate(), 2);
  p.incref(3);
  CHECK_EQ(p.num_shared(), 1);
  CHECK_EQ(p.ref_count(3), 2);
  CHECK_EQ(p.decref(3), 1);
  CHECK_EQ(p.num_shared(), 0);
  CHECK_EQ(p.decref(3), 0);
  CHECK_EQ(p.num_free(), 0);  // a decref to 0 is the caller's to place
  CHECK_THROWS(p.decref(3), std::invalid_argument);
  CHECK_THROWS(p.free(3), std::invalid_argument);
  CHECK_THROWS(p.incref(3), std::invalid_argument);
  CHECK_THROWS(p.ref_count(-1), std::invalid_argument);
  CHECK_THROWS(p.ref_count(4), std::invalid_argument);
  CHECK_THROWS(p.incref(1LL << 40), std::invalid_argument);
  CHECK_THROWS(BlockPool(0), std::invalid_argument);
  CHECK_THROWS(BlockPool(-5), std::invalid_argument);
  CHECK_THROWS(BlockPool(1LL << 40), std::invalid_argument);
  return CHECK_MAIN_RESULT();
}
