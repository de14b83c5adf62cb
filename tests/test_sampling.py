"""SamplingParams validation and the batched sampler against direct torch computations.

Every test runs twice: with the fused C++ full-softmax sampler (where the CPU has it) and with the
PyTorch path only; the two must also agree with each other.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

from mrt_engine import sampling_cpu
from mrt_engine.sampling import Sampler, SamplingParams, SamplingTensors, counter_keys, counter_uniforms


@pytest.fixture(autouse=True, params=["cpp", "pytorch"])
def sampler_path(request, monkeypatch):
    if request.param == "cpp" and not sampling_cpu.simd_available():
        pytest.skip("the fused C++ sampler needs the extension and AVX-512BW")
    monkeypatch.setenv(sampling_cpu.ENV, "1" if request.param == "cpp" else "0")
    return request.param


def _st(params, seeds=None, idx=None, steps=None, rows=None):
    r = len(params)
    return SamplingTensors.build(rows, params, seeds or [0] * r, idx or list(range(r)), steps or [0] * r, "cpu")


@pytest.mark.parametrize("kwargs", [
    dict(n=0), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
    dict(min_p=-0.1), dict(min_p=1.1), dict(max_tokens=0), dict(stop=[""]), dict(stop_token_ids=[-1]),
    dict(temperature=float("nan")), dict(repetition_penalty=1.1), dict(presence_penalty=0.5),
    dict(frequency_penalty=-0.2), dict(stop_token_ids=[np.float32(3)]),
    dict(min_tokens=2), dict(n=2, best_of=4), dict(guided_decoding={"regex": "a+"}),
    dict(structured_outputs=object()), dict(bad_words=["x"]), dict(truncate_prompt_tokens=8),
])
def test_invalid_values_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(n=1.5), dict(temperature="0"), dict(top_k=2.0), dict(max_tokens=2.0),
                                    dict(ignore_eos=1), dict(seed=1.0), dict(logprobs="yes"),
                                    dict(n=np.float64(2.0)), dict(max_tokens=np.bool_(True))])
def test_wrong_types_raise_type_error(kwargs):
    with pytest.raises(TypeError):
        SamplingParams(**kwargs)


def test_numpy_scalars_accepted_as_python_numbers():
    # a sweep's values (np.arange, np.linspace, a config read through NumPy) are NumPy scalars
    p = SamplingParams(n=np.int64(4), temperature=np.float32(0.5), top_p=np.float64(0.9), top_k=np.int32(8),
                       min_p=np.float32(0.0), max_tokens=np.int64(7), stop_token_ids=[np.int64(2)],
                       ignore_eos=np.bool_(True), seed=np.uint32(3), logprobs=np.int64(0))
    assert (p.n, p.top_k, p.max_tokens, p.seed, p.stop_token_ids) == (4, 8, 7, 3, [2])
    for v in (p.n, p.top_k, p.max_tokens, p.seed, p.stop_token_ids[0]):
        assert type(v) is int
    assert type(p.temperature) is float and p.temperature == 0.5
    assert p.ignore_eos is True and type(p.logprobs) is int and p.logprobs == 0 and p.returns_logprobs


def test_vllm_fields_a_port_passes_are_accepted_at_neutral_values():
    # TRL passes guided_decoding (older) or structured_outputs (newer) = None on every call
    p = SamplingParams(n=3, best_of=3, min_tokens=0, guided_decoding=None, structured_outputs=None, bad_words=None,
                       truncate_prompt_tokens=None, detokenize=True, skip_special_tokens=False,
                       include_stop_str_in_output=True)
    assert p.n == 3 and not p.skip_special_tokens and p.include_stop_str_in_output
    assert dataclasses.replace(p, n=5).n == 5       # what LLM.fork(n=...) does with a request's params
    with pytest.raises(TypeError, match="detokenize"):
        SamplingParams(detokenize="no")


def test_vllm_neutral_penalties_accepted():
    # TRL passes repetition_penalty=1.0 (and vLLM users the other two at 0) by default
    SamplingParams(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    with pytest.raises(ValueError, match="not supported"):
        SamplingParams(repetition_penalty=1.05)


def test_top_k_zero_is_off_as_in_vllm():
    # vLLM reads top_k 0 and -1 as "no top-k"; TRL passes 0 by default
    assert SamplingParams(top_k=0).top_k == -1 and SamplingParams(top_k=np.int64(0)).top_k == -1


def test_stop_normalised_to_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []


def test_greedy_is_argmax_and_logprob_at_temperature_one():
    torch.manual_seed(0)
    logits = torch.randn(7, 50) * 3
    params = [SamplingParams(temperature=0)] * 7
    tok, lp = Sampler()(logits, _st(params))
    assert torch.equal(tok, logits.argmax(-1))
    ref = torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)


def test_logprob_is_scaled_and_before_truncation():
    torch.manual_seed(1)
    logits = torch.randn(6, 40) * 2
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.05)] * 3 + \
             [SamplingParams(temperature=0), SamplingParams(temperature=1.3), SamplingParams(temperature=0.5, top_p=0.3)]
    tok, lp = Sampler()(logits, _st(params))
    temps = torch.tensor([0.7, 0.7, 0.7, 1.0, 1.3, 0.5])
    ref = torch.log_softmax(logits / temps[:, None], -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    assert tok[3] == logits[3].argmax()


@pytest.mark.parametrize("top_k", [-1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_accurate_at_a_tiny_temperature(top_k, dtype):
    """At T = 1e-6 the scaled logits are ~1e7, where a float32 ulp is 1: scaling before subtracting
    the max gave logprobs off by O(1), even positive. The max is subtracted first, so the logprob
    is log_softmax(x / T) in float64 to ~1e-6 (0 for the argmax, which is what is sampled when
    the top two logits are apart), on both sampler paths, full and truncated."""
    torch.manual_seed(3)
    logits = (torch.randn(8, 300) * 4 + 10).to(dtype)
    params = [SamplingParams(temperature=t, top_k=top_k) for t in (1e-6, 1e-5, 1e-4, 0.01, 1e-6, 1e-3, 1e-6, 0.05)]
    tok, lp = Sampler()(logits, _st(params, seeds=list(range(8))))
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float64)
    x = logits.double()
    ref = torch.log_softmax((x - x.amax(-1, keepdim=True)) / temps[:, None], -1).gather(1, tok[:, None])[:, 0]
    assert (lp <= 0).all(), lp
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(tok[[0, 4, 6]], logits.float().argmax(-1)[[0, 4, 6]])


def _empirical(logits_row, params, n=20000):
    logits = logits_row[None].expand(n, -1).contiguous()
    tok, _ = Sampler()(logits, _st([params] * n, seeds=[11] * n, idx=list(range(n))))
    return torch.bincount(tok, minlength=logits.shape[1]).float() / n


def _expected(logits_row, t, top_k=-1, top_p=1.0, min_p=0.0):
    p = torch.softmax(logits_row / t, -1)
    sp, si = p.sort(descending=True)
    keep = torch.ones_like(sp, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    sp = sp * keep
    csum = sp.cumsum(0)
    keep &= (csum - sp) < top_p * sp.sum()
    keep &= sp >= min_p * sp[0]
    out = torch.zeros_like(p)
    out[si] = sp * keep
    return out / out.sum()


@pytest.mark.parametrize("cfg", [dict(), dict(top_k=3), dict(top_p=0.6), dict(min_p=0.2),
                                 dict(top_k=4, top_p=0.7, min_p=0.1)])
def test_sampled_frequencies_match_truncated_distribution(cfg):
    torch.manual_seed(2)
    row = torch.randn(12) * 1.5
    params = SamplingParams(temperature=0.9, **cfg)
    emp = _empirical(row, params)
    exp = _expected(row, 0.9, **cfg)
    assert (emp[exp == 0] == 0).all(), "a truncated token was sampled"
    # 20k samples: standard error <= 0.0036 per token
    assert (emp - exp).abs().max() < 0.015


def test_processed_logprobs_are_in_the_truncated_distribution():
    # vLLM's processed_logprobs: a truncating row's logprob is log of its renormalised truncated
    # distribution (the `_expected` reference above), with the kept-token count; a mixed step
    # (truncating, plain and greedy rows) gives every row what it gets alone
    torch.manual_seed(4)
    logits = torch.randn(5, 40) * 2
    params = [SamplingParams(temperature=0.8, top_p=0.6, seed=1), SamplingParams(temperature=1.3, seed=2),
              SamplingParams(temperature=0.7, top_k=3, min_p=0.05, seed=3), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, min_p=0.3, seed=4)]
    st = _st(params, [1, 2, 3, 0, 4], list(range(5)), [0] * 5)
    sampler = Sampler()
    tok_plain, lp_plain = sampler(logits, st)
    assert sampler.kept_counts is None
    tok, lp = sampler(logits, st, processed=True)
    assert torch.equal(tok, tok_plain)
    for i, p in enumerate(params):
        t = p.temperature or 1.0
        if p.greedy:
            ref = torch.softmax(logits[i] / t, -1)
        else:
            ref = _expected(logits[i], t, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
        assert abs(lp[i].item() - ref[tok[i]].log().item()) < 1e-5
        assert sampler.kept_counts[i].item() == (ref > 0).sum().item()
        if p.top_p == 1.0 and p.top_k == -1 and p.min_p == 0.0:
            assert lp[i].item() == pytest.approx(lp_plain[i].item(), abs=1e-6)   # nothing truncated
        else:
            assert lp[i].item() > lp_plain[i].item()     # renormalised over less than all the mass


def test_seeded_rows_are_batch_invariant():
    torch.manual_seed(3)
    logits = torch.randn(10, 64)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=5)] * 10
    seeds = [5] * 10
    tok_all, _ = Sampler()(logits, _st(params, seeds, [0] * 10, list(range(10))))
    for i in (0, 4, 9):
        tok_one, _ = Sampler()(logits[i:i + 1], _st(params[i:i + 1], [5], [0], [i]))
        assert tok_one.item() == tok_all[i].item()


def test_counter_uniforms_pure_and_spread():
    a = counter_uniforms([1, 2, 1], [0, 0, 0], [3, 3, 3])
    b = counter_uniforms([1], [0], [3])
    assert a[0] == a[2] == b[0] and a[0] != a[1]
    u = counter_uniforms([7] * 10000, list(range(10000)), [0] * 10000)
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert counter_uniforms([-1], [0], [0])[0] == counter_uniforms([2**64 - 1], [0], [0])[0]


def test_counter_keys_kept_across_steps_give_the_same_uniforms():
    """A caller keeps counter_keys of its rows and passes each step's counters (a numpy array,
    as the runner's decode steps do): the same uniforms as from the seeds and sample indices."""
    seeds, idx = [3, 3, 9, -5], [0, 1, 0, 2]
    keys = counter_keys(seeds, idx)
    for step in range(4):
        steps = [step, step + 1, 0, 7 * step]
        want = counter_uniforms(seeds, idx, steps)
        assert np.array_equal(counter_uniforms(None, None, np.array(steps, dtype=np.int64), keys), want)
    assert not np.array_equal(counter_uniforms(None, None, [0, 1, 0, 0], keys),
                              counter_uniforms(None, None, [1, 1, 0, 0], keys))


def test_shared_logits_rows():
    torch.manual_seed(4)
    logits = torch.randn(2, 30)
    params = [SamplingParams(temperature=1.0)] * 4
    tok, lp = Sampler()(logits, _st(params, [9] * 4, [0, 1, 2, 0], [0] * 4, rows=[0, 0, 0, 1]))
    ref = torch.log_softmax(logits[[0, 0, 0, 1]], -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    assert math.isfinite(lp.sum().item())


# ---- the two-level inverse CDF (no top-k/top-p/min-p in the step) ------------------------------

def _exact_inverse_cdf(logits, temps, u):
    """float64 reference: the token whose CDF interval (ids in order) holds u, and its margin to
    the nearest interval edge relative to the total (rows within float32 rounding of an edge may
    legitimately differ)."""
    x = logits.double() / temps.double()[:, None]
    p = torch.softmax(x, -1)
    c = p.cumsum(-1)
    tgt = u.double() * c[:, -1]
    tok = torch.searchsorted(c, tgt[:, None], right=True)[:, 0].clamp(max=logits.shape[1] - 1)
    lo = torch.where(tok > 0, c.gather(1, (tok - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(tgt))
    hi = c.gather(1, tok[:, None])[:, 0]
    margin = torch.minimum(tgt - lo, hi - tgt) / c[:, -1]
    return tok, margin


@pytest.mark.parametrize("vocab", [5003, 4096, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_level_sampler_is_the_inverse_cdf_in_id_order(vocab, dtype):
    """Same uniform, same token as one big inverse CDF over softmax(x/T) in float64 (vocab not a
    multiple of the block size, a prime, a power of two), except within rounding of an edge."""
    torch.manual_seed(5)
    r = 300
    logits = (torch.randn(r, vocab) * 4).to(dtype)
    temps = [0.6, 1.0, 1.7]
    params = [SamplingParams(temperature=temps[i % 3], seed=i) for i in range(r)]
    st = _st(params, seeds=list(range(r)), idx=[0] * r, steps=list(range(r)))
    tok, lp = Sampler()(logits, st)
    ref, margin = _exact_inverse_cdf(logits.float(), st.temperature, st.uniform)
    clear = margin > 1e-5
    assert clear.sum() > 0.95 * r
    assert torch.equal(tok[clear], ref[clear])
    ref_lp = torch.log_softmax(logits.double() / st.temperature.double()[:, None], -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=2e-5)


def test_two_level_sampler_never_picks_a_zero_weight_token():
    """-inf logits (masked ids: whole blocks, the short tail block, neighbours of the only live
    ids) are never sampled, whatever the uniform."""
    vocab = 1000                      # block size 32: 31 full blocks and a tail of 8
    logits = torch.full((64, vocab), float("-inf"))
    live = [0, 31, 32, 500, 991, 999]
    logits[:, live] = torch.tensor([0.0, 2.0, -1.0, 0.5, 3.0, 1.0])
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(64)]
    for step in range(40):
        tok, lp = Sampler()(logits, _st(params, seeds=list(range(64)), steps=[step] * 64))
        assert set(tok.tolist()) <= set(live)
        assert torch.isfinite(lp).all()


def test_two_level_sampler_frequencies_large_vocab():
    torch.manual_seed(6)
    vocab = 1001                       # block size 32: 31 full blocks and a tail of 9
    row = torch.randn(vocab) * 3
    row[[5, 500, 1000]] += 6.0         # a few heavy ids, one in the tail block
    n = 20000
    logits = row[None].expand(n, -1).contiguous()
    tok, _ = Sampler()(logits, _st([SamplingParams(temperature=0.8)] * n, seeds=[3] * n, idx=list(range(n))))
    emp = torch.bincount(tok, minlength=vocab).double() / n
    exp = torch.softmax(row.double() / 0.8, -1)
    assert (emp - exp).abs().max() < 0.015
    heavy = exp > 0.01
    assert (emp[heavy] - exp[heavy]).abs().max() < 0.015 and heavy.sum() >= 3


def test_two_level_sampler_batch_invariant_bitwise():
    """A seeded row gets the same token AND the same logprob bits alone, in a batch of 37, and
    when its logits row is shared with other samples."""
    torch.manual_seed(7)
    vocab = 4099
    logits = torch.randn(37, vocab) * 3
    params = [SamplingParams(temperature=0.9, seed=5)] * 37
    tok_all, lp_all = Sampler()(logits, _st(params, [5] * 37, [0] * 37, list(range(37))))
    for i in (0, 17, 36):
        tok_one, lp_one = Sampler()(logits[i:i + 1], _st(params[:1], [5], [0], [i]))
        assert tok_one.item() == tok_all[i].item() and lp_one.item() == lp_all[i].item()
    # row 17 shared by 3 samples (sample indices 0..2), as a request's n samples at its prompt end
    tok_sh, lp_sh = Sampler()(logits[16:19], _st([params[0]] * 5, [5] * 5, [0, 0, 1, 2, 0], [16, 17, 17, 17, 18],
                                                 rows=[0, 1, 1, 1, 2]))
    assert tok_sh[1].item() == tok_all[17].item() and lp_sh[1].item() == lp_all[17].item()
    assert tok_sh[0].item() == tok_all[16].item() and tok_sh[4].item() == tok_all[18].item()


def test_greedy_and_sampled_rows_mixed_on_the_fast_path():
    torch.manual_seed(8)
    logits = (torch.randn(6, 2000) * 2).to(torch.bfloat16)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.5, seed=1)] * 3
    st = _st(params, seeds=[0, 1] * 3)
    assert not (st.any_top_k or st.any_top_p or st.any_min_p)
    tok, lp = Sampler()(logits, st)
    assert torch.equal(tok[0::2], logits[0::2].float().argmax(-1))
    temps = torch.tensor([1.0, 0.5] * 3)
    ref = torch.log_softmax(logits.float() / temps[:, None], -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_and_pytorch_paths_agree(dtype, monkeypatch, sampler_path):
    """Same uniforms, same tokens from both paths (rows are far from a CDF edge with these seeds),
    logprobs within float32 rounding; the C++ scalar path agrees with its vector path."""
    if sampler_path != "cpp":
        pytest.skip("compares the paths once")
    torch.manual_seed(2)
    r, vocab = 200, 3001
    logits = (torch.randn(r, vocab) * 3).to(dtype)
    params = [SamplingParams(temperature=[0.0, 0.7, 1.0, 1.3][i % 4], seed=i) for i in range(r)]
    st = _st(params, seeds=list(range(r)), idx=[0] * r, steps=list(range(r)))
    tok_c, lp_c = Sampler()(logits, st)
    monkeypatch.setenv(sampling_cpu.ENV, "0")
    tok_p, lp_p = Sampler()(logits, st)
    ref, margin = _exact_inverse_cdf(logits.float(), torch.where(st.temperature == 0, 1.0, st.temperature), st.uniform)
    clear = (margin > 1e-5) | (st.temperature == 0)
    assert clear.sum() > 0.95 * r
    assert torch.equal(tok_c[clear], tok_p[clear])
    torch.testing.assert_close(lp_c, lp_p, rtol=0, atol=2e-5)
    inv_t = torch.where(st.temperature == 0, 1.0, 1.0 / st.temperature)
    tok_s, lp_s = sampling_cpu.sample_full(logits, inv_t, torch.arange(r), st.uniform, st.temperature == 0,
                                           simd=False)
    assert torch.equal(tok_s[clear], tok_c[clear])
    torch.testing.assert_close(lp_s, lp_c, rtol=0, atol=2e-5)


def test_cpp_sampler_checks_its_inputs(sampler_path):
    if sampler_path != "cpp":
        pytest.skip("checks the C++ path once")
    logits = torch.randn(3, 10)
    ok = dict(inv_t=torch.ones(3), rows=torch.tensor([0, 2]), uniform=torch.tensor([0.1, 0.9]),
              greedy=torch.tensor([False, True]))
    tok, lp = sampling_cpu.sample_full(logits, **ok)
    assert tok[1] == logits[2].argmax() and torch.isclose(lp[1], torch.log_softmax(logits[2], -1)[tok[1]])
    with pytest.raises(ValueError, match="out of range"):
        sampling_cpu.sample_full(logits, **{**ok, "rows": torch.tensor([0, 3])})
    with pytest.raises(ValueError, match="positive and finite"):
        sampling_cpu.sample_full(logits, **{**ok, "inv_t": torch.tensor([1.0, 0.0, 1.0])})
    with pytest.raises(ValueError, match="expected inv_t"):
        sampling_cpu.sample_full(logits, **{**ok, "uniform": torch.tensor([0.1])})
    with pytest.raises(ValueError, match="contiguous rows"):
        sampling_cpu.sample_full(logits.t().contiguous().t(), **ok)
    with pytest.raises(ValueError, match="contiguous rows"):
        sampling_cpu.sample_full(logits.double(), **ok)


def test_inverse_temperature_knob_equals_the_samplers_own():
    """The 1/T row made with the knobs (numpy) is bit for bit what the sampler computed in torch,
    greedy rows 1; a row subset keeps its rows' values."""
    temps = [0.0, 1.0, 0.7, 1.3, 1e-31, 1e-30, 3e-7, 2.5, 1e10, 0.1]
    st = _st([SamplingParams(temperature=t) for t in temps])
    t = st.temperature
    want = torch.where(t == 0, torch.ones_like(t), 1.0 / t.clamp(min=1e-30))
    assert st.inv_temperature.dtype == torch.float32 and torch.equal(st.inv_temperature, want)
    assert torch.equal(st.select([2, 0, 9]).inv_temperature, want[[2, 0, 9]])
