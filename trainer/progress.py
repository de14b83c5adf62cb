"""MRT progress: J (forced-answer success) at every episode boundary of kept traces, by engine forks.

    outs = llm.generate(prompts, SamplingParams(n=4, max_tokens=1024), keep=True)
    handles = [c.handle for o in outs for c in o.outputs]
    tps = estimate_progress(llm, handles, problems_per_trace, "math", k=8)
    tps[0].J, tps[0].progress, tps[0].episode_ids          # per trace

For each kept trace (prompt + completion, KV pinned by its handle) the points are
  0                 empty thinking: cut right after the prompt,
  b_1 < b_2 < ...   every episode boundary (`episodes.segment`: the first token of the paragraph
                    that opens each new episode), cut just before it,
  think_len         the natural end: the whole thinking (the paper's "full trace, terminated
                    naturally", mrt.md §1.3).
At a cut point the forced suffix (default: the paper's "Time is up. ... </think> ..." text) is
appended and K answers are sampled; J is their mean reward. At the natural end no time-is-up text
is added: a trace that closed its thinking keeps its own closing tokens (the fork starts right
after `stop_at`, e.g. "</think>") and the K answers are re-sampled from there; a trace cut off by
max_tokens gets `natural_suffix` (the paper's "\\n</think>") at its end instead.

Each point is one `Fork(handle, at, suffix)` with SamplingParams(n=K): the engine prefills the
suffix once (plus the re-fed token at the cut) and forks the K answers after it, sharing the
trace's KV up to the cut. All points of all traces go to the engine in one `generate` call.

Seeds: the answers of trace i use seed `sampling.seed + i` (the engine mixes the prompt token ids
into a request's seed, so the points of one trace still draw different noise, and the same cut
generated from scratch as plain token ids with the same seed draws the same tokens).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mrt_engine import Fork, SamplingParams
from mrt_engine.trainer import episodes, grading

# The paper's meta-prover prompt (mrt.md §1.3, `apply_stop_template`): the cut prefix ends with a
# blank line, so "Time is up." opens a new paragraph; the answer continues after "1. **".
DEFAULT_FORCED_SUFFIX = (
    "Time is up.\n\nGiven the time I've spent and the approaches I've tried, I should stop thinking "
    "and formulate a final answer based on what I already have.\n</think>\n\n"
    "**Step-by-Step Explanation and Answer:**\n\n1. **")
# Appended to a trace that never closed its thinking (the paper appends it to every full trace).
DEFAULT_NATURAL_SUFFIX = "\n</think>\n\n"
STOP_AT = "</think>"
# Regret-study sampling (mrt.md §1.3): temperature 0.6, top_p 0.95; n is replaced by k.
DEFAULT_ANSWER_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=512, seed=0)

Verifier = Callable[[str, dict], float]
RULE = object()   # estimate_progress(stop_at=RULE): the episode rule's stop_at


@dataclass
class TraceProgress:
    """J at every point of one trace. Positions count completion tokens (0 = right after the prompt).

    points[j]   cut position of point j: 0, each episode boundary, then think_len (len = E + 1 for
                E episodes); fork_at[j] is the engine position forked (prompt + kept tokens; at the
                natural end of a closed trace it includes the model's own `</think>`)
    J[j]        mean reward of the K answers at point j; rewards[j] / answers[j] hold them
    progress[e] J[e+1] - J[e]: progress of episode e (len = E)
    cost[j]     prompt + kept tokens + mean answer tokens at point j (the paper's x axis, §1.6;
                the forced suffix is not counted, as in the paper)
    episode_ids per completion token, from `episodes.episode_ids` (what per-episode advantages need)
    """

    prompt_len: int
    completion_len: int
    think_len: int
    closed: bool
    points: list[int]
    fork_at: list[int]
    J: list[float]
    progress: list[float]
    cost: list[float]
    episode_ids: list[int]
    answers: list[list[str]] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)
    answer_tokens: list[list[int]] = field(default_factory=list)

    @property
    def boundaries(self) -> list[int]:
        return self.points[1:-1]

    @property
    def num_episodes(self) -> int:
        return len(self.points) - 1

    def to_dict(self, with_answers: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_answers:
            for key in ("answers", "rewards", "answer_tokens", "episode_ids"):
                d.pop(key)
        return d


@dataclass(frozen=True)
class Cut:
    """One forced-answer point: fork `handle` after `at` prompt+completion tokens, append `suffix`
    (token ids), sample K answers with `seed`."""

    handle: object
    at: int
    suffix: tuple
    seed: int | None = None


@dataclass
class Answers:
    texts: list[str]
    token_counts: list[int]
    rewards: list[float]
    no_room: bool = False   # prefix + suffix did not fit in max_model_len: no answer, reward 0

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    @property
    def mean_tokens(self) -> float:
        return sum(self.token_counts) / len(self.token_counts)


def progress_of(J: Sequence[float]) -> list[float]:
    """Per-episode progress J[e+1] - J[e] (mrt.md §1.4)."""
    return [b - a for a, b in zip(J, J[1:])]


def _as_handle(trace):
    h = getattr(trace, "handle", trace)   # a CompletionOutput kept with keep=True, or its handle
    if h is None or not hasattr(h, "token_ids") or not hasattr(h, "num_prompt_tokens"):
        raise TypeError("traces must be SequenceHandles (CompletionOutput.handle from generate(..., "
                        f"keep=True)) or such CompletionOutputs, got {type(trace).__name__}")
    return h


def _suffix_ids(suffix, tokenizer, what: str) -> tuple:
    if suffix is None or suffix == "":
        return ()
    if isinstance(suffix, str):
        if tokenizer is None:
            raise ValueError(f"{what} is text but the model has no tokenizer; pass token ids")
        return tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if isinstance(suffix, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in suffix):
        return tuple(suffix)
    raise TypeError(f"{what} must be a str or a list of token ids, got {suffix!r:.80}")


def close_end(completion_ids: Sequence[int], tokenizer, think_len: int,
              stop_at: str = STOP_AT, lookahead: int = 32) -> int | None:
    """Completion position just after the tokens that spell `stop_at` (which starts at or after
    `think_len`), or None when the thinking was never closed (or `stop_at` is None)."""
    if stop_at is None:
        return None
    end = min(len(completion_ids), think_len + lookahead)
    for n in range(think_len + 1, end + 1):
        if stop_at in tokenizer.decode(list(completion_ids[think_len:n]), skip_special_tokens=False):
            return n
    return None


def _check_sampling(sampling, k):
    if sampling is None:
        sampling = DEFAULT_ANSWER_SAMPLING
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (answers per point) must be a positive int, got {k!r}")
    return dataclasses.replace(sampling, n=k)


def forced_answers(llm, cuts: Sequence[Cut], problems: Sequence[dict], verifier, *, k: int = 8,
                   sampling: SamplingParams | None = None, use_tqdm: bool = False) -> list[Answers]:
    """K answers at every cut, in ONE generate call; each graded by `verifier(text, problem)` on
    the generated answer text only (never the prefix or the suffix). A cut whose prefix + suffix
    leaves no room under the engine's max_model_len gets no answers and reward 0 (`no_room`), as
    a budget that ran out would."""
    if len(cuts) != len(problems):
        raise ValueError(f"got {len(cuts)} cuts but {len(problems)} problems")
    params = _check_sampling(sampling, k)
    verify = grading.get_verifier(verifier)
    max_len = getattr(getattr(llm, "config", None), "max_model_len", None)
    fits = [max_len is None or c.at + len(c.suffix) < max_len for c in cuts]
    todo = [c for c, ok in zip(cuts, fits) if ok]
    reqs = [Fork(c.handle, at=c.at, suffix=list(c.suffix)) for c in todo]
    per = [dataclasses.replace(params, seed=c.seed) if c.seed is not None else params for c in todo]
    outs = iter(llm.generate(reqs, per, use_tqdm=use_tqdm) if reqs else [])
    result = []
    for ok, prob in zip(fits, problems):
        if not ok:
            result.append(Answers([""] * params.n, [0] * params.n, [0.0] * params.n, no_room=True))
            continue
        out = next(outs)
        texts = [c.text for c in out.outputs]
        result.append(Answers(texts, [len(c.token_ids) for c in out.outputs],
                              [float(verify(t, prob)) for t in texts]))
    return result


def trace_cuts(handle, prompt_len: int, tokenizer, points_in_completion: Sequence[int],
               think_len: int, forced: tuple, natural: tuple, stop_at: str,
               seed) -> tuple[list[Cut], list[int], bool]:
    """Cuts at the given completion positions of one trace (completion = the handle's tokens after
    `prompt_len`); the last point is the natural end (see the module docstring), the others get
    `forced`. Returns (cuts, fork positions, closed)."""
    p = prompt_len
    comp = handle.token_ids[p:]
    end = close_end(comp, tokenizer, think_len, stop_at) if tokenizer is not None else None
    cuts = [Cut(handle, p + c, forced, seed) for c in points_in_completion[:-1]]
    if end is not None:
        cuts.append(Cut(handle, p + end, (), seed))
    else:
        cuts.append(Cut(handle, p + points_in_completion[-1], natural, seed))
    return cuts, [c.at for c in cuts], end is not None


def estimate_progress(llm, traces: Sequence, problems: Sequence[dict], verifier="math", *,
                      boundaries: Sequence[Sequence[int]] | None = None,
                      rule: "episodes.EpisodeRule | None" = None, k: int = 8,
                      forced_suffix=DEFAULT_FORCED_SUFFIX, natural_suffix=DEFAULT_NATURAL_SUFFIX,
                      sampling: SamplingParams | None = None, stop_at=RULE,
                      use_tqdm: bool = False) -> list[TraceProgress]:
    """J at every point (empty thinking, each episode boundary, natural end) of each kept trace.

    traces: kept SequenceHandles (or CompletionOutputs with .handle); problems: one per trace,
    passed to the verifier; verifier: "math" | "toy" | callable(text, problem) -> float.
    boundaries: per trace, sorted episode-boundary positions in completion tokens, each in
    (0, think_len); default `episodes.segment(completion, tokenizer, rule)`. rule: default
    `episodes.EpisodeRule()` (the paper's triggers); its `stop_at` ends the thinking unless
    `stop_at` is given (None: no end marker, the whole completion is thinking and its end gets
    `natural_suffix`). k answers per point, sampled with `sampling` (temperature, top_p,
    max_tokens, seed; its n is ignored). The handles stay pinned; release them yourself.
    """
    handles = [_as_handle(t) for t in traces]
    if len(handles) != len(problems):
        raise ValueError(f"got {len(handles)} traces but {len(problems)} problems")
    if boundaries is not None and len(boundaries) != len(handles):
        raise ValueError(f"got boundaries for {len(boundaries)} traces, expected {len(handles)}")
    params = _check_sampling(sampling, k)
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("progress estimation needs the model's tokenizer (episodes and answers "
                         "are text); the model folder has none")
    rule = rule if rule is not None else episodes.EpisodeRule()
    if stop_at is RULE:
        stop_at = rule.stop_at
    forced = _suffix_ids(forced_suffix, tok, "forced_suffix")
    natural = _suffix_ids(natural_suffix, tok, "natural_suffix")

    # 1. points of every trace
    plans, all_cuts, all_probs = [], [], []
    for i, (h, prob) in enumerate(zip(handles, problems)):
        comp = list(h.token_ids[h.num_prompt_tokens:])
        think_len = episodes.think_length(comp, tok, stop_at)
        if boundaries is None:
            bounds = [b for b in episodes.segment(comp, tok, rule) if 0 < b < think_len]
        else:
            bounds = list(boundaries[i])
            for b in bounds:
                if isinstance(b, bool) or not isinstance(b, int) or not 0 < b < think_len:
                    raise ValueError(f"boundaries of trace {i} must be ints in (0, {think_len}) "
                                     f"(inside its thinking), got {bounds}")
            if bounds != sorted(set(bounds)):
                raise ValueError(f"boundaries of trace {i} must be strictly increasing, got {bounds}")
        points = [0] + bounds + [think_len]
        seed = None if params.seed is None else params.seed + i
        cuts, fork_at, closed = trace_cuts(h, h.num_prompt_tokens, tok, points, think_len, forced,
                                           natural, stop_at, seed)
        plans.append((h, comp, think_len, points, fork_at, closed, bounds))
        all_cuts += cuts
        all_probs += [prob] * len(cuts)

    # 2. every answer of every trace: one engine call
    answers = forced_answers(llm, all_cuts, all_probs, verifier, k=k, sampling=params,
                             use_tqdm=use_tqdm)

    # 3. J, progress, cost per trace
    result, pos = [], 0
    for h, comp, think_len, points, fork_at, closed, bounds in plans:
        ans = answers[pos:pos + len(points)]
        pos += len(points)
        J = [a.mean_reward for a in ans]
        result.append(TraceProgress(
            prompt_len=h.num_prompt_tokens, completion_len=len(comp), think_len=think_len,
            closed=closed, points=points, fork_at=fork_at, J=J, progress=progress_of(J),
            cost=[at + a.mean_tokens for at, a in zip(fork_at, ans)],
            episode_ids=list(episodes.episode_ids(len(comp), bounds)),
            answers=[a.texts for a in ans], rewards=[a.rewards for a in ans],
            answer_tokens=[a.token_counts for a in ans]))
    return result
