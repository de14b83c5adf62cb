"""Held-out accuracy during training: sample each held-out prompt, grade the natural answer.

Cheap on purpose (one seeded generate call, no forks): it runs every `eval_steps`. The full
picture (accuracy vs budget, maj@k, regret) is `mrt eval --model RUN/checkpoint-N`
(`trainer/evaluate.py`), whose natural-answer accuracy is the same quantity. Under torchrun each
rank evaluates its slice of the problems and the counts are summed.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch


def heldout_accuracy(llm, prompt_ids: Sequence[Sequence[int]], problems: Sequence[Any],
                     verifier: Callable[[str, Any], float], *, samples: int, max_tokens: int,
                     temperature: float, top_p: float, seed: int, dist=None) -> dict:
    """{'eval_accuracy', 'eval_completion_length', 'eval_truncated_ratio', 'eval_samples'}: mean
    verifier score over every (problem, sample); the same seed gives the same draws for the same
    weights, so two evaluations differ only by the weights."""
    from mrt_engine import SamplingParams

    if len(prompt_ids) != len(problems) or not problems:
        raise ValueError(f"need one prompt per problem and at least one: got {len(prompt_ids)} "
                         f"prompts, {len(problems)} problems")
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine = list(range(rank, len(problems), world))
    score = length = trunc = n = 0.0
    if mine:
        params = SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                seed=seed)
        outs = llm.generate([list(prompt_ids[i]) for i in mine], params)
        for i, out in zip(mine, outs):
            for c in out.outputs:
                score += float(verifier(c.text, problems[i]))
                length += len(c.token_ids)
                trunc += c.finish_reason == "length"
                n += 1
    tot = torch.tensor([score, length, trunc, n], dtype=torch.float64)
    if dist is not None:
        tot = dist.all_reduce(tot)
    score, length, trunc, n = tot.tolist()
    return {"eval_accuracy": score / n, "eval_completion_length": length / n,
            "eval_truncated_ratio": trunc / n, "eval_samples": int(n)}


def timed_heldout(llm, data, verifier, cfg, *, samples: int, seed: int, dist=None) -> dict:
    """heldout_accuracy over `data.eval_prompts` / `data.eval_problems` with the run's sampling
    settings, plus its wall time as 'eval_s'; {} when the run has no held-out problems."""
    if not data.eval_problems:
        return {}
    t0 = time.perf_counter()
    r = heldout_accuracy(llm, data.eval_prompts, data.eval_problems, verifier, samples=samples,
                         max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                         top_p=cfg.top_p, seed=seed, dist=dist)
    r["eval_s"] = time.perf_counter() - t0
    return r
