"""Pure-Python twin of the C++ KV bookkeeping core (csrc/block_pool.*, csrc/kv_cache_manager.*).

This file is the executable specification: the C++ classes have the same names, methods, block
numbering and error behaviour, and tests/test_kv_core_diff.py drives both with random operation
sequences and compares every observable after every step. Change both together.

Model (see DESIGN.md §5):
- `BlockPool`: fixed-size blocks with reference counts and a LIFO free stack (block 0 is handed out
  first on a fresh pool).
- `KVCacheManager`: sequences are block tables plus the token ids whose KV slots they own. A fork at
  token t shares every full block before t and privately copies the partial block holding token t-1
  (the copy is queued for the engine: `take_copies`). A radix tree over full blocks, one root per
  weight version, caches prefixes across requests; blocks that only the tree holds are evicted
  least-recently-used first, leaves before their parents, when the free stack runs dry.

Invariant kept by `cache_sequence` (it stops at the first block the tree already holds under
another block id): a sequence holding a tree block holds every ancestor block too, so a tree block
with no sequence reference has none below it, and such blocks are exactly the evictable ones.
"""
from __future__ import annotations

from mrt_engine.errors import OutOfBlocks


class BlockPool:
    """Reference-counted fixed pool of block ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: pop() yields 0 first

    @property
    def num_blocks(self) -> int:
        return len(self._ref)

    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        self._check(block)
        return self._ref[block]

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("block pool exhausted: 0 free blocks")
        block = self._free.pop()
        self._ref[block] = 1
        return block

    def incref(self, block: int) -> None:
        self._check(block)
        if self._ref[block] == 0:
            raise ValueError(f"incref of free block {block}")
        self._ref[block] += 1

    def decref(self, block: int) -> int:
        """Drop one reference; returns the remaining count. The caller decides where a 0 goes."""
        self._check(block)
        if self._ref[block] == 0:
            raise ValueError(f"double free of block {block}")
        self._ref[block] -= 1
        return self._ref[block]

    def free(self, block: int) -> None:
        """decref; a block reaching 0 returns to the free stack."""
        if self.decref(block) == 0:
            self._free.append(block)

    def _push_free(self, block: int) -> None:
        assert self._ref[block] == 0
        self._free.append(block)

    def _take(self, block: int) -> None:
        """Reclaim a block held only by the prefix cache (ref 0, not on the free stack)."""
        assert self._ref[block] == 0
        self._ref[block] = 1

    def _check(self, block: int) -> None:
        if not isinstance(block, int) or not 0 <= block < len(self._ref):
            raise ValueError(f"block id must be in [0, {len(self._ref)}), got {block!r}")


class _Node:
    __slots__ = ("key", "block", "parent", "children", "last_access")

    def __init__(self, key, block, parent):
        self.key = key            # tuple of block_size token ids
        self.block = block        # -1 for a root
        self.parent = parent
        self.children = {}
        self.last_access = 0


class _Seq:
    __slots__ = ("blocks", "tokens", "version")

    def __init__(self, version):
        self.blocks = []
        self.tokens = []
        self.version = version


class KVCacheManager:
    """Block tables, fork with copy-on-write, and a versioned prefix cache over one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self._pool = BlockPool(num_blocks)
        self._bs = block_size
        self._seqs: dict[int, _Seq] = {}
        self._roots: dict[int, _Node] = {}
        self._node_of: dict[int, _Node] = {}     # tree block -> node
        self._copies: list[tuple[int, int]] = []
        self._clock = 0

    # ---- read-only views -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def block_size(self) -> int:
        return self._bs

    def num_free_blocks(self) -> int:
        """Blocks on the free stack (held by no sequence and not cached)."""
        return self._pool.num_free()

    def num_cached_blocks(self) -> int:
        """Blocks held only by the prefix cache: evictable on demand."""
        return sum(1 for b in self._node_of if self._pool._ref[b] == 0)

    def num_available_blocks(self) -> int:
        return self.num_free_blocks() + self.num_cached_blocks()

    def num_shared_blocks(self) -> int:
        """Blocks referenced by more than one sequence."""
        return sum(1 for r in self._pool._ref if r > 1)

    def ref_count(self, block: int) -> int:
        return self._pool.ref_count(block)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def sequence_ids(self) -> list[int]:
        return sorted(self._seqs)

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def num_tokens(self, seq_id: int) -> int:
        return len(self._seq(seq_id).tokens)

    def token_ids(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).tokens)

    def blocks_needed(self, seq_id: int, n: int) -> int:
        """Blocks that appending n tokens to seq_id would allocate (copy-on-write included)."""
        s = self._seq(seq_id)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self._need(s, n)

    # ---- sequences -------------------------------------------------------------------------
    def add_sequence(self, seq_id: int, token_ids: list[int], version: int = 0,
                     use_prefix_cache: bool = True) -> int:
        """Register a new sequence whose prompt is token_ids; share its longest cached prefix.

        At most len(token_ids) - 1 tokens are matched (block aligned), so at least one token is
        left to compute logits from. Returns the number of cached tokens; the sequence owns
        exactly those tokens' slots until `append_tokens` adds more.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already exists")
        tokens = list(token_ids)
        if not tokens:
            raise ValueError("token_ids must not be empty")
        s = _Seq(version)
        if use_prefix_cache and version in self._roots:
            self._clock += 1
            node = self._roots[version]
            limit = (len(tokens) - 1) // self._bs
            for i in range(limit):
                child = node.children.get(tuple(tokens[i * self._bs:(i + 1) * self._bs]))
                if child is None:
                    break
                node = child
                node.last_access = self._clock
                self._ref_block(node.block)
                s.blocks.append(node.block)
            s.tokens = tokens[:len(s.blocks) * self._bs]
        self._seqs[seq_id] = s
        return len(s.tokens)

    def match_prefix(self, token_ids: list[int], version: int = 0) -> int:
        """Tokens of token_ids found in the prefix cache (full blocks); changes nothing."""
        node = self._roots.get(version)
        n = 0
        while node is not None and (n + 1) * self._bs <= len(token_ids):
            node = node.children.get(tuple(token_ids[n * self._bs:(n + 1) * self._bs]))
            if node is not None:
                n += 1
        return n * self._bs

    def append_tokens(self, seq_id: int, token_ids: list[int]) -> list[int]:
        """Record tokens whose KV is about to be written; returns their slots (block*bs + offset)."""
        s = self._seq(seq_id)
        tokens = list(token_ids)
        if not tokens:
            raise ValueError("token_ids must not be empty")
        need = self._need(s, len(tokens))
        self._ensure(need)
        return self._append(s, tokens)

    def append_decode(self, seq_ids: list[int], token_ids: list[int]) -> list[int]:
        """One token per sequence, all or nothing; returns one slot per sequence."""
        if len(seq_ids) != len(token_ids):
            raise ValueError(f"seq_ids and token_ids differ in length: {len(seq_ids)} vs {len(token_ids)}")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids must be distinct")
        seqs = [self._seq(i) for i in seq_ids]
        self._ensure(sum(self._need(s, 1) for s in seqs))
        return [self._append(s, [t])[0] for s, t in zip(seqs, token_ids)]

    def fork(self, parent_id: int, child_id: int, at: int) -> None:
        """child = parent's first `at` tokens; full blocks shared, the partial one copied."""
        p = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} already exists")
        if not isinstance(at, int) or not 1 <= at <= len(p.tokens):
            raise ValueError(f"fork position must be in [1, {len(p.tokens)}], got {at!r}")
        full, rem = divmod(at, self._bs)
        if rem:
            self._ensure(1)
        c = _Seq(p.version)
        for b in p.blocks[:full]:
            self._pool.incref(b)
            c.blocks.append(b)
        if rem:
            dst = self._alloc()
            self._copies.append((p.blocks[full], dst))
            c.blocks.append(dst)
        c.tokens = p.tokens[:at]
        self._seqs[child_id] = c

    def free_sequence(self, seq_id: int) -> None:
        s = self._seq(seq_id)
        del self._seqs[seq_id]
        for b in reversed(s.blocks):
            self._unref_block(b)

    def take_copies(self) -> list[tuple[int, int]]:
        """Pending (src_block, dst_block) KV copies, oldest first; the engine runs them before
        the next forward. Draining clears the queue."""
        out, self._copies = self._copies, []
        return out

    # ---- prefix cache ----------------------------------------------------------------------
    def cache_sequence(self, seq_id: int) -> int:
        """Insert the sequence's full blocks into the prefix tree of its version; returns how
        many blocks were newly cached."""
        s = self._seq(seq_id)
        self._clock += 1
        node = self._roots.setdefault(s.version, _Node((), -1, None))
        added = 0
        for i in range(len(s.tokens) // self._bs):
            key = tuple(s.tokens[i * self._bs:(i + 1) * self._bs])
            child = node.children.get(key)
            if child is None:
                b = s.blocks[i]
                if b in self._node_of:     # already cached on another path: keep the tree a tree
                    break
                child = _Node(key, b, node)
                node.children[key] = child
                self._node_of[b] = child
                added += 1
            elif child.block != s.blocks[i]:
                break
            child.last_access = self._clock
            node = child
        return added

    def drop_version(self, version: int) -> None:
        """Forget every cached block of one weight version (blocks in use stay with their owners)."""
        root = self._roots.pop(version, None)
        if root is None:
            return
        freed, stack = [], list(root.children.values())
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            del self._node_of[n.block]
            if self._pool._ref[n.block] == 0:
                freed.append(n.block)
        for b in sorted(freed, reverse=True):   # order-independent, so the C++ twin can match it
            self._pool._push_free(b)

    def clear_prefix_cache(self) -> None:
        for v in sorted(self._roots):
            self.drop_version(v)

    def cached_versions(self) -> list[int]:
        return sorted(self._roots)

    # ---- internals -------------------------------------------------------------------------
    def _seq(self, seq_id: int) -> _Seq:
        s = self._seqs.get(seq_id)
        if s is None:
            raise ValueError(f"unknown sequence {seq_id!r} (never added, or already freed)")
        return s

    def _need(self, s: _Seq, n: int) -> int:
        have = len(s.tokens)
        need = -(-(have + n) // self._bs) - len(s.blocks)
        if n and have % self._bs and self._pool._ref[s.blocks[-1]] > 1:
            need += 1  # copy-on-write of the shared partial tail
        return need

    def _ensure(self, n: int) -> None:
        avail = self.num_available_blocks()
        if n > avail:
            raise OutOfBlocks(f"need {n} KV blocks, only {avail} free or evictable")

    def _append(self, s: _Seq, tokens: list[int]) -> list[int]:
        bs = self._bs
        have = len(s.tokens)
        if tokens and have % bs and self._pool._ref[s.blocks[-1]] > 1:
            old = s.blocks[-1]
            new = self._alloc()
            self._copies.append((old, new))
            s.blocks[-1] = new
            self._unref_block(old)
        slots = []
        for i in range(have, have + len(tokens)):
            if i // bs == len(s.blocks):
                s.blocks.append(self._alloc())
            slots.append(s.blocks[i // bs] * bs + i % bs)
        s.tokens.extend(tokens)
        return slots

    def _alloc(self) -> int:
        if self._pool.num_free() == 0:
            self._evict_one()
        return self._pool.allocate()

    def _evict_one(self) -> None:
        best = None
        for b, n in self._node_of.items():
            if self._pool._ref[b] == 0 and not n.children:
                if best is None or (n.last_access, b) < (best.last_access, best.block):
                    best = n
        if best is None:
            raise OutOfBlocks("block pool exhausted and nothing evictable")
        del best.parent.children[best.key]
        del self._node_of[best.block]
        self._pool._push_free(best.block)

    def _ref_block(self, b: int) -> None:
        if self._pool._ref[b] == 0:
            self._pool._take(b)     # cached block comes back into use
        else:
            self._pool.incref(b)

    def _unref_block(self, b: int) -> None:
        if self._pool.decref(b) == 0 and b not in self._node_of:
            self._pool._push_free(b)
