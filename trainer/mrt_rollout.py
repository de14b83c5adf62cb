"""Engine-side work of the MRT reward modes: the forks that turn a batch of rollouts into the inputs
of the pure advantage math in `mrt.py`.

* `mrt_progress` (ours, on-policy): `progress_for_batch` runs `progress.estimate_progress` on the
  batch's kept handles. Every cut is a fork of a kept trace: the prefix KV stays in the engine, only
  the forced suffix is prefilled (once per boundary) and the K answers fork after it. Timed as
  `fork`.
* `mrt_termination` (the paper's released form, `train/rl/README.md` of CMU-AIRe/MRT):
  `termination_rollouts` samples one partial rollout per prompt from a *stale* policy
  (`StalePolicy`: its own engine with frozen weights, by default the base model, i.e. the paper's
  "Iteration 1" where pi_old is the model training started from), cuts it after a random number of
  complete episodes, then on the current policy's engine prefills that context once and forks
  m/2 continuations that terminate at once (forced suffix, short answer) and m/2 that keep
  thinking. The context is prompt-side for the loss (masked): only the sampled continuation is
  trained, as the paper's pseudo-code implies.

Row layout of a termination batch (group = one prompt's m rows, consecutive): the first m/2 rows
terminate, the last m/2 continue. A terminating row's `prompt_ids` are prompt + stale prefix +
forced-suffix ids and its completion is the answer; a continuing row's `prompt_ids` are prompt +
stale prefix and its completion is the rest of the thinking and the answer.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence

from mrt_engine.trainer.rollout import RolloutBatch

# Forced answers of the toy task are "\\boxed{a+b}" plus EOS (7-8 tokens); 12 leaves slack.
TOY_ANSWER_TOKENS = 12


@dataclass(frozen=True)
class MRTSettings:
    """What the MRT forks need, resolved from a GRPOConfig once per run (see `settings_from_config`)."""

    rule: Any                      # episodes.EpisodeRule
    forced_suffix: str             # appended at a cut to force an answer
    natural_suffix: str            # appended to a trace that never closed its thinking
    answer_max_tokens: int         # budget of one forced answer
    k: int                         # answers per point (progress_k)
    temperature: float
    top_p: float
    verifier: Any                  # callable(text, problem) -> float

    def boundaries_fn(self, tokenizer) -> Callable[[List[int]], tuple]:
        """completion ids -> (episode boundaries, thinking length), in completion positions."""
        from mrt_engine.trainer import episodes

        def fn(comp):
            think = episodes.think_length(comp, tokenizer, self.rule.stop_at)
            return [b for b in episodes.segment(comp, tokenizer, self.rule) if 0 < b < think], think
        return fn


def settings_from_config(cfg) -> MRTSettings:
    """Episode rule, suffixes and answer budget for `cfg`: the toy task's own ones (its triggers,
    its "Time is up." suffix, 12-token answers) when `cfg.verifier == "toy"`, else the paper's
    (`episodes.EpisodeRule()`, `progress.DEFAULT_FORCED_SUFFIX`, 512-token answers). The
    `episode_*` fields override the rule, `forced_suffix` the suffix."""
    import dataclasses as dc

    from mrt_engine.trainer import episodes, grading, progress

    toy = cfg.verifier == "toy"
    if toy:
        from mrt_engine.trainer.toy import traces
        base, forced, natural, answer = (episodes.TOY_RULE, traces.FORCED_SUFFIX, traces.NATURAL_END,
                                         TOY_ANSWER_TOKENS)
    else:
        base, forced, natural = (episodes.EpisodeRule(), progress.DEFAULT_FORCED_SUFFIX,
                                 progress.DEFAULT_NATURAL_SUFFIX)
        answer = progress.DEFAULT_ANSWER_SAMPLING.max_tokens
    rule = dc.replace(base, min_gap=cfg.episode_min_gap or 1, max_episodes=cfg.episode_max_episodes,
                      group_size=cfg.episode_group_size,
                      triggers=tuple(cfg.episode_triggers) if cfg.episode_triggers else base.triggers)
    return MRTSettings(rule=rule, forced_suffix=cfg.forced_suffix or forced, natural_suffix=natural,
                       answer_max_tokens=answer, k=cfg.progress_k, temperature=cfg.temperature,
                       top_p=cfg.top_p, verifier=grading.get_verifier(cfg.verifier))


def progress_for_batch(llm, batch: RolloutBatch, settings: MRTSettings, seed: int) -> tuple:
    """J at every episode boundary of every kept trace of `batch` (one engine call, forks only).

    Returns (list[TraceProgress] in row order, seconds). The handles stay pinned (the caller
    releases the batch); nothing is re-prefilled but the suffixes and the re-fed cut tokens."""
    from mrt_engine import SamplingParams
    from mrt_engine.trainer.progress import estimate_progress

    if len(batch.handles) != len(batch) or any(h is None for h in batch.handles):
        raise ValueError(f"mrt_progress needs the kept handle of every row (generate with "
                         f"keep=True): {sum(h is not None for h in batch.handles)} handles for "
                         f"{len(batch)} rows")
    t0 = time.perf_counter()
    sampling = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                              max_tokens=settings.answer_max_tokens, seed=seed)
    tps = estimate_progress(llm, batch.handles, batch.problems, settings.verifier,
                            rule=settings.rule, k=settings.k, forced_suffix=settings.forced_suffix,
                            natural_suffix=settings.natural_suffix, sampling=sampling)
    return tps, time.perf_counter() - t0


class StalePolicy:
    """pi_old of `mrt_termination`: a second engine with its own frozen copy of the weights.

    `refresh_steps = 0` (default) keeps the weights it was loaded with for the whole run (the base
    model: the paper's first MRT iteration samples its contexts from the model it starts from);
    `refresh_steps = N` copies the current policy's weights in every N optimizer steps, so the
    contexts come from a policy at most N steps old. A separate engine (rather than swapping the
    weights of the rollout engine twice per step) costs one more copy of the weights and KV pool,
    which is negligible for the toy model, and keeps the rollout engine's prefix cache valid.
    """

    def __init__(self, llm, refresh_steps: int = 0):
        if isinstance(refresh_steps, bool) or not isinstance(refresh_steps, int) or refresh_steps < 0:
            raise ValueError(f"refresh_steps must be an int >= 0, got {refresh_steps!r}")
        self.llm = llm
        self.refresh_steps = refresh_steps
        self.loaded_at_step = 0

    @classmethod
    def from_model(cls, model_dir: str, refresh_steps: int = 0, **engine_kw) -> "StalePolicy":
        from mrt_engine import LLM

        return cls(LLM(model_dir, **engine_kw), refresh_steps)

    def maybe_refresh(self, step: int, state_dict_fn: Callable[[], Any]) -> bool:
        """Copy the current weights in when `refresh_steps` have passed; True when it did."""
        if self.refresh_steps and step - self.loaded_at_step >= self.refresh_steps:
            self.llm.update_weights(state_dict_fn())
            self.loaded_at_step = step
            return True
        return False


@dataclass
class TerminationBatch:
    """A `RolloutBatch` of m rows per prompt plus what the termination advantage needs."""

    batch: RolloutBatch
    terminate: List[bool]             # [B] True for rows answering right after the stale prefix
    cut_episodes: List[int]           # [P] complete episodes in each prompt's stale prefix
    num_episodes: List[int]           # [P] episodes in each stale trace
    prefix_tokens: List[int]          # [P] tokens of stale thinking kept in the context
    seconds: Dict[str, float] = field(default_factory=dict)   # stale_generate, fork


def choose_cut(boundaries: Sequence[int], think_len: int, rng: random.Random) -> tuple:
    """(j, position, E): keep j ~ Uniform{0..E-1} complete episodes of a stale trace.

    `boundaries` are the starts of episodes 1..E-1 (completion token positions inside the
    thinking, as `episodes.segment` returns them; episode 0 starts at 0), so a trace has E =
    len(boundaries) + 1 episodes. Cutting after j episodes keeps the tokens before episode j's
    start (j = 0: empty thinking). At least one episode of the stale trace is always left out, so
    the continuations have something to redo."""
    starts = [0] + [b for b in boundaries if 0 < b < think_len]
    j = rng.randrange(len(starts))
    return j, starts[j], len(starts)


def termination_rollouts(llm, stale: StalePolicy, prompt_ids: Sequence[Sequence[int]],
                         problems: Sequence[Any], *, boundaries_fn: Callable[[List[int]], tuple],
                         forced_suffix_ids: Sequence[int], num_samples: int,
                         max_completion_length: int, answer_max_tokens: int,
                         temperature: float, top_p: float, seed: int) -> TerminationBatch:
    """One stale partial rollout per prompt, then m/2 terminating + m/2 continuing forks of it.

    boundaries_fn(completion_ids) -> (episode start positions, thinking length), both in completion
    token positions (from `episodes.py`). Seeded: a pure function of both engines' weights, the
    prompts and `seed`."""
    from mrt_engine import Fork, SamplingParams

    if num_samples < 2 or num_samples % 2:
        raise ValueError(f"num_samples must be an even int >= 2, got {num_samples!r}")
    if len(prompt_ids) != len(problems):
        raise ValueError(f"got {len(prompt_ids)} prompts for {len(problems)} problems")
    if not forced_suffix_ids:
        raise ValueError("forced_suffix_ids must hold at least one token")
    half = num_samples // 2
    rng = random.Random(seed)
    prompts = [list(p) for p in prompt_ids]
    out = TerminationBatch(RolloutBatch(num_samples, [], [], [], [], [], [], []), [], [], [], [])

    # 1. stale partial rollouts (tokens only: their KV lives in the other engine)
    t0 = time.perf_counter()
    stale_outs = stale.llm.generate(prompts, SamplingParams(
        n=1, temperature=temperature, top_p=top_p, max_tokens=max_completion_length, seed=seed))
    contexts = []
    for p, o in zip(prompts, stale_outs):
        comp = list(o.outputs[0].token_ids)
        bounds, think_len = boundaries_fn(comp)
        j, cut, num_ep = choose_cut(bounds, think_len, rng)
        out.cut_episodes.append(j)
        out.num_episodes.append(num_ep)
        out.prefix_tokens.append(cut)
        contexts.append(p + comp[:cut])
    out.seconds["stale_generate"] = time.perf_counter() - t0

    # 2. current policy: prefill each context once (one sampled token, discarded), keep its KV,
    #    then fork both kinds of continuation from the context's end in one engine call
    t0 = time.perf_counter()
    heads = llm.generate(contexts, SamplingParams(n=1, max_tokens=1, temperature=1.0, seed=seed),
                         keep=True)
    handles = [h.outputs[0].handle for h in heads]
    try:
        items, params = [], []
        term = SamplingParams(n=half, temperature=temperature, top_p=top_p,
                              max_tokens=answer_max_tokens, seed=seed + 1, logprobs=True)
        for ctx, h, cut in zip(contexts, handles, out.prefix_tokens):
            # the stale prefix counts against the completion budget, as if one policy wrote it all
            cont = SamplingParams(n=half, temperature=temperature, top_p=top_p, seed=seed + 2,
                                  max_tokens=max(1, max_completion_length - cut), logprobs=True)
            items += [Fork(h, len(ctx), list(forced_suffix_ids)), Fork(h, len(ctx))]
            params += [term, cont]
        forks = llm.generate(items, params)
    finally:
        for h in handles:
            llm.release(h)
    out.seconds["fork"] = time.perf_counter() - t0

    # 3. rows: m/2 terminating, then m/2 continuing, per prompt
    b = out.batch
    for i, (ctx, prob) in enumerate(zip(contexts, problems)):
        for kind, res in (("term", forks[2 * i]), ("cont", forks[2 * i + 1])):
            for c in res.outputs:
                b.prompt_ids.append(ctx + list(forced_suffix_ids) if kind == "term" else list(ctx))
                b.completion_ids.append(list(c.token_ids))
                b.engine_logps.append(list(c.logprobs))
                b.texts.append(c.text)
                b.finish_reasons.append(c.finish_reason)
                b.problems.append(prob)
                out.terminate.append(kind == "term")
    return out
