"""MRT math on hand-built traces with known J (no engine): mrt_progress per-token advantages,
alpha = 0 == outcome GRPO (advantages and loss, bit for bit), the termination baseline, and the
STaR / MRT-STaR selection (cumulative progress == area under the J step curve, brute-forced)."""
import bisect
import math
import random
import statistics
from dataclasses import dataclass
from typing import List

import pytest
import torch

from mrt_engine.trainer.advantages import STD_EPS, group_advantages
from mrt_engine.trainer.losses import policy_loss
from mrt_engine.trainer.mrt import (cumulative_progress, normalised_progress, progress_advantages,
                                    star_select, termination_advantages)


@dataclass
class Trace:  # the duck type of progress.TraceProgress that mrt.py reads
    points: List[int]
    J: List[float]
    completion_len: int

    @property
    def progress(self):
        return [b - a for a, b in zip(self.J, self.J[1:])]

    @property
    def think_len(self):
        return self.points[-1]

    @property
    def episode_ids(self):
        bounds = self.points[1:-1]
        return [bisect.bisect_right(bounds, t) for t in range(self.completion_len)]


# A: 6 tokens, thinking 4, episodes [0, 2) and [2, 4), J 0 -> .5 -> 1, correct
# B: 5 tokens, thinking 3, one episode [0, 3), J 0 -> 0, wrong
A = Trace([0, 2, 4], [0.0, 0.5, 1.0], 6)
B = Trace([0, 3], [0.0, 0.0], 5)


def test_progress_advantages_by_hand():
    adv = progress_advantages([1.0, 0.0], [A, B], 2, alpha=0.5)
    o = 0.5 / (math.sqrt(0.5) + STD_EPS)            # outcome advantage: +-o
    s = math.sqrt(((1 / 6) ** 2 * 2 + (1 / 3) ** 2) / 2)  # progress values .5, .5, 0: mean 1/3
    up, down = (1 / 6) / (s + STD_EPS), (-1 / 3) / (s + STD_EPS)
    want = [[o + 0.5 * up] * 4 + [o] * 2,                 # answer tokens: outcome only
            [-o + 0.5 * down] * 3 + [-o] * 2 + [0.0]]      # padding: 0
    assert adv.shape == (2, 6)
    assert adv.tolist()[0] == pytest.approx(want[0], rel=1e-6)
    assert adv.tolist()[1] == pytest.approx(want[1], rel=1e-6)


def test_progress_advantages_raw_by_hand():
    adv = progress_advantages([1.0, 0.0], [A, B], 2, alpha=2.0, scale_rewards="none",
                              progress_norm="raw", num_cols=8)
    assert adv.tolist() == [[0.5 + 1.0] * 4 + [0.5] * 2 + [0.0] * 2,  # dyadic: exact in fp32
                            [-0.5] * 5 + [0.0] * 3]


def test_episodes_get_their_own_progress():
    # one trace, three episodes with progress +.5, 0, -.25: tokens carry their episode's value
    t = Trace([0, 1, 3, 4], [0.25, 0.75, 0.75, 0.5], 5)
    adv = progress_advantages([1.0, 1.0], [t, t], 2, alpha=1.0, scale_rewards="none",
                              progress_norm="raw")
    assert adv[0].tolist() == pytest.approx([0.5, 0.0, 0.0, -0.25, 0.0])


def test_zero_spread_group_still_learns_from_progress():
    fast = Trace([0, 2, 8], [0.0, 1.0, 1.0], 9)   # solved in the first episode, then wandered
    slow = Trace([0, 6, 8], [0.0, 0.0, 1.0], 9)
    adv = progress_advantages([1.0, 1.0], [fast, slow], 2, alpha=1.0)
    assert (adv[:, 8] == 0).all()                      # outcome part: a zero-spread group gives 0
    assert adv[0, 0] > 0 and adv[0, 5] < 0             # productive vs idle episode
    assert adv[1, 0] < 0 and adv[1, 7] > 0
    # every episode progressing the same: no bonus at all (no 1/eps blow-up)
    same = Trace([0, 4, 8], [0.0, 0.5, 1.0], 9)
    assert progress_advantages([1.0, 1.0], [same, same], 2, alpha=1.0).abs().max() == 0


def _random_traces(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        think = rng.randint(1, 12)
        bounds = sorted(rng.sample(range(1, think), min(rng.randint(0, 3), think - 1)))
        points = [0] + bounds + [think]
        J = [rng.choice([0, 0.25, 0.5, 0.75, 1.0]) for _ in points]
        out.append(Trace(points, J, think + rng.randint(0, 4)))
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_progress_advantages_match_loop_twin(scale):
    G, traces = 4, _random_traces(12, seed=1)
    rewards = [float(random.Random(i).random() < 0.5) for i in range(12)]
    adv = progress_advantages(rewards, traces, G, alpha=0.7, scale_rewards=scale)
    outcome = group_advantages(rewards, G, scale).tolist()
    for g in range(0, 12, G):
        vals = [p for tr in traces[g:g + G] for p in tr.progress]
        m, s = statistics.mean(vals), statistics.stdev(vals)
        for i in range(g, g + G):
            tr = traces[i]
            for t in range(adv.shape[1]):
                if t >= tr.completion_len:
                    want = 0.0
                elif t >= tr.think_len:
                    want = outcome[i]
                else:
                    want = outcome[i] + 0.7 * (tr.progress[tr.episode_ids[t]] - m) / (s + STD_EPS)
                assert adv[i, t].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    norm = normalised_progress(traces, G)
    assert [len(x) for x in norm] == [len(t.progress) for t in traces]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_alpha_zero_is_outcome_grpo_exactly(loss_type):
    G, traces = 4, _random_traces(8, seed=2)
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    T = max(t.completion_len for t in traces)
    adv_tok = progress_advantages(rewards, traces, G, alpha=0.0)
    outcome = group_advantages(rewards, G, "group")
    mask = torch.tensor([[1.0] * t.completion_len + [0.0] * (T - t.completion_len) for t in traces])
    assert torch.equal(adv_tok * mask, outcome[:, None] * mask)
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(8, T, generator=g)
    new = (old + 0.3 * torch.randn(8, T, generator=g)).requires_grad_(True)
    la, _ = policy_loss(new, old, adv_tok, mask, loss_type, 0.2, max_completion_length=T)
    ga, = torch.autograd.grad(la, new)
    lb, _ = policy_loss(new, old, outcome, mask, loss_type, 0.2, max_completion_length=T)
    gb, = torch.autograd.grad(lb, new)
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    # and alpha > 0 does change it (the test above could not pass by ignoring alpha)
    lc, _ = policy_loss(new, old, progress_advantages(rewards, traces, G, alpha=1.0), mask,
                        loss_type, 0.2, max_completion_length=T)
    assert not torch.equal(la, lc)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rewards=[1.0]), ValueError, "1 rewards for 2 traces"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(progress_norm="std"), ValueError, "progress_norm"),
    (dict(traces=[A, Trace([0, 2, 4], [0.0, 1.0], 6)]), ValueError, "episode ids"),
    (dict(traces=[A, Trace([0, 9], [0.0, 1.0], 5)]), ValueError, "think_len"),
    (dict(traces=[A, object()]), TypeError, "traces\\[1\\]"),
    (dict(num_cols=3), ValueError, "num_cols"),
])
def test_progress_advantages_bad_input(kwargs, exc, match):
    args = dict(rewards=[1.0, 0.0], traces=[A, B], num_generations=2, alpha=1.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        progress_advantages(**args)


# ---- termination baseline ----

def test_termination_by_hand():
    # group 1: terminating rows score 1, 0 -> baseline .5; group 2: baseline 0
    r = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    term = [True, True, False, False] * 2
    assert termination_advantages(r, term, 4).tolist() == [0.5, -0.5, 0.5, 0.5, 0.0, 0.0, 1.0, 0.0]
    s = statistics.stdev(r[:4])
    got = termination_advantages(r, term, 4, scale_rewards="group").tolist()
    assert got[:4] == pytest.approx([0.5 / (s + STD_EPS), -0.5 / (s + STD_EPS),
                                     0.5 / (s + STD_EPS), 0.5 / (s + STD_EPS)])


def test_termination_bad_input():
    with pytest.raises(ValueError, match="no terminating row"):
        termination_advantages([1, 0, 1, 0], [True, False, False, False], 2)
    with pytest.raises(ValueError, match="flags"):
        termination_advantages([1, 0], [True], 2)
    with pytest.raises(ValueError, match="group_size"):
        termination_advantages([1, 0, 1], [True] * 3, 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        termination_advantages([1, 0], [True, False], 2, scale_rewards="batch")


# ---- STaR / MRT-STaR ----

def brute_area(tr, budget):
    """Mean of J over token positions 0..budget-1 (J holds its last value), minus J(0)."""
    total = 0.0
    for t in range(budget):
        j = bisect.bisect_right(tr.points, t) - 1
        total += tr.J[j]
    return total / budget - tr.J[0]


def test_cumulative_progress_is_the_area_under_J():
    for tr in _random_traces(30, seed=3):
        budget = tr.completion_len + 3
        assert cumulative_progress(tr, budget) == pytest.approx(brute_area(tr, budget), abs=1e-12)


def test_star_select_by_hand():
    X = Trace([0, 10, 20], [0.0, 0.0, 1.0], 22)   # right answer found late
    Y = Trace([0, 5, 30], [0.0, 1.0, 1.0], 32)    # found early (same J(end) - J(0) = 1)
    W = Trace([0, 4], [0.0, 0.0], 6)              # wrong
    assert cumulative_progress(X, 40) == pytest.approx(0.5)
    assert cumulative_progress(Y, 40) == pytest.approx(35 / 40)
    correct = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    rows = [X, Y, W, W, W, W]
    assert star_select(correct, 3, "star") == [0]
    assert star_select(correct, 3, "mrt_star", traces=rows, budget=40) == [1]
    assert star_select(correct, 3, "mrt_star", traces=rows, keep=2) == [0, 1]
    assert star_select(correct, 3, "star", keep=5) == [0, 1]
    # ties in score go to the shorter thinking
    Z = Trace([0, 5, 12], [0.0, 1.0, 1.0], 13)   # same first episode as Y, shorter
    assert star_select([1.0, 1.0], 2, "mrt_star", traces=[Y, Z], budget=40) == [1]


def test_star_select_bad_input():
    with pytest.raises(ValueError, match="traces"):
        star_select([1.0, 0.0], 2, "mrt_star")
    with pytest.raises(ValueError, match="mode"):
        star_select([1.0, 0.0], 2, "best")
    with pytest.raises(ValueError, match="keep"):
        star_select([1.0, 0.0], 2, keep=0)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        star_select([1.0, 0.0, 1.0], 2)
    with pytest.raises(ValueError, match="points"):
        cumulative_progress(Trace([0, 3], [0.0, 1.0, 1.0], 4), 10)


# ---- the reward modes' glue, with the engine side stubbed (the engine side has its own tests) ----

class _Dist:
    rank, world_size, device = 0, 1, "cpu"


class _Batch:
    def __init__(self, texts, problems):
        self.texts, self.problems = texts, problems


def _ctx(cfg):
    from mrt_engine.trainer.reward_modes import RewardContext
    from mrt_engine.trainer.rewards import combine

    verifier = lambda text, prob: float(text == prob)  # noqa: E731
    reward = combine({"outcome": lambda cs, ps: [verifier(c, p) for c, p in zip(cs, ps)]})
    tok = lambda text, add_special_tokens=False: {"input_ids": [ord(ch) for ch in text]}  # noqa: E731
    return RewardContext(llm=object(), cfg=cfg, tokenizer=tok, verifier=verifier, reward=reward,
                         dist=_Dist(), step=3)


def test_progress_mode_composes_the_math(monkeypatch):
    from mrt_engine.trainer import mrt_rollout
    from mrt_engine.trainer.config import GRPOConfig
    from mrt_engine.trainer.reward_modes import get_reward_mode

    cfg = GRPOConfig(reward_mode="mrt_progress", num_generations=2, per_device_train_batch_size=2,
                     verifier="toy", alpha=0.5)
    ctx = _ctx(cfg)
    batch = _Batch(["x", "y"], ["x", "z"])  # rewards 1, 0: the A / B traces above
    seen = {}

    def fake_progress(llm, b, settings, seed):
        seen["seed"] = seed
        return [A, B], 0.25
    monkeypatch.setattr(mrt_rollout, "progress_for_batch", fake_progress)
    mode = get_reward_mode("mrt_progress", ctx)
    assert mode.needs_handles
    cr = mode.credit(ctx, batch)
    assert torch.equal(cr.advantages, progress_advantages([1.0, 0.0], [A, B], 2, alpha=0.5))
    assert cr.rewards == [1.0, 0.0] and cr.correct == [1.0, 0.0]
    assert cr.metrics["fork_s"] == 0.25 and cr.metrics["progress_mean"] == pytest.approx(1 / 3)
    assert cr.metrics["J_end_mean"] == 0.5 and cr.metrics["episodes_mean"] == 1.5
    ctx.step = 4
    mode.credit(ctx, batch)
    assert seen["seed"] != 0  # derived from (seed, step, rank)


def test_termination_mode_composes_the_math(monkeypatch):
    from mrt_engine.trainer import mrt_rollout
    from mrt_engine.trainer.config import GRPOConfig
    from mrt_engine.trainer.reward_modes import get_reward_mode

    cfg = GRPOConfig(reward_mode="mrt_termination", num_generations=4,
                     per_device_train_batch_size=4, verifier="toy", scale_rewards="none")
    ctx = _ctx(cfg)
    monkeypatch.setattr(mrt_rollout.StalePolicy, "from_model", classmethod(lambda cls, *a, **k: "stale"))
    batch = _Batch(["a", "b", "a", "a"], ["a"] * 4)
    calls = {}

    def fake_rollouts(llm, stale, prompt_ids, problems, **kw):
        calls.update(kw, stale=stale)
        return mrt_rollout.TerminationBatch(batch, [True, True, False, False], [1], [3], [9],
                                            {"fork": 0.5, "stale_generate": 1.5})
    monkeypatch.setattr(mrt_rollout, "termination_rollouts", fake_rollouts)
    mode = get_reward_mode("mrt_termination", ctx)
    assert mode.rollout(ctx, [[1, 2]], ["a"], seed=9) is batch
    assert calls["num_samples"] == 4 and calls["seed"] == 9 and calls["stale"] == "stale"
    assert calls["forced_suffix_ids"] == [ord(c) for c in mode.settings.forced_suffix]
    cr = mode.credit(ctx, batch)
    assert cr.advantages.tolist() == [0.5, -0.5, 0.5, 0.5]
    assert cr.metrics["termination_reward"] == 0.5 and cr.metrics["continuation_reward"] == 1.0
    with pytest.raises(ValueError, match="must follow"):
        mode.credit(ctx, _Batch(["a"] * 4, ["a"] * 4))
    with pytest.raises(ValueError, match="scale_rewards"):
        get_reward_mode("mrt_termination", _ctx(GRPOConfig(
            reward_mode="mrt_termination", num_generations=4, per_device_train_batch_size=4,
            scale_rewards="batch")))
