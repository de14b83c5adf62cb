"""Group-relative advantages (GRPO), as TRL computes them, and the zero-spread group count.

Rewards are laid out group after group: rows [g*G, (g+1)*G) are the G completions of prompt g.
    A_i = r_i - mean(group of i)                     scale_rewards = "none"   (Dr. GRPO)
    A_i = (r_i - mean(group)) / (std(group) + 1e-4)  scale_rewards = "group"  (GRPO)
    A_i = (r_i - mean(group)) / (std(batch) + 1e-4)  scale_rewards = "batch"  ("Lite PPO")
std is Bessel-corrected (torch.std). "batch" uses the std of the rewards given: in TRL that is the
whole global batch gathered across ranks, so a data-parallel loop that wants TRL's exact number
must pass the gathered rewards (each rank then keeps its own slice).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's denominator guard

Rewards = Union[torch.Tensor, Sequence[float]]


def _as_grouped(rewards: Rewards, num_generations: int) -> torch.Tensor:
    """Rewards as a float tensor [num_groups, G], validated."""
    if isinstance(num_generations, bool) or not isinstance(num_generations, int):
        raise TypeError(f"num_generations: expected an int, got {type(num_generations).__name__}")
    if num_generations < 1:
        raise ValueError(f"num_generations: expected an int >= 1, got {num_generations}")
    if isinstance(rewards, torch.Tensor):
        r = rewards.detach()
        r = r if r.is_floating_point() else r.float()
    else:
        try:
            r = torch.tensor([float(x) for x in rewards], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise TypeError(f"rewards: expected a 1-D tensor or a list of numbers ({e})") from None
    if r.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor [N], got shape {tuple(r.shape)}")
    if r.numel() == 0 or r.numel() % num_generations:
        raise ValueError(f"rewards: expected a non-empty multiple of num_generations "
                         f"({num_generations}) values, got {r.numel()}")
    if not torch.isfinite(r).all():
        raise ValueError("rewards: expected finite numbers, got NaN or inf")
    return r.view(-1, num_generations)


def group_advantages(rewards: Rewards, num_generations: int,
                     scale_rewards: str = "group") -> torch.Tensor:
    """[N] advantages from [N] rewards laid out in consecutive groups of `num_generations`."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: expected one of {', '.join(SCALE_REWARDS)}, got "
                         f"{scale_rewards!r}")
    g = _as_grouped(rewards, num_generations)  # [P, G]
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return centred.reshape(-1)
    if scale_rewards == "group":
        # a group of one has no Bessel std: treat its spread as 0 (its centred reward is 0 anyway)
        std = g.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(g[:, :1])
    else:
        std = g.reshape(-1).std() if g.numel() > 1 else g.new_zeros(())
    return (centred / (std + STD_EPS)).reshape(-1)


def zero_std_groups(rewards: Rewards, num_generations: int) -> int:
    """Number of groups whose rewards are all equal (no learning signal from the outcome)."""
    g = _as_grouped(rewards, num_generations)
    return int(torch.isclose(g, g[:, :1]).all(dim=1).sum())
