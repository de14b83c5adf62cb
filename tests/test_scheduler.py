"""Scheduler over the real KV bookkeeping with a fake *paged* model: budgets, chunked prefill,
preemption, n > 1 fan-out, forks of kept sequences, the prefix cache, and that every block comes
back.

The fake model is faithful where it matters: it keeps a simulated KV cache (one value per slot),
runs each step's block copies first, writes every scheduled token's value into the slot the
scheduler gave it, and computes each row's output from the values it *reads through the row's
block table* — never from `Sequence.token_ids`. A slot's value is a hash of the values before it
and its token, so it depends on the whole context, like real KV. The sampled token and its logprob
are hashes of the whole context (plus the request seed and sample index, like a seeded sampler).
So a wrong block table, a missing copy-on-write copy, a prefix hit on the wrong blocks, samples
swapped or a fork at the wrong position changes the outputs, and every test compares them with an
oracle that runs the same arithmetic on plain lists, one sequence at a time. Each output position
of each sample must be drawn once (the fake asserts it): an output lost and regenerated after
preemption fails even though a seeded draw would reproduce it. The fake also refuses a block copy
into a block nobody holds.
"""
import random
from types import SimpleNamespace

import pytest

from mrt_engine.errors import OutOfBlocks
from mrt_engine.kv.cache import KVCacheManager
from mrt_engine.scheduler import Scheduler
from mrt_engine.sequence import Request, Sequence

VOCAB = 50
_MASK = (1 << 61) - 1


def _h(*xs) -> int:
    """Deterministic mixing (tuples of ints hash the same in every process)."""
    return hash(xs) & _MASK


def _kv_value(ctx_digest: int, token: int) -> int:
    return _h(ctx_digest, token, 1)


def _extend(digest: int, kv_value: int) -> int:
    return _h(digest, kv_value, 2)


def _sample(digest: int, seed: int, sample_index: int) -> tuple[int, float]:
    x = _h(digest, seed, sample_index, 3)
    return x % VOCAB, -((x >> 8) % 10007) / 1000.0


def oracle(prompt, seed, sample_index, max_tokens, stop_token=None):
    """What a correct engine must produce for one sample, computed alone on plain lists."""
    d, out, lps = 0, [], []
    for t in prompt:
        d = _extend(d, _kv_value(d, t))
    while True:
        tok, lp = _sample(d, seed, sample_index)
        out.append(tok)
        lps.append(lp)
        if len(out) >= max_tokens or tok == stop_token:
            return out, lps
        d = _extend(d, _kv_value(d, tok))


class PagedFakeModel:
    """Reads and writes a simulated paged KV cache exactly where the scheduler says."""

    def __init__(self, num_blocks, block_size):
        self.bs = block_size
        self.cache = [None] * (num_blocks * block_size)
        self.sampled = set()     # (request, sample index, output position): each drawn once

    def _digest(self, table, length):
        d = 0
        for i in range(length):
            v = self.cache[table[i // self.bs] * self.bs + i % self.bs]
            assert v is not None, "read of a slot nobody wrote"
            d = _extend(d, v)
        return d

    def execute(self, batch, rows):
        bs = self.bs
        for src, dst in batch.copies:
            self.cache[dst * bs:(dst + 1) * bs] = self.cache[src * bs:(src + 1) * bs]
        digests = {}
        for s, start, n, slots, table in batch.prefills:
            d = self._digest(table, start)
            for tok, slot in zip(s.token_ids[start:start + n], slots):
                v = _kv_value(d, tok)
                self.cache[slot] = v
                d = _extend(d, v)
            digests[id(s)] = d
        for s, slot, table in zip(batch.decodes, batch.decode_slots, batch.decode_block_tables):
            length = s.num_computed + 1
            d = self._digest(table, length - 1)
            v = _kv_value(d, s.token_ids[-1])
            self.cache[slot] = v
            digests[id(s)] = _extend(d, v)
        toks, lps = [], []
        for s, k in rows:
            d = digests[id(s)]
            for j in range(k):
                # a leader's k samples are samples 0..k-1 of its request
                idx = s.sample_index + j
                # preemption recomputes KV but keeps sampled tokens: re-drawing one means an
                # output was lost (a seeded sampler would hide that by drawing it again)
                key = (s.request.seqs[0].seq_id, idx, s.num_output)   # leader ids are unique
                assert key not in self.sampled, f"output {key[1:]} of a request sampled twice"
                self.sampled.add(key)
                tok, lp = _sample(d, s.request.seed, idx)
                toks.append(tok)
                lps.append(lp)
        return toks, lps


def _params(n=1, max_tokens=4, stop_token=None):
    return SimpleNamespace(n=n, max_tokens=max_tokens, ignore_eos=True, stop=[], prompt_logprobs=None,
                           skip_reading_prefix_cache=False,
                           stop_token_ids=[] if stop_token is None else [stop_token])


def _stop(seq, token):
    if token in seq.request.params.stop_token_ids:
        seq.finish_reason = "stop"
        return True
    if seq.num_output >= seq.request.params.max_tokens:
        seq.finish_reason = "length"
        return True
    return False


class Harness:
    def __init__(self, num_blocks=64, bs=4, budget=32, max_seqs=8, prefix_caching=True):
        self.kv = KVCacheManager(num_blocks, bs)
        self.sched = Scheduler(self.kv, bs, budget, max_seqs, prefix_caching)
        self.model = PagedFakeModel(num_blocks, bs)
        self.bs = bs

    def submit(self, prompts, n=1, max_tokens=4, keep=False, seed=0, stop_token=None, fork=None):
        """fork: (kept Sequence, at) -> prompts are Fork-like (source's first `at` tokens + suffix)."""
        reqs = []
        for i, p in enumerate(prompts):
            src, at = None, 0
            if fork is not None:
                parent, t = fork[i]
                p = parent.token_ids[:t] + list(p)
                if t >= 2:
                    src, at = parent.seq_id, t - 1
            r = Request(i, None, p, _params(n, max_tokens, stop_token), seed=seed + 1000 * i, keep=keep,
                        fork_source=src, fork_at=at)
            r.seqs[0] = Sequence(self.sched.new_seq_id(), r, 0, p, spawn=n)
            self.sched.add(r.seqs[0])
            reqs.append(r)
        return reqs

    def run(self, check=None, max_steps=20_000):
        steps = 0
        while self.sched.has_unfinished():
            batch = self.sched.schedule()
            for src, dst in batch.copies:
                # a copy into a block nobody holds is left over from a rolled-back admission or
                # a preempted sample (its source may be freed: no forward ran since it was queued)
                assert self.kv.ref_count(dst) > 0, (src, dst)
            if check:
                check(batch)
            rows = self.sched.sample_rows(batch)
            toks, lps = self.model.execute(batch, rows)
            self.sched.update(batch, toks, lps, _stop)
            steps += 1
            assert steps < max_steps
        return steps

    def expect(self, reqs):
        for r in reqs:
            assert r.finished
            for j, s in enumerate(r.seqs):
                assert s.sample_index == j
                want, lps = oracle(r.prompt_token_ids, r.seed, j, r.params.max_tokens,
                                   (r.params.stop_token_ids or [None])[0])
                assert s.output_token_ids == want, (r.index, j)
                assert s.logprobs == lps, (r.index, j)

    def release(self, reqs):
        for r in reqs:
            for s in r.seqs:
                self.kv.free_sequence(s.seq_id)

    def assert_all_free(self):
        self.kv.clear_prefix_cache()
        assert self.kv.num_free_blocks() == self.kv.num_blocks
        assert self.kv.sequence_ids() == []


def test_fake_model_reads_the_cache_not_the_sequence():
    """The oracle and the fake agree on a plain run, and corrupting one cached slot changes the
    later outputs: the fake really depends on what the scheduler put in the cache."""
    h = Harness()
    reqs = h.submit([list(range(1, 10))], max_tokens=4)
    h.run()
    h.expect(reqs)
    h = Harness()
    reqs = h.submit([list(range(1, 10))], max_tokens=4)
    batch = h.sched.schedule()
    h.sched.update(batch, *h.model.execute(batch, h.sched.sample_rows(batch)), _stop)
    h.model.cache[batch.prefills[0][3][2]] ^= 1          # the KV of prompt token 2
    h.run()
    want, lps = oracle(list(range(1, 10)), reqs[0].seed, 0, 4)
    got = reqs[0].seqs[0]
    assert got.output_token_ids[0] == want[0]
    assert got.output_token_ids[1:] != want[1:] or got.logprobs[1:] != lps[1:]


def test_chunked_prefill_respects_budget_and_finishes():
    h = Harness(budget=10)
    reqs = h.submit([list(range(1, 38)), list(range(3, 9)), [5]], max_tokens=5)

    def check(batch):
        assert batch.num_tokens <= 10
        for s, start, n, slots, table in batch.prefills:
            assert len(slots) == n and start == s.num_computed
    h.run(check)
    h.expect(reqs)
    assert h.sched.stats["prefill_tokens"] == 37 + 6 + 1
    assert h.kv.num_available_blocks() == h.kv.num_blocks


def test_n_samples_prefill_prompt_once_and_share_blocks():
    h = Harness()
    prompt = list(range(10, 20))           # 10 tokens: 2 full blocks + a partial one
    reqs = h.submit([prompt], n=4, max_tokens=3, keep=True)
    h.run()
    h.expect(reqs)
    assert h.sched.stats["prefill_tokens"] == 10
    seqs = reqs[0].seqs
    tables = [h.kv.block_table(s.seq_id) for s in seqs]
    assert all(t[:2] == tables[0][:2] for t in tables)        # full prompt blocks shared
    assert len({t[2] for t in tables}) == 4                    # partial tail copied per sample
    assert h.kv.num_shared_blocks() == 2
    h.release(reqs)
    h.assert_all_free()


def test_preemption_when_blocks_run_out_recomputes_and_loses_nothing():
    h = Harness(num_blocks=12, bs=4, budget=64)
    reqs = h.submit([list(range(i, i + 9)) for i in range(1, 7)], max_tokens=12)
    h.run()
    assert h.sched.stats["num_preemptions"] > 0
    h.expect(reqs)
    h.assert_all_free()


def test_max_num_seqs_caps_running():
    h = Harness(max_seqs=3)
    reqs = h.submit([[1, 2, 3]] * 5, n=1, max_tokens=6)
    seen = []
    h.run(lambda b: seen.append(len(h.sched.running)))
    assert max(seen) <= 3
    h.expect(reqs)


def test_everything_pinned_raises_out_of_blocks_and_abort_frees():
    h = Harness(num_blocks=4, bs=4)
    first = h.submit([list(range(1, 12))], max_tokens=2, keep=True)
    h.run()
    assert h.kv.num_available_blocks() <= 1
    later = h.submit([list(range(20, 30))], max_tokens=2)
    with pytest.raises(OutOfBlocks, match="pinned"):
        h.run()     # a first chunk fits in the free block, then nothing can progress
    h.sched.abort([s for r in later for s in r.seqs])
    assert not h.sched.has_unfinished()
    h.expect(first)                   # the kept sequence survived the failed call
    # and still works: a fork from it equals generating its prefix from scratch
    forks = h.submit([[3, 4]], n=1, max_tokens=1, fork=[(first[0].seqs[0], 9)])
    h.run()
    h.expect(forks)
    h.release(first)
    h.assert_all_free()


def test_n_gt_1_under_pressure_preempts_instead_of_asserting():
    """The reported crash: prompts of 2..120 tokens, n=2, 24 blocks of 16. The tail copies of a
    leader's samples are reserved when its last prompt chunk is scheduled; admitting further
    prompts in the same step must not hand those blocks out again."""
    rng = random.Random(0)
    for trial in range(6):
        h = Harness(num_blocks=24, bs=16, budget=2048, max_seqs=64)
        prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 120))] for _ in range(rng.randint(4, 10))]
        reqs = h.submit(prompts, n=2, max_tokens=rng.randint(1, 60), seed=trial)
        h.run()
        h.expect(reqs)
        h.assert_all_free()


def test_fork_admission_respects_reserved_tail_copies():
    """A fork admitted after a leader's completing chunk in the same step must not take the
    block reserved for that leader's sample."""
    for tight in range(3, 12):
        h2 = Harness(num_blocks=tight + 6, bs=4, budget=256, max_seqs=64)
        par = h2.submit([list(range(1, 23))], max_tokens=2, keep=True)     # 24 tokens, 6 blocks pinned
        h2.run()
        reqs = h2.submit([[5, 6, 7]], n=3, max_tokens=5, seed=7)
        reqs += h2.submit([[8, 9]] * 2, n=2, max_tokens=4, seed=9, fork=[(par[0].seqs[0], 11), (par[0].seqs[0], 22)])
        h2.run()
        h2.expect(par)
        h2.expect(reqs)
        h2.release(par)
        h2.assert_all_free()


@pytest.mark.parametrize("seed", range(64))
def test_random_workloads_equal_the_oracle_and_free_everything(seed):
    """Random prompts, n (up to more samples than sequence slots or blocks), stop tokens, forks of
    kept sequences, keep/release and tiny pools; the running set never exceeds max_num_seqs."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    max_seqs = rng.choice([4, 16, 64])
    h = Harness(num_blocks=rng.randint(24, 64), bs=bs, budget=rng.choice([8, 16, 64, 512]),
                max_seqs=max_seqs, prefix_caching=rng.random() < 0.8)

    def within_cap(batch):
        assert len(h.sched.running) <= max_seqs

    kept = []
    for call in range(6):
        k = rng.randint(1, 5)
        if kept and rng.random() < 0.5:
            fork = [(rng.choice(kept), None) for _ in range(k)]
            fork = [(p, rng.randint(1, len(p.token_ids))) for p, _ in fork]
            prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))] for _ in range(k)]
        else:
            fork = None
            base = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))]
            # shared prefixes exercise the prefix cache
            prompts = [base[:rng.randint(1, len(base))] + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 9))]
                       for _ in range(k)]
        keep = rng.random() < 0.4
        reqs = h.submit(prompts, n=rng.choice([1, 2, 3, 4, 12, 40]), max_tokens=rng.randint(1, 12), keep=keep,
                        seed=rng.randrange(10**6), stop_token=rng.choice([None, 3, 17]), fork=fork)
        try:
            h.run(within_cap)
        except OutOfBlocks as exc:
            assert "pinned" in str(exc)
            assert h.sched.waiting[0].spawn == 1    # only a single sample can fail to fit
            h.sched.abort([s for r in reqs for s in r.seqs])
            assert not h.sched.has_unfinished()
        else:
            h.expect(reqs)
            if keep:
                kept.extend(s for r in reqs for s in r.seqs)
        while kept and (len(kept) > 6 or rng.random() < 0.3):
            s = kept.pop(rng.randrange(len(kept)))
            h.kv.free_sequence(s.seq_id)
    for s in kept:
        h.kv.free_sequence(s.seq_id)
    h.assert_all_free()


def test_n_larger_than_the_pool_runs_its_samples_in_turn():
    """n samples whose tail copies cannot all be had at once, even in an idle engine (here 10 of
    a prompt in 6 blocks): the engine lets them in one by one instead of raising OutOfBlocks, and
    every sample still equals the oracle (sample j drawn with its own seed stream) with nothing left
    behind. Holds with the prefix cache off (every sample recomputes the prompt) and for a fork."""
    for caching in (True, False):
        h = Harness(num_blocks=6, bs=4, budget=64, max_seqs=16, prefix_caching=caching)
        reqs = h.submit([list(range(1, 11))], n=10, max_tokens=5)   # 3 blocks, 2 full + a tail
        h.run()
        h.expect(reqs)
        h.assert_all_free()
    h = Harness(num_blocks=8, bs=4, budget=64, max_seqs=16)
    base = h.submit([list(range(1, 8))], max_tokens=3, keep=True)
    h.run()
    forks = h.submit([[20, 21]], n=12, max_tokens=4, fork=[(base[0].seqs[0], 9)])
    h.run()
    h.expect(forks)
    h.release(base)
    h.assert_all_free()


def test_n_larger_than_max_num_seqs_never_exceeds_it():
    """A request with n > max_num_seqs could never run its samples together: they run in turn and
    the running set stays within max_num_seqs. Leaders admitted in one step count as their n
    samples: two n=3 requests under a cap of 4 must not both start (each becomes 3 running
    sequences when its prompt completes)."""
    for cap, n in ((3, 5), (4, 3)):
        h = Harness(num_blocks=64, bs=4, max_seqs=cap)
        reqs = h.submit([list(range(1, 7)), list(range(30, 35))], n=n, max_tokens=6)
        seen = []
        h.run(lambda b: seen.append(len(h.sched.running)))
        assert max(seen) <= cap, (cap, n)
        h.expect(reqs)
        h.assert_all_free()
