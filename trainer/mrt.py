"""MRT's learning signals as pure math (no engine): per-token `mrt_progress` advantages, the
paper's `mrt_termination` advantage, and the STaR / MRT-STaR trace selection.

Inputs are plain lists and duck-typed traces (anything with `progress`, `episode_ids`,
`think_len`, `points`, as `progress.TraceProgress` has); rows come in consecutive groups, one group
per prompt, exactly as `advantages.group_advantages` expects.

1. mrt_progress (ours, on-policy; mrt.md §2.1 with per-episode credit):
       A[i, t] = Â_i + alpha * p̃[i, e(t)]     for thinking tokens t < think_len_i
       A[i, t] = Â_i                          for tokens after the thinking (the answer)
   Â_i is the outcome advantage (`group_advantages(rewards, G, scale_rewards)`), e(t) the episode of
   token t (`episode_ids`) and p̃ the normalised progress of that episode. Normalisation
   (`progress_norm`):
     "group" (default): p̃ = (p - m_g) / (s_g + 1e-4), with m_g, s_g the mean and Bessel std of the
       progress of *every episode of every trace* of the group (prompt). Like GRPO's reward
       normalisation this puts the bonus on the advantage's scale whatever K or the task, and a group
       whose episodes all progress equally gets no bonus (not a 1e4 blow-up). Centring makes the
       bonus relative: an episode that progresses less than the group's typical episode gets a
       negative bonus, so unproductive episodes are pushed down even when every trace of the group
       is correct (a zero-spread group, where outcome GRPO has no signal at all).
     "raw": p̃ = p (J differences in [-1, 1]); the paper's Eq. 2 adds alpha * progress unscaled.
   alpha = 0 returns exactly the outcome advantage broadcast over the tokens, so the loss equals
   outcome GRPO's bit for bit.

2. mrt_termination (the paper's released recipe, CMU-AIRe/MRT train/rl/README.md; mrt.md §2.3):
       A_i = r_i - mean{ r_j : j in the group of i, j terminated right after the stale prefix }
   for every row of the group (terminating rows included: their advantages sum to 0). With
   scale_rewards="group" the difference is divided by the group's reward std + 1e-4; the README
   form ("none") is the default.

3. STaR / MRT-STaR selection (mrt.md §2.2; the exact rule is not published):
     star      per prompt, keep up to `keep` correct traces, first in sampling order (samples are
               i.i.d., so this is a uniform choice among the correct ones).
     mrt_star  per prompt, keep up to `keep` correct traces with the highest cumulative progress
               over the token budget: score = sum_e p_e * (budget - end_e) / budget, end_e = the
               token where episode e ends. Plain sum_e p_e telescopes to J(end) - J(0), which is
               ~1 - J(0) for every correct trace (the choice would be noise); weighting each
               episode's progress by the budget left after it counts progress for as long as it
               is held, i.e. it is the area under the trace's J-vs-tokens step curve minus the
               shared J(0) term: the trace with the best score is the one with the least
               cumulative regret (mrt.md §1.6). Ties go to fewer thinking tokens, then sampling
               order.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

import torch

from mrt_engine.trainer.advantages import STD_EPS, group_advantages

PROGRESS_NORMS = ("group", "raw")
STAR_MODES = ("star", "mrt_star")


# ---- helpers ----

def _floats(xs, name: str) -> List[float]:
    if isinstance(xs, torch.Tensor):
        xs = xs.detach().reshape(-1).tolist()
    try:
        out = [float(x) for x in xs]
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected a list of numbers ({e})") from None
    if not all(math.isfinite(x) for x in out):
        raise ValueError(f"{name}: expected finite numbers")
    return out


def _check_groups(n: int, group_size: int, name: str) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {group_size!r}")
    if n == 0 or n % group_size:
        raise ValueError(f"expected a non-empty multiple of {name}={group_size} rows, got {n}")


def _trace_fields(tr, i: int):
    """(progress, episode_ids, think_len) of one duck-typed trace, validated."""
    try:
        progress = _floats(tr.progress, f"traces[{i}].progress")
        ids = [int(e) for e in tr.episode_ids]
        think_len = int(tr.think_len)
    except AttributeError as e:
        raise TypeError(f"traces[{i}]: expected progress, episode_ids and think_len ({e})") from None
    if not 0 <= think_len <= len(ids):
        raise ValueError(f"traces[{i}]: think_len {think_len} outside [0, {len(ids)}] (the number "
                         f"of completion tokens)")
    used = ids[:think_len]
    if used and (min(used) < 0 or max(used) >= len(progress)):
        raise ValueError(f"traces[{i}]: episode ids of the thinking must be in [0, {len(progress)}) "
                         f"(one progress value per episode), got {min(used)}..{max(used)}")
    return progress, ids, think_len


def normalised_progress(traces: Sequence[Any], num_generations: int,
                        progress_norm: str = "group") -> List[List[float]]:
    """Per trace, per episode: the progress as it enters the advantage (see the module docstring)."""
    if progress_norm not in PROGRESS_NORMS:
        raise ValueError(f"progress_norm: expected one of {', '.join(PROGRESS_NORMS)}, got "
                         f"{progress_norm!r}")
    _check_groups(len(traces), num_generations, "num_generations")
    progs = [_trace_fields(tr, i)[0] for i, tr in enumerate(traces)]
    if progress_norm == "raw":
        return progs
    out: List[List[float]] = []
    for g in range(0, len(progs), num_generations):
        vals = [p for prog in progs[g:g + num_generations] for p in prog]
        if len(vals) > 1:
            m = sum(vals) / len(vals)
            s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
        else:  # one episode in the whole group: no spread to measure
            m, s = (vals[0] if vals else 0.0), 0.0
        out += [[(p - m) / (s + STD_EPS) for p in prog] for prog in progs[g:g + num_generations]]
    return out


# ---- 1. mrt_progress ----

def progress_advantages(rewards, traces: Sequence[Any], num_generations: int, alpha: float,
                        scale_rewards: str = "group", progress_norm: str = "group",
                        num_cols: Optional[int] = None) -> torch.Tensor:
    """[B, T] per-token advantages: outcome advantage + alpha * normalised episode progress on
    thinking tokens, outcome only after the thinking; 0 past a row's completion (padding).

    rewards [B]; traces[i] for row i (duck-typed TraceProgress); T = num_cols, default the longest
    completion (len(episode_ids))."""
    r = _floats(rewards, "rewards")
    if len(r) != len(traces):
        raise ValueError(f"got {len(r)} rewards for {len(traces)} traces")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha: expected a number >= 0, got {alpha!r}")
    outcome = group_advantages(torch.tensor(r, dtype=torch.float32), num_generations,
                               scale_rewards)  # validates the grouping
    fields = [_trace_fields(tr, i) for i, tr in enumerate(traces)]
    T = max(len(ids) for _, ids, _ in fields) if num_cols is None else int(num_cols)
    if T < max(len(ids) for _, ids, _ in fields):
        raise ValueError(f"num_cols {T} is shorter than the longest completion")
    adv = torch.zeros(len(traces), max(T, 1), dtype=torch.float32)
    for i, (_, ids, _) in enumerate(fields):
        adv[i, :len(ids)] = outcome[i]
    if alpha == 0:
        return adv
    bonus = normalised_progress(traces, num_generations, progress_norm)
    for i, (_, ids, think_len) in enumerate(fields):
        if think_len:
            per_ep = torch.tensor(bonus[i], dtype=torch.float32)
            adv[i, :think_len] += float(alpha) * per_ep[torch.tensor(ids[:think_len])]
    return adv


# ---- 2. mrt_termination ----

def termination_advantages(rewards, terminate: Sequence[bool], group_size: int,
                           scale_rewards: str = "none") -> torch.Tensor:
    """[B] advantages r_i - mean reward of the terminating rows of i's group (README form).

    terminate[i]: True for a row that answered right after the stale prefix (forced suffix)."""
    r = _floats(rewards, "rewards")
    _check_groups(len(r), group_size, "group_size")
    if len(terminate) != len(r):
        raise ValueError(f"terminate: expected {len(r)} flags, got {len(terminate)}")
    if scale_rewards not in ("group", "none"):
        raise ValueError(f"scale_rewards: expected group or none for mrt_termination, got "
                         f"{scale_rewards!r}")
    out = []
    for g in range(0, len(r), group_size):
        rs, ts = r[g:g + group_size], [bool(t) for t in terminate[g:g + group_size]]
        term = [x for x, t in zip(rs, ts) if t]
        if not term:
            raise ValueError(f"group {g // group_size} has no terminating row: the baseline needs "
                             f"at least one")
        base = sum(term) / len(term)
        div = 1.0
        if scale_rewards == "group":
            m = sum(rs) / len(rs)
            s = math.sqrt(sum((x - m) ** 2 for x in rs) / (len(rs) - 1)) if len(rs) > 1 else 0.0
            div = s + STD_EPS
        out += [(x - base) / div for x in rs]
    return torch.tensor(out, dtype=torch.float32)


# ---- 3. STaR / MRT-STaR ----

def cumulative_progress(trace: Any, budget: float) -> float:
    """sum_e progress_e * (budget - end_e) / budget, end_e = trace.points[e + 1] (episode e's end)."""
    prog = _floats(trace.progress, "progress")
    points = [int(p) for p in trace.points]
    if len(points) != len(prog) + 1:
        raise ValueError(f"points: expected {len(prog) + 1} (one more than episodes), got "
                         f"{len(points)}")
    if budget <= 0:
        raise ValueError(f"budget: expected a number > 0, got {budget!r}")
    return sum(p * max(budget - end, 0.0) / budget for p, end in zip(prog, points[1:]))


def star_select(correct: Sequence[float], samples_per_prompt: int, mode: str = "star",
                keep: int = 1, traces: Optional[Sequence[Any]] = None,
                budget: Optional[float] = None) -> List[int]:
    """Row indices kept for SFT, in row order. correct[i] >= 0.5 counts as correct.

    mode "star": first `keep` correct rows of each prompt; "mrt_star": the `keep` correct rows of
    highest `cumulative_progress` (needs `traces`, one per row; budget default: the longest
    completion of the prompt's rows, len(episode_ids))."""
    c = _floats(correct, "correct")
    _check_groups(len(c), samples_per_prompt, "samples_per_prompt")
    if mode not in STAR_MODES:
        raise ValueError(f"mode: expected one of {', '.join(STAR_MODES)}, got {mode!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
    if mode == "mrt_star" and (traces is None or len(traces) != len(c)):
        raise ValueError(f"traces: mrt_star needs one progress trace per row ({len(c)}), got "
                         f"{None if traces is None else len(traces)}")
    kept: List[int] = []
    for g in range(0, len(c), samples_per_prompt):
        rows = [i for i in range(g, g + samples_per_prompt) if c[i] >= 0.5]
        if mode == "mrt_star" and rows:
            b = budget if budget is not None else max(
                max(len(traces[i].episode_ids), int(traces[i].think_len), 1)
                for i in range(g, g + samples_per_prompt))
            scored = [(-cumulative_progress(traces[i], b), int(traces[i].think_len), i)
                      for i in rows]
            rows = [i for _, _, i in sorted(scored)]
        kept += sorted(rows[:keep])
    return kept
