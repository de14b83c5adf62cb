"""Engine side of the MRT reward modes (trainer/mrt_rollout.py) on the shipped tiny reasoner.

Differential where it can be: a termination fork equals generating its context from scratch with
the same seed; progress points equal `episodes.segment` of the trace; the stale prefix is exactly
the stale engine's own sample cut at an episode start. Every test checks that no KV is left
pinned afterwards."""
from __future__ import annotations

import random

import pytest

from mrt_engine import LLM, SamplingParams, default_model_path
from mrt_engine.trainer import episodes
from mrt_engine.trainer.config import GRPOConfig
from mrt_engine.trainer.mrt_rollout import (StalePolicy, choose_cut, progress_for_batch,
                                            settings_from_config, termination_rollouts)
from mrt_engine.trainer.rollout import generate_rollouts
from mrt_engine.trainer.toy import task, traces

MAX_TOKENS = 160


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    return LLM(default_model_path(), dtype="float32", seed=0, kv_cache_memory_gb=0.1)


@pytest.fixture(scope="module")
def stale():
    return StalePolicy.from_model(default_model_path(), dtype="float32", seed=0,
                                  kv_cache_memory_gb=0.1)


def _prompts(llm, n, seed):
    probs = task.generate_problems(n, 5, seed)
    tok = llm.get_tokenizer()
    return [tok(p.prompt())["input_ids"] for p in probs], probs


def _no_leak(llm):
    st = llm.kv_stats()
    assert st["kept_handles"] == 0
    assert st["used_blocks"] == 0


def test_choose_cut_uniform_over_episode_starts():
    rng = random.Random(0)
    counts = {}
    for _ in range(4000):
        j, pos, num = choose_cut([5, 9, 14], think_len=20, rng=rng)
        assert num == 4 and pos == [0, 5, 9, 14][j]
        counts[j] = counts.get(j, 0) + 1
    assert set(counts) == {0, 1, 2, 3}
    assert all(850 < c < 1150 for c in counts.values())   # 1000 expected each
    # boundaries outside the thinking are ignored; no boundary: empty thinking only
    assert choose_cut([0, 25], think_len=20, rng=rng) == (0, 0, 1)


def test_settings_toy_and_math():
    cfg = GRPOConfig(verifier="toy", episode_max_episodes=5, progress_k=3)
    st = settings_from_config(cfg)
    assert st.rule.triggers == episodes.TOY_RULE.triggers and st.rule.max_episodes == 5
    assert st.forced_suffix == traces.FORCED_SUFFIX and st.k == 3
    cfg = GRPOConfig(verifier="math", episode_triggers=["Hmm"], forced_suffix="Stop.",
                     episode_min_gap=3)
    st = settings_from_config(cfg)
    assert st.rule.triggers == ("Hmm",) and st.rule.min_gap == 3 and st.forced_suffix == "Stop."


def test_termination_rows_match_scratch_generation(llm, stale):
    prompts, probs = _prompts(llm, 3, 11)
    tok = llm.get_tokenizer()
    st = settings_from_config(GRPOConfig(verifier="toy"))
    suffix = tok(st.forced_suffix, add_special_tokens=False)["input_ids"]
    seed, m = 7, 4
    tb = termination_rollouts(llm, stale, prompts, probs, boundaries_fn=st.boundaries_fn(tok),
                              forced_suffix_ids=suffix, num_samples=m,
                              max_completion_length=MAX_TOKENS, answer_max_tokens=12,
                              temperature=1.0, top_p=1.0, seed=seed)
    b = tb.batch
    assert len(b) == 3 * m and b.num_generations == m
    assert tb.terminate == ([True] * 2 + [False] * 2) * 3
    # 1. the stale prefix: the stale engine's own sample (same seed), cut at an episode start
    stale_outs = stale.llm.generate(prompts, SamplingParams(n=1, temperature=1.0,
                                                            max_tokens=MAX_TOKENS, seed=seed))
    for i in range(3):
        comp = list(stale_outs[i].outputs[0].token_ids)
        bounds, think = st.boundaries_fn(tok)(comp)
        cut = tb.prefix_tokens[i]
        assert cut == ([0] + bounds)[tb.cut_episodes[i]]
        assert tb.num_episodes[i] == len(bounds) + 1
        ctx = prompts[i] + comp[:cut]
        rows = range(i * m, (i + 1) * m)
        for r in rows:
            assert b.prompt_ids[r] == (ctx + suffix if tb.terminate[r] else ctx)
            assert b.problems[r] is probs[i]
        # 2. forks == scratch generation of the same token ids with the same seed
        scratch_term = llm.generate([ctx + suffix], SamplingParams(
            n=2, temperature=1.0, max_tokens=12, seed=seed + 1, logprobs=True))[0]
        scratch_cont = llm.generate([ctx], SamplingParams(
            n=2, temperature=1.0, max_tokens=MAX_TOKENS - cut, seed=seed + 2))[0]
        got_term = [b.completion_ids[r] for r in rows][:2]
        got_cont = [b.completion_ids[r] for r in rows][2:]
        assert got_term == [list(c.token_ids) for c in scratch_term.outputs]
        assert got_cont == [list(c.token_ids) for c in scratch_cont.outputs]
        for r, c in zip(list(rows)[:2], scratch_term.outputs):
            assert b.engine_logps[r] == pytest.approx(list(c.logprobs), abs=1e-4)
        # terminating answers are short, continuing ones stay within the completion budget
        assert all(len(c) <= 12 for c in got_term)
        assert all(len(c) <= MAX_TOKENS - cut for c in got_cont)
    assert b.handles == []
    _no_leak(llm)


def test_termination_input_errors(llm, stale):
    prompts, probs = _prompts(llm, 1, 1)
    kw = dict(boundaries_fn=lambda c: ([], len(c)), forced_suffix_ids=[5],
              max_completion_length=8, answer_max_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="even"):
        termination_rollouts(llm, stale, prompts, probs, num_samples=3, **kw)
    with pytest.raises(ValueError, match="problems"):
        termination_rollouts(llm, stale, prompts, probs * 2, num_samples=2, **kw)
    with pytest.raises(ValueError, match="refresh_steps"):
        StalePolicy(stale.llm, refresh_steps=-1)


def test_stale_refresh(llm):
    import torch

    pol = StalePolicy(llm, refresh_steps=2)
    v0 = llm.weight_version
    sd = {"model.norm.weight": torch.ones(llm.hf_config.hidden_size)}
    assert not pol.maybe_refresh(1, lambda: sd)
    assert pol.maybe_refresh(2, lambda: sd) and llm.weight_version == v0 + 1
    assert not pol.maybe_refresh(3, lambda: sd)
    assert StalePolicy(llm, 0).maybe_refresh(100, lambda: sd) is False


def test_progress_points_are_episode_boundaries(llm):
    prompts, probs = _prompts(llm, 2, 3)
    cfg = GRPOConfig(verifier="toy", progress_k=2, episode_max_episodes=4)
    st = settings_from_config(cfg)
    tok = llm.get_tokenizer()
    b = generate_rollouts(llm, prompts, probs, num_generations=2, max_completion_length=MAX_TOKENS,
                          temperature=1.0, top_p=1.0, seed=2)
    try:
        tps, secs = progress_for_batch(llm, b, st, seed=9)
    finally:
        b.release(llm)
    assert secs > 0 and len(tps) == len(b)
    for tp, comp in zip(tps, b.completion_ids):
        bounds, think = st.boundaries_fn(tok)(comp)
        assert len(bounds) <= 4
        assert tp.points == [0] + bounds + [think]
        assert tp.episode_ids == episodes.episode_ids(len(comp), bounds)
        assert len(tp.J) == len(tp.points) and all(len(r) == 2 for r in tp.rewards)
    _no_leak(llm)
    with pytest.raises(ValueError, match="keep=True"):
        b2 = generate_rollouts(llm, prompts, probs, num_generations=2, max_completion_length=8,
                               temperature=1.0, top_p=1.0, seed=2, keep=False)
        progress_for_batch(llm, b2, st, seed=0)


# ---- one training round of the loop (train.make_round) in mrt_progress mode ----

STEP_ARGS = ["--num_generations", "4", "--per_device_train_batch_size", "8",
             "--gradient_accumulation_steps", "1", "--max_completion_length", "96",
             "--progress_k", "2", "--episode_max_episodes", "3", "--eval_steps", "0",
             "--num_train_problems", "16"]


def _round(llm, mode_name, extra=()):
    from transformers import AutoModelForCausalLM

    from mrt_engine.trainer import dist as dist_mod
    from mrt_engine.trainer.config import load_config
    from mrt_engine.trainer.grading import get_verifier
    from mrt_engine.trainer.reward_modes import RewardContext, get_reward_mode
    from mrt_engine.trainer.rewards import build_reward
    from mrt_engine.trainer.round import train_pass
    from mrt_engine.trainer.sampler import PromptSampler
    from mrt_engine.trainer.train import load_data, make_round

    cfg = load_config("trainer/configs/toy_mrt.yaml",
                      STEP_ARGS + ["--reward_mode", mode_name] + list(extra))
    tok = llm.get_tokenizer()
    data = load_data(cfg, tok)
    dist = dist_mod.DistInfo()
    ctx = RewardContext(llm=llm, cfg=cfg, tokenizer=tok, verifier=get_verifier(cfg.verifier),
                        reward=build_reward(cfg), dist=dist)
    mode = get_reward_mode(cfg.reward_mode, ctx)
    rd, _ = make_round(cfg, mode, ctx, None, None, data, PromptSampler(len(data.problems), cfg.seed),
                       dist, 0)
    policy = AutoModelForCausalLM.from_pretrained(default_model_path())
    loss = train_pass(policy, rd, cfg, 1, measure_mismatch=False)["loss"]
    return cfg, rd, loss


def test_mrt_progress_round_advantages_follow_episodes(llm):
    import torch

    cfg, rd, loss = _round(llm, "mrt_progress", ["--alpha", "0.5"])
    _no_leak(llm)
    st = settings_from_config(cfg)
    tok = llm.get_tokenizer()
    tb = rd.tb
    comps = [tb.completion_ids[i, :int(tb.completion_mask[i].sum())].tolist() for i in range(len(tb))]
    rewards = rd.metrics["reward"]
    assert 0.0 <= rewards <= 1.0 and torch.isfinite(torch.tensor(loss))
    n_multi = 0
    for i, comp in enumerate(comps):
        bounds, think = st.boundaries_fn(tok)(comp)
        assert len(bounds) <= 3
        ep = episodes.episode_ids(len(comp), bounds)
        a = rd.advantages[i, :len(comp)]
        # constant within an episode of the thinking ...
        for e in set(ep[:think]):
            vals = a[[t for t in range(think) if ep[t] == e]]
            assert torch.all(vals == vals[0])
        # ... the outcome advantage alone after it, and nothing past the completion
        if think < len(comp):
            tail = a[think:]
            assert torch.all(tail == tail[0])
        assert torch.all(rd.advantages[i, len(comp):] == 0)
        n_multi += len(bounds) > 0
    assert n_multi > 0, "no trace had an episode boundary: the test checks nothing"
    assert rd.metrics["fork_s"] > 0


def test_mrt_progress_alpha_zero_is_outcome_grpo(llm):
    import torch

    _, rd0, loss0 = _round(llm, "mrt_progress", ["--alpha", "0"])
    _, rdg, lossg = _round(llm, "outcome")
    _no_leak(llm)
    assert torch.equal(rd0.tb.completion_ids, rdg.tb.completion_ids)
    # equal on every trained token (outcome mode broadcasts its scalar over the padding too)
    m = rdg.loss_mask.bool()
    assert torch.equal(rd0.advantages[m], rdg.advantages[m])
    assert loss0 == lossg
    _, rd5, loss5 = _round(llm, "mrt_progress", ["--alpha", "0.5"])
    assert not torch.equal(rd5.advantages[m], rdg.advantages[m])   # the bonus does change something
