"""benchmarks/bench_torch_compile.py compares the engine's eager layer halves with plain-PyTorch
rewrites under torch.compile: the rewrites must compute the same layer (checked here uncompiled,
in float32 and bfloat16, on Llama and Qwen2), or the benchmark would time a different model."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_torch_compile as btc  # noqa: E402

from mrt_engine.models import load_model  # noqa: E402


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewritten_halves_compute_the_engine_layer(make_tiny_model, tmp_path, kind, dtype):
    model, _ = load_model(make_tiny_model(tmp_path, kind), dtype=dtype)
    torch.manual_seed(0)
    n = 13
    h = torch.randn(n, model.hidden_size, dtype=dtype)
    cos, sin = model.rope.cos_sin(torch.arange(n) * 3, dtype)
    o = torch.randn(n, model.num_heads, model.head_dim, dtype=dtype)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    for layer in model.layers:
        for got, want in zip(btc.PreAttention(layer)(h, cos, sin), layer.pre_attention(h, cos, sin)):
            torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(btc.PostAttention(layer)(o, h), layer.post_attention(o, h), **tol)
