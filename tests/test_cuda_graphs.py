"""Piecewise decode graphs (mrt_engine/models/cuda_graphs.py) without a GPU: MRT_CUDA_GRAPHS=eager
runs exactly the pieces a capture would record (padding rows up to the bucket, static buffers,
attention eager between pieces), so what CUDA adds is only record and replay, checked by
tests/test_engine_gpu.py on a GPU. Outputs must equal the plain forward's.
"""
from __future__ import annotations

import random

import pytest
import torch

from mrt_engine import LLM, Fork, SamplingParams
from mrt_engine.models import cuda_graphs


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    # three layers: a middle piece whose residual comes from the piece before it, not from piece 0
    from conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("three_layers"), "llama", num_layers=3)


def _engine(path, monkeypatch, mode, **kw):
    if mode is None:
        monkeypatch.delenv(cuda_graphs.ENV, raising=False)
    else:
        monkeypatch.setenv(cuda_graphs.ENV, mode)
    return LLM(path, num_blocks=kw.pop("num_blocks", 96), block_size=16, **kw)


def _same(outs_a, outs_b, atol):
    assert len(outs_a) == len(outs_b)
    for a, b in zip(outs_a, outs_b):
        assert len(a.outputs) == len(b.outputs)
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eager_pieces_equal_the_plain_forward(three_layers, monkeypatch, dtype):
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (23, 6, 40)]   # 3 rows: bucket 4
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(n=3, temperature=1.0, max_tokens=5, ignore_eos=True, seed=7)
    plain = _engine(three_layers, monkeypatch, None, dtype=dtype)
    pieces = _engine(three_layers, monkeypatch, "eager", dtype=dtype)
    assert plain.runner.graphs is None and pieces.runner.graphs.mode == "eager"
    # padding rows change the GEMMs' row count: float32 library GEMMs may round a row differently
    atol = 1e-5 if dtype == "float32" else 0.0
    _same(pieces.generate(prompts, greedy), plain.generate(prompts, greedy), atol)
    _same(pieces.generate(prompts, sampled), plain.generate(prompts, sampled), atol)
    assert pieces.runner.graphs.replays > 0 and set(pieces.runner.graphs.buckets) >= {4}


def test_forks_through_the_pieces_match(three_layers, monkeypatch):
    # the fork phase: 2 points x 5 branches = 10 decode rows (bucket 16) sharing a trunk
    rng = random.Random(1)
    prompt = [rng.randrange(256) for _ in range(45)]
    results = []
    for mode in (None, "eager"):
        llm = _engine(three_layers, monkeypatch, mode, dtype="float32")
        parent = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                              keep=True)[0].outputs[0]
        outs = llm.generate([Fork(parent.handle, at=t, suffix=[5, 6]) for t in (20, 38)],
                            SamplingParams(n=5, temperature=1.0, max_tokens=4, ignore_eos=True, seed=3))
        llm.release(parent.handle)
        results.append(outs)
        if mode:
            assert 16 in llm.runner.graphs.buckets
    _same(results[1], results[0], 1e-5)


def test_triton_backend_writes_into_the_static_buffer(three_layers, monkeypatch):
    # the CUDA path's attention (interpreter here) takes out= instead of a copy
    from mrt_engine.attention import triton_backend

    seen = []
    real = triton_backend.TritonAttentionBackend.forward

    def spy(self, *args, out=None, **kw):
        seen.append(out is not None)
        return real(self, *args, out=out, **kw)

    monkeypatch.setattr(triton_backend.TritonAttentionBackend, "forward", spy)
    prompts = [[3, 4, 5, 6, 7], [9, 8, 7]]
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    want = _engine(three_layers, monkeypatch, None, dtype="float32", attention_backend="triton").generate(prompts, sp)
    seen.clear()
    got = _engine(three_layers, monkeypatch, "eager", dtype="float32", attention_backend="triton").generate(prompts, sp)
    assert any(seen) and not all(seen)   # decode steps through the pieces, the prefill step plain
    _same(got, want, 1e-5)


def test_bad_out_is_rejected():
    from mrt_engine.attention.triton_backend import TritonAttentionBackend

    q = torch.zeros(2, 4, 16)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(2, 4, 16\)"):
        TritonAttentionBackend().forward(q, q[:, :2], q[:, :2], torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16),
                                         _meta(), 1.0, out=torch.zeros(2, 4, 8))


def _meta():
    from mrt_engine.attention.metadata import AttentionMetadata

    return AttentionMetadata(slot_mapping=torch.tensor([0, 1]), positions=torch.tensor([0, 1]), num_prefill_tokens=0)


def test_modes_buckets_and_misuse(three_layers, monkeypatch):
    for raw, mode in (("1", "capture"), ("eager", "eager"), ("EAGER ", "eager"), ("0", None), ("yes", None)):
        monkeypatch.setenv(cuda_graphs.ENV, raw)
        assert cuda_graphs.mode_from_env() == mode
    assert [cuda_graphs.bucket_of(n) for n in (1, 2, 3, 4, 5, 256, 257)] == [1, 2, 4, 4, 8, 256, 512]
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        llm = _engine(three_layers, monkeypatch, "1", dtype="float32")
    assert llm.runner.graphs is None
    with pytest.raises(ValueError, match="need a CUDA model"):
        cuda_graphs.PiecewiseDecode(llm.model, "capture")
    with pytest.raises(ValueError, match="mode must be"):
        cuda_graphs.PiecewiseDecode(llm.model, "fast")
