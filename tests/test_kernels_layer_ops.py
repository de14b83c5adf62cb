"""The decoder layer's fused elementwise kernels (rms_norm, silu_mul, rope_) vs their torch twins
(kernels/reference.py, the engine's torch path), under the Triton interpreter.

The twins round where torch's ops round, and so do the kernels: fp32 agrees to float rounding,
16-bit results are equal element for element except where the fp32 arithmetic inside differs in
its last bit (a different summation order, exp or rsqrt) and the 16-bit rounding falls the other
way: at most one unit in the last place, and rarely. A kernel with the wrong rounding order
(the weight applied before the cast, say) fails the bit-equal share by a wide margin.
"""
from __future__ import annotations

from kernels_helpers import assert_rounds_like_torch as _same  # (interpreter switch first)
import pytest
import torch

from mrt_engine.kernels import reference as ref
from mrt_engine.kernels.rms_norm import rms_norm
from mrt_engine.kernels.rope import rope_
from mrt_engine.kernels.silu_mul import silu_mul

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, BF16, F16]
IDS = ["fp32", "bf16", "fp16"]


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,h", [(1, 64), (7, 896), (5, 1000), (3, 4096)])
def test_rms_norm(n, h, dtype):
    x = _randn(n, h, dtype=dtype, seed=h, scale=3.0)
    w = _randn(h, dtype=dtype, seed=h + 1)
    got = rms_norm(x, w, 1e-6)
    _same(got, ref.rms_norm(x, w, 1e-6), dtype)


def test_rms_norm_strided_rows_and_out():
    x = _randn(6, 1200, dtype=BF16, seed=1)[:, :1000]          # row stride 1200
    w = _randn(1000, dtype=BF16, seed=2)
    out = torch.full((6, 1000), float("nan"), dtype=BF16)
    assert rms_norm(x, w, 1e-5, out=out) is out
    _same(out, ref.rms_norm(x, w, 1e-5), BF16)
    assert rms_norm(x[:0], w, 1e-5).shape == (0, 1000)


def test_rms_norm_rounds_like_transformers():
    # the weight applies after the cast to bf16: a kernel scaling in fp32 first differs in ~a third
    # of the elements, which _same's bit-equal share catches (checked here against that variant)
    x, w = _randn(8, 896, dtype=BF16, seed=3, scale=2.0), _randn(896, dtype=BF16, seed=4)
    fp32_first = torch.nn.functional.rms_norm(x.float(), (896,), w.float(), 1e-6).to(BF16)
    assert (fp32_first == ref.rms_norm(x, w, 1e-6)).float().mean() < 0.9
    _same(rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), BF16)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,i", [(1, 16), (5, 1000), (3, 2500)])
def test_silu_mul(n, i, dtype):
    gate_up = _randn(n, 2 * i, dtype=dtype, seed=i, scale=4.0)
    out = torch.full((n, i), float("nan"), dtype=dtype)
    assert silu_mul(gate_up, out=out) is out
    _same(out, ref.silu_mul(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,hq,hkv,dh", [(1, 4, 2, 64), (5, 14, 2, 64), (3, 32, 8, 128), (4, 3, 1, 80)])
def test_rope_in_place_on_the_qkv_slice(n, hq, hkv, dh, dtype):
    # as the model calls it: the q|k heads of the fused qkv output, v after them untouched
    qkv = _randn(n, (hq + 2 * hkv) * dh, dtype=dtype, seed=dh + n, scale=2.0)
    qk = qkv[:, :(hq + hkv) * dh].view(n, hq + hkv, dh)
    angles = torch.arange(n, dtype=F32)[:, None] * 0.37 * torch.arange(1, dh // 2 + 1, dtype=F32)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
    want = ref.rope_(qk.clone(), cos, sin)
    v_before = qkv[:, (hq + hkv) * dh:].clone()
    assert rope_(qk, cos, sin) is qk
    _same(qk, want, dtype, min_equal=1.0 if dtype != F32 else 0.0)   # products and sum: no inner arithmetic
    assert torch.equal(qkv[:, (hq + hkv) * dh:], v_before)


def test_bad_inputs_say_what_was_expected():
    x, w = _randn(2, 64, dtype=BF16, seed=0), _randn(64, dtype=BF16, seed=1)
    with pytest.raises(ValueError, match=r"weight must be a contiguous \[64\]"):
        rms_norm(x, w[:32], 1e-6)
    with pytest.raises(TypeError, match="weight must have dtype"):
        rms_norm(x, w.float(), 1e-6)
    with pytest.raises(ValueError, match=r"out must be \[2, 64\]"):
        rms_norm(x, w, 1e-6, out=torch.empty(2, 32, dtype=BF16))
    with pytest.raises(ValueError, match="odd width"):
        silu_mul(_randn(2, 7, dtype=BF16, seed=2))
    with pytest.raises(ValueError, match="even head_dim"):
        rope_(_randn(2, 3, 5, dtype=BF16, seed=3), _randn(2, 1, 5, dtype=BF16, seed=4), _randn(2, 1, 5, dtype=BF16, seed=5))
    with pytest.raises(ValueError, match=r"cos must be \[2, 1, 8\]"):
        rope_(_randn(2, 3, 8, dtype=BF16, seed=3), _randn(2, 8, dtype=BF16, seed=4)[:, None, :4], _randn(2, 1, 8, dtype=BF16, seed=5))
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        silu_mul(_randn(8, 4, dtype=BF16, seed=6).t())
