"""Reward functions: callables `(completions: list[str], problems: list) -> list[float]`.

* `outcome_reward(verifier)`: 0/1 correctness from a `grading.py` verifier ("math", "toy" or any
  callable `(generated_text, problem) -> float`), applied to the generated text only.
* `format_reward`: 1.0 when the completion closes its thinking with exactly one `</think>` and
  writes exactly one `\\boxed{...}` after it, else 0.0.
* `combine({name: reward}, {name: weight})`: the weighted sum (TRL's default aggregation); it keeps
  each component's last values in `.last` so the loop can log them (e.g. accuracy = the outcome).
* `build_reward(cfg)`: what a GRPOConfig asks for (outcome, plus format when its weight > 0).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

Reward = Callable[[List[str], List[Any]], List[float]]

THINK_END = "</think>"
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _check_batch(completions, problems, who: str) -> None:
    if isinstance(completions, str) or not isinstance(completions, Sequence):
        raise TypeError(f"{who}: completions must be a list of str, got {type(completions).__name__}")
    if not all(isinstance(c, str) for c in completions):
        raise TypeError(f"{who}: every completion must be a str")
    if problems is not None and len(problems) != len(completions):
        raise ValueError(f"{who}: got {len(completions)} completions for {len(problems)} problems")


def outcome_reward(verifier: Union[str, Callable[[str, Any], float]] = "math") -> Reward:
    """0/1 (or the verifier's float) per completion, from `grading.get_verifier(verifier)`."""
    from mrt_engine.trainer.grading import get_verifier  # lazy: grading imports math-verify
    verify = get_verifier(verifier)

    def outcome(completions: List[str], problems: List[Any]) -> List[float]:
        _check_batch(completions, problems, "outcome")
        return [float(verify(c, p)) for c, p in zip(completions, problems)]

    outcome.verifier = verify
    return outcome


def format_ok(completion: str) -> bool:
    """Thinking closed exactly once, then exactly one \\boxed{} (or \\fbox{}) after it."""
    if completion.count(THINK_END) != 1:
        return False
    answer = completion.split(THINK_END, 1)[1]
    return len(_BOX.findall(answer)) == 1


def format_reward(completions: List[str], problems: Optional[List[Any]] = None) -> List[float]:
    """1.0 per well-formed completion (see `format_ok`), else 0.0. Problems are not used."""
    _check_batch(completions, problems, "format")
    return [1.0 if format_ok(c) else 0.0 for c in completions]


class CombinedReward:
    """Weighted sum of named rewards; `.last` holds each component's values of the last call."""

    def __init__(self, rewards: Mapping[str, Reward], weights: Optional[Mapping[str, float]] = None):
        if not rewards:
            raise ValueError("combine: expected at least one reward")
        for name, fn in rewards.items():
            if not callable(fn):
                raise TypeError(f"combine: reward {name!r} is not callable")
        weights = dict(weights or {})
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(f"combine: weights for unknown rewards {sorted(unknown)}; rewards are "
                             f"{sorted(rewards)}")
        self.rewards = dict(rewards)
        self.weights = {n: float(weights.get(n, 1.0)) for n in rewards}
        self.last: Dict[str, List[float]] = {}

    def __call__(self, completions: List[str], problems: List[Any]) -> List[float]:
        total = [0.0] * len(completions)
        self.last = {}
        for name, fn in self.rewards.items():
            vals = [float(v) for v in fn(completions, problems)]
            if len(vals) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(vals)} values for "
                                 f"{len(completions)} completions")
            self.last[name] = vals
            w = self.weights[name]
            total = [t + w * v for t, v in zip(total, vals)]
        return total


def combine(rewards: Mapping[str, Reward], weights: Optional[Mapping[str, float]] = None) -> CombinedReward:
    """sum_name weights[name] * rewards[name](completions, problems); missing weights are 1."""
    return CombinedReward(rewards, weights)


def build_reward(cfg) -> CombinedReward:
    """The reward a config asks for: `outcome` (cfg.verifier), plus `format` when
    cfg.format_reward_weight > 0. `.last["outcome"]` is the accuracy signal."""
    parts: Dict[str, Reward] = {"outcome": outcome_reward(cfg.verifier)}
    weights = {"outcome": 1.0}
    if cfg.format_reward_weight > 0:
        parts["format"] = format_reward
        weights["format"] = cfg.format_reward_weight
    return combine(parts, weights)
