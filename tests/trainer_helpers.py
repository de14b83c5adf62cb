"""Shared by the trainer tests (test_train, test_resume, test_ddp)."""
from __future__ import annotations

from mrt_engine.trainer import reward_modes


class ParityMode(reward_modes.OutcomeMode):
    """reward = share of odd token ids: a spread in every group even when 12-token completions
    never reach an answer, so every step moves the weights."""

    def credit(self, ctx, batch):
        rewards = [sum(t % 2 for t in c) / max(len(c), 1) for c in batch.completion_ids]
        adv = reward_modes.normalised_advantages(ctx, rewards)
        return reward_modes.Credit(adv, rewards, [0.0] * len(rewards), batch)
