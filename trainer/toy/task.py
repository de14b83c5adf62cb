"""Synthetic verifiable search task: find the two numbers of a small set that sum to a target.

A problem is a list of distinct digits 1..9 and a target that exactly one pair of them reaches, so
solving it needs search over pairs (each attempt computes a sum and checks it). The difficulty knob is
the set size: n numbers give n*(n-1)/2 candidate pairs. The verifier accepts any pair of set members
(two different positions) whose sum is the target; `grade` reads the last `\\boxed{a+b}` of a text.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

MIN_DIFFICULTY = 3
MAX_DIFFICULTY = 7  # 8 or 9 distinct digits almost never leave a target reached by exactly one pair
MAX_VALUE = 9


@dataclass(frozen=True)
class Problem:
    """One search problem: the numbers in the order shown, the target and its unique pair."""

    numbers: Tuple[int, ...]
    target: int
    answer: Tuple[int, int]  # the unique pair, in the order the numbers are shown

    @property
    def difficulty(self) -> int:
        return len(self.numbers)

    def pairs(self) -> List[Tuple[int, int]]:
        """Every candidate pair (by value, in display order): the searcher's action space."""
        xs = self.numbers
        return [(xs[i], xs[j]) for i in range(len(xs)) for j in range(i + 1, len(xs))]

    def prompt(self) -> str:
        """The text the model is given; thinking starts right after it."""
        shown = " ".join(str(x) for x in self.numbers)
        return f"Find two of {shown} that sum to {self.target}.\n<think>\n"

    def to_json(self) -> dict:
        d = asdict(self)
        d["numbers"] = list(self.numbers)
        d["answer"] = list(self.answer)
        d["prompt"] = self.prompt()
        d["solution"] = f"{self.answer[0]}+{self.answer[1]}"
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Problem":
        return cls(tuple(int(x) for x in d["numbers"]), int(d["target"]),
                   (int(d["answer"][0]), int(d["answer"][1])))


def _check_difficulty(difficulty: int) -> None:
    if isinstance(difficulty, bool) or not isinstance(difficulty, int):
        raise TypeError(f"difficulty must be an int, got {type(difficulty).__name__}")
    if not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty (set size) must be in [{MIN_DIFFICULTY}, {MAX_DIFFICULTY}], "
                         f"got {difficulty}")


def generate_problem(rng: random.Random, difficulty: int = 5) -> Problem:
    """Draw one problem with `difficulty` numbers whose target is reached by exactly one pair."""
    _check_difficulty(difficulty)
    while True:
        numbers = rng.sample(range(1, MAX_VALUE + 1), difficulty)
        sums = {}
        for i in range(difficulty):
            for j in range(i + 1, difficulty):
                sums.setdefault(numbers[i] + numbers[j], []).append((numbers[i], numbers[j]))
        unique = sorted(s for s, ps in sums.items() if len(ps) == 1)
        if unique:
            target = rng.choice(unique)
            return Problem(tuple(numbers), target, sums[target][0])


def generate_problems(n: int, difficulty: int = 5, seed: int = 0) -> List[Problem]:
    """`n` problems drawn deterministically from `seed`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(seed)
    return [generate_problem(rng, difficulty) for _ in range(n)]


def verify(problem: Problem, pair: Optional[Sequence[int]]) -> bool:
    """True if `pair` names two members of the set (two different positions) summing to the target."""
    if pair is None or len(pair) != 2:
        return False
    a, b = int(pair[0]), int(pair[1])
    pool = list(problem.numbers)
    for x in (a, b):
        if x not in pool:
            return False
        pool.remove(x)  # a number may be used once: "3+3" needs two 3s in the set
    return a + b == problem.target


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_PAIR = re.compile(r"^\s*(-?\d+)\s*\+\s*(-?\d+)\s*$")


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` in `text`, or None."""
    found = _BOXED.findall(text)
    return found[-1] if found else None


def parse_answer(text: str) -> Optional[Tuple[int, int]]:
    """The pair in the last `\\boxed{a+b}` of `text`, or None when there is none or it is malformed."""
    boxed = extract_boxed(text)
    if boxed is None:
        return None
    m = _PAIR.match(boxed)
    return (int(m.group(1)), int(m.group(2))) if m else None


def grade(text: str, problem: Problem) -> bool:
    """Task-level grade of a model's answer text: its last boxed pair verifies."""
    return verify(problem, parse_answer(text))


def export_jsonl(problems: Iterable[Problem], path: str) -> str:
    """Write one JSON object per line; `datasets.load_dataset("json", data_files=path)` reads it."""
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_json()) + "\n")
    return path


def load_jsonl(path: str) -> List[Problem]:
    with open(path, encoding="utf-8") as f:
        return [Problem.from_json(json.loads(line)) for line in f if line.strip()]
