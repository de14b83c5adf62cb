"""Our bf16 CPU GEMM (csrc/cpu_gemm.cpp): against a float32 reference at odd shapes, a row's result
independent of the batch, the thread count and the split, and PackedLinear / the LM head using it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gemm_helpers import assert_rows_independent_of_batch_and_threads

from mrt_engine.models import packed_linear
from mrt_engine.models.packed_linear import Bf16Panels, PackedLinear, gemm_bf16

pytestmark = pytest.mark.skipif(not packed_linear._GEMM_OK, reason="no AVX512_BF16 or no extension")


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """out within one bf16 rounding of the float32 product (plus float32 accumulation-order error)."""
    ref = x.float() @ w.float().t()
    scale = x.float().abs() @ w.float().abs().t()
    err = (out.float() - ref).abs()
    bound = 2.0 ** -8 * ref.abs() + 1e-6 * scale + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("m,k,n", [(1, 2, 16), (3, 30, 80), (4, 64, 96), (5, 898, 112), (17, 2000, 208),
                                   (130, 96, 16), (257, 900, 192), (300, 64, 1040)])
def test_matches_float32_reference(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    out = gemm_bf16(x, Bf16Panels(w))
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    _check(out, x, w)


def test_strided_rows_and_out_buffer():
    """a's rows inside a wider tensor, the result written into a column slice of a wider buffer."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(40, 200, generator=g).bfloat16()
    x = wide[:, 4:134]                                     # lda 200, k 130
    w = torch.randn(48, 130, generator=g).bfloat16()
    buf = torch.full((40, 70), 7.0, dtype=torch.bfloat16)
    out = buf[:, 10:58]
    assert gemm_bf16(x, Bf16Panels(w), out=out).data_ptr() == out.data_ptr()
    _check(out, x, w)
    assert bool((buf[:, :10] == 7).all()) and bool((buf[:, 58:] == 7).all()), "wrote outside out"


def test_a_row_does_not_depend_on_the_batch_or_threads():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 896, generator=g).bfloat16()
    w = (torch.randn(1152, 896, generator=g) * 0.05).bfloat16()
    assert_rows_independent_of_batch_and_threads(gemm_bf16, x, Bf16Panels(w))


def test_bad_input_is_a_clear_error():
    w = torch.randn(32, 64).bfloat16()
    p = Bf16Panels(w)
    with pytest.raises(ValueError, match="bf16 CPU x"):
        gemm_bf16(torch.randn(4, 64), p)                   # float32 x
    with pytest.raises(ValueError, match="bf16 CPU x"):
        gemm_bf16(torch.randn(4, 66).bfloat16()[:, 1:65], p)   # rows not 4-byte aligned
    with pytest.raises(ValueError, match="out"):
        gemm_bf16(torch.randn(4, 64).bfloat16(), p, out=torch.empty(4, 31, dtype=torch.bfloat16))
    from mrt_engine import _C
    with pytest.raises(ValueError, match="k > 0 even"):
        _C.gemm_bf16(0, 4, 1, 3, 0, 16, 0, 16, 1)


def test_which_weights_take_it(monkeypatch):
    """The bf16 LM head (columns a multiple of 16, even k) packs for our GEMM; layers keep oneDNN's;
    an LM head it cannot take, or the off switch, leaves the plain GEMM (None)."""
    w = torch.randn(64, 128).bfloat16()
    assert isinstance(packed_linear.pack(w, lm_head=True), Bf16Panels)
    assert not isinstance(packed_linear.pack(w), Bf16Panels)
    assert packed_linear.pack(torch.randn(40, 128).bfloat16(), lm_head=True) is None
    assert not isinstance(packed_linear.pack(torch.randn(64, 128), lm_head=True), Bf16Panels)   # float32
    lin = PackedLinear(128, 64, bias=True, dtype=torch.bfloat16)
    x = torch.randn(9, 128).bfloat16()
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-2, atol=1e-2)
    assert lin.packed_weight.packed is not None and not isinstance(lin.packed_weight.packed, Bf16Panels)
    monkeypatch.setenv(packed_linear.GEMM_ENV, "0")
    assert packed_linear.pack(w, lm_head=True) is None


def test_lm_head_writes_into_the_logits_buffer(make_tiny_model, tmp_path):
    """bf16 model, vocab 272 (a multiple of 16): the LM head runs our GEMM straight into the runner's
    buffer, and the engine's logprobs match the oneDNN / PyTorch path to bf16 rounding."""
    from mrt_engine import LLM, SamplingParams

    path = make_tiny_model(tmp_path / "m", "qwen2", vocab_size=272, with_tokenizer=False)
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], list(range(20, 61))]
    llm = LLM(path, dtype="bfloat16")
    ours = llm.generate(prompts, sp)
    model = llm.model
    assert isinstance(model._lm_head_packed.packed, Bf16Panels)
    calls = []
    real = packed_linear.gemm_bf16
    monkey = pytest.MonkeyPatch()
    monkey.setattr(packed_linear, "gemm_bf16", lambda *a, **kw: calls.append(kw.get("out")) or real(*a, **kw))
    try:
        llm.generate(prompts, sp)
    finally:
        monkey.undo()
    assert any(o is not None for o in calls), "the LM head did not write into the runner's buffer"
    monkey.setenv(packed_linear.GEMM_ENV, "0")
    try:
        theirs = LLM(path, dtype="bfloat16").generate(prompts, SamplingParams(
            max_tokens=8, temperature=1.0, seed=3, ignore_eos=True))
    finally:
        monkey.undo()
    for a, b in zip(ours, theirs):
        n = 0
        for ta, tb, la, lb in zip(a.outputs[0].token_ids, b.outputs[0].token_ids, a.outputs[0].logprobs,
                                  b.outputs[0].logprobs):
            if ta != tb:            # a sampled token may differ once logits differ in the last bit
                break
            assert abs(la - lb) < 0.05, (la, lb)
            n += 1
        assert n >= 1
