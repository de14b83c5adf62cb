"""Prepacked CPU linear layers: the same results as F.linear, and never stale after a weight update."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mrt_engine import LLM, SamplingParams
from mrt_engine.models import packed_linear
from mrt_engine.models.packed_linear import PackedLinear

pytestmark = pytest.mark.skipif(not packed_linear._AVAILABLE, reason="this torch has no oneDNN linear ops")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 256, 300])
def test_matches_f_linear(dtype, rows):
    torch.manual_seed(rows)
    lin = PackedLinear(96, 40, bias=True, dtype=dtype)
    x = torch.randn(rows, 96).to(dtype)
    out = lin(x)
    assert lin.packed_weight.packed is not None, "the CPU float32/bf16 weight was not packed"
    ref = F.linear(x, lin.weight, lin.bias)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_off_switch_and_other_dtypes(monkeypatch):
    monkeypatch.setenv(packed_linear.ENV, "0")
    lin = PackedLinear(16, 8)
    lin(torch.randn(3, 16))
    assert lin.packed_weight.packed is None
    monkeypatch.delenv(packed_linear.ENV)
    lin64 = PackedLinear(16, 8, dtype=torch.float64)
    torch.testing.assert_close(lin64(torch.randn(3, 16, dtype=torch.float64)).shape, torch.Size([3, 8]))
    assert lin64.packed_weight.packed is None


def test_weight_updates_repack(make_tiny_model, tmp_path):
    """After update_weights the engine computes with the new weights, exactly like an engine loaded
    with them from the start (a stale packed copy would give the old model's logprobs)."""
    a = make_tiny_model(tmp_path / "a", seed=1)
    b = make_tiny_model(tmp_path / "b", seed=2)
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    prompt = [[5, 6, 7, 8, 9]]
    llm = LLM(a, dtype="float32")
    before = llm.generate(prompt, sp)[0].outputs[0]
    llm.update_weights(load_file(os.path.join(b, "model.safetensors")))
    after = llm.generate(prompt, sp)[0].outputs[0]
    fresh = LLM(b, dtype="float32").generate(prompt, sp)[0].outputs[0]
    assert after.token_ids == fresh.token_ids
    torch.testing.assert_close(torch.tensor(after.logprobs), torch.tensor(fresh.logprobs), rtol=0, atol=1e-6)
    assert before.logprobs != after.logprobs
