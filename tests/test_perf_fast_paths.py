"""Fast paths taken for speed give the same results as the general code they skip.

- the sampler skips the logits * (1/T) multiply when every row has T == 1: tokens and logprobs
  must equal the general path bit for bit (with and without top-k/top-p/min-p);
- the bf16 RMSNorm uses the fused fp32 normalisation, then casts and scales like transformers;
- the LM head writes into a reused buffer in the model dtype: same values as fresh fp32 logits;
- a decode step over the same sequences as the step before reuses that step's sampling knobs and
  takes its step counters from the context lengths: the same sampling inputs as a fresh build.
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


def _fresh_runner():
    from mrt_engine.model_runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)     # only what _sampling_tensors reads
    runner._st_cache, runner.device = None, torch.device("cpu")
    return runner


def _assert_same_sampling_inputs(a, b):
    (sa, ca), (sb, cb) = a, b
    assert ca == cb
    for f in dataclasses.fields(SamplingTensors):
        x, y = getattr(sa, f.name), getattr(sb, f.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name


def test_repeated_decode_step_reuses_knobs_and_matches_a_fresh_build():
    from types import SimpleNamespace

    from mrt_engine.sequence import Sequence

    kinds = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=0.0),
             dict(temperature=1.3, top_p=0.8, logprobs=2), dict(temperature=1.0, min_p=0.1)]
    seqs = []
    for i in range(11):
        req = SimpleNamespace(params=SamplingParams(seed=i, **kinds[i % len(kinds)]), seed=977 * i + 5,
                              prompt_token_ids=list(range(3 + i)))
        seqs.append(Sequence(100 + i, req, i % 3, req.prompt_token_ids + [7] * (i % 4)))
    runner = _fresh_runner()
    for step in range(4):
        rows = [(s, 1) for s in seqs]
        ctx = [len(s.token_ids) for s in seqs]
        got = runner._sampling_tensors(rows, ctx)
        assert runner._st_cache is not None and runner._st_cache[0] == seqs
        _assert_same_sampling_inputs(got, _fresh_runner()._sampling_tensors(rows))
        for s in seqs:
            s.token_ids.append(3)
        if step == 1:
            seqs = seqs[:4] + seqs[5:]      # one sequence finished: the next step builds afresh
    # a leader at its prompt end (k > 1) is not cached; the next step is built afresh
    rows = [(seqs[0], 3)] + [(s, 1) for s in seqs[1:]]
    runner._sampling_tensors(rows)
    assert runner._st_cache is None


def test_the_step_cache_does_not_outlive_a_generate_call(tiny_llama_dir):
    """The runner keeps the last step's sequences for the next step only within a call."""
    from mrt_engine import LLM

    llm = LLM(tiny_llama_dir, dtype="float32", block_size=8, num_blocks=64)
    seen = []
    real = llm.runner._sampling_tensors

    def spy(*args):
        out = real(*args)
        seen.append(llm.runner._st_cache is not None)
        return out

    llm.runner._sampling_tensors = spy
    llm.generate([[1, 2, 3, 4]], SamplingParams(n=2, max_tokens=5, temperature=0, ignore_eos=True))
    assert any(seen)                               # the decode steps kept it ...
    assert llm.runner._st_cache is None            # ... and the call's end dropped it (and the
    assert llm.runner._groups_memo is None         # decode groups, which hold the step's tables)
