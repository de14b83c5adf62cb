"""The engine against transformers on tiny random Llama (GQA) and Qwen2 (qkv bias, tied embeddings):
greedy tokens, logprobs of the same tokens, concurrency, chunked prefill and preemption."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from mrt_engine import LLM, SamplingParams


pytestmark = pytest.mark.usefixtures("one_thread")


GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def _prompts(k, seed=0, lo=3, hi=70):
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(lo, hi))] for _ in range(k)]


def _hf_logprobs(hf, prompt, gen, temperature=1.0):
    """log_softmax(logits / T) at every generated position, and the argmax tokens there."""
    ids = torch.tensor([prompt + gen])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1), logits.argmax(-1).tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tiny_llama_dir, tiny_qwen2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", num_blocks=512)
    return path, hf, llm


# Ranks and top-k lists are compared up to near ties: two logits closer than this may order either
# way under another GEMM's rounding (a 190-token prompt here has two of its top 3 7e-7 apart); it is
# the tolerance the logprobs themselves are held to
TIE = 1e-4


def _assert_top_k(ids, row, k, tol=TIE):
    """ids (ours, in rank order) are transformers' k most likely up to ties within `tol`: their
    values in `row` (transformers' logits or logprobs) are its k best, in order; a wrong id would
    be off by more than tol."""
    assert len(ids) == len(set(ids)) == k
    if k:
        torch.testing.assert_close(row[ids], row.topk(k).values, rtol=0, atol=tol)


def _assert_rank(rank, row, token, tol=TIE):
    """Our rank of `token` (1 + the number of larger logits) is transformers' up to ties within tol."""
    v = row[token]
    assert int((row > v + tol).sum()) + 1 <= rank <= int((row > v - tol).sum()), (rank, token)


def _check_against_hf(hf, prompt, out, temperature=1.0, greedy=True):
    lp, argmax = _hf_logprobs(hf, prompt, out.token_ids, temperature)
    if greedy:
        assert out.token_ids == argmax
    ref = lp.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), ref, rtol=0, atol=1e-4)


def test_greedy_tokens_and_logprobs_match_transformers_batched(pair):
    _, hf, llm = pair
    prompts = _prompts(6)
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        assert len(c.token_ids) == 48 and c.finish_reason == "length"
        _check_against_hf(hf, p, c)


@pytest.mark.parametrize("count", [0, 3])
def test_vllm_logprob_dicts_match_transformers(pair, count):
    # SamplingParams(logprobs=k) in vLLM's spelling: per token {sampled id: Logprob, then the k most
    # likely ids}, ranks by logit; sampled (seeded, T=0.8, n=2) so the sampled token is often not
    # the argmax and its rank is > 1
    _, hf, llm = pair
    prompt = _prompts(1, seed=7)[0]
    t = 0.8
    outs = llm.generate([prompt], SamplingParams(n=2, temperature=t, max_tokens=24, seed=3, ignore_eos=True,
                                                 logprobs=count))[0].outputs
    plain = llm.generate([prompt], SamplingParams(n=2, temperature=t, max_tokens=24, seed=3, ignore_eos=True))[0]
    tok = llm.get_tokenizer()
    ranked_below_top = 0
    for c, f in zip(outs, plain.outputs):
        assert c.token_ids == f.token_ids and len(c.logprobs) == len(c.token_ids)
        lp, _ = _hf_logprobs(hf, prompt, c.token_ids, t)
        for pos, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            ids = list(entry)
            assert ids[0] == token                              # the sampled token first (TRL reads it so)
            assert abs(entry[token].logprob - f.logprobs[pos]) < 1e-5   # another call: rounding
            assert abs(entry[token].logprob - lp[pos, token].item()) < 1e-4
            _assert_rank(entry[token].rank, lp[pos], token)
            ranked_below_top += entry[token].rank > 1
            alts = {i: e for i, e in entry.items() if i != token or e.rank <= count}
            top = [i for i, e in sorted(alts.items(), key=lambda kv: kv[1].rank)]
            _assert_top_k(top, lp[pos], count)
            for r, i in enumerate(top):
                assert entry[i].rank == r + 1 and abs(entry[i].logprob - lp[pos, i].item()) < 1e-4
                assert entry[i].decoded_token == (tok.decode([i]) if tok is not None else None)
            assert len(entry) in (count, count + 1) if count else len(entry) == 1
    assert ranked_below_top > 0
    assert outs[0].cumulative_logprob == pytest.approx(sum(plain.outputs[0].logprobs), abs=1e-5)


@pytest.mark.parametrize("mode", [None, "raw_logprobs", "processed_logprobs"])
def test_logprobs_modes_match_transformers(pair, mode):
    # vLLM's logprobs_mode: raw = log_softmax(logits); processed = after temperature and top-k (the
    # kept tokens renormalised, the dropped ones -inf); ours (None) = log_softmax(logits / T)
    path, hf, _ = pair
    llm = LLM(path, dtype="float32", num_blocks=256, logprobs_mode=mode)
    prompt = _prompts(1, seed=11)[0]
    t, k = 0.7, 5
    for top_k in (-1, k):
        out = llm.generate([prompt], SamplingParams(n=2, temperature=t, top_k=top_k, max_tokens=16, seed=5,
                                                    ignore_eos=True, logprobs=k + 2))[0].outputs[0]
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            x = hf(ids).logits[0, len(prompt) - 1:-1].float()
        if mode == "raw_logprobs":
            ref = torch.log_softmax(x, -1)
        elif mode == "processed_logprobs" and top_k > 0:
            kth = x.topk(top_k, dim=-1).values[:, -1:]
            ref = torch.log_softmax((x / t).masked_fill(x < kth, float("-inf")), -1)
        else:
            ref = torch.log_softmax(x / t, -1)
        for pos, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            assert list(entry)[0] == token
            assert abs(entry[token].logprob - ref[pos, token].item()) < 1e-4
            for i, e in entry.items():
                if ref[pos, i] == float("-inf"):
                    assert e.logprob == float("-inf") and e.rank > top_k
                else:
                    assert abs(e.logprob - ref[pos, i].item()) < 1e-4
        if mode == "processed_logprobs" and top_k > 0:
            assert all(e[i].logprob == float("-inf") for e in out.logprobs for i in e if e[i].rank > top_k)


@pytest.mark.parametrize("count", [0, 3])
def test_prompt_logprobs_match_transformers(pair, count):
    # vLLM's SamplingParams(prompt_logprobs=k): None for the first prompt token, then per token
    # {prompt token: Logprob, then the k most likely ids}, log_softmax of the raw logits (T does not
    # apply), ranks by logit; in a batch with requests that do not ask, with n=3 (one list), under
    # chunked prefill across steps, and again with the prompts in the prefix cache (not reused)
    path, hf, llm = pair
    # the 150- and 190-token prompts take the kernel's long-prefill plan (query blocks of 16)
    prompts = _prompts(4, seed=17, lo=1, hi=40) + [[7]] + _prompts(1, seed=18, lo=150, hi=151) \
        + _prompts(1, seed=19, lo=190, hi=191)
    sp = SamplingParams(n=3, temperature=0.7, max_tokens=3, seed=1, prompt_logprobs=count)
    plain = SamplingParams(max_tokens=3, **{"temperature": 0})
    params = [sp if i % 2 == 0 else plain for i in range(len(prompts))] + [sp]
    chunked = LLM(path, dtype="float32", num_blocks=512, max_num_batched_tokens=8)
    # chunks of up to 100 tokens after a cached part that is not a multiple of 8 or 16
    long_chunks = LLM(path, dtype="float32", num_blocks=512, block_size=8, max_num_batched_tokens=100)
    for engine in (llm, chunked, long_chunks, llm):
        outs = engine.generate(prompts + [prompts[0]], params)
        for p, prm, o in zip(prompts + [prompts[0]], params, outs):
            if prm is plain:
                assert o.prompt_logprobs is None
                continue
            assert len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None and len(o.outputs) == 3
            if len(p) == 1:
                continue
            with torch.no_grad():
                logits = hf(torch.tensor([p])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1)
            tgt = torch.tensor(p[1:])
            want = lp.gather(1, tgt[:, None])[:, 0]
            for j, d in enumerate(o.prompt_logprobs[1:]):
                first = next(iter(d.items()))
                assert first[0] == p[j + 1]
                _assert_rank(first[1].rank, logits[j], p[j + 1])
                assert first[1].logprob == pytest.approx(want[j].item(), abs=1e-4)
                alts = {t: x for t, x in d.items() if t != p[j + 1] or x.rank <= count}
                _assert_top_k([t for t, x in sorted(alts.items(), key=lambda kv: kv[1].rank) if x.rank <= count],
                              logits[j], count)
                for t, x in d.items():
                    assert x.logprob == pytest.approx(lp[j, t].item(), abs=1e-4)
        assert outs[0].num_cached_tokens == 0    # computed, not taken from the prefix cache


def test_concurrent_mixed_lengths_equal_alone(pair):
    _, _, llm = pair
    prompts = _prompts(8, seed=1, lo=1, hi=120)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (5, 40, 17, 1, 33, 8, 25, 12)]
    together = llm.generate(prompts, params)
    for p, sp, t in zip(prompts, params, together):
        alone = llm.generate([p], sp)[0].outputs[0]
        assert alone.token_ids == t.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(t.outputs[0].logprobs),
                                   rtol=0, atol=1e-4)


def test_sampled_logprobs_are_tempered_log_softmax(pair):
    _, hf, llm = pair
    prompt = _prompts(1, seed=2)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=20, seed=1,
                                                ignore_eos=True))[0].outputs[0]
    _check_against_hf(hf, prompt, out, temperature=0.7, greedy=False)


def test_chunked_prefill_and_preemption_keep_greedy_outputs(pair):
    path, hf, llm = pair
    prompts = _prompts(5, seed=3, lo=20, hi=60)
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = llm.generate(prompts, sp)
    small = LLM(path, dtype="float32", num_blocks=14, block_size=8, max_num_batched_tokens=24)
    outs = small.generate(prompts, sp)
    for p, o, r in zip(prompts, outs, ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        _check_against_hf(hf, p, o.outputs[0])              # logprobs after recompute, too
    # seeded sampling with n > 1 under the same pressure: tokens and logprobs as the roomy engine's
    sampled = SamplingParams(n=2, temperature=1.0, max_tokens=30, seed=8, ignore_eos=True)
    before = small.kv_stats()["num_preemptions"]
    outs = small.generate(prompts[:3], sampled)
    assert small.kv_stats()["num_preemptions"] > before
    for p, o, r in zip(prompts, outs, llm.generate(prompts[:3], sampled)):
        for c, rc in zip(o.outputs, r.outputs, strict=True):
            assert c.token_ids == rc.token_ids
            _check_against_hf(hf, p, c, greedy=False)
    st = small.kv_stats()
    assert st["num_preemptions"] > 0
    small.reset_prefix_cache()
    assert small.kv_stats()["free_blocks"] == st["total_blocks"]


def test_all_blocks_free_after_everything(pair):
    _, _, llm = pair
    llm.reset_prefix_cache()
    st = llm.kv_stats()
    assert st["free_blocks"] == st["total_blocks"] and st["used_blocks"] == 0
