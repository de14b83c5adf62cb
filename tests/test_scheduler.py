"""Scheduler over the real KV bookkeeping with a fake model: budgets, chunked prefill, preemption,
n > 1 fan-out, and that every block comes back."""
from types import SimpleNamespace

import pytest

from mrt_engine.errors import OutOfBlocks
from mrt_engine.kv.cache import KVCacheManager
from mrt_engine.scheduler import Scheduler
from mrt_engine.sequence import Request, Sequence, Status


def _params(n=1, max_tokens=4):
    return SimpleNamespace(n=n, max_tokens=max_tokens, ignore_eos=True, stop=[], stop_token_ids=[])


def _stop(seq, token):
    if seq.num_output >= seq.request.params.max_tokens:
        seq.finish_reason = "length"
        return True
    return False


def _submit(sched, prompts, n=1, max_tokens=4, keep=False):
    reqs = []
    for i, p in enumerate(prompts):
        r = Request(i, None, p, _params(n, max_tokens), seed=0, keep=keep)
        r.seqs[0] = Sequence(sched.new_seq_id(), r, 0, p, spawn=n)
        sched.add(r.seqs[0])
        reqs.append(r)
    return reqs


def _run(sched, budget_check=None, max_steps=10_000):
    """Drive to completion; the fake model samples token 7 + the sequence's output length."""
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        if budget_check:
            budget_check(batch)
        rows = sched.sample_rows(batch)
        toks = [7 + s.num_output for s, k in rows for _ in range(k)]
        sched.update(batch, toks, [0.0] * len(toks), _stop)
        steps += 1
        assert steps < max_steps
    return steps


def _sched(num_blocks=64, bs=4, budget=32, max_seqs=8):
    kv = KVCacheManager(num_blocks, bs)
    return Scheduler(kv, bs, budget, max_seqs), kv


def test_chunked_prefill_respects_budget_and_finishes():
    sched, kv = _sched(budget=10)
    reqs = _submit(sched, [list(range(1, 38)), list(range(3, 9)), [5]], max_tokens=5)

    def check(batch):
        assert batch.num_tokens <= 10
        for s, start, n, slots, table in batch.prefills:
            assert len(slots) == n and start == s.num_computed
    _run(sched, check)
    for r in reqs:
        s = r.seqs[0]
        assert s.status is Status.FINISHED and s.output_token_ids == [7, 8, 9, 10, 11]
    assert sched.stats["prefill_tokens"] == 37 + 6 + 1
    assert kv.num_available_blocks() == kv.num_blocks


def test_n_samples_prefill_prompt_once_and_share_blocks():
    sched, kv = _sched()
    prompt = list(range(10, 20))           # 10 tokens: 2 full blocks + a partial one
    reqs = _submit(sched, [prompt], n=4, max_tokens=3, keep=True)
    _run(sched)
    assert sched.stats["prefill_tokens"] == 10
    seqs = reqs[0].seqs
    assert [s.sample_index for s in seqs] == [0, 1, 2, 3]
    tables = [kv.block_table(s.seq_id) for s in seqs]
    assert all(t[:2] == tables[0][:2] for t in tables)        # full prompt blocks shared
    assert len({t[2] for t in tables}) == 4                    # partial tail copied per sample
    assert kv.num_shared_blocks() == 2
    for s in seqs:
        kv.free_sequence(s.seq_id)
    kv.clear_prefix_cache()
    assert kv.num_free_blocks() == kv.num_blocks


def test_preemption_when_blocks_run_out_recomputes_and_loses_nothing():
    sched, kv = _sched(num_blocks=12, bs=4, budget=64)
    prompts = [list(range(i, i + 9)) for i in range(1, 7)]
    reqs = _submit(sched, prompts, max_tokens=12)
    _run(sched)
    assert sched.stats["num_preemptions"] > 0
    for r in reqs:
        assert r.seqs[0].output_token_ids == list(range(7, 19))
    kv.clear_prefix_cache()
    assert kv.num_free_blocks() == kv.num_blocks


def test_max_num_seqs_caps_running():
    sched, kv = _sched(max_seqs=3)
    _submit(sched, [[1, 2, 3]] * 5, n=1, max_tokens=6)
    seen = []
    _run(sched, lambda b: seen.append(len(sched.running)))
    assert max(seen) <= 3


def test_everything_pinned_raises_out_of_blocks_and_abort_frees():
    sched, kv = _sched(num_blocks=4, bs=4)
    first = _submit(sched, [list(range(1, 12))], max_tokens=2, keep=True)
    _run(sched)
    assert kv.num_available_blocks() <= 1
    later = _submit(sched, [list(range(20, 30))], max_tokens=2)
    with pytest.raises(OutOfBlocks, match="pinned"):
        _run(sched)     # a first chunk fits in the free block, then nothing can progress
    sched.abort([s for r in later + first for s in r.seqs])
    assert not sched.has_unfinished()
    kv.clear_prefix_cache()
    assert kv.num_free_blocks() == kv.num_blocks
