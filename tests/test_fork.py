"""Token-level fork: a fork of a kept sequence at t with a suffix must equal generating from scratch
on prefix + suffix, prefill only the suffix (plus one re-fed token), and give every block back."""
import random

import pytest
import torch

from mrt_engine import LLM, Fork, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    shared = LLM(tiny_llama_dir, dtype="float32", num_blocks=1024, block_size=8)
    # the oracle: no prefix cache, so nothing it computes is shared
    scratch = LLM(tiny_llama_dir, dtype="float32", num_blocks=256, block_size=8, enable_prefix_caching=False)
    return shared, scratch


def _trace(llm, seed, plen=29, gen=50):
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(plen)]
    out = llm.generate([prompt], SamplingParams(max_tokens=gen, **GREEDY), keep=True)[0].outputs[0]
    return out.handle, prompt + out.token_ids


def _same(a, b):
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)


def test_forks_at_many_positions_equal_scratch(engines):
    llm, scratch = engines
    h, full = _trace(llm, 0)
    suffix = [11, 12, 13, 14, 15]
    positions = [1, 2, 7, 8, 9, 16, 29, 30, 47, 64, 78, 79]      # block size 8: edges and interiors
    before = llm.kv_stats()["prefill_tokens"]
    outs = llm.generate([Fork(h, at=t, suffix=suffix) for t in positions],
                        SamplingParams(n=2, max_tokens=12, **GREEDY))
    computed = llm.kv_stats()["prefill_tokens"] - before
    # fork at t >= 2 re-feeds one token and the suffix; at t = 1 there is nothing to share
    assert computed == sum(1 + len(suffix) if t >= 2 else t + len(suffix) for t in positions)
    ref = scratch.generate([full[:t] + suffix for t in positions], SamplingParams(max_tokens=12, **GREEDY))
    for t, o, r in zip(positions, outs, ref):
        assert o.prompt_token_ids == full[:t] + suffix
        assert len(o.outputs) == 2
        for c in o.outputs:
            _same(c, r.outputs[0])
    llm.release(h)


def test_numpy_fork_positions(engines):
    """Positions computed with NumPy (episode boundaries often are) work as ints, in llm.fork and in
    Fork items, and give the same branches; a NumPy bool or float is still refused."""
    import numpy as np

    llm, _ = engines
    h, full = _trace(llm, 3, gen=20)
    sp = SamplingParams(max_tokens=4, **GREEDY)
    want = [o.outputs[0].token_ids for o in llm.fork(h, at=[9, 30], suffix=[7], params=sp)]
    got = [o.outputs[0].token_ids for o in llm.fork(h, at=list(np.array([9, 30])), suffix=[7], params=sp)]
    one = llm.fork(h, at=np.int64(30), suffix=[7], params=sp)[0].outputs[0].token_ids
    item = llm.generate([Fork(h, at=np.int32(9), suffix=[7])], sp)[0]
    assert got == want and one == want[1] and item.outputs[0].token_ids == want[0]
    assert item.prompt_token_ids == full[:9] + [7]
    for bad in (np.bool_(True), np.float64(9.0)):
        with pytest.raises((TypeError, ValueError)):
            llm.fork(h, at=[bad], params=sp)
    llm.release(h)


def test_fork_at_end_continues_the_trace(engines):
    llm, _ = engines
    rng = random.Random(5)
    prompt = [rng.randrange(256) for _ in range(21)]
    long = llm.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0]
    short = llm.generate([prompt], SamplingParams(max_tokens=25, **GREEDY), keep=True)[0].outputs[0]
    cont = llm.fork(short.handle, at=len(short.handle), n=1, params=SamplingParams(max_tokens=15, **GREEDY))
    assert short.token_ids + cont[0].outputs[0].token_ids == long.token_ids
    llm.release(short.handle)


def test_many_handles_text_suffix_and_nested_forks(engines):
    llm, scratch = engines
    tok = llm.get_tokenizer()
    handles = [_trace(llm, s, plen=10 + 7 * s, gen=30) for s in range(3)]
    suffix_text = " Answer:"
    suffix = tok(suffix_text, add_special_tokens=False).input_ids
    items = [Fork(h, at=t, suffix=suffix_text) for h, full in handles for t in (5, 17, len(full))]
    outs = llm.generate(items, SamplingParams(n=3, max_tokens=6, **GREEDY), keep=True)
    refs = scratch.generate([full[:t] + suffix for _, full in handles for t in (5, 17, len(full))],
                            SamplingParams(max_tokens=6, **GREEDY))
    for o, r in zip(outs, refs):
        for c in o.outputs:
            _same(c, r.outputs[0])
    # a fork of a fork: its prompt is the child's prompt + generated tokens
    child = outs[1].outputs[2]
    child_full = outs[1].prompt_token_ids + child.token_ids
    nested = llm.fork(child.handle, at=[len(child_full) - 2], suffix=[3, 4], n=1,
                      params=SamplingParams(max_tokens=5, **GREEDY))
    ref = scratch.generate([child_full[:-2] + [3, 4]], SamplingParams(max_tokens=5, **GREEDY))
    _same(nested[0].outputs[0], ref[0].outputs[0])
    for o in outs:
        for c in o.outputs:
            llm.release(c.handle)
    for h, _ in handles:
        llm.release(h)


def test_seeded_forks_sample_like_scratch(engines):
    llm, scratch = engines
    h, full = _trace(llm, 9)
    sp = SamplingParams(n=4, temperature=1.0, top_k=20, max_tokens=8, seed=123)
    forked = llm.fork(h, at=[33], suffix=[1, 2], params=sp)[0]
    ref = scratch.generate([full[:33] + [1, 2]], sp)[0]
    for c, r in zip(forked.outputs, ref.outputs, strict=True):
        _same(c, r)                                                  # tokens and logprobs
    assert len({tuple(c.token_ids) for c in forked.outputs}) > 1    # the n samples differ
    llm.release(h)


@pytest.mark.parametrize("path", ["pytorch", "cpp_kernel"])
def test_fork_decode_reads_the_shared_trace_once(engines, monkeypatch, path):
    """The CPU torch backend must really share, on both of its decode paths (PyTorch batches and the
    C++ kernel): in a decode step of 12 branches forked at 3 points of one trace, the blocks it
    reads are far fewer than one pass per sequence, and the trunk's shared blocks are read about
    once (a prefix tree), not once per group or per row."""
    import mrt_engine.attention.torch_backend as tb
    from mrt_engine.attention import cpu_kernel

    llm, scratch = engines
    if not isinstance(llm.model.attn_backend, tb.TorchAttentionBackend):
        pytest.skip("the engine does not run the torch attention backend")
    if path == "cpp_kernel" and not cpu_kernel.simd_available():
        pytest.skip("the C++ kernel needs the extension and AVX-512F")
    monkeypatch.setenv(cpu_kernel.ENV, "1" if path == "cpp_kernel" else "0")
    h, full = _trace(llm, 17, plen=40, gen=40)                      # 80 tokens, 10 blocks of 8
    plans = []

    def distinct_shared(meta):
        # the blocks the step plan's groups share (each group: its rows' common leading blocks)
        ptr, ns = meta.group_ptr_host, meta.group_num_shared_host
        rows, tables = meta.group_rows.tolist(), meta.block_tables().tolist()
        return {b for g in range(len(ptr) - 1) if ptr[g + 1] - ptr[g] > 1 for b in tables[rows[ptr[g]]][:ns[g]]}

    if path == "pytorch":
        build = tb._build_decode_plan

        def spy(meta, block_size, device):
            plan = build(meta, block_size, device)
            shared = sum(b.blocks.numel() for b in plan.shared)
            own = sum(b.blocks.numel() for b in plan.own)
            plans.append((meta.decode_context_lens.tolist(), distinct_shared(meta), shared, own))
            return plan
        monkeypatch.setattr(tb, "_build_decode_plan", spy)
    else:
        items_of = tb._kernel_items

        def spy(meta, block_size):
            items = items_of(meta, block_size)
            shared = sum(len(blk) for blk, _, rows in items if len(rows) > 1)
            own = sum(len(blk) for blk, _, rows in items if len(rows) == 1)
            plans.append((meta.decode_context_lens.tolist(), distinct_shared(meta), shared, own))
            return items
        monkeypatch.setattr(tb, "_kernel_items", spy)
    positions = [40, 60, 79]
    outs = llm.fork(h, at=positions, n=4, params=SamplingParams(max_tokens=5, **GREEDY))
    monkeypatch.undo()
    refs = scratch.generate([full[:t] for t in positions], SamplingParams(max_tokens=5, **GREEDY))
    for o, r in zip(outs, refs):
        for c in o.outputs:
            _same(c, r.outputs[0])
    steps = [p for p in plans if len(p[0]) == 12]
    assert steps, "no decode step held all 12 branches"
    for ctx, distinct, shared, own in steps:
        per_sequence = sum(-(-n // 8) for n in ctx)
        # every shared block is read about once for all the rows under it (padding aside): the
        # trace's first blocks are common to the 3 fork points' groups and must not be re-read
        assert len(distinct) >= 7 and len(distinct) <= shared <= 1.25 * len(distinct), (shared, distinct)
        assert shared + own <= 0.4 * per_sequence, (shared + own, per_sequence)
    llm.release(h)


def test_fork_shares_blocks_instead_of_copying(engines):
    llm, _ = engines
    h, full = _trace(llm, 11, plen=40, gen=40)                       # 80 tokens, 10 blocks of 8
    used0 = llm.kv_stats()["used_blocks"]
    outs = llm.generate([Fork(h, at=65)], SamplingParams(n=4, max_tokens=3, **GREEDY), keep=True)
    st = llm.kv_stats()
    # the 8 full blocks before token 64 are shared; each branch owns its tail (65..70 -> 1 block)
    assert st["used_blocks"] - used0 == 4
    assert st["shared_blocks"] >= 8
    for c in outs[0].outputs:
        llm.release(c.handle)
    llm.release(h)


def test_bad_forks_raise_and_engine_keeps_working(engines):
    llm, _ = engines
    h, full = _trace(llm, 13, plen=12, gen=6)
    for at in (0, len(full) + 1, -1):
        with pytest.raises(ValueError, match="fork position"):
            llm.generate([Fork(h, at=at)], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="fork position"):
        llm.fork(h, at=[3, 2.5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.fork(h, at=[3], suffix=[10**6])
    with pytest.raises(TypeError):
        llm.fork("not a handle", at=[3])
    llm.release(h)
    with pytest.raises(ValueError, match="released"):
        llm.release(h)
    with pytest.raises(ValueError, match="released"):
        llm.fork(h, at=[3])
    out = llm.generate([full[:5]], SamplingParams(max_tokens=3, **GREEDY))
    assert len(out[0].outputs[0].token_ids) == 3


def test_forks_under_block_pressure_preempt_and_match(engines, tiny_llama_dir):
    _, scratch = engines
    tight = LLM(tiny_llama_dir, dtype="float32", num_blocks=40, block_size=8, max_num_batched_tokens=32)
    h, full = _trace(tight, 21, plen=30, gen=20)                   # pins 7 blocks
    positions = [3, 12, 25, 40, 49]
    sp = SamplingParams(n=3, max_tokens=24, **GREEDY)
    outs = tight.generate([Fork(h, at=t, suffix=[7, 8, 9]) for t in positions], sp)
    assert tight.kv_stats()["num_preemptions"] > 0
    refs = scratch.generate([full[:t] + [7, 8, 9] for t in positions], SamplingParams(max_tokens=24, **GREEDY))
    for o, r in zip(outs, refs):
        for c in o.outputs:
            _same(c, r.outputs[0])
    # seeded sampling under the same pressure: every sample's tokens and logprobs as from scratch
    before = tight.kv_stats()["num_preemptions"]
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=24, seed=5, ignore_eos=True)
    outs = tight.generate([Fork(h, at=t, suffix=[7, 8, 9]) for t in positions], sp)
    assert tight.kv_stats()["num_preemptions"] > before
    refs = scratch.generate([full[:t] + [7, 8, 9] for t in positions], sp)
    for o, r in zip(outs, refs):
        for c, rc in zip(o.outputs, r.outputs, strict=True):
            _same(c, rc)
    tight.release(h)
    tight.reset_prefix_cache()
    st = tight.kv_stats()
    assert st["free_blocks"] == st["total_blocks"]


def test_all_blocks_free_at_the_end(engines):
    for llm in engines:
        llm.reset_prefix_cache()
        st = llm.kv_stats()
        assert st["kept_handles"] == 0 and st["free_blocks"] == st["total_blocks"]
