"""The engine end to end with attention_backend="triton" (kernels under the Triton interpreter on
CPU) equals the torch backend: same greedy tokens, close logprobs — for plain generation (prefill +
decode) and for forks at two points of one trace, whose branches decode through the cascade
kernel with the trace's trunk as a prefix-tree segment.
Kept tiny: the interpreter runs every kernel program in Python.
"""
from __future__ import annotations

import random

import pytest
import torch

from mrt_engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    kw = dict(dtype="float32", num_blocks=64, block_size=16)
    return LLM(tiny_llama_dir, attention_backend="triton", **kw), LLM(tiny_llama_dir, attention_backend="torch", **kw)


def _assert_same(outs_a, outs_b):
    assert len(outs_a) == len(outs_b)
    for a, b in zip(outs_a, outs_b):
        assert len(a.outputs) == len(b.outputs)
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), rtol=0, atol=1e-4)


def test_generate_matches_torch_backend(engines):
    triton_llm, torch_llm = engines
    assert type(triton_llm.model.attn_backend).__name__ == "TritonAttentionBackend"
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (37, 5)]
    _assert_same(triton_llm.generate(prompts, GREEDY), torch_llm.generate(prompts, GREEDY))


def test_forks_decode_through_the_cascade_path_and_match(engines, monkeypatch):
    from mrt_engine.attention import triton_backend as attention_triton

    calls = []
    real = attention_triton.cascade_decode

    def counting(*args, **kwargs):
        calls.append(kwargs["max_group_rows"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_triton, "cascade_decode", counting)
    rng = random.Random(1)
    prompt = [rng.randrange(256) for _ in range(40)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    results = []
    for llm in engines:
        parent = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                              keep=True)[0].outputs[0]
        # 3 branches at tokens 20 and 35 (one and two full shared blocks of the same trace) with a
        # forced 2-token suffix: the trunk block is a tree segment under all 6 branches
        results.append(llm.fork(parent.handle, at=[20, 35], n=3, suffix=[10, 11], params=params))
        llm.release(parent.handle)
    _assert_same(*results)
    assert calls and max(calls) == 6, "the trunk was not read once for both fork groups"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_layer_ops_match_the_cpu_path(tiny_llama_dir, monkeypatch, dtype):
    # the CUDA path's fused RMSNorm / RoPE / SiLU*up kernels, forced onto CPU tensors (interpreter),
    # against the CPU path (C++ ops, which round as the torch path does): same tokens, logprobs
    # equal (bf16) or to float rounding (fp32); and every one of them must actually have run
    from mrt_engine.models import triton_ops

    calls = {"rms_norm": 0, "rope_": 0, "silu_mul": 0}
    for name in calls:
        real = getattr(triton_ops, name)

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)

        monkeypatch.setattr(triton_ops, name, counted)
    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (23, 6)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    kw = dict(dtype=dtype, num_blocks=32, block_size=16, attention_backend="torch")
    want = LLM(tiny_llama_dir, **kw).generate(prompts, params)
    monkeypatch.setattr(triton_ops, "FORCE", True)
    got = LLM(tiny_llama_dir, **kw).generate(prompts, params)
    assert all(n > 0 for n in calls.values()), calls
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # bf16: every rounding where the CPU path rounds, so bit for bit (measured: 0.0 difference)
        tol = 1e-5 if dtype == "float32" else 0.0
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   rtol=0, atol=tol)
