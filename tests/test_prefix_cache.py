"""Prefix-cache hits give the same outputs as computing everything: an engine with the cache on
against one with it off (same model, same params), on prompts sharing prefixes of several block
counts, with seeded sampling and n > 1 — and again after the cache has evicted part of what it
held (LRU, leaves first), so a partial hit, a miss and a re-hit all match too."""
import random

import pytest
import torch

from mrt_engine import LLM, SamplingParams

BS = 8



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    cached = LLM(tiny_llama_dir, dtype="float32", block_size=BS, num_blocks=40)
    plain = LLM(tiny_llama_dir, dtype="float32", block_size=BS, num_blocks=256, enable_prefix_caching=False)
    return cached, plain


def _same(outs_a, outs_b, atol=2e-5):
    for a, b in zip(outs_a, outs_b, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            # a hit reads the cached prefix through the paged path instead of one causal pass
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=atol)


def _family(rng, base, k):
    """k prompts sharing `base`'s first 1..len tokens, each with its own tail."""
    return [base[:rng.randint(1, len(base))] + [rng.randrange(256) for _ in range(rng.randint(1, 9))]
            for _ in range(k)]


SAMPLED = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=11, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def test_hits_equal_cache_off(engines):
    llm, plain = engines
    rng = random.Random(0)
    base = [rng.randrange(256) for _ in range(50)]
    first = llm.generate([base + [1]], GREEDY)                  # fills the cache with 6 blocks
    _same(first, plain.generate([base + [1]], GREEDY))
    hits0 = llm.kv_stats()["prefix_cache_hit_tokens"]
    for sp in (GREEDY, SAMPLED):
        # a block that differs from a cached one in its last token only must miss
        near = base[:23] + [(base[23] + 1) % 256] + base[24:40]
        prompts = _family(rng, base, 5) + [base, base[:17], base[:16] + [3], near]
        outs = llm.generate(prompts, sp)
        _same(outs, plain.generate(prompts, sp))
    assert llm.kv_stats()["prefix_cache_hit_tokens"] - hits0 >= 48
    # a whole-prompt hit still computes the last token (its logits are needed)
    out = llm.generate([base + [1]], GREEDY)[0]
    assert out.num_cached_tokens == 48
    _same([out], first)


def test_hits_after_eviction_equal_cache_off(engines):
    llm, plain = engines
    llm.reset_prefix_cache()
    rng = random.Random(1)
    base = [rng.randrange(256) for _ in range(60)]            # 7 full blocks
    llm.generate([base + [2]], GREEDY)
    assert llm.kv.match_prefix(base, llm.weight_version) == 56
    # unrelated prompts fill the pool (40 blocks): the least recently used leaves go first
    for i in range(4):
        other = [rng.randrange(256) for _ in range(70)]
        llm.generate([other], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    left = llm.kv.match_prefix(base, llm.weight_version)
    assert left < 56, "the workload did not evict the base prompt's blocks"
    assert llm.kv_stats()["free_blocks"] < 8
    hits0 = llm.kv_stats()["prefix_cache_hit_tokens"]
    prompts = [base + [9], base[:33] + [4, 5], base[:left + 3], base[:left - 1] + [(base[left - 1] + 1) % 256, 7]]
    for sp in (GREEDY, SAMPLED):
        _same(llm.generate(prompts, sp), plain.generate(prompts, sp))
    assert llm.kv_stats()["prefix_cache_hit_tokens"] > hits0
    # the recomputed blocks were cached again: a re-hit covers the whole base now
    assert llm.kv.match_prefix(base, llm.weight_version) == 56


def test_all_blocks_free_at_the_end(engines):
    for llm in engines:
        llm.reset_prefix_cache()
        st = llm.kv_stats()
        assert st["free_blocks"] == st["total_blocks"] and st["kept_handles"] == 0
