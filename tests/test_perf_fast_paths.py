"""Fast paths taken for speed give the same results as the general code they skip.

- the sampler skips the logits * (1/T) multiply when every row has T == 1: tokens and logprobs
  must equal the general path bit for bit (with and without top-k/top-p/min-p);
- the bf16 RMSNorm uses the fused fp32 normalisation, then casts and scales like transformers;
- the LM head writes into a reused buffer in the model dtype: same values as fresh fp32 logits.
"""
import dataclasses

import pytest
import torch

from mrt_engine.models.llama import RMSNorm
from mrt_engine.sampling import Sampler, SamplingParams, SamplingTensors


@pytest.mark.parametrize("extra", [{}, {"top_k": 50}, {"top_p": 0.9}, {"min_p": 0.05}])
def test_unit_temperature_fast_path_matches_general_path(extra):
    torch.manual_seed(0)
    r, v = 37, 1000
    logits = torch.randn(r, v) * 3
    params = [SamplingParams(temperature=1.0, seed=i, **extra) for i in range(r)]
    st = SamplingTensors.build(None, params, list(range(r)), [0] * r, list(range(r)), "cpu")
    assert st.all_unit_temperature
    slow = dataclasses.replace(st, all_unit_temperature=False)
    t_fast, lp_fast = Sampler()(logits, st)
    t_slow, lp_slow = Sampler()(logits, slow)
    assert torch.equal(t_fast, t_slow)
    assert torch.equal(lp_fast, lp_slow)
    torch.testing.assert_close(lp_fast, torch.log_softmax(logits, -1).gather(1, t_fast[:, None])[:, 0])


def test_unit_temperature_flag_is_off_for_other_temperatures():
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7)]
    assert not SamplingTensors.build(None, params, [0, 1], [0, 0], [0, 0], "cpu").all_unit_temperature
    greedy = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    assert not SamplingTensors.build(None, greedy, [0, 1], [0, 0], [0, 0], "cpu").all_unit_temperature


def test_bf16_rms_norm_matches_transformers_arithmetic():
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6, torch.bfloat16, "cpu")
    norm.weight.data.copy_(torch.randn(96))
    x = (torch.randn(64, 96) * 5).to(torch.bfloat16)
    xf = x.float()
    ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    # the fused fp32 reduction may round its last bit differently: allow one bf16 ulp
    torch.testing.assert_close(norm(x), ref, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_into_reused_buffer_matches_fresh_logits(tiny_llama_dir, dtype):
    """The runner writes logits into one buffer kept across steps (model dtype, no fp32 copy):
    the values equal compute_logits' fresh fp32 result bit for bit once cast, for several row
    counts written into the same buffer in turn."""
    from mrt_engine.models.loader import load_model

    model, _ = load_model(tiny_llama_dir, dtype, "cpu", "torch")
    torch.manual_seed(0)
    buf = torch.empty(7 * model.vocab_size, dtype=dtype)
    for rows in (7, 3, 5):
        hidden = torch.randn(rows, model.hidden_size).to(dtype)
        fresh = model.compute_logits(hidden)
        out = model.compute_logits(hidden, float32=False, out=buf[:rows * model.vocab_size].view(rows, -1))
        assert fresh.dtype == torch.float32 and out.dtype == dtype
        assert out.data_ptr() == buf.data_ptr()
        assert torch.equal(out.float(), fresh)
