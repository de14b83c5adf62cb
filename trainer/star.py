"""STaR and MRT-STaR (`reward_mode: star | mrt_star`): sample, (estimate progress,) keep per prompt
the selected correct traces, SFT on them, iterate. `mrt train` dispatches here (train.main).

    mrt train --config trainer/configs/toy_star.yaml        # or toy_mrt_star.yaml

One iteration (mrt.md §2.2), `star_iterations` of them over `max_steps` optimizer steps:
 1. sample: the iteration's prompts, `star_samples_per_prompt` traces each, from the current
    policy's engine (one seeded generate call; KV kept for mrt_star). The iteration's S optimizer
    steps see S * generation_batch_size completions, as S GRPO steps would.
 2. mrt_star only: J at every episode boundary of every trace by forks of the kept traces
    (`mrt_rollout.progress_for_batch`, timed as `fork`), then every handle is released.
 3. select (`mrt.star_select`): per prompt up to `star_keep_per_prompt` correct traces, the first
    ones (star) or those of highest cumulative progress (mrt_star).
 4. SFT on the kept traces with the RL loop's optimizer and schedule (`train.build_optimizer`,
    `train.build_scheduler`): the iteration's S optimizer steps together pass over the kept set
    `star_epochs` times; the loss is the token-mean negative log-likelihood of the completion
    tokens only (the prompt is never trained), micro-batches of `per_device_train_batch_size` rows.
    After every optimizer step the engine gets the new weights (LLM.update_weights), as in RL.
metrics.jsonl rows per optimizer step as the RL loop writes them (loss, accuracy of the
iteration's samples, lengths, lr, grad_norm, generate_s / fork_s / train_s / weight_sync_s, held-out
accuracy every eval_steps); the model is saved every save_steps and at the end
(checkpoint-{step}, for `mrt eval --model`).
Single process only (kept sets differ between ranks, so DDP micro-steps would not line up), and
no --resume.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from typing import List, Sequence

import torch

from mrt_engine.trainer.rollout import TensorBatch, completion_logps


def sft_tensors(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                pad_id: int) -> TensorBatch:
    """Right-padded rows of kept traces; completion_mask marks the trained tokens."""
    return TensorBatch.build(prompt_ids, completion_ids, [[0.0] * len(c) for c in completion_ids],
                             pad_id)


def sft_nll(model, tb: TensorBatch) -> torch.Tensor:
    """Sum over completion tokens of -log p(token) at temperature 1 (prompt and pads excluded)."""
    logps, _ = completion_logps(model, tb, temperature=1.0)
    return -(logps * tb.completion_mask).sum()


def steps_per_iteration(max_steps: int, iterations: int) -> List[int]:
    """Split max_steps optimizer steps over the iterations, earlier ones taking the remainder."""
    if iterations < 1 or max_steps < 1:
        raise ValueError(f"need max_steps >= 1 and star_iterations >= 1, got {max_steps}, {iterations}")
    base, extra = divmod(max_steps, iterations)
    return [base + (i < extra) for i in range(iterations)]


def sft_schedule(kept: Sequence[int], num_steps: int, epochs: int, rng: random.Random) -> List[List[int]]:
    """Rows of each of `num_steps` optimizer steps: `epochs` shuffled passes over `kept`, cut into
    equal consecutive chunks (the last ones may be shorter or empty when kept is small)."""
    order: List[int] = []
    for _ in range(epochs):
        ep = list(kept)
        rng.shuffle(ep)
        order += ep
    per = math.ceil(len(order) / num_steps) if order else 0
    return [order[s * per:(s + 1) * per] for s in range(num_steps)]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def train_star(cfg, resume=None) -> dict:
    """Run the configured STaR / MRT-STaR training; returns a summary (also summary.json)."""
    from transformers import AutoModelForCausalLM

    from mrt_engine import LLM
    from mrt_engine.trainer import checkpoint as ckpt
    from mrt_engine.trainer import dist as dist_mod
    from mrt_engine.trainer.grading import get_verifier
    from mrt_engine.trainer.heldout import timed_heldout
    from mrt_engine.trainer.metrics import MetricsLogger
    from mrt_engine.trainer.mrt import cumulative_progress, star_select
    from mrt_engine.trainer.mrt_rollout import progress_for_batch, settings_from_config
    from mrt_engine.trainer.rollout import generate_rollouts
    from mrt_engine.trainer.sampler import PromptSampler
    from mrt_engine.trainer.train import (EVAL_SAMPLES, EVAL_SEED_OFFSET, build_optimizer,
                                          build_scheduler, load_data, round_seed, seed_everything)

    if cfg.reward_mode not in ("star", "mrt_star"):
        raise ValueError(f"reward_mode: star.py trains star or mrt_star, got {cfg.reward_mode!r}")
    if resume not in (None, False) or cfg.resume:
        raise ValueError("resume: STaR / MRT-STaR runs cannot be resumed yet; start a new run")
    dist = dist_mod.init_distributed()
    if dist.enabled:
        dist_mod.shutdown(dist)
        raise ValueError("STaR / MRT-STaR runs single-process only (kept sets differ between ranks)")
    mrt_star = cfg.reward_mode == "mrt_star"
    seed_everything(cfg.seed, 0)
    model_dir = cfg.resolved_model_path()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dist.device).train()
    optimizer = build_optimizer(cfg, policy)
    scheduler = build_scheduler(cfg, optimizer)
    llm = LLM(model_dir, dtype=cfg.dtype, device=dist.device, seed=cfg.seed,
              num_blocks=cfg.engine_num_blocks, kv_cache_memory_gb=cfg.engine_kv_memory_gb)
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError(f"{model_dir!r} has no tokenizer: training needs one to build prompts")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    data = load_data(cfg, tok)
    sampler = PromptSampler(len(data.problems), cfg.seed)
    verifier = get_verifier(cfg.verifier)
    settings = settings_from_config(cfg) if mrt_star else None
    logger = MetricsLogger(cfg.output_dir, cfg.report_to)
    cfg.save(os.path.join(cfg.output_dir, "grpo_config.yaml"))
    rng = random.Random(cfg.seed)
    samples = cfg.star_samples_per_prompt

    def evaluate() -> dict:
        return timed_heldout(llm, data, verifier, cfg, samples=EVAL_SAMPLES,
                             seed=cfg.seed + EVAL_SEED_OFFSET, dist=dist)

    def save(at_step: int) -> None:
        state = {"step": at_step, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "data": sampler.state_dict(), "round": None}
        ckpt.save(cfg.output_dir, at_step, model=policy, tokenizer=tok, state=state, cfg=cfg,
                  dist=dist, llm=llm)

    summary: dict = {"start_step": 0, "reward_mode": cfg.reward_mode}
    if cfg.eval_steps:
        base = evaluate()
        if base:
            logger.log(0, base)
            summary["base_eval"] = base
    step, last, iterations = 0, {}, []
    for it, n_steps in enumerate(steps_per_iteration(cfg.max_steps, cfg.star_iterations)):
        if n_steps == 0:
            continue
        # 1. sample the iteration's traces from the current policy
        n_prompts = max(1, n_steps * cfg.generation_batch_size // samples)
        idx = sampler.take(n_prompts)
        prompts = [data.prompts[i] for i in idx]
        problems = [data.problems[i] for i in idx]
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        batch = generate_rollouts(llm, prompts, problems, num_generations=samples,
                                  max_completion_length=cfg.max_completion_length,
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=round_seed(cfg.seed, step),
                                  max_prompt_length=cfg.max_prompt_length, keep=mrt_star)
        t_gen = time.perf_counter() - t0
        # 2. progress of every trace (mrt_star), then no KV stays pinned
        tps, t_fork = None, 0.0
        try:
            correct = [float(verifier(t, p)) for t, p in zip(batch.texts, batch.problems)]
            if mrt_star:
                tps, t_fork = progress_for_batch(llm, batch, settings,
                                                 round_seed(cfg.seed + 17, step))
        finally:
            batch.release(llm)
        st = llm.kv_stats()
        assert st["kept_handles"] == 0 and st["used_blocks"] == 0, f"KV leak after sampling: {st}"
        # 3. selection
        kept = star_select(correct, samples, cfg.reward_mode, cfg.star_keep_per_prompt, traces=tps)
        it_metrics = {
            "iteration": it, "accuracy": _mean(correct), "reward": _mean(correct),
            "completion_length_mean": _mean(len(c) for c in batch.completion_ids),
            "completion_length_max": float(max(len(c) for c in batch.completion_ids)),
            "truncated_ratio": _mean(batch.truncated), "num_prompts": float(n_prompts),
            "kept": float(len(kept)),
            "kept_prompt_ratio": len({i // samples for i in kept}) / n_prompts,
            "kept_length_mean": _mean(len(batch.completion_ids[i]) for i in kept),
            "generate_s": t_gen, "fork_s": t_fork}
        if mrt_star:
            budget = float(cfg.max_completion_length)
            it_metrics["kept_cum_progress"] = _mean(cumulative_progress(tps[i], budget) for i in kept)
            it_metrics["correct_cum_progress"] = _mean(
                cumulative_progress(tp, budget) for tp, c in zip(tps, correct) if c >= 0.5)
            it_metrics["J_end_mean"] = _mean(tp.J[-1] for tp in tps)
        iterations.append(dict(it_metrics))
        # 4. SFT: n_steps optimizer steps over the kept traces, star_epochs passes
        for s, rows in enumerate(sft_schedule(kept, n_steps, cfg.star_epochs, rng)):
            t_step = time.perf_counter()
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss_sum, n_tok, grad_norm = 0.0, 0, 0.0
            if rows:
                n_tok = sum(len(batch.completion_ids[i]) for i in rows)
                mb = cfg.per_device_train_batch_size
                for m0 in range(0, len(rows), mb):
                    part = rows[m0:m0 + mb]
                    tb = sft_tensors([batch.prompt_ids[i] for i in part],
                                     [batch.completion_ids[i] for i in part], pad_id)
                    nll = sft_nll(policy, tb)
                    (nll / n_tok).backward()
                    loss_sum += float(nll.detach())
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            llm.update_weights(policy.state_dict())
            t_sync = time.perf_counter() - t0
            step += 1
            row = dict(it_metrics) if s == 0 else {
                k: v for k, v in it_metrics.items() if not k.endswith("_s")}
            if s:
                row.update(generate_s=0.0, fork_s=0.0)
            row.update(loss=loss_sum / n_tok if n_tok else 0.0, sft_rows=float(len(rows)),
                       sft_tokens=float(n_tok), lr=lr, grad_norm=grad_norm, train_s=t_train,
                       weight_sync_s=t_sync)
            if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == cfg.max_steps):
                row.update(evaluate())
            row["step_s"] = time.perf_counter() - t_step + (t_gen + t_fork if s == 0 else 0.0)
            logger.log(step, row)
            last = row
            if cfg.logging_steps and step % cfg.logging_steps == 0:
                print(_line(step, row), flush=True)
            if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
                save(step)
    logger.close()
    save(step)   # the final model, loadable by `mrt eval --model RUN/checkpoint-N`
    summary.update(final_step=step, last=last, iterations=iterations)
    if "eval_accuracy" in last:
        summary["final_eval"] = {k: v for k, v in last.items() if k.startswith("eval_")}
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    summary["policy"] = policy
    summary["llm"] = llm
    return summary


def _line(step: int, r: dict) -> str:
    keys = ("loss", "accuracy", "kept", "kept_prompt_ratio", "completion_length_mean",
            "kept_length_mean", "grad_norm", "lr", "generate_s", "fork_s", "train_s",
            "weight_sync_s", "eval_accuracy")
    return f"step {step}: " + " ".join(f"{k}={r[k]:.4g}" for k in keys
                                        if isinstance(r.get(k), (int, float)))


def main(cfg, resume=None) -> dict:
    """Entry from `mrt train` (train.main) for reward_mode star / mrt_star."""
    summary = train_star(cfg, resume)
    b = summary.get("base_eval", {}).get("eval_accuracy")
    f = summary.get("final_eval", {}).get("eval_accuracy")
    if b is not None or f is not None:
        print(f"held-out accuracy: start {b if b is None else round(b, 4)} -> end "
              f"{f if f is None else round(f, 4)}", file=sys.stdout)
    return {k: v for k, v in summary.items() if k not in ("policy", "llm")}
