"""Our float32 CPU GEMM (csrc/cpu_gemm.cpp), its fused SiLU*up and residual add: against a float64
reference at odd shapes, a row's result independent of the batch and the thread count, and the layers / LM head /
gated MLP of a float32 model using it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gemm_helpers import assert_rows_independent_of_batch_and_threads

from mrt_engine.models import packed_linear
from mrt_engine.models.packed_linear import Fp32Panels, PackedLinear, gemm_f32

pytestmark = pytest.mark.skipif(not packed_linear._GEMM_F32_OK, reason="no AVX-512F or no extension")


def _check(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> None:
    """float32 accumulation-order error only: well inside 1e-6 of the sum of |products|."""
    err = (out.double() - ref).abs()
    bound = 1e-6 * scale + 1e-6 * ref.abs() + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def _case(m, k, n, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


# row tails of 1-3, k across the 448-value pass (900, 2000), panels of 16-96 columns and many panels
@pytest.mark.parametrize("m,k,n", [(1, 1, 16), (3, 30, 80), (4, 64, 96), (5, 898, 112), (17, 2000, 208),
                                   (130, 96, 16), (257, 900, 192), (300, 64, 1040)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(m, k, n, bias):
    x, w, b = _case(m, k, n, m * 1000 + k + n, bias)
    out = gemm_f32(x, Fp32Panels(w), b)
    assert out.shape == (m, n) and out.dtype == torch.float32
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    _check(out, ref, x.double().abs() @ w.double().abs().t() + (b.double().abs() if bias else 0))


@pytest.mark.parametrize("m,k,i", [(1, 8, 16), (3, 384, 1024), (7, 1000, 80), (64, 64, 48), (257, 900, 4864)])
@pytest.mark.parametrize("bias", [False, True])
def test_silu_mul_epilogue(m, k, i, bias):
    """gate|up [2I, k] packed in pairs: silu(gate) * up [m, I], every panel shape (I % 48 = 0, 16, 32)."""
    x, w, b = _case(m, k, 2 * i, m + k + i, bias)
    lin = PackedLinear(k, 2 * i, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(b)
    out = lin.silu_mul(x)
    assert out.shape == (m, i) and isinstance(lin.glu_weight.packed, Fp32Panels) and lin.glu_weight.packed.glu
    gu = x.double() @ w.double().t() + (b.double() if bias else 0)
    scale = x.double().abs() @ w.double().abs().t() + (b.double().abs() if bias else 0)
    (gate, up), (sg, su) = gu.chunk(2, dim=-1), scale.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    # each of gate and up off by float32 accumulation (1e-6 of its |products|), |silu'| <= 1.1
    err = (out.double() - ref).abs()
    bound = 1e-6 * (1.1 * up.abs() * sg + F.silu(gate).abs() * su) + 1e-6 * ref.abs() + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def test_silu_mul_follows_a_changed_bias():
    """The gate/up bias is permuted into the packed order once and reused: a bias changed in place,
    or replaced, must still reach the next product."""
    x, w, b = _case(5, 64, 96, 7, bias=True)
    lin = PackedLinear(64, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)

    def ref():
        gate, up = (x.double() @ w.double().t() + lin.bias.double()).chunk(2, dim=-1)
        return F.silu(gate) * up

    first = lin.silu_mul(x)
    assert torch.allclose(first.double(), ref(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        lin.bias.add_(0.5)
    assert torch.allclose(lin.silu_mul(x).double(), ref(), rtol=1e-5, atol=1e-5)
    lin.bias = torch.nn.Parameter(torch.randn(96), requires_grad=False)
    assert torch.allclose(lin.silu_mul(x).double(), ref(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lin.silu_mul(x), first)


@pytest.mark.parametrize("m,k,n", [(1, 8, 16), (5, 898, 112), (130, 96, 384), (257, 1024, 96)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_residual_epilogue(m, k, n, bias, in_place):
    """residual + x . w^T (+ bias), the sums started from the residual: into a fresh tensor or into
    the residual itself (k over several passes included), and through PackedLinear.add_to."""
    x, w, b = _case(m, k, n, m + k + n, bias)
    res = torch.randn(m, n, generator=torch.Generator().manual_seed(7))
    ref = x.double() @ w.double().t() + (b.double() if bias else 0) + res.double()
    scale = x.double().abs() @ w.double().abs().t() + (b.double().abs() if bias else 0) + res.double().abs()
    r = res.clone()
    out = gemm_f32(x, Fp32Panels(w), b, out=r if in_place else None, residual=r)
    assert (out.data_ptr() == r.data_ptr()) == in_place
    _check(out, ref, scale)
    if not in_place:
        assert torch.equal(r, res), "the residual was written"
    lin = PackedLinear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(b)
    _check(lin.add_to(x, res), ref, scale)
    assert lin.add_to(x.bfloat16(), res) is None and lin.add_to(x, res[:, :-1]) is None


def test_strided_rows_out_buffer_and_leading_dims():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(40, 200, generator=g)
    x = wide[:, 4:134]                                     # lda 200, k 130
    w = torch.randn(48, 130, generator=g)
    p = Fp32Panels(w)
    buf = torch.full((40, 70), 7.0)
    out = buf[:, 10:58]
    assert gemm_f32(x, p, out=out).data_ptr() == out.data_ptr()
    ref = x.double() @ w.double().t()
    _check(out, ref, x.double().abs() @ w.double().abs().t())
    assert bool((buf[:, :10] == 7).all()) and bool((buf[:, 58:] == 7).all()), "wrote outside out"
    x3 = torch.randn(2, 5, 130, generator=g)
    torch.testing.assert_close(gemm_f32(x3, p), (x3.reshape(10, 130) @ w.t()).view(2, 5, 48), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("glu", [False, True])
def test_a_row_does_not_depend_on_the_batch_or_threads(glu):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 896, generator=g)
    w = torch.randn(1152, 896, generator=g) * 0.05
    assert_rows_independent_of_batch_and_threads(gemm_f32, x, Fp32Panels(w, glu=glu))


def test_bad_input_is_a_clear_error():
    p = Fp32Panels(torch.randn(32, 64))
    with pytest.raises(ValueError, match="float32 CPU x"):
        gemm_f32(torch.randn(4, 64).bfloat16(), p)
    with pytest.raises(ValueError, match="float32 CPU x"):
        gemm_f32(torch.randn(4, 63), p)
    with pytest.raises(ValueError, match="bias"):
        gemm_f32(torch.randn(4, 64), p, torch.randn(31))
    with pytest.raises(ValueError, match="out"):
        gemm_f32(torch.randn(4, 64), p, out=torch.empty(4, 31))
    with pytest.raises(ValueError, match="residual"):
        gemm_f32(torch.randn(4, 64), p, residual=torch.randn(4, 31))
    with pytest.raises(ValueError, match="residual"):
        gemm_f32(torch.randn(4, 64), Fp32Panels(torch.randn(32, 64), glu=True), residual=torch.randn(4, 32))
    from mrt_engine import _C
    with pytest.raises(ValueError, match="multiple of 16"):
        _C.gemm_f32(0, 4, 1, 4, 0, 24, 0, 0, 24, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.gemm_f32(0, 4, 1, 4, 0, 48, 0, 0, 24, 1, True)
    with pytest.raises(ValueError, match="residual needs"):
        _C.gemm_f32(0, 4, 1, 4, 0, 32, 0, 0, 32, 1, False, 8, 16)


def test_which_weights_take_it(monkeypatch):
    """float32 weights with columns a multiple of 16 pack for our GEMM (layers and LM head), other
    widths keep oneDNN's; a gate|up projection packs in pairs only when asked and I % 16 == 0; the
    off switch leaves oneDNN's for float32 and no fused SiLU*up."""
    w = torch.randn(64, 128)
    assert isinstance(packed_linear.pack(w), Fp32Panels)
    assert isinstance(packed_linear.pack(w, lm_head=True), Fp32Panels)
    assert not isinstance(packed_linear.pack(torch.randn(40, 128)), Fp32Panels)
    assert packed_linear.pack(torch.randn(48, 128), glu=True) is None          # I = 24
    assert packed_linear.pack(w, glu=True).glu
    lin = PackedLinear(128, 64, bias=True)
    x = torch.randn(9, 128)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert isinstance(lin.packed_weight.packed, Fp32Panels)
    assert lin.silu_mul(x.bfloat16()) is None                                  # not float32: caller's path
    monkeypatch.setenv(packed_linear.GEMM_ENV, "0")
    assert not isinstance(packed_linear.pack(w), Fp32Panels)
    lin2 = PackedLinear(128, 64)
    assert lin2.silu_mul(x) is None


def test_float32_model_uses_it_and_matches_the_onednn_path(make_tiny_model, tmp_path, monkeypatch):
    """A float32 model: every layer's gate|up runs the fused SiLU*up (no [N, 2I] product), o_proj and
    down_proj add the residual in their sums, qkv and the LM head run our GEMM; greedy tokens equal and logprobs within float32 rounding
    of the engine with our GEMM off (oneDNN's and PyTorch's SiLU)."""
    from mrt_engine import LLM, SamplingParams

    path = make_tiny_model(tmp_path / "m", "qwen2", vocab_size=272, with_tokenizer=False)   # q/k/v biases
    sp = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True)
    prompts = [[5, 6, 7, 8, 9], list(range(20, 61))]
    llm = LLM(path, dtype="float32")
    ours = llm.generate(prompts, sp)
    model = llm.model
    for layer in model.layers:
        assert layer.gate_up_proj.glu_weight.packed is not None and layer.gate_up_proj.packed_weight.packed is None
        assert isinstance(layer.qkv_proj.packed_weight.packed, Fp32Panels)
    assert isinstance(model._lm_head_packed.packed, Fp32Panels)
    monkeypatch.setenv(packed_linear.GEMM_ENV, "0")
    theirs = LLM(path, dtype="float32").generate(prompts, sp)
    for a, b in zip(ours, theirs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   rtol=0, atol=1e-4)
