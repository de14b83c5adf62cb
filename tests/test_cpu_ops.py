"""The fused CPU ops (RMSNorm, SiLU*up, RoPE) equal the PyTorch op sequences they replace: bit for bit
in bf16 (and RoPE in float32), to rounding for the float32 RMSNorm."""
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
    assert torch.equal(cpu_ops.rms_norm(x, w, 1e-6), ref)


@pytest.mark.parametrize("rows,n", [(256, 1024), (2, 4864), (5, 23)])
def test_silu_mul_is_the_pytorch_sequence(rows, n):
    torch.manual_seed(rows * n)
    gate_up = (torch.randn(rows, 2 * n) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(cpu_ops.silu_mul_bf16(gate_up), F.silu(gate) * up)


def test_bad_input_is_a_clear_error():
    x = torch.randn(4, 8).bfloat16()
    with pytest.raises(ValueError, match="rms_norm expects"):
        cpu_ops.rms_norm(x.float(), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="rms_norm expects"):
        cpu_ops.rms_norm(x, torch.ones(7).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="rms_norm expects"):
        cpu_ops.rms_norm(x.double(), torch.ones(8).double(), 1e-6)
    with pytest.raises(ValueError, match="silu_mul_bf16 expects"):
        cpu_ops.silu_mul_bf16(torch.randn(4, 7).bfloat16())
    with pytest.raises(ValueError, match="silu_mul_bf16 expects"):
        cpu_ops.silu_mul_bf16(x.t())


def test_which_dtypes_use_them_and_the_switch(monkeypatch):
    assert cpu_ops.usable(torch.zeros(2, 16, dtype=torch.bfloat16))
    assert not cpu_ops.usable(torch.zeros(2, 16))
    assert cpu_ops.usable(torch.zeros(2, 16), torch.float32)
    assert not cpu_ops.usable(torch.zeros(2, 16, dtype=torch.bfloat16), torch.float32)
    assert not cpu_ops.usable(torch.zeros(16, 2).t(), torch.float32)
    monkeypatch.setenv(cpu_ops.ENV, "0")
    assert not cpu_ops.usable(torch.zeros(2, 16, dtype=torch.bfloat16))
    assert not cpu_ops.usable(torch.zeros(2, 16), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,heads,dh", [(256, 8, 64), (3, 16, 64), (5, 3, 128), (1, 2, 32)])
def test_rope_is_apply_rope_bit_for_bit(dtype, rows, heads, dh):
    from mrt_engine.models.rope import apply_rope

    torch.manual_seed(rows * heads)
    qkv = (torch.randn(rows, (heads + 3) * dh) * 3).to(dtype)        # q|k heads, then 3 more: strided rows
    x = qkv[:, :heads * dh].view(rows, heads, dh)
    ang = torch.randn(rows, 1, dh) * 5
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    assert cpu_ops.rope_usable(x, cos)
    assert torch.equal(cpu_ops.rope(x, cos, sin), apply_rope(x, cos, sin))


def test_rope_bad_input():
    x = torch.randn(2, 4, 64)
    cos = torch.randn(2, 1, 64)
    with pytest.raises(ValueError, match="rope expects"):
        cpu_ops.rope(x, cos, torch.randn(2, 1, 32))
    with pytest.raises(ValueError, match="rope expects"):
        cpu_ops.rope(torch.randn(2, 4, 48), torch.randn(2, 1, 48), torch.randn(2, 1, 48))
    with pytest.raises(ValueError, match="rope expects"):
        cpu_ops.rope(x.double(), cos.double(), cos.double())


@pytest.mark.parametrize("rows,hidden", [(256, 384), (3, 896), (7, 17), (40, 33)])
def test_rms_norm_f32_is_pytorch_to_rounding(rows, hidden):
    torch.manual_seed(rows * hidden)
    x = (torch.randn(rows, 2 * hidden) * 3)[:, :hidden]   # strided rows
    w = torch.randn(hidden)
    ref = w * (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6))
    out = cpu_ops.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out.double(), ref, rtol=3e-7, atol=1e-7)
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x, (hidden,), w, 1e-6), rtol=3e-7, atol=1e-7)
    with pytest.raises(ValueError, match="rms_norm expects"):
        cpu_ops.rms_norm(x, w.double(), 1e-6)
