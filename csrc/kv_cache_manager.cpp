// KVCacheManager: see kv_cache_manager.h; the numbered rules live in mrt_engine/kv_core_py.py.
#include "kv_cache_manager.h"

#include <algorithm>
#include <limits>
#include <string>

namespace mrt {

namespace {
std::invalid_argument unknown_sequence(int64_t seq_id) {
  return std::invalid_argument("unknown sequence " + std::to_string(seq_id) +
                               " (never added, or already freed)");
}
}  // namespace

KVCacheManager::KVCacheManager(int64_t num_blocks, int64_t block_size)
    : pool_((block_size < 1 || block_size > std::numeric_limits<int32_t>::max())
                ? throw std::invalid_argument("block_size must be a positive int (< 2^31), got " +
                                              std::to_string(block_size))
                : num_blocks),
      bs_(block_size) {
  node_of_.assign(static_cast<size_t>(num_blocks), -1);
}

// ---- read-only views ---------------------------------------------------------------------------

std::vector<int64_t> KVCacheManager::sequence_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(seq_index_.size());
  for (const auto& kv : seq_index_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int64_t KVCacheManager::blocks_needed(int64_t seq_id, int64_t n) const {
  const Seq& s = seq(seq_id);
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  return need(s, n);
}

// ---- sequences ---------------------------------------------------------------------------------

int64_t KVCacheManager::add_sequence(int64_t seq_id, const std::vector<int64_t>& token_ids,
                                     int64_t version, bool use_prefix_cache) {
  if (seq_index_.count(seq_id)) {
    throw std::invalid_argument("sequence " + std::to_string(seq_id) + " already exists");
  }
  if (token_ids.empty()) throw std::invalid_argument("token_ids must not be empty");
  const int32_t slot = new_seq_slot();
  seq_index_.emplace(seq_id, slot);
  Seq& s = seq_store_[slot];
  s.version = version;
  auto root = roots_.find(version);
  if (use_prefix_cache && root != roots_.end()) {
    ++clock_;
    int32_t node = root->second;
    const int64_t limit = (static_cast<int64_t>(token_ids.size()) - 1) / bs_;
    for (int64_t i = 0; i < limit; ++i) {
      const int64_t* t = token_ids.data() + i * bs_;
      int32_t child = find_child(node, t, hash_tokens(t));
      if (child < 0) break;
      node = child;
      ref_block(nodes_[node].block);  // takes it out of the LRU before its key changes
      nodes_[node].last_access = clock_;
      s.blocks.push_back(nodes_[node].block);
    }
    s.tokens.assign(token_ids.begin(), token_ids.begin() + s.blocks.size() * bs_);
  }
  return static_cast<int64_t>(s.tokens.size());
}

int64_t KVCacheManager::match_prefix(const std::vector<int64_t>& token_ids, int64_t version) const {
  auto root = roots_.find(version);
  if (root == roots_.end()) return 0;
  int32_t node = root->second;
  int64_t n = 0;
  while ((n + 1) * bs_ <= static_cast<int64_t>(token_ids.size())) {
    const int64_t* t = token_ids.data() + n * bs_;
    node = find_child(node, t, hash_tokens(t));
    if (node < 0) break;
    ++n;
  }
  return n * bs_;
}

std::vector<int64_t> KVCacheManager::append_tokens(int64_t seq_id,
                                                   const std::vector<int64_t>& token_ids) {
  Seq& s = seq(seq_id);
  if (token_ids.empty()) throw std::invalid_argument("token_ids must not be empty");
  const int64_t n = static_cast<int64_t>(token_ids.size());
  ensure(need(s, n));
  std::vector<int64_t> slots(token_ids.size());
  append(s, token_ids.data(), n, slots.data());
  return slots;
}

std::vector<int64_t> KVCacheManager::append_decode(const std::vector<int64_t>& seq_ids,
                                                   const std::vector<int64_t>& token_ids) {
  if (seq_ids.size() != token_ids.size()) {
    throw std::invalid_argument("seq_ids and token_ids differ in length: " +
                                std::to_string(seq_ids.size()) + " vs " +
                                std::to_string(token_ids.size()));
  }
  // Python's order of checks (distinct, then unknown ids) with one hash lookup per id: marks
  // catch duplicates among known ids; the rare error path falls back to sorting.
  std::vector<Seq*> seqs(seq_ids.size(), nullptr);
  const uint64_t epoch = ++decode_epoch_;
  bool duplicate = false;
  int64_t unknown = -1;
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    auto it = seq_index_.find(seq_ids[i]);
    if (it == seq_index_.end()) {
      if (unknown < 0) unknown = static_cast<int64_t>(i);
      continue;
    }
    Seq& s = seq_store_[it->second];
    duplicate = duplicate || s.mark == epoch;
    s.mark = epoch;
    seqs[i] = &s;
  }
  if (unknown >= 0 && !duplicate) {
    std::vector<int64_t> sorted_ids(seq_ids);
    std::sort(sorted_ids.begin(), sorted_ids.end());
    duplicate = std::adjacent_find(sorted_ids.begin(), sorted_ids.end()) != sorted_ids.end();
  }
  if (duplicate) throw std::invalid_argument("seq_ids must be distinct");
  if (unknown >= 0) throw unknown_sequence(seq_ids[unknown]);
  int64_t total = 0;
  for (Seq* s : seqs) total += need(*s, 1);
  ensure(total);
  std::vector<int64_t> slots(seq_ids.size());
  for (size_t i = 0; i < seqs.size(); ++i) append(*seqs[i], &token_ids[i], 1, &slots[i]);
  return slots;
}

void KVCacheManager::fork(int64_t parent_id, int64_t child_id, int64_t at) {
  Seq& p = seq(parent_id);
  if (seq_index_.count(child_id)) {
    throw std::invalid_argument("sequence " + std::to_string(child_id) + " already exists");
  }
  const int64_t len = static_cast<int64_t>(p.tokens.size());
  if (at < 1 || at > len) {
    throw std::invalid_argument("fork position must be in [1, " + std::to_string(len) +
                                "], got " + std::to_string(at));
  }
  const int64_t full = at / bs_, rem = at % bs_;
  if (rem) ensure(1);
  const int32_t slot = new_seq_slot();  // deque: p stays valid
  Seq& c = seq_store_[slot];
  c.version = p.version;
  c.blocks.reserve(static_cast<size_t>(full + (rem ? 1 : 0)));
  for (int64_t i = 0; i < full; ++i) {
    pool_.inc(p.blocks[i]);
    c.blocks.push_back(p.blocks[i]);
  }
  if (rem) {
    int32_t dst = alloc();
    copies_.emplace_back(p.blocks[full], dst);
    c.blocks.push_back(dst);
  }
  c.tokens.assign(p.tokens.begin(), p.tokens.begin() + at);
  seq_index_.emplace(child_id, slot);
}

void KVCacheManager::free_sequence(int64_t seq_id) {
  auto it = seq_index_.find(seq_id);
  if (it == seq_index_.end()) throw unknown_sequence(seq_id);
  const int32_t slot = it->second;
  seq_index_.erase(it);
  const std::vector<int32_t>& blocks = seq_store_[slot].blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) unref_block(*b);
  free_seq_slots_.push_back(slot);
}

std::vector<std::pair<int32_t, int32_t>> KVCacheManager::take_copies() {
  std::vector<std::pair<int32_t, int32_t>> out;
  out.swap(copies_);
  return out;
}

// ---- prefix cache ------------------------------------------------------------------------------

int64_t KVCacheManager::cache_sequence(int64_t seq_id) {
  const Seq& s = seq(seq_id);
  ++clock_;
  auto root = roots_.find(s.version);
  int32_t node;
  if (root == roots_.end()) {
    node = new_node(-1, -1, s.version, nullptr, 0);
    roots_.emplace(s.version, node);
  } else {
    node = root->second;
  }
  int64_t added = 0;
  const int64_t full = static_cast<int64_t>(s.tokens.size()) / bs_;
  for (int64_t i = 0; i < full; ++i) {
    const int64_t* t = s.tokens.data() + i * bs_;
    const uint64_t h = hash_tokens(t);
    int32_t child = find_child(node, t, h);
    const int32_t b = s.blocks[i];
    if (child < 0) {
      if (node_of_[b] >= 0) break;  // already cached on another path: keep the tree a tree
      child = new_node(node, b, s.version, t, h);
      node_of_[b] = child;
      refresh_lru(node);
      ++added;
    } else if (nodes_[child].block != b) {
      break;
    }
    // a sequence block has ref >= 1, so the node is not in the LRU and its key may change
    nodes_[child].last_access = clock_;
    node = child;
  }
  return added;
}

void KVCacheManager::drop_version(int64_t version) {
  auto root = roots_.find(version);
  if (root == roots_.end()) return;
  const int32_t r = root->second;
  roots_.erase(root);
  std::vector<int32_t> freed, stack(nodes_[r].children);
  while (!stack.empty()) {
    const int32_t n = stack.back();
    stack.pop_back();
    Node& nd = nodes_[n];
    stack.insert(stack.end(), nd.children.begin(), nd.children.end());
    lru_erase(n);
    node_of_[nd.block] = -1;
    if (pool_.ref(nd.block) == 0) {
      freed.push_back(nd.block);
      --num_cached_;
    }
    unlink_node(n);
    free_nodes_.push_back(n);
  }
  nodes_[r].children.clear();
  free_nodes_.push_back(r);
  std::sort(freed.rbegin(), freed.rend());  // order-independent, as in the twin
  for (int32_t b : freed) pool_.push_free(b);
}

void KVCacheManager::clear_prefix_cache() {
  for (int64_t v : cached_versions()) drop_version(v);
}

std::vector<int64_t> KVCacheManager::cached_versions() const {
  std::vector<int64_t> vs;
  vs.reserve(roots_.size());
  for (const auto& kv : roots_) vs.push_back(kv.first);
  std::sort(vs.begin(), vs.end());
  return vs;
}

// ---- internals ---------------------------------------------------------------------------------

const KVCacheManager::Seq& KVCacheManager::seq(int64_t seq_id) const {
  auto it = seq_index_.find(seq_id);
  if (it == seq_index_.end()) throw unknown_sequence(seq_id);
  return seq_store_[it->second];
}

KVCacheManager::Seq& KVCacheManager::seq(int64_t seq_id) {
  auto it = seq_index_.find(seq_id);
  if (it == seq_index_.end()) throw unknown_sequence(seq_id);
  return seq_store_[it->second];
}

int32_t KVCacheManager::new_seq_slot() {
  int32_t slot;
  if (!free_seq_slots_.empty()) {
    slot = free_seq_slots_.back();
    free_seq_slots_.pop_back();
  } else {
    slot = static_cast<int32_t>(seq_store_.size());
    seq_store_.emplace_back();
  }
  Seq& s = seq_store_[slot];
  s.blocks.clear();  // keeps capacity
  s.tokens.clear();
  s.version = 0;
  return slot;
}

int64_t KVCacheManager::need(const Seq& s, int64_t n) const {
  const int64_t have = static_cast<int64_t>(s.tokens.size());
  // ceil((have + n) / bs) split so that a huge n cannot overflow
  const int64_t r = n % bs_;
  int64_t blocks = n / bs_ + (have + r + bs_ - 1) / bs_;
  int64_t out = blocks - static_cast<int64_t>(s.blocks.size());
  if (n && have % bs_ && pool_.ref(s.blocks.back()) > 1) ++out;  // copy-on-write of the tail
  return out;
}

void KVCacheManager::ensure(int64_t n) const {
  const int64_t avail = num_available_blocks();
  if (n > avail) {
    throw OutOfBlocks("need " + std::to_string(n) + " KV blocks, only " + std::to_string(avail) +
                      " free or evictable");
  }
}

void KVCacheManager::append(Seq& s, const int64_t* tokens, int64_t n, int64_t* slots) {
  const int64_t have = static_cast<int64_t>(s.tokens.size());
  if (n && have % bs_ && pool_.ref(s.blocks.back()) > 1) {
    const int32_t old = s.blocks.back();
    const int32_t fresh = alloc();
    copies_.emplace_back(old, fresh);
    s.blocks.back() = fresh;
    unref_block(old);
  }
  for (int64_t i = have; i < have + n; ++i) {
    if (i / bs_ == static_cast<int64_t>(s.blocks.size())) s.blocks.push_back(alloc());
    slots[i - have] = static_cast<int64_t>(s.blocks[i / bs_]) * bs_ + i % bs_;
  }
  s.tokens.insert(s.tokens.end(), tokens, tokens + n);
}

int32_t KVCacheManager::alloc() {
  if (pool_.num_free() == 0) evict_one();
  return pool_.allocate();
}

void KVCacheManager::evict_one() {
  if (lru_.empty()) throw OutOfBlocks("block pool exhausted and nothing evictable");
  const int32_t b = lru_.begin()->second;
  const int32_t n = node_of_[b];
  const int32_t parent = nodes_[n].parent;
  lru_erase(n);
  unlink_node(n);
  free_nodes_.push_back(n);
  node_of_[b] = -1;
  --num_cached_;
  pool_.push_free(b);
  refresh_lru(parent);  // a parent left without children may now be an evictable leaf
}

void KVCacheManager::ref_block(int32_t b) {
  if (pool_.ref(b) == 0) {  // a cached block comes back into use
    lru_erase(node_of_[b]);
    pool_.take(b);
    --num_cached_;
  } else {
    pool_.inc(b);
  }
}

void KVCacheManager::unref_block(int32_t b) {
  if (pool_.dec(b) != 0) return;
  if (node_of_[b] < 0) {
    pool_.push_free(b);
  } else {
    ++num_cached_;
    refresh_lru(node_of_[b]);
  }
}

uint64_t KVCacheManager::hash_tokens(const int64_t* t) const {
  uint64_t h = 0x84222325CBF29CE4ull;
  for (int64_t i = 0; i < bs_; ++i) {
    uint64_t x = static_cast<uint64_t>(t[i]) + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    h ^= x;
  }
  return h;
}

int32_t KVCacheManager::find_child(int32_t parent, const int64_t* t, uint64_t h) const {
  auto range = child_index_.equal_range(ChildKey{parent, h});
  for (auto it = range.first; it != range.second; ++it) {
    const Node& c = nodes_[it->second];
    if (std::equal(c.key.begin(), c.key.end(), t)) return it->second;
  }
  return -1;
}

int32_t KVCacheManager::new_node(int32_t parent, int32_t block, int64_t version, const int64_t* t,
                                 uint64_t h) {
  int32_t id;
  if (!free_nodes_.empty()) {
    id = free_nodes_.back();
    free_nodes_.pop_back();
  } else {
    id = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
  }
  Node& nd = nodes_[id];
  nd.parent = parent;
  nd.block = block;
  nd.version = version;
  nd.hash = h;
  nd.in_lru = false;
  nd.last_access = 0;
  nd.children.clear();
  if (t) {
    nd.key.assign(t, t + bs_);
  } else {
    nd.key.clear();
  }
  if (parent >= 0) {
    nd.pos_in_parent = static_cast<int32_t>(nodes_[parent].children.size());
    nodes_[parent].children.push_back(id);
    child_index_.emplace(ChildKey{parent, h}, id);
  } else {
    nd.pos_in_parent = -1;
  }
  return id;
}

void KVCacheManager::unlink_node(int32_t node) {
  Node& nd = nodes_[node];
  if (nd.parent < 0) return;
  std::vector<int32_t>& siblings = nodes_[nd.parent].children;
  const int32_t last = siblings.back();
  siblings[nd.pos_in_parent] = last;
  nodes_[last].pos_in_parent = nd.pos_in_parent;
  siblings.pop_back();
  auto range = child_index_.equal_range(ChildKey{nd.parent, nd.hash});
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == node) {
      child_index_.erase(it);
      break;
    }
  }
  nd.parent = -1;
  nd.pos_in_parent = -1;
}

void KVCacheManager::refresh_lru(int32_t node) {
  Node& nd = nodes_[node];
  if (nd.block < 0) return;  // roots are never evicted
  const bool want = pool_.ref(nd.block) == 0 && nd.children.empty();
  if (want && !nd.in_lru) {
    lru_.emplace(nd.last_access, nd.block);
    nd.in_lru = true;
  } else if (!want && nd.in_lru) {
    lru_erase(node);
  }
}

void KVCacheManager::lru_erase(int32_t node) {
  Node& nd = nodes_[node];
  if (!nd.in_lru) return;
  lru_.erase({nd.last_access, nd.block});
  nd.in_lru = false;
}

}  // namespace mrt
