// Reference-counted pool of fixed-size KV blocks (C++ twin of mrt_engine/kv_core_py.py BlockPool).
//
// Blocks are ids 0..num_blocks-1. Free blocks sit on a LIFO stack (block 0 is handed out first on
// a fresh pool). A block whose count drops to 0 through decref() is not pushed back: its owner
// decides (the prefix cache keeps such blocks as evictable). Misuse throws std::invalid_argument,
// exhaustion throws mrt::OutOfBlocks; no state changes before a throw.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mrt {

// Out of KV blocks even after eviction; the Python binding raises mrt_engine.errors.OutOfBlocks.
class OutOfBlocks : public std::runtime_error {
 public:
  explicit OutOfBlocks(const std::string& what) : std::runtime_error(what) {}
};

class BlockPool {
 public:
  explicit BlockPool(int64_t num_blocks);

  int64_t num_blocks() const { return static_cast<int64_t>(ref_.size()); }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_shared() const { return num_shared_; }  // blocks with ref_count > 1
  int64_t ref_count(int64_t block) const;

  int32_t allocate();
  void incref(int64_t block);
  int32_t decref(int64_t block);  // returns the remaining count
  void free(int64_t block);       // decref; a block reaching 0 goes back on the free stack

  // Unchecked internals for KVCacheManager (ids it owns are valid by construction).
  int32_t ref(int32_t block) const { return ref_[block]; }
  void push_free(int32_t block) { free_.push_back(block); }
  void take(int32_t block) { ref_[block] = 1; }  // reclaim a cached block (ref 0, not on stack)
  void inc(int32_t block) {
    if (++ref_[block] == 2) ++num_shared_;
  }
  int32_t dec(int32_t block) {
    if (ref_[block]-- == 2) --num_shared_;
    return ref_[block];
  }

 private:
  void check(int64_t block) const;

  std::vector<int32_t> ref_;
  std::vector<int32_t> free_;  // stack: back() is handed out next
  int64_t num_shared_ = 0;
};

}  // namespace mrt
