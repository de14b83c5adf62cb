"""The lean CPU decode step (models/cpu_decode.py) runs the layers' own kernels in their
order, so an engine with it must give exactly what the reference layers give: the same tokens and
the same logprobs bit for bit, on shared fork prefixes, own tails, sampled branches and greedy rows;
Llama, Qwen2 (q/k/v bias, tied embeddings) and Llama with attention and MLP biases, in float32 and
bf16; and the steps it does not take (a prefill in the step, head_dim 16, the switch off) go
through the reference layers."""
import random

import pytest
import torch

from mrt_engine import LLM, Fork, SamplingParams
from mrt_engine.attention import cpu_kernel
from mrt_engine.models import cpu_decode, cpu_ops

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (cpu_kernel.simd_available() and cpu_ops._ok), reason="needs the AVX-512 C++ kernels"),
]

KINDS = {"llama": ("llama", {}), "qwen2": ("qwen2", {}),
         "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True))}


@pytest.fixture(scope="module", params=sorted(KINDS))
def model_dir(request, tmp_path_factory):
    from conftest import make_tiny_model

    from transformers import AutoModelForCausalLM

    kind, extra = KINDS[request.param]
    # head_dim 32: the C++ RoPE takes multiples of 32
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), kind, hidden_size=128, num_heads=4,
                           num_kv_heads=2, intermediate_size=160, num_layers=3, seed=7, **extra)
    # transformers initialises biases to zero, where a dropped bias would go unnoticed
    model = AutoModelForCausalLM.from_pretrained(path)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture
def lean_steps(monkeypatch):
    """Counts the steps the lean path ran."""
    calls = {"n": 0}
    real = cpu_decode.forward

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += out is not None
        return out

    monkeypatch.setattr(cpu_decode, "forward", counted)
    return calls


def _fork_workload(llm):
    """A kept trace, forks of it at three points with sampled branches and a greedy one; outputs
    as (tokens, logprobs) lists."""
    rng = random.Random(5)
    prompt = [rng.randrange(256) for _ in range(21)]
    base = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), keep=True)
    h = base[0].outputs[0].handle
    forks = [Fork(h, at=at, suffix=[11, 12, 13]) for at in (6, 17, 40)]
    sampled = llm.generate(forks, SamplingParams(n=4, max_tokens=14, temperature=1.0, seed=3, ignore_eos=True))
    greedy = llm.generate([Fork(h, at=25)], SamplingParams(n=2, max_tokens=9, temperature=0, ignore_eos=True))
    llm.release(h)
    return [(c.token_ids, c.logprobs) for o in base + sampled + greedy for c in o.outputs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_decode_gives_the_reference_layers_outputs_bit_for_bit(model_dir, dtype, lean_steps, monkeypatch):
    # two fresh engines: a second run in one engine would find its first run's prefixes cached
    lean = _fork_workload(LLM(model_dir, dtype=dtype, block_size=8, num_blocks=512, seed=0))
    assert lean_steps["n"] > 30                 # the decode steps took it
    monkeypatch.setenv(cpu_decode.ENV, "0")
    taken = lean_steps["n"]
    ref = _fork_workload(LLM(model_dir, dtype=dtype, block_size=8, num_blocks=512, seed=0))
    assert lean_steps["n"] == taken             # ... and now none did
    assert lean == ref


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_decode_writes_the_same_kv_and_hidden_states(model_dir, dtype, monkeypatch):
    """One decode step run twice on the same inputs: hidden states and every layer's KV equal."""
    llm = LLM(model_dir, dtype=dtype, block_size=8, num_blocks=128, seed=0)
    runner, captured = llm.runner, {}
    real_forward = runner.model.forward

    def capture(input_ids, meta, kv_caches):
        if not meta.num_prefill_tokens and "step" not in captured:
            captured["step"] = (input_ids.clone(), meta, [(k.clone(), v.clone()) for k, v in kv_caches])
        return real_forward(input_ids, meta, kv_caches)

    monkeypatch.setattr(runner.model, "forward", capture)
    llm.generate([[3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5, 6, 7, 8, 20]],
                 SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=1, ignore_eos=True))
    ids, meta, caches = captured["step"]
    results = []
    for env in ("1", "0"):
        monkeypatch.setenv(cpu_decode.ENV, env)
        kv = [(k.clone(), v.clone()) for k, v in caches]
        meta.backend_cache.clear()
        h = runner.model.embed_tokens(ids)
        cos, sin = runner.model.rope.cos_sin(meta.positions, h.dtype)
        assert cpu_decode.usable(runner.model, h, cos, sin, meta, kv) == (env == "1")
        results.append((real_forward(ids, meta, kv), kv))
    (h_lean, kv_lean), (h_ref, kv_ref) = results
    assert torch.equal(h_lean, h_ref)
    for (k1, v1), (k2, v2) in zip(kv_lean, kv_ref):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_steps_the_lean_path_does_not_take(tiny_llama_dir, model_dir, lean_steps):
    # head_dim 16 (the C++ RoPE needs multiples of 32): the reference layers
    for dtype in ("float32", "bfloat16"):
        llm = LLM(tiny_llama_dir, dtype=dtype, block_size=8, num_blocks=128)
        llm.generate([[1, 2, 3, 4, 5]], SamplingParams(n=2, max_tokens=6, temperature=0, ignore_eos=True))
    assert lean_steps["n"] == 0
    # a step with a prefill row: the reference layers (the lean path is for decode-only steps)
    llm = LLM(model_dir, dtype="float32", block_size=8, num_blocks=128, max_num_seqs=4)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1, ignore_eos=True))
    assert lean_steps["n"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_probe_runs_each_call_twice_and_changes_nothing(model_dir, dtype, lean_steps):
    """profiling.probe_attention: every lean step's attention call runs twice (timed both times),
    one call per layer and step; the outputs stay bit for bit those of a run without it."""
    from mrt_engine import profiling

    plain = _fork_workload(LLM(model_dir, dtype=dtype, block_size=8, num_blocks=512, seed=0))
    steps = lean_steps["n"]
    run = object()
    assert profiling.probed(run) is run          # off: the plan's own run, nothing wrapped
    profiling.probe_attention(True)
    try:
        probed = _fork_workload(LLM(model_dir, dtype=dtype, block_size=8, num_blocks=512, seed=0))
        rep = profiling.attention_probe_report()
    finally:
        profiling.probe_attention(False)
    assert probed == plain
    assert lean_steps["n"] == 2 * steps > 0
    assert rep["calls"] == 3 * steps            # 3 layers
    assert rep["in_place_s"] > 0 and rep["again_at_once_s"] > 0
    assert profiling.attention_probe_report()["calls"] == 0    # turning it off resets it
