// BlockPool: see block_pool.h.
#include "block_pool.h"

#include <limits>

namespace mrt {

BlockPool::BlockPool(int64_t num_blocks) {
  // ids and counts are int32 inside; 2^31 blocks of KV would not fit any accelerator anyway
  if (num_blocks < 1 || num_blocks > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("num_blocks must be a positive int (< 2^31), got " +
                                std::to_string(num_blocks));
  }
  ref_.assign(static_cast<size_t>(num_blocks), 0);
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

void BlockPool::check(int64_t block) const {
  if (block < 0 || block >= num_blocks()) {
    throw std::invalid_argument("block id must be in [0, " + std::to_string(num_blocks()) +
                                "), got " + std::to_string(block));
  }
}

int64_t BlockPool::ref_count(int64_t block) const {
  check(block);
  return ref_[block];
}

int32_t BlockPool::allocate() {
  if (free_.empty()) throw OutOfBlocks("block pool exhausted: 0 free blocks");
  int32_t block = free_.back();
  free_.pop_back();
  ref_[block] = 1;
  return block;
}

void BlockPool::incref(int64_t block) {
  check(block);
  if (ref_[block] == 0) throw std::invalid_argument("incref of free block " + std::to_string(block));
  if (ref_[block] == std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("reference count overflow on block " + std::to_string(block));
  }
  inc(static_cast<int32_t>(block));
}

int32_t BlockPool::decref(int64_t block) {
  check(block);
  if (ref_[block] == 0) throw std::invalid_argument("double free of block " + std::to_string(block));
  return dec(static_cast<int32_t>(block));
}

void BlockPool::free(int64_t block) {
  if (decref(block) == 0) free_.push_back(static_cast<int32_t>(block));
}

}  // namespace mrt
