"""Thinking traces of a noisy searcher for the pair-sum task, and their parsing.

A trace is a sequence of episodes (paragraphs separated by a blank line), each opening with a trigger
phrase ("Let me try", "Wait", "Alternatively", ...) and holding one attempt `a+b=s`. The searcher
tries pairs in random order, sometimes repeats one, and sometimes keeps going after it found the
answer; then it closes with `</think>` and `\\boxed{a+b}`. A forced-termination example cuts the
thinking anywhere, appends FORCED_SUFFIX, and answers with what the prefix found, or a guess among
the pairs it has not tried yet, so that the model's answer when cut off reflects its progress.

Layout of a full example (prompt from `Problem.prompt()`, which ends with "<think>\\n"):
    Let me try 3+8=11, not 12.\\n\\nWait, 3+9=12. Found it: 3+9.\\n</think>\\n\\boxed{3+9}
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from mrt_engine.trainer.toy.task import Problem, parse_answer

FIRST_TRIGGER = "Let me try"
TRIGGERS = ("Wait,", "Alternatively,", "But wait,")
CHECK_TRIGGER = "But let me double-check:"
EPISODE_STARTS = (FIRST_TRIGGER,) + TRIGGERS + (CHECK_TRIGGER,)
EPISODE_SEP = "\n\n"
THINK_END = "</think>"
NATURAL_END = "\n" + THINK_END + "\n"
FORCED_SUFFIX = "\n\nTime is up.\n" + THINK_END + "\n"


@dataclass
class Trace:
    """A searcher's thinking: one text per episode, which episode found the pair, and the answer."""

    episodes: List[str]
    found_at: int  # index of the episode that found the pair
    answer: Tuple[int, int]
    attempts: List[Tuple[int, int]] = field(default_factory=list)  # one pair per episode

    @property
    def thinking(self) -> str:
        return EPISODE_SEP.join(self.episodes)

    def completion(self) -> str:
        """Everything the model writes after the prompt (without the end-of-sequence token)."""
        return self.thinking + NATURAL_END + boxed(self.answer)


def boxed(pair: Tuple[int, int]) -> str:
    return "\\boxed{%d+%d}" % pair


def _attempt(trigger: str, a: int, b: int, target: int) -> str:
    s = a + b
    if s == target:
        # restating the pair right after the marker lets the answer copy it with one induction step
        return f"{trigger} {a}+{b}={s}. Found it: {a}+{b}."
    return f"{trigger} {a}+{b}={s}, not {target}."


def searcher_trace(problem: Problem, rng: random.Random, p_repeat: float = 0.2,
                   p_continue: float = 0.4) -> Trace:
    """One noisy search: random order, repeats with prob `p_repeat`, may go on after finding."""
    if not (0.0 <= p_repeat < 1.0 and 0.0 <= p_continue < 1.0):
        raise ValueError(f"p_repeat and p_continue must be in [0, 1), got {p_repeat}, {p_continue}")
    order = problem.pairs()
    rng.shuffle(order)
    order = [p if rng.random() < 0.5 else (p[1], p[0]) for p in order]  # either operand order
    episodes: List[str] = []
    attempts: List[Tuple[int, int]] = []
    found_at = -1
    queue = list(order)
    while found_at < 0:
        if attempts and rng.random() < p_repeat:
            pair = rng.choice(attempts)  # the noisy part: re-checks something already ruled out
        else:
            pair = queue.pop(0)
        trigger = FIRST_TRIGGER if not episodes else rng.choice(TRIGGERS)
        episodes.append(_attempt(trigger, pair[0], pair[1], problem.target))
        attempts.append(pair)
        if sum(pair) == problem.target:
            found_at = len(episodes) - 1
    answer = attempts[found_at]
    # Keep going after the answer is found: a re-check, or more (pointless) attempts.
    while rng.random() < p_continue and len(episodes) < found_at + 3:
        if rng.random() < 0.5 or not queue:
            episodes.append(f"{CHECK_TRIGGER} {answer[0]}+{answer[1]}={problem.target}. Yes.")
            attempts.append(answer)
        else:
            pair = queue.pop(0)
            episodes.append(_attempt(rng.choice(TRIGGERS), pair[0], pair[1], problem.target))
            attempts.append(pair)
    return Trace(episodes, found_at, answer, attempts)


def tried_pairs(problem: Problem, thinking_prefix: str) -> List[Tuple[int, int]]:
    """Pairs whose attempt `a+b=s` appears complete in a thinking prefix (either operand order).

    The sum counts only when a non-digit follows it: "3+9=1" cut mid-number is not yet "3+9=12".
    """
    done = []
    for a, b in problem.pairs():
        s = a + b
        pattern = r"(?<!\d)(%d\+%d|%d\+%d)=%d(?=\D)" % (a, b, b, a, s)
        if re.search(pattern, thinking_prefix):
            done.append((a, b))
    return done


def forced_answer(problem: Problem, thinking_prefix: str, rng: random.Random) -> Tuple[int, int]:
    """The answer after a cut: the pair found so far, else a guess among the untried pairs."""
    tried = tried_pairs(problem, thinking_prefix)
    if any(a + b == problem.target for a, b in tried):
        a, b = next(p for p in tried if sum(p) == problem.target)
        # answer in the order the trace wrote it
        return (a, b) if f"{a}+{b}={problem.target}" in thinking_prefix else (b, a)
    untried = [p for p in problem.pairs() if p not in tried] or problem.pairs()
    return rng.choice(untried)


def forced_completion(problem: Problem, thinking_prefix: str, rng: random.Random) -> str:
    """Prefix, forced suffix and the forced answer: what the model should write when cut off."""
    return thinking_prefix + FORCED_SUFFIX + boxed(forced_answer(problem, thinking_prefix, rng))


# ---- parsing (for sampled text as well as for generated traces) ----

def thinking_of(completion: str) -> str:
    """The thinking part of a completion: everything before the first `</think>`, newline-trimmed."""
    cut = completion.find(THINK_END)
    text = completion if cut < 0 else completion[:cut]
    return text.rstrip("\n")


def episode_starts(thinking: str) -> List[int]:
    """Character offsets where episodes start: the beginning, and every paragraph opening a trigger."""
    starts = []
    pos = 0
    for para in thinking.split(EPISODE_SEP):
        if para.startswith(EPISODE_STARTS) or (not starts and para.strip()):
            starts.append(pos)
        pos += len(para) + len(EPISODE_SEP)
    return starts


def count_episodes(completion: str) -> int:
    """Number of episodes in the thinking of a completion (0 for empty thinking)."""
    return len(episode_starts(thinking_of(completion)))


def final_answer(completion: str) -> Optional[Tuple[int, int]]:
    """The pair in the last `\\boxed{}` after `</think>`, or None."""
    cut = completion.rfind(THINK_END)
    return parse_answer(completion[cut:]) if cut >= 0 else None
