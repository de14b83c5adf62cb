// Block tables, fork with copy-on-write, and a versioned radix prefix cache over one BlockPool.
//
// C++ twin of mrt_engine/kv_core_py.py KVCacheManager, which is the specification: same methods,
// same block numbering, same eviction order, same errors (tests/test_kv_core_diff.py compares the
// two after every operation). What differs is only cost: reference and shared/cached counts are
// kept incrementally (O(1) queries), evictable leaves live in a std::set ordered by
// (last_access, block) (O(log n) eviction), and radix children are found through one hash table
// keyed by (parent node, hash of the block's tokens).
//
// Misuse throws std::invalid_argument (ValueError in Python); running out of blocks throws
// mrt::OutOfBlocks. Every method validates and reserves before it mutates, so a throw leaves the
// state unchanged.
#pragma once

#include <cstdint>
#include <deque>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_pool.h"

namespace mrt {

class KVCacheManager {
 public:
  KVCacheManager(int64_t num_blocks, int64_t block_size);

  // ---- read-only views
  int64_t num_blocks() const { return pool_.num_blocks(); }
  int64_t block_size() const { return bs_; }
  int64_t num_free_blocks() const { return pool_.num_free(); }
  int64_t num_cached_blocks() const { return num_cached_; }
  int64_t num_available_blocks() const { return pool_.num_free() + num_cached_; }
  int64_t num_shared_blocks() const { return pool_.num_shared(); }
  int64_t ref_count(int64_t block) const { return pool_.ref_count(block); }
  bool has_sequence(int64_t seq_id) const { return seq_index_.count(seq_id) != 0; }
  std::vector<int64_t> sequence_ids() const;
  const std::vector<int32_t>& block_table(int64_t seq_id) const { return seq(seq_id).blocks; }
  int64_t num_tokens(int64_t seq_id) const {
    return static_cast<int64_t>(seq(seq_id).tokens.size());
  }
  const std::vector<int64_t>& token_ids(int64_t seq_id) const { return seq(seq_id).tokens; }
  int64_t blocks_needed(int64_t seq_id, int64_t n) const;

  // ---- sequences
  int64_t add_sequence(int64_t seq_id, const std::vector<int64_t>& token_ids, int64_t version = 0,
                       bool use_prefix_cache = true);
  int64_t match_prefix(const std::vector<int64_t>& token_ids, int64_t version = 0) const;
  std::vector<int64_t> append_tokens(int64_t seq_id, const std::vector<int64_t>& token_ids);
  std::vector<int64_t> append_decode(const std::vector<int64_t>& seq_ids,
                                     const std::vector<int64_t>& token_ids);
  void fork(int64_t parent_id, int64_t child_id, int64_t at);
  void free_sequence(int64_t seq_id);
  std::vector<std::pair<int32_t, int32_t>> take_copies();

  // ---- prefix cache
  int64_t cache_sequence(int64_t seq_id);
  void drop_version(int64_t version);
  void clear_prefix_cache();
  std::vector<int64_t> cached_versions() const;

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    std::vector<int64_t> tokens;
    int64_t version = 0;
    uint64_t mark = 0;  // append_decode's duplicate check: last call that saw this sequence
  };
  // A radix node owns one full block (roots own none: block -1). Nodes live in nodes_, recycled
  // through free_nodes_; node_of_[block] is the node holding a cached block or -1.
  struct Node {
    int32_t parent = -1;
    int32_t block = -1;
    int32_t pos_in_parent = -1;  // index in parent's children, for O(1) unlinking
    bool in_lru = false;
    uint64_t hash = 0;
    int64_t last_access = 0;
    int64_t version = 0;
    std::vector<int64_t> key;        // the block's block_size token ids
    std::vector<int32_t> children;
  };
  struct ChildKey {
    int32_t parent;
    uint64_t hash;
    bool operator==(const ChildKey& o) const { return parent == o.parent && hash == o.hash; }
  };
  struct ChildKeyHash {
    size_t operator()(const ChildKey& k) const {
      return static_cast<size_t>(k.hash ^ (static_cast<uint64_t>(k.parent) * 0x9E3779B97F4A7C15ull));
    }
  };

  const Seq& seq(int64_t seq_id) const;
  Seq& seq(int64_t seq_id);
  int32_t new_seq_slot();
  int64_t need(const Seq& s, int64_t n) const;
  void ensure(int64_t n) const;
  void append(Seq& s, const int64_t* tokens, int64_t n, int64_t* slots);
  int32_t alloc();
  void evict_one();
  void ref_block(int32_t b);
  void unref_block(int32_t b);

  uint64_t hash_tokens(const int64_t* t) const;
  int32_t find_child(int32_t parent, const int64_t* t, uint64_t h) const;
  int32_t new_node(int32_t parent, int32_t block, int64_t version, const int64_t* t, uint64_t h);
  void unlink_node(int32_t node);  // from parent and index; does not recycle
  void refresh_lru(int32_t node);  // (re)file the node in lru_ iff it is an evictable leaf
  void lru_erase(int32_t node);

  BlockPool pool_;
  int64_t bs_;
  // Sequences live in a deque (stable addresses) and are recycled with their vectors' capacity,
  // so steady-state fork/free cycles do not touch the allocator.
  std::unordered_map<int64_t, int32_t> seq_index_;  // seq_id -> slot in seq_store_
  std::deque<Seq> seq_store_;
  std::vector<int32_t> free_seq_slots_;
  std::unordered_map<int64_t, int32_t> roots_;  // version -> root node
  std::vector<Node> nodes_;
  std::vector<int32_t> free_nodes_;
  std::vector<int32_t> node_of_;
  std::unordered_multimap<ChildKey, int32_t, ChildKeyHash> child_index_;
  std::set<std::pair<int64_t, int32_t>> lru_;  // evictable leaves: (last_access, block)
  std::vector<std::pair<int32_t, int32_t>> copies_;
  int64_t num_cached_ = 0;  // tree blocks with ref 0
  int64_t clock_ = 0;
  uint64_t decode_epoch_ = 0;
};

}  // namespace mrt
