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
                        num_cols: Optional[int] = None, outcome=None) -> torch.Tensor:
    """[B, T] per-token advantages: outcome advantage + alpha * normalised episode progress on
    thinking tokens, outcome only after the thinking; 0 past a row's completion (padding).

    rewards [B]; traces[i] for row i (duck-typed TraceProgress); T = num_cols, default the longest
    completion (len(episode_ids)). outcome [B]: the outcome advantages when the caller computed
    them (e.g. "batch" scaling over all ranks); default group_advantages(rewards, ...)."""
    r = _floats(rewards, "rewards")
    if len(r) != len(traces):
        raise ValueError(f"got {len(r)} rewards for {len(traces)} traces")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha: expected a number >= 0, got {alpha!r}")
    computed = group_advantages(torch.tensor(r, dtype=torch.float32), num_generations,
                                scale_rewards)  # validates the grouping
    if outcome is None:
        outcome = computed
    else:
        outcome = torch.tensor(_floats(outcome, "outcome"), dtype=torch.float32)
        if outcome.numel() != len(r):
            raise ValueError(f"outcome: expected {len(r)} advantages, got {outcome.numel()}")
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


# ---- 4. the reward modes (registered with reward_modes.py on import) ----
# Glue only: the engine work is in mrt_rollout.py, the math above. A mode's `rollout` builds the
# round's rows, its `credit` turns them into per-token (or per-row) advantages for the loop.

def _round_seed(ctx) -> int:
    """Seed of a round's progress forks: a pure function of (run seed, step, rank), apart from
    the rollout's own seed (which `train.round_seed` derives from the same three)."""
    return ((ctx.cfg.seed + 17) * 1_000_003 + ctx.step * 1009 + ctx.dist.rank) % (1 << 62)


def _outcome(ctx, batch):
    rewards = ctx.reward(batch.texts, batch.problems)
    last = getattr(ctx.reward, "last", {})
    correct = last.get("outcome") or [float(ctx.verifier(t, p))
                                      for t, p in zip(batch.texts, batch.problems)]
    return rewards, correct


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _progress_mode(ctx):
    from mrt_engine.trainer.mrt_rollout import progress_for_batch, settings_from_config
    from mrt_engine.trainer.reward_modes import Credit, OutcomeMode, normalised_advantages

    class ProgressMode(OutcomeMode):
        """mrt_progress: outcome GRPO + alpha x per-episode progress from forks of kept traces."""

        needs_handles = True  # the forks need the traces' KV

        def __init__(self, ctx):
            super().__init__(ctx)
            self.settings = settings_from_config(ctx.cfg)

        def credit(self, ctx, batch):
            cfg = ctx.cfg
            rewards, correct = _outcome(ctx, batch)
            outcome = normalised_advantages(ctx, rewards)
            tps, secs = progress_for_batch(ctx.llm, batch, self.settings, _round_seed(ctx))
            adv = progress_advantages(rewards, tps, cfg.num_generations, cfg.alpha,
                                      cfg.scale_rewards, cfg.progress_norm, outcome=outcome)
            prog = [p for tp in tps for p in tp.progress]
            metrics = {"fork_s": secs, "progress_mean": _mean(prog),
                       "progress_pos_frac": _mean(p > 0 for p in prog),
                       "J_start_mean": _mean(tp.J[0] for tp in tps),
                       "J_end_mean": _mean(tp.J[-1] for tp in tps),
                       "episodes_mean": _mean(len(tp.progress) for tp in tps)}
            return Credit(advantages=adv, rewards=rewards, correct=correct, batch=batch,
                          metrics=metrics)

    return ProgressMode(ctx)


def _termination_mode(ctx):
    from mrt_engine.trainer.mrt_rollout import (StalePolicy, settings_from_config,
                                                termination_rollouts)
    from mrt_engine.trainer.reward_modes import Credit

    cfg = ctx.cfg
    if cfg.scale_rewards == "batch":
        raise ValueError("scale_rewards: mrt_termination takes none (the paper's README form) or "
                         "group, got batch")

    class TerminationMode:
        """mrt_termination: stale partial rollout, m/2 terminating + m/2 continuing forks per
        prompt (m = num_generations), A = r - mean reward of the terminating ones."""

        def __init__(self, ctx):
            self.settings = settings_from_config(ctx.cfg)
            self.suffix_ids = list(ctx.tokenizer(self.settings.forced_suffix,
                                                 add_special_tokens=False)["input_ids"])
            # pi_old: the model training starts from (the paper's first MRT iteration)
            self.stale = StalePolicy.from_model(
                cfg.resolved_model_path(), dtype=cfg.dtype, device=ctx.dist.device,
                seed=cfg.seed + ctx.dist.rank, num_blocks=cfg.engine_num_blocks,
                kv_cache_memory_gb=cfg.engine_kv_memory_gb)
            self.last = None

        def rollout(self, ctx, prompt_ids, problems, seed):
            self.last = termination_rollouts(
                ctx.llm, self.stale, prompt_ids, problems,
                boundaries_fn=self.settings.boundaries_fn(ctx.tokenizer),
                forced_suffix_ids=self.suffix_ids, num_samples=cfg.num_generations,
                max_completion_length=cfg.max_completion_length,
                answer_max_tokens=self.settings.answer_max_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, seed=seed)
            return self.last.batch

        def credit(self, ctx, batch):
            tb = self.last
            if tb is None or tb.batch is not batch:
                raise ValueError("mrt_termination: credit() must follow this mode's rollout()")
            rewards, correct = _outcome(ctx, batch)
            adv = termination_advantages(rewards, tb.terminate, cfg.num_generations,
                                         cfg.scale_rewards)
            term = [r for r, t in zip(rewards, tb.terminate) if t]
            cont = [r for r, t in zip(rewards, tb.terminate) if not t]
            metrics = {"fork_s": tb.seconds.get("fork", 0.0),
                       "stale_generate_s": tb.seconds.get("stale_generate", 0.0),
                       "termination_reward": _mean(term), "continuation_reward": _mean(cont),
                       "cut_episodes_mean": _mean(tb.cut_episodes),
                       "prefix_tokens_mean": _mean(tb.prefix_tokens)}
            return Credit(advantages=adv, rewards=rewards, correct=correct, batch=batch,
                          metrics=metrics)

    return TerminationMode(ctx)


def _register() -> None:
    from mrt_engine.trainer.reward_modes import register_reward_mode
    register_reward_mode("mrt_progress", _progress_mode)
    register_reward_mode("mrt_termination", _termination_mode)


_register()
