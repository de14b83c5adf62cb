"""`mrt train`: GRPO (and the MRT reward modes) on a policy that drives its own in-process engine.

    mrt train --config trainer/configs/toy_grpo.yaml [--output-dir D] [--max-steps N]
              [--resume [CHECKPOINT]] [--any-config-field VALUE ...]
    torchrun --nproc_per_node 2 -m mrt_engine.trainer.train --config ...     # DDP, one engine per rank

One optimizer step:
 1. (every num_iterations steps) a generation round: this rank's prompts -> the reward mode's
    rollout (mrt_engine.LLM, seeded) -> its credit (rewards, per-token advantages [B, T]; MRT forks
    from the kept handles here) -> every handle released, no KV left pinned -> tensors; old
    logprobs = the engine's sampling logprobs (num_iterations == 1) or a forward pass.
 2. forward/backward over gradient_accumulation_steps micro-batches (DDP all-reduces on the last),
    clip, AdamW step, LR scheduler step.
 3. weight sync: LLM.update_weights(policy.state_dict()) in-process, timed.
 4. metrics.jsonl (+ tensorboard), held-out accuracy every eval_steps, checkpoint every save_steps.

The policy is a transformers AutoModelForCausalLM trained in fp32; the engine shares nothing with it
but the weights it is sent. `max_steps` counts optimizer steps (as TRL).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from mrt_engine.trainer import checkpoint as ckpt
from mrt_engine.trainer import dist as dist_mod
from mrt_engine.trainer.metrics import MetricsLogger, health_warnings, warn_loudly
from mrt_engine.trainer.round import RoundData, forward_logps, mismatch, train_pass
from mrt_engine.trainer.sampler import PromptSampler

EVAL_SAMPLES = 2        # samples per held-out problem at each evaluation
EVAL_SEED_OFFSET = 7919  # held-out draws use their own seed stream, fixed across evaluations
MAX_KEYS = ("completion_length_max", "logprob_mismatch_max")


# ---- 1. setup -----------------------------------------------------------------------------------

@dataclass
class Data:
    problems: list
    prompts: list          # token ids per problem
    eval_problems: list
    eval_prompts: list


def _key(p) -> str:
    return json.dumps(p, sort_keys=True, default=str) if not isinstance(p, dict) else \
        json.dumps({k: p[k] for k in sorted(p) if k in ("numbers", "target", "problem")}, default=str)


def load_data(cfg, tokenizer) -> Data:
    """Training problems and a held-out set that shares none of them."""
    from mrt_engine.trainer import data

    if cfg.dataset == "toy":
        train = data.load_problems("toy", num_problems=cfg.num_train_problems or 1024,
                                   difficulty=cfg.toy_difficulty, seed=cfg.seed)
    else:
        train = data.load_problems(cfg.dataset, split=cfg.dataset_split)
        random.Random(cfg.seed).shuffle(train)
    n_train = cfg.num_train_problems or len(train)
    pool = train[n_train:]
    train = train[:n_train]
    seen = {_key(p) for p in train}
    held = []
    if cfg.num_eval_problems and cfg.eval_steps:
        kind = cfg.eval_dataset or cfg.dataset
        if kind == "toy":
            # over-draw with a disjoint seed, drop any problem that is also a training problem
            cand = data.load_problems("toy", num_problems=2 * cfg.num_eval_problems + 64,
                                      difficulty=cfg.toy_difficulty, seed=cfg.seed + 1_000_003)
        elif cfg.eval_dataset is not None:
            cand = data.load_problems(cfg.eval_dataset, split="test" if cfg.eval_dataset == cfg.dataset
                                      else cfg.dataset_split)
        else:
            cand = pool   # the rows of the training file past num_train_problems
        held = [p for p in cand if _key(p) not in seen][:cfg.num_eval_problems]
        if not held:
            print("warning: no held-out problems left (eval disabled)", file=sys.stderr)

    def enc(p):
        return data.encode_prompt(data.build_prompt(p, tokenizer, cfg.use_chat_template), tokenizer)

    return Data(train, [enc(p) for p in train], held, [enc(p) for p in held])


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed)


def round_seed(seed: int, step: int) -> int:
    """The engine seed of a generation round: a pure function of (run seed, step). The same on
    every rank: the engine mixes each prompt's ids into the seed, so ranks (holding different
    prompts) still draw differently, and a prompt draws the same completions whichever rank
    holds it (a 2-rank run samples what one process with the whole batch samples)."""
    return (seed * 1_000_003 + step * 1009) % (1 << 62)


def build_optimizer(cfg, model):
    """AdamW over the policy's parameters (shared with the STaR loop, star.py)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


def apply_update(cfg, params, optimizer, scheduler=None) -> float:
    """Clip (max_grad_norm 0 = off), step the optimizer and the LR schedule, clear the gradients;
    returns the pre-clip gradient norm (the RL loop and bench_train_step share it)."""
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def build_scheduler(cfg, optimizer):
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler_type, optimizer,
                         num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
                         num_training_steps=cfg.max_steps)


# ---- 2. one generation round ----------------------------------------------------------------------

def make_round(cfg, mode, ctx, policy, ref, data: Data, sampler: PromptSampler, dist, step: int):
    """Generate, score and lay out this rank's share of a round; returns (RoundData, seconds)."""
    llm = ctx.llm
    k = cfg.prompts_per_generation
    idx = sampler.take(k * dist.world_size)[dist.rank * k:(dist.rank + 1) * k]
    prompts = [data.prompts[i] for i in idx]
    problems = [data.problems[i] for i in idx]
    ctx.step = step
    # a clean prefix cache makes the round's numerics independent of earlier calls (eval, a
    # resumed run's empty cache): exact resume relies on it; across rounds nothing reusable is
    # lost, since every optimizer step changes the weights and so the cache version anyway
    llm.reset_prefix_cache()
    t0 = time.perf_counter()
    batch = mode.rollout(ctx, prompts, problems, round_seed(cfg.seed, step))
    t_gen = time.perf_counter() - t0
    try:
        credit = mode.credit(ctx, batch)
    finally:
        batch.release(llm)
    if credit.batch is not batch:
        credit.batch.release(llm)
    st = llm.kv_stats()
    assert st["kept_handles"] == 0 and st["used_blocks"] == 0, f"KV leak after a round: {st}"
    t_credit = time.perf_counter() - t0 - t_gen
    b = credit.batch

    from mrt_engine.trainer.advantages import zero_std_groups
    from mrt_engine.trainer.reward_modes import per_token

    t1 = time.perf_counter()
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
    tb = b.to_tensors(pad, device=dist.device)
    t = tb.completion_mask.shape[1]
    adv = per_token(credit.advantages, len(b), t).to(dist.device)
    loss_mask = tb.completion_mask.clone()
    if cfg.mask_truncated_completions:
        loss_mask[torch.tensor(b.truncated, dtype=torch.bool, device=dist.device)] = 0.0
    if cfg.num_iterations == 1:
        old = tb.engine_logps
    else:
        old = forward_logps(policy, tb, cfg.temperature, cfg.gradient_accumulation_steps)
    ref_logps = None
    if ref is not None:
        ref_logps = forward_logps(ref, tb, cfg.temperature, cfg.gradient_accumulation_steps)
    # every row masked (e.g. all truncated and masked): the loss is 0; 1 keeps the division defined
    num_items = max(float(dist.all_reduce(loss_mask.sum().double())), 1.0)
    t_prep = time.perf_counter() - t1

    # metrics over the whole global batch (all ranks' rows)
    lens = torch.tensor([len(c) for c in b.completion_ids], dtype=torch.float64)
    rewards = torch.tensor(credit.rewards, dtype=torch.float64)
    g_rewards = dist.all_gather(rewards)
    g_lens = dist.all_gather(lens)
    g_correct = dist.all_gather(torch.tensor(credit.correct, dtype=torch.float64))
    g_trunc = dist.all_gather(torch.tensor(b.truncated, dtype=torch.float64))
    groups = g_rewards.numel() // b.num_generations
    m = {"reward": float(g_rewards.mean()), "reward_std": float(g_rewards.std()) if groups * b.num_generations > 1 else 0.0,
         "accuracy": float(g_correct.mean()), "completion_length_mean": float(g_lens.mean()),
         "completion_length_max": float(g_lens.max()), "truncated_ratio": float(g_trunc.mean()),
         "zero_std_groups": float(zero_std_groups(g_rewards, b.num_generations)),
         "num_groups": float(groups), "generate_s": t_gen, "credit_s": t_credit}
    m.update({k2: float(v) for k2, v in credit.metrics.items()})
    if cfg.num_iterations > 1:
        m.update(mismatch(old, tb.engine_logps, tb.completion_mask))
    rd = RoundData(tb, adv, loss_mask, old, ref_logps, num_items, m)
    return rd, t_prep


# ---- 3. the run -----------------------------------------------------------------------------------

def train(cfg, resume=None, stop_after: Optional[int] = None) -> dict:
    """Run (or resume) the configured training; returns a summary dict (also summary.json).
    stop_after: leave after this step (checkpointing it) as if the process were killed there:
    the schedule is still the one of max_steps (tests of exact resume use it)."""
    from transformers import AutoModelForCausalLM

    from mrt_engine import LLM
    from mrt_engine.trainer.grading import get_verifier
    from mrt_engine.trainer.heldout import timed_heldout
    from mrt_engine.trainer.reward_modes import RewardContext, get_reward_mode
    from mrt_engine.trainer.rewards import build_reward

    dist = dist_mod.init_distributed()
    resume_path = ckpt.resolve(resume if resume not in (None, False) else (True if cfg.resume else None),
                               cfg.output_dir)
    seed_everything(cfg.seed, dist.rank)
    model_dir = cfg.resolved_model_path()

    # policy (fp32) + optional frozen reference, optimizer, schedule
    policy = AutoModelForCausalLM.from_pretrained(resume_path or model_dir, dtype=torch.float32)
    policy.to(dist.device).train()
    ref = None
    if cfg.beta > 0:
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dist.device).eval()
        ref.requires_grad_(False)
    optimizer = build_optimizer(cfg, policy)
    scheduler = build_scheduler(cfg, optimizer)

    # this rank's engine, holding the policy's weights
    llm = LLM(model_dir, dtype=cfg.dtype, device=dist.device, seed=cfg.seed + dist.rank,
              num_blocks=cfg.engine_num_blocks, kv_cache_memory_gb=cfg.engine_kv_memory_gb)
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError(f"{model_dir!r} has no tokenizer: training needs one to build prompts")
    data = load_data(cfg, tokenizer)
    sampler = PromptSampler(len(data.problems), cfg.seed)

    step, pending = 0, None
    if resume_path is not None:
        state, rng = ckpt.load_state(resume_path, dist.rank)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["data"])
        step = int(state["step"])
        pending = RoundData.from_state_dict(state["round"]).to(dist.device) if state.get("round") else None
        llm.update_weights(policy.state_dict())
        ckpt.set_rng_state(rng, llm)
    model = policy
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(policy, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None)

    verifier = get_verifier(cfg.verifier)
    ctx = RewardContext(llm=llm, cfg=cfg, tokenizer=tokenizer, verifier=verifier,
                        reward=build_reward(cfg), dist=dist)
    mode = get_reward_mode(cfg.reward_mode, ctx)
    logger = MetricsLogger(cfg.output_dir, cfg.report_to, enabled=dist.is_main,
                           resume_step=step if resume_path else None)
    if dist.is_main:
        cfg.save(os.path.join(cfg.output_dir, "grpo_config.yaml"))

    def evaluate() -> dict:
        return timed_heldout(llm, data, verifier, cfg, samples=EVAL_SAMPLES,
                             seed=cfg.seed + EVAL_SEED_OFFSET, dist=dist)

    def save(at_step: int, rd: Optional[RoundData]) -> None:
        state = {"step": at_step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "data": sampler.state_dict(), "round": rd.state_dict() if rd is not None else None}
        ckpt.save(cfg.output_dir, at_step, model=policy, tokenizer=tokenizer, state=state, cfg=cfg,
                  dist=dist, llm=llm)

    summary: dict = {"start_step": step}
    if step == 0 and cfg.eval_steps:
        base = evaluate()
        if base:
            logger.log(0, base)
            summary["base_eval"] = base
    bar = None
    if dist.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    last: dict = {}
    rd = pending
    end = cfg.max_steps if stop_after is None else min(stop_after, cfg.max_steps)
    while step < end:
        t_step = time.perf_counter()
        new_round = rd is None or step % cfg.num_iterations == 0
        t_prep = 0.0
        if new_round:
            rd, t_prep = make_round(cfg, mode, ctx, policy, ref, data, sampler, dist, step)
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        m = train_pass(model, rd, cfg, dist.world_size, measure_mismatch=cfg.num_iterations == 1)
        grad_norm = apply_update(cfg, policy.parameters(), optimizer, scheduler)
        t_train = time.perf_counter() - t0 + t_prep
        t0 = time.perf_counter()
        llm.update_weights(policy.state_dict())
        t_sync = time.perf_counter() - t0
        step += 1

        m = dist.reduce_metrics(m, max_keys=MAX_KEYS)
        row = dict(rd.metrics) if new_round else {k: v for k, v in rd.metrics.items() if not k.endswith("_s")}
        row.update(m)
        row.update(lr=lr, grad_norm=grad_norm, train_s=t_train, weight_sync_s=t_sync)
        if not new_round:
            row.update(generate_s=0.0, credit_s=0.0)
        if rd is not None and step % cfg.num_iterations == 0:
            rd = None   # the round is spent; the next step generates
        if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == cfg.max_steps):
            row.update(evaluate())
        row["step_s"] = time.perf_counter() - t_step
        logger.log(step, row)
        last = row
        if dist.is_main:
            warn_loudly(step, health_warnings(row))
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{row['reward']:.3f}",
                            acc=f"{row['accuracy']:.3f}", refresh=False)
            if cfg.logging_steps and step % cfg.logging_steps == 0:
                bar.write(_line(step, row))
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == end:
            save(step, rd)
    if bar is not None:
        bar.close()
    logger.close()
    summary.update(final_step=step, last=last)
    if "eval_accuracy" in last:
        summary["final_eval"] = {k: v for k, v in last.items() if k.startswith("eval_")}
    if dist.is_main:
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    summary["policy"] = policy
    summary["llm"] = llm
    dist_mod.shutdown(dist)
    return summary


def _line(step: int, r: dict) -> str:
    keys = ("loss", "reward", "accuracy", "reward_std", "completion_length_mean", "truncated_ratio",
            "zero_std_groups", "kl", "clip_ratio", "logprob_mismatch_max", "grad_norm", "lr",
            "generate_s", "train_s", "weight_sync_s", "eval_accuracy")
    parts = [f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), (int, float))]
    return f"step {step}: " + " ".join(parts)


# ---- 4. command line ------------------------------------------------------------------------------

def parse_args(argv):
    from mrt_engine.trainer.config import GRPOConfig, load_config

    ap = argparse.ArgumentParser(prog="mrt train", add_help=False,
                                 description="GRPO / MRT training on the in-process engine.")
    ap.add_argument("--config", default=None, help="YAML file of GRPOConfig fields")
    ap.add_argument("--resume", nargs="?", const=True, default=None,
                    help="continue from the latest checkpoint of output_dir, or from this path")
    ap.add_argument("-h", "--help", action="store_true")
    a, rest = ap.parse_known_args(argv)
    if a.help:
        ap.print_help()
        print("\nany GRPOConfig field may be overridden (--name VALUE, dashes or underscores):")
        print(GRPOConfig.describe())
        raise SystemExit(0)
    resume = a.resume
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        resume = resume.strip().lower() in ("true", "yes", "1")
    return load_config(a.config, rest), resume


def main(argv=None) -> dict:
    cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg.reward_mode in ("star", "mrt_star"):
        try:
            from mrt_engine.trainer import star
        except ImportError as exc:
            raise ValueError(f"reward_mode {cfg.reward_mode!r} needs mrt_engine.trainer.star, which "
                             "is not available") from exc
        return star.main(cfg, resume)
    summary = train(cfg, resume)
    if "base_eval" in summary or "final_eval" in summary:
        b = summary.get("base_eval", {}).get("eval_accuracy")
        f = summary.get("final_eval", {}).get("eval_accuracy")
        print(f"held-out accuracy: start {b if b is None else round(b, 4)} -> end "
              f"{f if f is None else round(f, 4)}")
    return {k: v for k, v in summary.items() if k not in ("policy", "llm")}


if __name__ == "__main__":
    main()
