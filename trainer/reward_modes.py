"""Reward modes: how one generation round becomes per-token advantages — the seam MRT plugs into.

A mode is an object with two methods, called once per generation round by `train.py`:

    batch  = mode.rollout(ctx, prompt_ids, problems, seed)   # RolloutBatch, handles kept
    credit = mode.credit(ctx, batch)                          # Credit: advantages [B] or [B, T], ...

after which the loop releases every kept handle of `credit.batch` and checks that no KV is
left pinned. `credit` may fork from the kept handles (MRT's progress at episode boundaries) before
that; `rollout` may build its own rows (MRT's termination baseline samples partial rollouts from a
stale policy). `OutcomeMode` is plain GRPO: outcome (+ optional format) reward, group-normalised.

Registry: `register_reward_mode("name", factory)` where `factory(ctx) -> mode`. Names this file
does not define are looked up after importing `mrt_engine.trainer.mrt`, which registers its own
(`mrt_progress`, `mrt_termination`) when it exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence

import torch

from mrt_engine.trainer.rollout import RolloutBatch, generate_rollouts


@dataclass
class RewardContext:
    """What a mode may use: the engine, the run's config, reward functions and the ranks."""

    llm: Any                       # this rank's mrt_engine.LLM (weights = the current policy)
    cfg: Any                       # GRPOConfig
    tokenizer: Any
    verifier: Callable[[str, Any], float]
    reward: Callable               # rewards.build_reward(cfg): (completions, problems) -> [B]
    dist: Any                      # dist.DistInfo (rank, world_size, all_gather)
    step: int = 0                  # optimizer step the round is generated for


@dataclass
class Credit:
    """One round's learning signal. advantages: [B] (one per row) or [B, T] over completion
    positions (T >= the longest completion; extra columns are ignored). rewards: [B] scalar reward
    per row (for metrics and zero-spread counts). correct: [B] verifier outcome in [0, 1].
    metrics: extra per-round numbers (e.g. "fork_s", "progress_mean"). batch: the rows to train on
    (usually the round's batch itself)."""

    advantages: torch.Tensor
    rewards: List[float]
    correct: List[float]
    batch: RolloutBatch
    metrics: Dict[str, float] = field(default_factory=dict)


class OutcomeMode:
    """GRPO: reward = weighted sum of the reward functions; A = group-normalised reward."""

    needs_handles = False

    def __init__(self, ctx: RewardContext):
        self.ctx = ctx

    def rollout(self, ctx: RewardContext, prompt_ids, problems, seed: int) -> RolloutBatch:
        cfg = ctx.cfg
        return generate_rollouts(ctx.llm, prompt_ids, problems, num_generations=cfg.num_generations,
                                 max_completion_length=cfg.max_completion_length,
                                 temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                                 max_prompt_length=cfg.max_prompt_length, keep=self.needs_handles)

    def credit(self, ctx: RewardContext, batch: RolloutBatch) -> Credit:
        rewards = ctx.reward(batch.texts, batch.problems)
        last = getattr(ctx.reward, "last", {})
        correct = last.get("outcome") or [float(ctx.verifier(t, p))
                                          for t, p in zip(batch.texts, batch.problems)]
        adv = normalised_advantages(ctx, rewards)
        return Credit(advantages=adv, rewards=rewards, correct=correct, batch=batch)


def normalised_advantages(ctx: RewardContext, rewards: Sequence[float]) -> torch.Tensor:
    """group_advantages of this rank's rows. Groups never straddle ranks, so "group" and "none"
    are local; "batch" divides by the std of the *global* batch, so the rewards of every rank are
    gathered first and this rank keeps its slice (TRL's number exactly)."""
    from mrt_engine.trainer.advantages import group_advantages

    cfg = ctx.cfg
    local = torch.tensor([float(r) for r in rewards], dtype=torch.float32)
    if cfg.scale_rewards == "batch" and ctx.dist.world_size > 1:
        everyone = ctx.dist.all_gather(local)             # [P * B], rank-major
        adv = group_advantages(everyone, cfg.num_generations, "batch")
        n = local.numel()
        return adv[ctx.dist.rank * n:(ctx.dist.rank + 1) * n]
    return group_advantages(local, cfg.num_generations, cfg.scale_rewards)


_REGISTRY: Dict[str, Callable[[RewardContext], Any]] = {"outcome": OutcomeMode}


def register_reward_mode(name: str, factory: Callable[[RewardContext], Any]) -> None:
    """Make `reward_mode: name` build `factory(ctx)`; the object needs `rollout` and `credit`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward mode name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable (ctx) -> mode, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def get_reward_mode(name: str, ctx: RewardContext):
    if name not in _REGISTRY:
        try:
            import mrt_engine.trainer.mrt  # noqa: F401  (registers the MRT modes on import)
        except ImportError:
            pass
    if name not in _REGISTRY:
        raise ValueError(f"reward_mode {name!r} is not available; registered: {sorted(_REGISTRY)}")
    mode = _REGISTRY[name](ctx)
    for attr in ("rollout", "credit"):
        if not callable(getattr(mode, attr, None)):
            raise TypeError(f"reward mode {name!r} has no {attr}() method")
    return mode


def per_token(advantages: torch.Tensor, batch_size: int, num_cols: int) -> torch.Tensor:
    """[B] or [B, T'] advantages as [B, num_cols] (a row's scalar broadcast over its tokens;
    per-token ones cropped or zero-padded to the batch's completion width)."""
    if not isinstance(advantages, torch.Tensor):
        advantages = torch.as_tensor(advantages, dtype=torch.float32)
    a = advantages.detach().float()
    if a.dim() == 1:
        if a.shape[0] != batch_size:
            raise ValueError(f"advantages: expected [B]={batch_size} values, got {a.shape[0]}")
        return a[:, None].expand(batch_size, num_cols).contiguous()
    if a.dim() != 2 or a.shape[0] != batch_size:
        raise ValueError(f"advantages: expected shape [B] or [B, T] with B={batch_size}, got "
                         f"{tuple(a.shape)}")
    if a.shape[1] >= num_cols:
        return a[:, :num_cols].contiguous()
    return torch.cat([a, a.new_zeros(batch_size, num_cols - a.shape[1])], dim=1)
