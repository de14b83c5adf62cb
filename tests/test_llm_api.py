"""The public API: outputs, stop rules, seeds, keep/release, update_weights, kv_stats, bad input."""
import json
import os
import random
import shutil
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mrt_engine import LLM, Fork, Logprob, RequestOutput, SamplingParams


pytestmark = pytest.mark.usefixtures("one_thread")


GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_qwen2_dir):
    return LLM(tiny_qwen2_dir, num_blocks=512)


def _prompt(seed, n=20):
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def test_text_prompts_outputs_and_order(llm):
    outs = llm.generate(["hello world", "a", "the quick brown fox"], SamplingParams(max_tokens=7, **GREEDY))
    assert [o.prompt for o in outs] == ["hello world", "a", "the quick brown fox"]
    tok = llm.get_tokenizer()
    for o in outs:
        assert isinstance(o, RequestOutput) and o.finished
        assert o.prompt_token_ids == tok(o.prompt).input_ids
        c = o.outputs[0]
        assert len(c.token_ids) == 7 and len(c.logprobs) == 7 and c.finish_reason == "length"
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.handle is None
    # one token-id prompt, a single string, and logprobs off
    one = llm.generate(_prompt(1), SamplingParams(max_tokens=3, logprobs=False, **GREEDY))
    assert len(one) == 1 and one[0].outputs[0].logprobs is None
    # vLLM's spellings: None is off, a count (0: what TRL and veRL pass) gives vLLM's shape, whose
    # first entry per token is the sampled token's (checked against transformers in test_llm_vs_hf)
    assert llm.generate(_prompt(1), SamplingParams(max_tokens=3, logprobs=None, **GREEDY))[0].outputs[0].logprobs is None
    full = llm.generate(_prompt(1), SamplingParams(max_tokens=3, **GREEDY))[0].outputs[0]
    for count in (0, 1, np.int64(2)):
        c = llm.generate(_prompt(1), SamplingParams(max_tokens=3, logprobs=count, **GREEDY))[0].outputs[0]
        assert [next(iter(lp.values())).logprob for lp in c.logprobs] == full.logprobs      # TRL's line
        assert [next(iter(lp)) for lp in c.logprobs] == full.token_ids
        assert all(isinstance(e, Logprob) and e.rank >= 1 for lp in c.logprobs for e in lp.values())
        assert [len(lp) for lp in c.logprobs] == [max(1, count)] * 3    # greedy: the sampled token is top 1
        assert c.cumulative_logprob == pytest.approx(full.cumulative_logprob)
    with pytest.raises(ValueError, match="count >= 0"):
        SamplingParams(logprobs=-1)
    with pytest.raises(TypeError, match="logprobs must be"):
        SamplingParams(logprobs="yes")
    assert len(llm.generate("hi", SamplingParams(max_tokens=2))) == 1
    assert llm.generate([], SamplingParams()) == []
    assert len(llm.generate(["ab", "cd"], SamplingParams(max_tokens=2), use_tqdm=True)) == 2


def test_vllm_prompt_forms(llm):
    """vLLM's prompt dicts ({'prompt_token_ids': ...}, {'prompt': ...}, both: the ids win) and NumPy
    token ids give the same outputs as plain prompts; anything else in a dict is refused."""
    import numpy as np

    sp = SamplingParams(max_tokens=5, **GREEDY)
    ids = _prompt(7)
    text = "the quick brown fox"
    want_ids = llm.generate([ids], sp)[0].outputs[0].token_ids
    want_text = llm.generate([text], sp)[0].outputs[0].token_ids
    outs = llm.generate(prompts=[{"prompt_token_ids": ids}, {"prompt": text}, {"prompt_token_ids": ids, "prompt": "x"},
                                 list(np.array(ids))], sampling_params=sp)
    assert [o.outputs[0].token_ids for o in outs] == [want_ids, want_text, want_ids, want_ids]
    assert [o.prompt for o in outs] == [None, text, "x", None]
    assert outs[0].prompt_token_ids == ids and outs[3].prompt_token_ids == ids
    assert llm.generate({"prompt_token_ids": ids}, sp)[0].outputs[0].token_ids == want_ids
    for bad, err in (({"prompt_token_ids": ids, "multi_modal_data": {}}, ValueError), ({}, ValueError),
                     ({"prompt": 3}, TypeError), ({"prompt": ""}, ValueError), ({"prompt_token_ids": [1.5]}, TypeError),
                     ({"prompt_token_ids": "text"}, TypeError)):
        with pytest.raises(err, match="prompt 0"):
            llm.generate([bad], sp)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_renders_the_template_then_generates(llm):
    """vLLM's LLM.chat (what TRL calls for conversational prompts): one conversation or a list, the
    rendered text encoded without added special tokens, outputs equal generate on those ids."""
    sp = SamplingParams(max_tokens=6, **GREEDY)
    one = [{"role": "user", "content": "hi there"}]
    two = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
           {"role": "assistant", "content": "It is"}]
    tok = llm.get_tokenizer()
    outs = llm.chat([one, two], sp, chat_template=CHAT_TEMPLATE)
    assert [o.prompt for o in outs] == ["<|user|>hi there\n<|assistant|>",
                                        "<|system|>be brief\n<|user|>2+2?\n<|assistant|>It is\n<|assistant|>"]
    for o in outs:
        ids = tok(o.prompt, add_special_tokens=False).input_ids
        assert o.prompt_token_ids == ids
        assert o.outputs[0].token_ids == llm.generate([ids], sp)[0].outputs[0].token_ids
    single = llm.chat(one, sp, chat_template=CHAT_TEMPLATE)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    cont = llm.chat(two, sp, chat_template=CHAT_TEMPLATE, add_generation_prompt=False, continue_final_message=True)
    assert cont[0].prompt.endswith("It is")
    kept = llm.chat(one, sp, chat_template=CHAT_TEMPLATE, keep=True)[0].outputs[0]
    assert kept.handle is not None
    llm.release(kept.handle)
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat(one, sp)                       # the tiny tokenizer has none
    with pytest.raises(ValueError, match="cannot both"):
        llm.chat(one, sp, chat_template=CHAT_TEMPLATE, continue_final_message=True)
    for bad in ([], "hi", [{"content": "no role"}], [[]], [one, "x"]):
        with pytest.raises(TypeError, match="conversation"):
            llm.chat(bad, sp, chat_template=CHAT_TEMPLATE)


def test_chat_without_a_tokenizer_says_so(make_tiny_model, tmp_path):
    with pytest.warns(UserWarning, match="no tokenizer"):
        bare = LLM(make_tiny_model(tmp_path, "llama", with_tokenizer=False), num_blocks=16)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        bare.chat([{"role": "user", "content": "hi"}], chat_template=CHAT_TEMPLATE)


def test_vllm_engine_arguments(tiny_qwen2_dir, tiny_llama_dir, tmp_path):
    """What TRL's colocate mode passes to vLLM's LLM() is accepted where it describes this engine,
    refused with what is supported otherwise; tokenizer= loads another folder's tokenizer."""
    sp = SamplingParams(max_tokens=4, **GREEDY)
    want = LLM(tiny_qwen2_dir, num_blocks=32).generate(["hello"], sp)[0].outputs[0].token_ids
    trl = LLM(model=tiny_qwen2_dir, num_blocks=32, tensor_parallel_size=1, gpu_memory_utilization=0.3,
              max_num_seqs=64, max_model_len=256, distributed_executor_backend="external_launcher", seed=0,
              max_num_batched_tokens=1024, enable_sleep_mode=False, model_impl="vllm",
              logprobs_mode="processed_logprobs", trust_remote_code=True, enforce_eager=True, tokenizer=tiny_llama_dir)
    assert trl.generate(["hello"], sp)[0].outputs[0].token_ids == want   # the same tiny tokenizer
    for kwargs, exc, match in ((dict(tensor_parallel_size=2), ValueError, "single-device"),
                               (dict(quantization="bitsandbytes"), ValueError, "accepted: None"),
                               (dict(enable_sleep_mode=1), TypeError, "enable_sleep_mode"),
                               (dict(load_format="pt"), ValueError, "load_format"),
                               (dict(distributed_executor_backend="ray"), ValueError, "external_launcher"),
                               (dict(enforce_eager=1), TypeError, "bool"),
                               (dict(no_such_argument=1), TypeError, "unexpected keyword"),
                               (dict(logprobs_mode="raw_logits"), ValueError, "logits modes"),
                               (dict(tokenizer=str(tmp_path)), FileNotFoundError, "no tokenizer"),
                               (dict(tokenizer=3), TypeError, "folder path"),
                               (dict(max_logprobs=-1), ValueError, "max_logprobs"),
                               (dict(max_num_seqs=0), ValueError, "max_num_seqs")):
        with pytest.raises(exc, match=match):
            LLM(tiny_qwen2_dir, num_blocks=8, **kwargs)


def test_vllm_argument_names(tiny_qwen2_dir):
    """LLM(model=...) as in vLLM (model_dir= and the positional folder still work; both at once or
    neither is refused), and max_tokens=None generates up to max_model_len."""
    a = LLM(model=tiny_qwen2_dir, num_blocks=64, max_model_len=40)
    b = LLM(model_dir=tiny_qwen2_dir, num_blocks=64, max_model_len=40)
    with pytest.raises(ValueError, match="once"):
        LLM(tiny_qwen2_dir, model_dir=tiny_qwen2_dir)
    with pytest.raises(TypeError, match="model folder"):
        LLM()
    sp = SamplingParams(max_tokens=None, **GREEDY)
    outs = [llm.generate([_prompt(3, n=25)], sp)[0].outputs[0] for llm in (a, b)]
    assert outs[0].token_ids == outs[1].token_ids and len(outs[0].token_ids) == 40 - 25
    assert outs[0].finish_reason == "length"


def test_stop_token_ids_and_eos(llm):
    prompt = _prompt(2)
    base = llm.generate([prompt], SamplingParams(max_tokens=30, **GREEDY))[0].outputs[0].token_ids
    stop_tok = base[10]
    first = base.index(stop_tok)
    out = llm.generate([prompt], SamplingParams(max_tokens=30, stop_token_ids=[stop_tok], **GREEDY))[0].outputs[0]
    assert out.token_ids == base[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    # the same token as eos stops unless ignore_eos
    saved = llm.eos_token_ids
    llm._stop.eos = frozenset([stop_tok])
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0))[0].outputs[0]
        assert out.token_ids == base[:first + 1] and out.finish_reason == "stop"
        out = llm.generate([prompt], SamplingParams(max_tokens=30, **GREEDY))[0].outputs[0]
        assert out.token_ids == base
    finally:
        llm._stop.eos = frozenset(saved)


def test_stop_string_truncates_text(llm):
    tok = llm.get_tokenizer()
    prompt = tok("Once upon a time").input_ids
    base = llm.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0]
    text = base.text
    # a printable two-character stop string from the middle of the text
    k = next(i for i in range(8, len(text) - 2) if text[i:i + 2].isprintable() and text[i:i + 2].strip())
    stop = text[k:k + 2]
    out = llm.generate([prompt], SamplingParams(max_tokens=40, stop=[stop, "\x00never"], **GREEDY))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.find(stop)]
    assert out.token_ids == base.token_ids[:len(out.token_ids)] and len(out.token_ids) < 40
    # vLLM's text options: the stop string kept, no text at all
    kept = llm.generate([prompt], SamplingParams(max_tokens=40, stop=[stop], include_stop_str_in_output=True,
                                                 **GREEDY))[0].outputs[0]
    assert kept.text == text[:text.find(stop) + len(stop)] and kept.token_ids == out.token_ids
    bare = llm.generate([prompt], SamplingParams(max_tokens=40, detokenize=False, **GREEDY))[0].outputs[0]
    assert bare.text == "" and bare.token_ids == base.token_ids
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)


def test_skip_special_tokens_false_keeps_them_in_the_text(llm):
    # flat sampling with EOS ignored: some of the 8 samples draw the EOS token mid-output
    tok = llm.get_tokenizer()
    outs = {skip: llm.generate([_prompt(2)], SamplingParams(n=8, temperature=5.0, max_tokens=200, ignore_eos=True,
                                                            seed=1, skip_special_tokens=skip))[0].outputs
            for skip in (True, False)}
    with_eos = [i for i, c in enumerate(outs[True]) if tok.eos_token_id in c.token_ids]
    assert with_eos, "no sample drew EOS: pick another seed"
    for i in with_eos:
        a, b = outs[True][i], outs[False][i]
        assert a.token_ids == b.token_ids
        assert tok.eos_token not in a.text and tok.eos_token in b.text
        assert b.text == tok.decode(b.token_ids, skip_special_tokens=False)


def test_seeded_sampling_is_batch_invariant_and_engine_seed_reproducible(llm, tiny_qwen2_dir):
    sp = SamplingParams(n=3, temperature=1.0, top_p=0.95, min_p=0.01, max_tokens=12, seed=42)
    alone = llm.generate([_prompt(3)], sp)[0]
    mixed = llm.generate([_prompt(4, 33), _prompt(3), _prompt(5, 7)],
                         [SamplingParams(n=2, max_tokens=20), sp, SamplingParams(temperature=0.5, max_tokens=4)])[1]
    for x, y in zip(alone.outputs, mixed.outputs, strict=True):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-5)
    # unseeded requests draw their seed from LLM(seed=...)
    a = LLM(tiny_qwen2_dir, num_blocks=64, seed=7).generate([_prompt(6)], SamplingParams(max_tokens=10))
    b = LLM(tiny_qwen2_dir, num_blocks=64, seed=7).generate([_prompt(6)], SamplingParams(max_tokens=10))
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


@pytest.mark.parametrize("mine,other", [
    (dict(), dict(top_k=5)),                   # untruncated next to top-k
    (dict(min_p=0.05), dict(top_p=0.8)),       # min-p only next to top-p
    (dict(top_k=7), dict()),                   # top-k next to untruncated
    (dict(temperature=0.7), dict(top_k=3, min_p=0.1)),
])
def test_seeded_request_is_batch_invariant_next_to_other_truncations(llm, mine, other):
    """Each row samples by its own knobs: what shares the step never changes its tokens."""
    sp = SamplingParams(**{"temperature": 1.0, **mine}, max_tokens=12, seed=42)
    alone = llm.generate([_prompt(3)], sp)[0].outputs[0]
    mixed = llm.generate([_prompt(4, 33), _prompt(3)],
                         [SamplingParams(**other, max_tokens=12, seed=9), sp])[1].outputs[0]
    assert alone.token_ids == mixed.token_ids
    # the sampler's part is exact; the model's matmuls round differently with the batch size
    torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(mixed.logprobs), rtol=0, atol=1e-5)


def test_shared_seed_differs_per_prompt(llm):
    sp = SamplingParams(seed=5)
    a, b, c = (llm._make_request(0, p, sp, False).seed for p in ([1, 2, 3], [1, 2, 4], [1, 2, 3]))
    assert a == c != b


def test_prefix_cache_reuse_and_stats(llm):
    prompt = _prompt(8, 70)
    llm.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))
    hits0 = llm.kv_stats()["prefix_cache_hit_tokens"]
    out = llm.generate([prompt[:66] + [1, 2]], SamplingParams(max_tokens=2, **GREEDY))[0]
    assert out.num_cached_tokens == 64
    st = llm.kv_stats()
    assert st["prefix_cache_hit_tokens"] - hits0 == 64
    for key in ("total_blocks", "free_blocks", "shared_blocks", "prefix_cache_hit_tokens", "cached_blocks"):
        assert key in st


def test_update_weights_changes_outputs_and_drops_prefix_cache(llm, make_tiny_model, tmp_path):
    other = make_tiny_model(tmp_path / "other", "qwen2", seed=1)
    prompt = _prompt(9, 40)
    sp = SamplingParams(max_tokens=10, **GREEDY)
    before = llm.generate([prompt], sp, keep=True)[0].outputs[0]
    assert llm.kv_stats()["cached_blocks"] > 0
    want = LLM(other, num_blocks=64).generate([prompt], sp)[0].outputs[0].token_ids
    v = llm.weight_version
    llm.update_weights(load_file(os.path.join(other, "model.safetensors")))
    assert llm.weight_version == v + 1
    st = llm.kv_stats()
    assert st["cached_blocks"] == 0          # old-version prefix blocks dropped (the handle keeps its own)
    assert llm.generate([prompt], sp)[0].outputs[0].token_ids == want != before.token_ids
    with pytest.raises(ValueError, match="weight version"):
        llm.fork(before.handle, at=[5])
    llm.release(before.handle)
    with pytest.raises(ValueError, match="unknown parameter"):
        llm.update_weights({"model.nope.weight": torch.zeros(3)})
    with pytest.raises(ValueError):
        llm.update_weights({"model.norm.weight": torch.zeros(3)})


def test_trl_colocate_flow_runs_unchanged(tiny_qwen2_dir, make_tiny_model, tmp_path):
    """TRL's colocate vLLM path, as its code calls vLLM: engine arguments (max_num_seqs=None,
    processed logprobs), SamplingParams with top_k=0, token-id dict prompts, logprobs read back
    sorted by rank, weights pushed one parameter at a time through
    llm_engine.model_executor.driver_worker.model_runner.model.load_weights, then the prefix cache reset."""
    llm = LLM(model=tiny_qwen2_dir, num_blocks=64, tensor_parallel_size=1, gpu_memory_utilization=0.9,
              max_model_len=None, max_num_seqs=None, enable_sleep_mode=False, model_impl="auto",
              distributed_executor_backend="external_launcher", seed=0, max_num_batched_tokens=4096,
              logprobs_mode="processed_logprobs", quantization=None)
    sp = SamplingParams(n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=8,
                        logprobs=0, seed=3)
    assert sp.top_k == -1
    prompts = [_prompt(1), _prompt(2)]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling_params=sp, use_tqdm=False)
    plain = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=1.0, seed=3))
    for o, f in zip(outs, plain):
        c = o.outputs[0]
        ranked = [sorted(lp.items(), key=lambda kv: kv[1].rank) for lp in c.logprobs]     # TRL's extract_logprobs
        assert [r[0][0] for r in ranked] == c.token_ids == f.outputs[0].token_ids
        assert [r[0][1].logprob for r in ranked] == pytest.approx(f.outputs[0].logprobs, abs=1e-5)
    other = make_tiny_model(tmp_path / "other", "qwen2", seed=1)
    greedy = SamplingParams(max_tokens=10, **GREEDY)
    want = LLM(other, num_blocks=64).generate([prompts[0]], greedy)[0].outputs[0].token_ids
    v = llm.weight_version
    for name, tensor in load_file(os.path.join(other, "model.safetensors")).items():
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        assert model.load_weights([(name, tensor)]) == {name}
    llm.reset_prefix_cache()
    assert llm.weight_version > v
    assert llm.generate([prompts[0]], greedy)[0].outputs[0].token_ids == want
    with pytest.raises(AttributeError, match="update_weights"):
        llm.llm_engine.model_executor.scheduler
    with pytest.raises(TypeError, match="name, tensor"):
        llm.llm_engine.model.load_weights([("model.norm.weight", 1, 2)])
    # vLLM's cap on alternatives per token (20 by default), raised per engine
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.generate([prompts[0]], SamplingParams(max_tokens=2, logprobs=21))
    wide = LLM(tiny_qwen2_dir, num_blocks=16, max_logprobs=30)
    assert len(wide.generate([prompts[0]], SamplingParams(max_tokens=1, logprobs=25, **GREEDY))[0]
               .outputs[0].logprobs[0]) == 25


def test_verl_rollout_arguments(tiny_qwen2_dir):
    """What veRL's (synchronous) vLLM rollout passes: engine arguments, skip_tokenizer_init (token ids
    only), generate(..., lora_request=None), logprobs=0 read as lp[token_id].logprob."""
    llm = LLM(model=tiny_qwen2_dir, num_blocks=64, dtype="float32", enable_chunked_prefill=True,
              disable_custom_all_reduce=True, skip_tokenizer_init=True, enable_prefix_caching=True,
              max_num_batched_tokens=512, trust_remote_code=False)
    assert llm.get_tokenizer() is None
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=6, logprobs=0, detokenize=False, seed=2)
    out = llm.generate(prompts=[{"prompt_token_ids": _prompt(4)}], sampling_params=sp, lora_request=None,
                       use_tqdm=False)[0]
    for c in out.outputs:
        assert c.text == "" and len(c.token_ids) == 6
        assert [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] == [
            next(iter(lp.values())).logprob for lp in c.logprobs]
        assert all(next(iter(lp.values())).decoded_token is None for lp in c.logprobs)
    with pytest.raises(ValueError, match="lora_request"):
        llm.generate([_prompt(4)], sp, lora_request=object())
    with pytest.raises(TypeError, match="skip_tokenizer_init"):
        LLM(tiny_qwen2_dir, num_blocks=8, skip_tokenizer_init=1)


@pytest.mark.parametrize("bad, exc, match", [
    ([[]], ValueError, "empty"),
    ([""], ValueError, "empty"),
    ([[1, 2, 10**6]], ValueError, "outside the vocabulary"),
    ([[1, -1]], ValueError, "outside the vocabulary"),
    ([[1, 2.0]], TypeError, "ints"),
    ([None], TypeError, "str or a list of token ids"),
    (42, TypeError, "prompts must be"),
    ([[5] * 600], ValueError, "max_model_len"),
])
def test_bad_prompts_raise_and_engine_keeps_working(llm, bad, exc, match):
    free0 = llm.kv_stats()["free_blocks"] + llm.kv_stats()["cached_blocks"]
    with pytest.raises(exc, match=match):
        llm.generate(bad, SamplingParams(max_tokens=2))
    assert llm.kv_stats()["free_blocks"] + llm.kv_stats()["cached_blocks"] == free0
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2


def test_bad_params_and_handles(llm, tiny_qwen2_dir):
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(TypeError):
        llm.generate([[1]], {"temperature": 0})
    small = LLM(tiny_qwen2_dir, num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="KV blocks"):   # can never fit: refused up front
        small.generate([[1] * 60], SamplingParams(max_tokens=10))
    assert small.generate([[1] * 60], SamplingParams(max_tokens=4))[0].outputs[0].finish_reason == "length"
    with pytest.raises(TypeError):
        llm.release(None)
    h = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), keep=True)[0].outputs[0].handle
    llm.release(h)
    with pytest.raises(ValueError, match="already released"):
        llm.release(h)
    with pytest.raises(ValueError, match="already released"):
        llm.generate([Fork(h, at=1)], SamplingParams(max_tokens=2))


def test_model_folder_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError):
        LLM(str(broken))
    noweights = tmp_path / "noweights"
    shutil.copytree(tiny_llama_dir, noweights)
    os.remove(noweights / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        LLM(str(noweights))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError):
        LLM(str(corrupt))
    with pytest.raises(ValueError, match="block_size"):
        LLM(tiny_llama_dir, block_size=0)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_llama_dir, dtype="int8")
    cfg = json.loads((broken.parent / "noweights" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_generation_reaching_max_model_len_stops_with_length(tiny_qwen2_dir):
    """Sequences (n > 1, a fork of a kept one) that run into max_model_len finish with "length"
    exactly there; a fork prompt that fills max_model_len is refused up front."""
    small = LLM(tiny_qwen2_dir, num_blocks=32, block_size=8, max_model_len=40)
    roomy = LLM(tiny_qwen2_dir, num_blocks=64, block_size=8)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=100, seed=3, ignore_eos=True)
    prompt = _prompt(20, 29)
    outs = small.generate([prompt, prompt[:5]], sp, keep=True)
    ref = roomy.generate([prompt, prompt[:5]], sp)
    for o, r in zip(outs, ref):
        for c, rc in zip(o.outputs, r.outputs, strict=True):
            assert c.finish_reason == "length" and len(o.prompt_token_ids) + len(c.token_ids) == 40
            assert c.token_ids == rc.token_ids[:len(c.token_ids)]
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(rc.logprobs[:len(c.logprobs)]),
                                       rtol=0, atol=1e-5)
    h = outs[0].outputs[1].handle
    assert len(h) == 40
    branch = small.fork(h, at=[35], suffix=[1, 2], params=SamplingParams(max_tokens=50, **GREEDY))[0].outputs[0]
    assert branch.finish_reason == "length" and len(branch.token_ids) == 40 - 37
    with pytest.raises(ValueError, match="max_model_len"):
        small.fork(h, at=[40], params=SamplingParams(max_tokens=1))
    for o in outs:
        for c in o.outputs:
            small.release(c.handle)
    small.reset_prefix_cache()
    assert small.kv_stats()["free_blocks"] == small.kv_stats()["total_blocks"]


@pytest.mark.parametrize("fail_at", [1, 4])
def test_exception_mid_step_frees_the_call_and_keeps_handles(tiny_qwen2_dir, monkeypatch, fail_at):
    """The model raising on the k-th step of a call: the exception reaches the caller, the call's
    blocks are all freed, and earlier handles still hold valid KV (a fork from one equals the
    same prompt computed from scratch by a fresh engine); the engine keeps working."""
    llm = LLM(tiny_qwen2_dir, num_blocks=64, block_size=8)
    scratch = LLM(tiny_qwen2_dir, num_blocks=64, block_size=8, enable_prefix_caching=False)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=9, ignore_eos=True)
    kept = llm.generate([_prompt(30, 21)], sp, keep=True)[0]
    st0 = llm.kv_stats()
    calls = [0]
    execute = llm.runner.execute

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("injected failure")
        return execute(*args, **kwargs)
    monkeypatch.setattr(llm.runner, "execute", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.generate([_prompt(31, 30), Fork(kept.outputs[0].handle, 25, [5, 6])], sp, keep=True)
    monkeypatch.undo()
    st = llm.kv_stats()
    assert st["used_blocks"] == st0["used_blocks"] and st["kept_handles"] == 2
    assert not llm.scheduler.has_unfinished()
    assert set(llm.kv.sequence_ids()) == {c.handle.seq_id for c in kept.outputs}
    full = kept.prompt_token_ids + kept.outputs[1].token_ids
    fork_sp = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=4, ignore_eos=True)
    got = llm.fork(kept.outputs[1].handle, at=[10, 27, len(full)], suffix=[7], params=fork_sp)
    want = scratch.generate([full[:t] + [7] for t in (10, 27, len(full))], fork_sp)
    for o, r in zip(got, want):
        for c, rc in zip(o.outputs, r.outputs, strict=True):
            assert c.token_ids == rc.token_ids
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(rc.logprobs), rtol=0, atol=1e-5)
    for c in kept.outputs:
        llm.release(c.handle)
    llm.reset_prefix_cache()
    assert llm.kv_stats()["free_blocks"] == llm.kv_stats()["total_blocks"]


def test_all_blocks_free_at_the_end(llm):
    llm.reset_prefix_cache()
    st = llm.kv_stats()
    assert st["kept_handles"] == 0 and st["free_blocks"] == st["total_blocks"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _same_outputs(got, ref, prompts, sp):
    ref.reset_prefix_cache()   # both computed from scratch (a prefix-cache hit rounds differently)
    want = ref.generate(prompts, sp)
    for g, w in zip(got, want):
        for a, b in zip(g.outputs, w.outputs):
            assert a.token_ids == b.token_ids
            assert [{t: (x.logprob, x.rank) for t, x in d.items()} for d in a.logprobs] == \
                [{t: (x.logprob, x.rank) for t, x in d.items()} for d in b.logprobs]


def test_verl_rollout_with_dummy_weights_and_sleep_mode(tiny_qwen2_dir, tmp_path):
    """veRL's default rollout: LLM(load_format="dummy", enable_sleep_mode=True), sleep(level=1) at
    once, then each step wake_up(["weights"]), the trainer's weights through
    llm_engine.model_executor.driver_worker.worker.model_runner.model.load_weights,
    wake_up(["kv_cache"]), generate, sleep: outputs equal an engine loaded from the checkpoint, and
    sleep gives the KV cache's memory back: no reference left to its tensors, and the RSS falls by
    (nearly) all of it. Each K/V tensor is 40 MB, above glibc's largest mmap threshold, yet glibc
    serves it from its heap when the heap has that much free (after the earlier tests: 1-2 of the 4
    kept their RSS when freed, CI failed twice); sleep trims the heap, so the drop holds anyway."""
    cfg_only = tmp_path / "cfg_only"      # config and tokenizer, no weights: dummy needs none
    shutil.copytree(tiny_qwen2_dir, cfg_only, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(FileNotFoundError):
        LLM(str(cfg_only), num_blocks=8)
    a = LLM(str(cfg_only), num_blocks=8, load_format="dummy", seed=3)
    b = LLM(str(cfg_only), num_blocks=8, load_format="dummy", seed=3)
    for p, q in zip(a.model.parameters(), b.model.parameters()):     # seeded, small, not left uninitialised
        assert torch.equal(p, q) and 0 < p.abs().max() <= 1e-3
    blocks = 20480
    llm = LLM(str(cfg_only), num_blocks=blocks, load_format="dummy", enable_sleep_mode=True, seed=0,
              tensor_parallel_size=1, distributed_executor_backend="external_launcher", dtype="auto",
              enforce_eager=True, gpu_memory_utilization=0.5, disable_custom_all_reduce=True,
              skip_tokenizer_init=False, max_model_len=256, disable_log_stats=True, max_num_batched_tokens=8192,
              enable_chunked_prefill=True, enable_prefix_caching=True, trust_remote_code=False)
    ref = LLM(tiny_qwen2_dir, num_blocks=64)
    sp = SamplingParams(n=2, logprobs=0, max_tokens=8, temperature=1.0, seed=5, detokenize=False)
    prompts = [{"prompt_token_ids": _prompt(i)} for i in range(3)]
    refs = [weakref.ref(t) for kv in llm.kv_caches for t in kv]
    rss = _rss_bytes()
    llm.sleep(level=1)
    assert all(r() is None for r in refs), "sleep left a reference to a KV cache tensor"
    assert rss - _rss_bytes() > blocks * llm.bytes_per_block * 3 // 4
    assert all(k.numel() == 0 and v.numel() == 0 for k, v in llm.kv_caches)
    weights = load_file(os.path.join(tiny_qwen2_dir, "model.safetensors"))
    for level in (1, 2):
        llm.wake_up(tags=["weights"])
        with pytest.raises(RuntimeError, match="asleep .*kv_cache"):
            llm.generate(prompts, sp)
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        assert model.load_weights(weights.items()) == set(weights)
        llm.wake_up(tags=["kv_cache"])
        _same_outputs(llm.generate(prompts, sp), ref, prompts, sp)
        assert llm.kv_stats()["cached_blocks"] > 0
        llm.sleep(level=level)
        assert llm.kv_stats()["cached_blocks"] == 0 and llm.kv_stats()["free_blocks"] == blocks
    llm.wake_up()
    _same_outputs(llm.generate(prompts, sp), ref, prompts, sp)


def test_sleep_mode_refusals_lose_nothing(tiny_qwen2_dir):
    """sleep()/wake_up() need enable_sleep_mode=True; sleep refuses while a kept handle pins KV
    blocks (the handle still forks as before), and bad levels or tags are refused."""
    off = LLM(tiny_qwen2_dir, num_blocks=16)
    for call in (off.sleep, off.wake_up):
        with pytest.raises(ValueError, match="enable_sleep_mode=True"):
            call()
    llm = LLM(tiny_qwen2_dir, num_blocks=64, enable_sleep_mode=True)
    sp = SamplingParams(max_tokens=6, **GREEDY)
    kept = llm.generate([_prompt(1)], sp, keep=True)[0].outputs[0]
    before = llm.fork(kept.handle, at=[22], params=sp)[0].outputs[0].token_ids
    with pytest.raises(RuntimeError, match="kept handle"):
        llm.sleep()
    assert llm.fork(kept.handle, at=[22], params=sp)[0].outputs[0].token_ids == before
    for level in (0, 3, True, "1"):
        with pytest.raises(ValueError, match="level"):
            llm.sleep(level)
    llm.release(kept.handle)
    llm.sleep(level=2)
    for tags, exc in ((["kv"], ValueError), ("weights", TypeError), ([1], TypeError)):
        with pytest.raises(exc, match="tag"):
            llm.wake_up(tags)
    llm.wake_up()
    llm.wake_up(["kv_cache"])     # awake already: nothing to do
    fresh = LLM(tiny_qwen2_dir, num_blocks=64)
    assert llm.generate([_prompt(1)], sp)[0].outputs[0].token_ids == \
        fresh.generate([_prompt(1)], sp)[0].outputs[0].token_ids


def _same_prompt_logprobs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert list(x) == list(y)
            assert [(v.rank, v.decoded_token) for v in x.values()] == [(v.rank, v.decoded_token) for v in y.values()]
            assert [v.logprob for v in x.values()] == pytest.approx([v.logprob for v in y.values()], abs=1e-5)


def test_prompt_logprobs_api(tiny_qwen2_dir):
    """vLLM's prompt_logprobs: validated like logprobs and refused past max_logprobs; a Fork scores
    its suffix (and the token after the re-fed one) as the same ids as a plain prompt would, its
    reused prefix None; under a pool so small that requests preempt, the values equal a roomy
    engine's; the prompt's blocks still go into the prefix cache for later requests, and
    skip_reading_prefix_cache=False reuses them (vLLM's switch)."""
    roomy = LLM(tiny_qwen2_dir, num_blocks=256)
    sp = SamplingParams(max_tokens=4, prompt_logprobs=2, **GREEDY)
    kept = roomy.generate([_prompt(1)], SamplingParams(max_tokens=6, **GREEDY), keep=True)[0].outputs[0]
    full = list(kept.handle.token_ids)
    suffix = [5, 6, 7]
    forks = roomy.generate([Fork(kept.handle, at=t, suffix=suffix) for t in (1, 10, 24)], sp)
    for t, o in zip((1, 10, 24), forks):
        ids = full[:t] + suffix
        assert o.prompt_token_ids == ids
        plain = roomy.generate([ids], sp)[0].prompt_logprobs
        want = plain if t == 1 else [None] * t + plain[t:]   # at >= 2: the first t tokens are reused
        _same_prompt_logprobs(o.prompt_logprobs, want)
        assert o.outputs[0].token_ids == roomy.generate([ids], sp)[0].outputs[0].token_ids
    roomy.release(kept.handle)
    with pytest.raises(ValueError, match="max_logprobs"):
        roomy.generate([_prompt(1)], SamplingParams(prompt_logprobs=21))
    for bad, exc in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(exc, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(prompt_logprobs=np.int64(1)).prompt_logprobs == 1
    assert roomy.generate([_prompt(1)], SamplingParams(max_tokens=2))[0].prompt_logprobs is None
    prompts = [_prompt(i, 30 + 7 * i) for i in range(4)]
    want = roomy.generate(prompts, sp)
    tight = LLM(tiny_qwen2_dir, num_blocks=12, max_num_seqs=4)
    got = tight.generate(prompts, sp)
    assert tight.kv_stats()["num_preemptions"] > 0
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.prompt_logprobs[0] is None and all(x is not None for x in g.prompt_logprobs[1:])
        _same_prompt_logprobs(g.prompt_logprobs, w.prompt_logprobs)
    hits = roomy.kv_stats()["prefix_cache_hit_tokens"]
    roomy.generate([prompts[3]], SamplingParams(max_tokens=1))
    assert roomy.kv_stats()["prefix_cache_hit_tokens"] > hits
    # vLLM's skip_reading_prefix_cache=False: the cached blocks are reused and only the rest of the
    # prompt is scored (cached positions None); True skips the cache even without prompt logprobs
    reuse = roomy.generate([prompts[3]], SamplingParams(max_tokens=4, prompt_logprobs=2, skip_reading_prefix_cache=False,
                                                        **GREEDY))[0]
    cached = reuse.num_cached_tokens
    assert cached == (len(prompts[3]) - 1) // 16 * 16 > 0
    _same_prompt_logprobs(reuse.prompt_logprobs, [None] * (cached + 1) + want[3].prompt_logprobs[cached + 1:])
    assert reuse.outputs[0].token_ids == want[3].outputs[0].token_ids
    assert roomy.generate([prompts[3]], SamplingParams(max_tokens=1, skip_reading_prefix_cache=True))[0] \
        .num_cached_tokens == 0
    with pytest.raises(TypeError, match="skip_reading_prefix_cache"):
        SamplingParams(skip_reading_prefix_cache="no")
