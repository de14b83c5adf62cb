"""Semantic tests of the KV bookkeeping core, run on both backends (the Python twin always, the C++
core when built): block numbering, fork sharing and copies, prefix hits, versions, LRU eviction
order, all-or-nothing allocation, and a clear Python exception for every misuse we can think of."""
from __future__ import annotations

import pytest

import mrt_engine
from mrt_engine.kv import core_py as kv_core_py
from mrt_engine.errors import OutOfBlocks

try:
    from mrt_engine import _C
except ImportError:
    _C = None

BACKENDS = [
    pytest.param(kv_core_py, id="python"),
    pytest.param(_C, id="cpp", marks=pytest.mark.skipif(_C is None, reason="C++ extension not built")),
]


@pytest.fixture(params=BACKENDS)
def mod(request):
    return request.param


def state(m):
    seqs = m.sequence_ids()
    return (seqs, [(m.block_table(s), m.token_ids(s)) for s in seqs], m.num_free_blocks(),
            m.num_cached_blocks(), m.num_shared_blocks(), [m.ref_count(b) for b in range(m.num_blocks)],
            m.cached_versions())


def prefill(m, seq_id, tokens, version=0):
    """Add a sequence, append what the cache did not cover; returns the cached token count."""
    hit = m.add_sequence(seq_id, tokens, version=version)
    if hit < len(tokens):
        m.append_tokens(seq_id, tokens[hit:])
    return hit


# ---- BlockPool -----------------------------------------------------------------------------------

def test_pool_lifo_numbering(mod):
    p = mod.BlockPool(4)
    assert p.num_blocks == 4 and p.num_free() == 4
    assert [p.allocate() for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(OutOfBlocks):
        p.allocate()
    p.free(2)
    p.free(1)
    assert p.allocate() == 1 and p.allocate() == 2   # last freed, first reused
    p.incref(3)
    assert p.ref_count(3) == 2 and p.decref(3) == 1 and p.num_free() == 0
    assert p.decref(3) == 0 and p.num_free() == 0    # decref leaves the 0 to the caller


@pytest.mark.parametrize("n", [0, -1, -100])
def test_pool_bad_size(mod, n):
    with pytest.raises(ValueError, match="num_blocks"):
        mod.BlockPool(n)


def test_pool_misuse(mod):
    p = mod.BlockPool(3)
    b = p.allocate()
    for bad in (-1, 3, 10**6):
        with pytest.raises(ValueError, match="block id"):
            p.ref_count(bad)
        with pytest.raises(ValueError, match="block id"):
            p.free(bad)
        with pytest.raises(ValueError, match="block id"):
            p.incref(bad)
    with pytest.raises(ValueError, match="incref of free block"):
        p.incref(2)
    p.free(b)
    with pytest.raises(ValueError, match="double free"):
        p.free(b)
    with pytest.raises(ValueError, match="double free"):
        p.decref(b)
    assert p.num_free() == 3


# ---- block tables and fork -----------------------------------------------------------------------

def test_slots_and_block_tables(mod):
    m = mod.KVCacheManager(8, 4)
    assert m.num_blocks == 8 and m.block_size == 4
    assert m.add_sequence(0, [1, 2, 3, 4, 5, 6]) == 0
    assert m.block_table(0) == [] and m.num_tokens(0) == 0
    assert m.blocks_needed(0, 6) == 2 and m.blocks_needed(0, 0) == 0
    assert m.append_tokens(0, [1, 2, 3, 4, 5, 6]) == [0, 1, 2, 3, 4 + 0, 4 + 1]
    assert m.block_table(0) == [0, 1] and m.token_ids(0) == [1, 2, 3, 4, 5, 6]
    assert m.blocks_needed(0, 2) == 0 and m.blocks_needed(0, 3) == 1
    assert m.append_decode([0], [7]) == [6]
    assert m.num_free_blocks() == 6 and m.take_copies() == []


def test_fork_shares_full_blocks_and_copies_one_partial(mod):
    m = mod.KVCacheManager(16, 4)
    prefill(m, 0, list(range(10)))             # blocks [0, 1, 2], block 2 holds tokens 8, 9
    m.fork(0, 1, 6)                            # token 5 sits in block 1: share block 0, copy 1
    assert m.block_table(1) == [0, 3] and m.token_ids(1) == list(range(6))
    assert m.take_copies() == [(1, 3)] and m.take_copies() == []
    assert (m.ref_count(0), m.ref_count(1), m.ref_count(3)) == (2, 1, 1)
    m.fork(0, 2, 8)                            # block aligned: share both, copy nothing
    assert m.block_table(2) == [0, 1] and m.take_copies() == []
    assert m.ref_count(0) == 3 and m.ref_count(1) == 2 and m.num_shared_blocks() == 2
    m.fork(0, 3, 10)                           # whole parent: copy its partial tail
    assert m.block_table(3) == [0, 1, 4] and m.take_copies() == [(2, 4)]
    # appends go to private blocks; the shared ones are never written again
    assert m.append_tokens(1, [9, 9]) == [3 * 4 + 2, 3 * 4 + 3]
    assert m.append_tokens(2, [9]) == [5 * 4 + 0]
    assert m.append_decode([0, 3], [1, 1]) == [2 * 4 + 2, 4 * 4 + 2]
    assert m.block_table(0) == [0, 1, 2] and m.ref_count(2) == 1
    assert m.take_copies() == []
    for s in m.sequence_ids():
        m.free_sequence(s)
    assert m.num_free_blocks() == 16 and m.num_shared_blocks() == 0


def test_fork_of_fork_and_release_in_any_order(mod):
    m = mod.KVCacheManager(12, 2)
    prefill(m, 0, [5] * 7)
    m.fork(0, 1, 7)
    m.append_decode([0, 1], [1, 2])
    m.fork(1, 2, 3)
    assert m.block_table(2)[0] == m.block_table(0)[0] and m.ref_count(m.block_table(0)[0]) == 3
    m.free_sequence(0)
    m.free_sequence(2)
    assert m.token_ids(1) == [5] * 7 + [2]
    m.free_sequence(1)
    assert m.num_free_blocks() == 12


def test_copy_queue_survives_until_drained(mod):
    m = mod.KVCacheManager(8, 4)
    prefill(m, 0, [1, 2, 3])
    m.fork(0, 1, 2)
    m.fork(0, 2, 3)
    assert m.take_copies() == [(0, 1), (0, 2)]


# ---- prefix cache --------------------------------------------------------------------------------

def test_prefix_hit_shares_blocks(mod):
    m = mod.KVCacheManager(16, 4)
    tokens = list(range(10))
    prefill(m, 0, tokens)
    assert m.cache_sequence(0) == 2            # the two full blocks
    assert m.cache_sequence(0) == 0            # idempotent
    a = m.block_table(0)
    m.free_sequence(0)
    assert m.num_cached_blocks() == 2 and m.num_free_blocks() == 14 and m.num_available_blocks() == 16
    assert m.match_prefix(tokens) == 8 and m.match_prefix(tokens[:5]) == 4 and m.match_prefix([9]) == 0
    assert m.add_sequence(1, tokens) == 8 and m.block_table(1) == a[:2]
    assert m.num_cached_blocks() == 0
    # at least one token is left to compute logits from: a full-block prompt matches one block less
    assert m.add_sequence(2, tokens[:8]) == 4 and m.block_table(2) == a[:1]
    assert m.ref_count(a[0]) == 2
    assert m.add_sequence(3, tokens, use_prefix_cache=False) == 0
    assert m.add_sequence(4, [7] * 10) == 0


def test_cached_path_with_another_block_is_not_replaced(mod):
    m = mod.KVCacheManager(16, 2)
    prefill(m, 0, [1, 2, 3, 4, 5])
    m.add_sequence(1, [1, 2, 3, 4, 5], use_prefix_cache=False)
    m.append_tokens(1, [1, 2, 3, 4, 5])
    assert m.cache_sequence(0) == 2
    assert m.cache_sequence(1) == 0            # same tokens, other blocks: stops at the first block
    m.free_sequence(1)
    assert m.num_cached_blocks() == 0 and m.num_free_blocks() == 16 - 3


def test_versions_never_match_across(mod):
    m = mod.KVCacheManager(8, 2)
    prefill(m, 0, [1, 2, 3, 4, 5], version=0)
    m.cache_sequence(0)
    m.free_sequence(0)
    assert m.cached_versions() == [0]
    assert m.match_prefix([1, 2, 3, 4, 5], version=1) == 0
    assert m.add_sequence(1, [1, 2, 3, 4, 5], version=1) == 0
    assert m.add_sequence(2, [1, 2, 3, 4, 5], version=0) == 4
    m.free_sequence(2)
    m.drop_version(0)
    assert m.cached_versions() == [] and m.num_free_blocks() == 8
    assert m.add_sequence(3, [1, 2, 3, 4, 5], version=0) == 0
    m.drop_version(0)                          # unknown version: nothing to do
    m.drop_version(12345)


def test_drop_version_keeps_blocks_in_use(mod):
    m = mod.KVCacheManager(8, 2)
    prefill(m, 0, [1, 2, 3, 4, 5])
    m.cache_sequence(0)
    m.drop_version(0)
    assert m.num_free_blocks() == 5 and m.block_table(0) == [0, 1, 2]
    m.free_sequence(0)
    assert m.num_free_blocks() == 8 and m.num_cached_blocks() == 0


def test_lru_eviction_order(mod):
    bs = 2
    m = mod.KVCacheManager(6, bs)
    prompts = {p: [p, p, 9] for p in (1, 2, 3)}   # one full block each
    for p, toks in prompts.items():
        prefill(m, p, toks)
        m.cache_sequence(p)
        m.free_sequence(p)
    assert m.num_cached_blocks() == 3 and m.num_free_blocks() == 3
    assert m.add_sequence(10, prompts[1]) == 2    # a hit refreshes prompt 1
    m.free_sequence(10)

    def cached():
        return [p for p, toks in prompts.items() if m.match_prefix(toks) == bs]

    prefill(m, 20, [0] * (4 * bs))                # 3 free + 1 evicted: the oldest, prompt 2
    assert cached() == [1, 3]
    m.append_tokens(20, [0])                      # next oldest: prompt 3
    assert cached() == [1]
    m.append_tokens(20, [0] * bs)
    assert cached() == []
    with pytest.raises(OutOfBlocks):
        m.append_tokens(20, [0] * bs)


def test_eviction_takes_leaves_before_parents(mod):
    m = mod.KVCacheManager(4, 1)
    prefill(m, 0, [1, 2, 3, 4])                   # chain 1 -> 2 -> 3 -> 4, all full blocks
    m.cache_sequence(0)
    m.free_sequence(0)
    assert m.num_cached_blocks() == 4
    prefill(m, 1, [7])
    assert m.match_prefix([1, 2, 3, 4]) == 3      # the deepest block went first
    m.append_tokens(1, [7])
    assert m.match_prefix([1, 2, 3, 4]) == 2


def test_out_of_blocks_leaves_state_unchanged(mod):
    m = mod.KVCacheManager(4, 2)
    prefill(m, 0, [1, 2, 3, 4])                   # blocks 0, 1
    m.fork(0, 1, 4)                               # shares both
    prefill(m, 5, [1])                            # block 2; one block left
    before = state(m)
    with pytest.raises(mrt_engine.OutOfBlocks):
        m.append_tokens(0, [1, 2, 3])             # needs 2
    assert state(m) == before
    with pytest.raises(mrt_engine.OutOfBlocks):
        m.append_decode([0, 1], [1, 1])           # needs 2, 1 free: nobody gets one
    assert state(m) == before
    m.fork(0, 2, 1)                               # copies block 0 into the last block, 3
    before = state(m)
    with pytest.raises(OutOfBlocks, match="need 1"):
        m.fork(0, 3, 1)
    assert state(m) == before and not m.has_sequence(3)
    assert m.take_copies() == [(0, 3)]
    with pytest.raises(OutOfBlocks):
        m.append_tokens(2, [1, 2])
    assert state(m) == before and m.sequence_ids() == [0, 1, 2, 5]
    assert issubclass(OutOfBlocks, RuntimeError) and OutOfBlocks is mrt_engine.OutOfBlocks


def test_release_everything_returns_every_block(mod):
    m = mod.KVCacheManager(32, 4)
    for i in range(4):
        prefill(m, i, [i % 2] * (5 + 3 * i), version=i % 2)
        m.cache_sequence(i)
        for j in range(3):
            m.fork(i, 100 + 10 * i + j, 1 + j * 2)
    m.append_decode(m.sequence_ids(), [1] * len(m.sequence_ids()))
    for s in m.sequence_ids():
        m.free_sequence(s)
    assert m.num_free_blocks() + m.num_cached_blocks() == 32
    m.clear_prefix_cache()
    assert m.num_free_blocks() == 32 and m.cached_versions() == []


# ---- misuse --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, match", [((0, 4), "num_blocks"), ((-3, 4), "num_blocks"),
                                         ((4, 0), "block_size"), ((4, -1), "block_size")])
def test_manager_bad_sizes(mod, args, match):
    with pytest.raises(ValueError, match=match):
        mod.KVCacheManager(*args)


def test_manager_misuse(mod):
    m = mod.KVCacheManager(8, 4)
    prefill(m, 0, [1, 2, 3, 4, 5])
    before = state(m)
    cases = [
        (lambda: m.add_sequence(0, [1]), "already exists"),
        (lambda: m.add_sequence(1, []), "must not be empty"),
        (lambda: m.append_tokens(0, []), "must not be empty"),
        (lambda: m.append_tokens(7, [1]), "unknown sequence 7"),
        (lambda: m.append_decode([0, 7], [1, 1]), "unknown sequence 7"),
        (lambda: m.append_decode([0, 0], [1, 1]), "distinct"),
        (lambda: m.append_decode([0], [1, 1]), "differ in length"),
        (lambda: m.fork(0, 1, 0), "fork position"),
        (lambda: m.fork(0, 1, -1), "fork position"),
        (lambda: m.fork(0, 1, 6), "fork position"),
        (lambda: m.fork(0, 0, 2), "already exists"),
        (lambda: m.fork(9, 1, 1), "unknown sequence 9"),
        (lambda: m.free_sequence(9), "unknown sequence 9"),
        (lambda: m.cache_sequence(9), "unknown sequence 9"),
        (lambda: m.block_table(9), "unknown sequence 9"),
        (lambda: m.token_ids(9), "unknown sequence 9"),
        (lambda: m.num_tokens(9), "unknown sequence 9"),
        (lambda: m.blocks_needed(9, 1), "unknown sequence 9"),
        (lambda: m.blocks_needed(0, -1), "n must be >= 0"),
        (lambda: m.ref_count(-1), "block id"),
        (lambda: m.ref_count(8), "block id"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
        assert state(m) == before
    m.free_sequence(0)
    with pytest.raises(ValueError, match="unknown sequence 0"):
        m.free_sequence(0)                     # double free of a sequence
    assert m.num_free_blocks() == 8


def test_fork_of_empty_sequence_is_rejected(mod):
    m = mod.KVCacheManager(8, 4)
    m.add_sequence(0, [1, 2])                  # nothing cached: owns 0 tokens so far
    with pytest.raises(ValueError, match=r"fork position must be in \[1, 0\]"):
        m.fork(0, 1, 1)


@pytest.mark.skipif(_C is None, reason="C++ extension not built")
def test_cpp_wrong_types_raise_type_error():
    m = _C.KVCacheManager(8, 4)
    m.add_sequence(0, [1, 2, 3])
    for fn in (lambda: m.add_sequence("a", [1]), lambda: m.add_sequence(1, [1.5]),
               lambda: m.add_sequence(1, None), lambda: m.fork(0, 1, "2"),
               lambda: m.append_tokens(0, ["x"]), lambda: m.ref_count(None),
               lambda: m.append_tokens(0, [2**70]), lambda: _C.KVCacheManager(2**40, 4),
               lambda: m.fork(0, 1, 2.0)):
        with pytest.raises((TypeError, ValueError)):
            fn()
    with pytest.raises(ValueError):
        _C.KVCacheManager(2**31, 4)
    assert m.token_ids(0) == [] and m.sequence_ids() == [0]
