"""The fused bf16 CPU ops (RMSNorm, SiLU*up) equal the PyTorch op sequences they replace, bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mrt_engine.models import cpu_ops

pytestmark = pytest.mark.skipif(not cpu_ops._ok, reason="needs mrt_engine._C on a CPU with AVX-512F/BW")


@pytest.mark.parametrize("rows,hidden", [(256, 384), (3, 896), (1, 4864), (7, 17), (40, 33)])
def test_rms_norm_is_transformers_arithmetic(rows, hidden):
    torch.manual_seed(rows + hidden)
    x = (torch.randn(rows, 2 * hidden) * 3).bfloat16()[:, :hidden]   # strided rows
    w = torch.randn(hidden).bfloat16()
    xf = x.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(cpu_ops.rms_norm_bf16(x, w, 1e-6), ref)


@pytest.mark.parametrize("rows,n", [(256, 1024), (2, 4864), (5, 23)])
def test_silu_mul_is_the_pytorch_sequence(rows, n):
    torch.manual_seed(rows * n)
    gate_up = (torch.randn(rows, 2 * n) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(cpu_ops.silu_mul_bf16(gate_up), F.silu(gate) * up)


def test_bad_input_is_a_clear_error():
    x = torch.randn(4, 8).bfloat16()
    with pytest.raises(ValueError, match="rms_norm_bf16 expects"):
        cpu_ops.rms_norm_bf16(x.float(), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="rms_norm_bf16 expects"):
        cpu_ops.rms_norm_bf16(x, torch.ones(7).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="silu_mul_bf16 expects"):
        cpu_ops.silu_mul_bf16(torch.randn(4, 7).bfloat16())
    with pytest.raises(ValueError, match="silu_mul_bf16 expects"):
        cpu_ops.silu_mul_bf16(x.t())


def test_the_model_uses_them_only_for_bf16(monkeypatch):
    assert cpu_ops.usable(torch.zeros(2, 16, dtype=torch.bfloat16))
    assert not cpu_ops.usable(torch.zeros(2, 16))
    monkeypatch.setenv(cpu_ops.ENV, "0")
    assert not cpu_ops.usable(torch.zeros(2, 16, dtype=torch.bfloat16))
