"""Deterministic mode's GEMMs (kernels/matmul.py, under the Triton interpreter): a row's result
does not depend on the rows beside it, and the engine routes every layer GEMM and the LM head
through it when its attention backend is deterministic.

On the first lent H200 a branch's logprobs alone vs in a batch differed by 2.9e-6 in deterministic
mode: the attention was batch-invariant, the library GEMMs were not. On this CPU the same holds for
oneDNN in float32 at hidden sizes from ~900 (seen in the contrast below when it shows).
"""
from __future__ import annotations

import random

import kernels_helpers  # noqa: F401  (interpreter switch, before triton is imported)
import pytest
import torch
import torch.nn.functional as F

from mrt_engine.kernels import reference as ref
from mrt_engine.kernels.matmul import matmul

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m,k,n,bias", [(1, 64, 64, False), (70, 130, 90, True), (5, 17, 200, True), (129, 256, 3, False)])
def test_matmul_matches_the_reference(m, k, n, bias, dtype):
    x, w = _randn(m, k, dtype=dtype, seed=k), _randn(n, k, dtype=dtype, seed=n)
    b = _randn(n, dtype=dtype, seed=1) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    assert matmul(x, w, b, out=out) is out
    want = ref.matmul(x, w, b)
    assert not torch.isnan(out).any()
    # fp32 sums in another order than float64; 16-bit: fp32 accumulation, one rounding at the end
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == F32 else dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-2)
    torch.testing.assert_close(out.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_rows_do_not_depend_on_the_batch(dtype):
    m, k, n = 150, 900, 300            # K with a tail, M over two and a bit tiles
    x, w, b = _randn(m, k, dtype=dtype, seed=3), _randn(n, k, dtype=dtype, seed=4), _randn(n, dtype=dtype, seed=5)
    full = matmul(x, w, b)
    for lo, hi in ((0, 1), (5, 6), (62, 67), (127, 129), (149, 150), (10, 140)):
        part = matmul(x[lo:hi].contiguous(), w, b)
        assert torch.equal(part, full[lo:hi]), f"rows {lo}:{hi} alone differ from the same rows in the batch"
    # the same rows inside another batch (other rows around them, other tile positions)
    mixed = torch.cat([_randn(37, k, dtype=dtype, seed=6), x[60:70]])
    assert torch.equal(matmul(mixed, w, b)[37:], full[60:70])


def test_the_library_gemm_contrast():
    # what the kernel is for, shown where it shows: oneDNN float32 rounds a row alone differently
    x, w = _randn(64, 896, dtype=F32, seed=7), _randn(1152, 896, dtype=F32, seed=8)
    if torch.equal(F.linear(x[:1], w), F.linear(x, w)[:1]):
        pytest.skip("this build's F.linear happens to be batch-invariant at this shape: nothing to contrast")
    assert torch.equal(matmul(x[:1].contiguous(), w), matmul(x, w)[:1])


def test_edge_shapes_and_bad_inputs():
    w, b = _randn(8, 5, dtype=F32, seed=0), _randn(8, dtype=F32, seed=1)
    assert matmul(torch.empty(0, 5), w).shape == (0, 8)
    torch.testing.assert_close(matmul(torch.empty(3, 0), torch.empty(8, 0), b), b.expand(3, 8))
    assert torch.equal(matmul(torch.empty(3, 0), torch.empty(8, 0)), torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"weight must be \[N, 4\]"):
        matmul(torch.ones(2, 4), w)
    with pytest.raises(TypeError, match="weight must have dtype"):
        matmul(torch.ones(2, 5, dtype=BF16), w)
    with pytest.raises(ValueError, match=r"bias must be a contiguous \[8\]"):
        matmul(torch.ones(2, 5), w, b[:4])
    with pytest.raises(ValueError, match=r"out must be \[2, 8\]"):
        matmul(torch.ones(2, 5), w, out=torch.empty(2, 7))
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        matmul(torch.ones(5, 2).t(), w)


@pytest.fixture
def deterministic(monkeypatch):
    from mrt_engine.attention.triton_backend import DETERMINISTIC_ENV

    monkeypatch.setenv(DETERMINISTIC_ENV, "1")


def _spy(monkeypatch):
    from mrt_engine.models import triton_ops

    calls = []
    real = triton_ops.batch_invariant_linear

    def spy(x, weight, bias=None, out=None):
        calls.append(tuple(weight.shape))
        return real(x, weight, bias, out=out)

    monkeypatch.setattr(triton_ops, "batch_invariant_linear", spy)
    return calls


def test_deterministic_engine_gemms_are_batch_invariant(tiny_llama_dir, deterministic, monkeypatch):
    from mrt_engine import LLM, SamplingParams

    calls = _spy(monkeypatch)
    llm = LLM(tiny_llama_dir, dtype="float32", attention_backend="triton", num_blocks=64, block_size=16)
    assert llm.model.attn_backend.deterministic and llm.model.batch_invariant
    rng = random.Random(0)
    others = [[rng.randrange(256) for _ in range(rng.randrange(10, 40))] for _ in range(5)]
    target = [rng.randrange(256) for _ in range(21)]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    alone = llm.generate([target], sp)[0].outputs[0]
    batched = llm.generate(others[:2] + [target] + others[2:], sp)[2].outputs[0]
    assert alone.token_ids == batched.token_ids and alone.logprobs == batched.logprobs
    # every layer's four GEMMs and the LM head went through the fixed-tile kernel
    spec = llm.model.spec
    shapes = set(calls)
    assert (spec.vocab_size, spec.hidden_size) in shapes
    assert (2 * spec.intermediate_size, spec.hidden_size) in shapes and (spec.hidden_size, spec.intermediate_size) in shapes
    assert len(calls) % (4 * spec.num_layers + 1) == 0


def test_default_mode_keeps_the_library_gemms(tiny_llama_dir, monkeypatch):
    from mrt_engine import LLM, SamplingParams
    from mrt_engine.attention.triton_backend import DETERMINISTIC_ENV

    monkeypatch.delenv(DETERMINISTIC_ENV, raising=False)
    calls = _spy(monkeypatch)
    llm = LLM(tiny_llama_dir, dtype="float32", attention_backend="triton", num_blocks=64, block_size=16)
    assert not llm.model.batch_invariant
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert calls == []


def test_deterministic_argument(tiny_llama_dir, monkeypatch):
    # LLM(deterministic=True) without the environment variable; the torch backend refuses it with
    # what to do instead; a non-bool is a clear error; False overrides the environment
    from mrt_engine import LLM, SamplingParams
    from mrt_engine.attention.triton_backend import DETERMINISTIC_ENV

    monkeypatch.delenv(DETERMINISTIC_ENV, raising=False)
    calls = _spy(monkeypatch)
    llm = LLM(tiny_llama_dir, dtype="float32", attention_backend="triton", num_blocks=64, deterministic=True)
    assert llm.model.attn_backend.deterministic and llm.model.batch_invariant
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert calls
    with pytest.raises(ValueError, match="deterministic=True needs the Triton attention backend"):
        LLM(tiny_llama_dir, dtype="float32", attention_backend="torch", deterministic=True)
    with pytest.raises(TypeError, match="deterministic must be a bool or None"):
        LLM(tiny_llama_dir, dtype="float32", deterministic="yes")
    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    assert not LLM(tiny_llama_dir, dtype="float32", attention_backend="triton", num_blocks=64,
                   deterministic=False).model.batch_invariant
