"""Differential test: the C++ KV core (mrt_engine._C) against its pure-Python twin (the spec).

Random operation sequences (hypothesis stateful, plus a long seeded random walk) drive both
backends in lockstep: every return value and exception type must match, every observable (block
tables, token ids, counts, every block's ref count, the prefix tree as seen through match_prefix)
must be identical after every operation, an operation that raises must leave the state unchanged,
and releasing everything must return every block to the free stack. Small pools, small block sizes
and a 3-letter vocabulary make out-of-blocks, eviction and prefix hits common.
"""
from __future__ import annotations

import importlib.util
import os
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mrt_engine.kv import core_py as kv_core_py
from mrt_engine.errors import OutOfBlocks

try:
    from mrt_engine import _C
except ImportError:
    _C = None

pytestmark = pytest.mark.skipif(_C is None, reason="C++ extension mrt_engine._C not built "
                                "(python setup.py build_ext --inplace)")

IDS = st.integers(0, 9)
TOKENS = st.lists(st.integers(0, 2), min_size=0, max_size=14)
VERSIONS = st.sampled_from([0, 0, 0, 1, 2])


def _outcome(fn):
    try:
        return "ok", fn()
    except OutOfBlocks as e:
        return "OutOfBlocks", type(e)
    except ValueError:
        return "ValueError", None


def snapshot(m, probes=()) -> dict:
    """Everything observable through the public API; `probes` are token lists whose cached
    prefix length is looked up in every version (the tree of released prompts is otherwise
    invisible until a later hit or eviction)."""
    seqs = m.sequence_ids()
    state = {
        "seqs": seqs,
        "free": m.num_free_blocks(), "cached": m.num_cached_blocks(),
        "available": m.num_available_blocks(), "shared": m.num_shared_blocks(),
        "refs": [m.ref_count(b) for b in range(m.num_blocks)],
        "versions": m.cached_versions(),
    }
    state["probes"] = [[m.match_prefix(p, v) for v in state["versions"]] for p in probes]
    for s in seqs:
        toks = m.token_ids(s)
        state[s] = (m.block_table(s), m.num_tokens(s), toks, m.blocks_needed(s, 1),
                    m.blocks_needed(s, m.block_size + 1),
                    [m.match_prefix(toks, v) for v in state["versions"]])
    return state


class Lockstep:
    """Apply each call to both backends; check outcomes, state equality and atomicity."""

    def __init__(self, num_blocks, block_size):
        self.py = kv_core_py.KVCacheManager(num_blocks, block_size)
        self.cc = _C.KVCacheManager(num_blocks, block_size)
        self.ops = 0
        self.probes = []   # recent prompts

    def call(self, name, *args, **kwargs):
        if name == "add_sequence" and args[1] not in self.probes:
            self.probes = (self.probes + [list(args[1])])[-12:]
        before = snapshot(self.py, self.probes)
        got_py = _outcome(lambda: getattr(self.py, name)(*args, **kwargs))
        got_cc = _outcome(lambda: getattr(self.cc, name)(*args, **kwargs))
        assert got_py[0] == got_cc[0], (name, args, kwargs, got_py, got_cc)
        if got_py[0] == "ok":
            assert _norm(got_py[1]) == _norm(got_cc[1]), (name, args, kwargs)
        after = snapshot(self.py, self.probes)
        assert after == snapshot(self.cc, self.probes), (name, args, kwargs)
        if got_py[0] != "ok":
            assert after == before, f"{name}{args} raised {got_py[0]} but changed the state"
        self.ops += 1
        return got_py

    def release_all(self):
        for s in self.py.sequence_ids():
            self.call("free_sequence", s)
        self.call("take_copies")
        self.call("clear_prefix_cache")
        for m in (self.py, self.cc):
            assert m.num_free_blocks() == m.num_blocks
            assert m.num_cached_blocks() == 0 and m.num_shared_blocks() == 0
            assert m.sequence_ids() == [] and m.cached_versions() == []


def _norm(x):
    if isinstance(x, (list, tuple)):
        return [_norm(v) for v in x]
    return x


BASES = [[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], [1, 1, 0, 0, 2, 2, 1, 1, 0, 0], [2, 0, 2, 0, 2, 0]]


class KVCoreMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 20), block_size=st.integers(1, 4))
    def setup(self, num_blocks, block_size):
        self.m = Lockstep(num_blocks, block_size)
        self.next_id = 0

    def _seq_id(self, data):
        """Mostly a live sequence; sometimes any small id (unknown ones test misuse)."""
        live = self.m.py.sequence_ids()
        if live and data.draw(st.integers(0, 9), label="pick_live") > 0:
            return data.draw(st.sampled_from(live), label="live_id")
        return data.draw(IDS, label="any_id")

    def _new_id(self, data):
        if data.draw(st.integers(0, 7), label="reuse_id") == 0:
            return data.draw(IDS, label="maybe_taken_id")
        self.next_id += 1
        return 100 + self.next_id

    def _prompt(self, data):
        """A shared base prefix plus a random tail, so prefix hits are common."""
        base = data.draw(st.sampled_from(BASES), label="base")
        cut = data.draw(st.integers(0, len(base)), label="cut")
        return base[:cut] + data.draw(TOKENS, label="tail")

    def _len(self, seq_id):
        return self.m.py.num_tokens(seq_id) if self.m.py.has_sequence(seq_id) else 0

    @rule(data=st.data(), version=VERSIONS, use_cache=st.booleans(), prefill=st.integers(0, 3))
    def add_sequence(self, data, version, use_cache, prefill):
        seq_id, tokens = self._new_id(data), self._prompt(data)
        got = self.m.call("add_sequence", seq_id, tokens, version=version,
                          use_prefix_cache=use_cache)
        if prefill and got[0] == "ok" and got[1] < len(tokens):
            self.m.call("append_tokens", seq_id, tokens[got[1]:])

    @rule(data=st.data(), version=VERSIONS, keep=st.booleans())
    def serve_request(self, data, version, keep):
        """The engine's rhythm: match the cache, prefill the rest, cache it, maybe release it."""
        seq_id, tokens = self._new_id(data), self._prompt(data)
        got = self.m.call("add_sequence", seq_id, tokens, version=version)
        if got[0] == "ok":
            if got[1] < len(tokens):
                self.m.call("append_tokens", seq_id, tokens[got[1]:])
            self.m.call("cache_sequence", seq_id)
            if not keep:
                self.m.call("free_sequence", seq_id)

    @rule(data=st.data(), tokens=st.lists(st.integers(0, 2), max_size=9))
    def append_tokens(self, data, tokens):
        self.m.call("append_tokens", self._seq_id(data), tokens)

    @rule(data=st.data(), misuse=st.integers(0, 7))
    def append_decode(self, data, misuse):
        live = self.m.py.sequence_ids()
        seq_ids = data.draw(st.lists(st.sampled_from(live), unique=True, max_size=5)
                            if live else st.just([]), label="decode_ids")
        tokens = [i % 3 for i in seq_ids]
        if misuse == 1:
            seq_ids = seq_ids + [self._seq_id(data)]     # duplicate or unknown, maybe fine
        elif misuse == 2:
            tokens = tokens + [0]
        self.m.call("append_decode", seq_ids, tokens)

    @rule(data=st.data(), n=st.integers(1, 3), misuse=st.integers(0, 7))
    def fork(self, data, n, misuse):
        parent = self._seq_id(data)
        length = self._len(parent)
        if misuse == 0 or length == 0:
            at = data.draw(st.integers(-1, length + 1), label="any_at")
        else:
            at = data.draw(st.integers(1, length), label="at")
        for _ in range(n):
            self.m.call("fork", parent, self._new_id(data), at)

    @rule(data=st.data())
    def free_sequence(self, data):
        self.m.call("free_sequence", self._seq_id(data))

    @rule(data=st.data(), free=st.booleans())
    def cache_sequence(self, data, free):
        seq_id = self._seq_id(data)
        self.m.call("cache_sequence", seq_id)
        if free:
            self.m.call("free_sequence", seq_id)

    @rule(version=st.one_of(VERSIONS, st.none()))
    def drop_version(self, version):
        if version is None:
            self.m.call("clear_prefix_cache")
        else:
            self.m.call("drop_version", version)

    @rule(data=st.data())
    def take_copies(self, data):
        # usually the engine drains copies every step; sometimes they pile up for a while
        if data.draw(st.integers(0, 3), label="drain") == 0:
            self.m.call("take_copies")

    @rule(data=st.data(), version=VERSIONS)
    def match_prefix(self, data, version):
        self.m.call("match_prefix", self._prompt(data), version)

    @rule(data=st.data(), n=st.integers(-2, 9))
    def blocks_needed(self, data, n):
        self.m.call("blocks_needed", self._seq_id(data), n)

    @rule(block=st.integers(-2, 22))
    def ref_count(self, block):
        self.m.call("ref_count", block)

    @invariant()
    def accounting(self):
        if not hasattr(self, "m"):
            return
        py = self.m.py
        assert py.num_free_blocks() + py.num_cached_blocks() <= py.num_blocks
        held = {b for s in py.sequence_ids() for b in py.block_table(s)}
        assert len(held) + py.num_available_blocks() == py.num_blocks

    def teardown(self):
        if hasattr(self, "m"):
            self.m.release_all()


TestKVCoreStateful = KVCoreMachine.TestCase
TestKVCoreStateful.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("seed, num_blocks, block_size", [(0, 32, 4), (1, 20, 2), (2, 64, 8)])
def test_long_random_walk(seed, num_blocks, block_size):
    """A longer seeded walk in the engine's rhythm (prompt, prefill, cache, fork, decode, release)
    over a pool small enough that evictions and out-of-blocks errors are frequent."""
    rng = random.Random(seed)
    m = Lockstep(num_blocks, block_size)
    prompts = [[rng.randrange(3) for _ in range(rng.randint(1, 4 * block_size))] for _ in range(5)]
    next_id = 0
    for _ in range(1200):
        live = m.py.sequence_ids()
        op = rng.random()
        if op < 0.25 or not live:
            p = rng.choice(prompts) + [rng.randrange(3) for _ in range(rng.randint(0, 3))]
            got = m.call("add_sequence", next_id, p, version=rng.randrange(2))
            if got[0] == "ok" and got[1] < len(p):
                m.call("append_tokens", next_id, p[got[1]:])
            next_id += 1
        elif op < 0.4:
            parent = rng.choice(live)
            at = rng.randint(1, m.py.num_tokens(parent) or 1)
            for _ in range(rng.randint(1, 3)):
                m.call("fork", parent, next_id, at)
                next_id += 1
        elif op < 0.55:
            ids = rng.sample(live, rng.randint(1, len(live)))
            m.call("append_decode", ids, [rng.randrange(3) for _ in ids])
        elif op < 0.85:
            s = rng.choice(live)
            if rng.random() < 0.6:
                m.call("cache_sequence", s)
            m.call("free_sequence", s)
            if rng.random() < 0.3:      # a request that hits the cache and is aborted at once
                p = rng.choice(prompts)
                if m.call("add_sequence", next_id, p, version=rng.randrange(2))[0] == "ok":
                    m.call("free_sequence", next_id)
                next_id += 1
        elif op < 0.9:
            m.call("take_copies")
        elif op < 0.95:
            m.call("match_prefix", rng.choice(prompts), rng.randrange(2))
        elif op < 0.99:
            m.call("append_tokens", rng.choice(live), [rng.randrange(3) for _ in range(rng.randint(1, 9))])
        else:
            m.call("drop_version", rng.randrange(2))
    m.release_all()
    assert m.ops > 1200


def test_block_pool_lockstep():
    rng = random.Random(5)
    py, cc = kv_core_py.BlockPool(8), _C.BlockPool(8)
    for _ in range(2000):
        name = rng.choice(["allocate", "incref", "decref", "free", "ref_count", "num_free"])
        args = () if name in ("allocate", "num_free") else (rng.randint(-1, 8),)
        a = _outcome(lambda: getattr(py, name)(*args))
        b = _outcome(lambda: getattr(cc, name)(*args))
        assert a == b, (name, args)
        assert [py.ref_count(i) for i in range(8)] == [cc.ref_count(i) for i in range(8)]
        assert py.num_free() == cc.num_free()


def test_benchmark_trace_replays_identically():
    """The fork-heavy MRT trace of benchmarks/bench_kv_cache.py, small: identical results."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_kv_cache.py")
    spec = importlib.util.spec_from_file_location("bench_kv_cache", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    num_blocks, ops = bench.make_trace(traces=6, boundaries=4, forks=3, decode_steps=40, seed=3)
    assert len(ops) > 300
    _, want = bench.replay(kv_core_py.KVCacheManager, num_blocks, ops, record=True)
    _, got = bench.replay(_C.KVCacheManager, num_blocks, ops, record=True)
    assert _norm(want) == _norm(got)
