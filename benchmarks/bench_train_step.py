"""One MRT-RL (mrt_progress) step vs one GRPO step on the same prompts and model, split into
generate / fork / train / weight sync.

    python benchmarks/bench_train_step.py [--config trainer/configs/toy_mrt.yaml] [--reps 3]

Both steps run the training loop's own pieces (`train.make_round`, `round.train_pass`, AdamW,
`LLM.update_weights`) on one policy and one engine; before every step the policy, the engine and
the optimizer are reset to the start weights and the prompt sampler to its seed, so both modes see
the same prompts and weights, and a step of either mode is the first step of a run. One warm-up
step of each mode, then `--reps` of each, interleaved (GRPO, MRT, MRT, GRPO, ...) so load drift
hits both alike; medians are reported. Phases:
  generate  the rollouts (engine, KV kept for MRT)
  fork      MRT only: J at every episode boundary by forks of the kept traces (progress.py)
  score     rewards and advantages (credit minus fork)
  train     tensor layout + forward/backward over the micro-batches + clip + AdamW step
  sync      LLM.update_weights(policy.state_dict())
Prints a table, writes JSON (default benchmarks/results/train_step.json), and ends with the line
`mrt step / grpo step: <R>x`. Torch runs single-threaded by default (--threads): on a shared 2-core
machine more threads spin against other processes and time mostly noise.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import loadavg  # noqa: E402

PHASES = ("generate", "fork", "score", "train", "sync")


def setup(cfg):
    """Policy, engine, tokenizer and data, built as train.train builds them."""
    import torch
    from transformers import AutoModelForCausalLM

    from mrt_engine import LLM
    from mrt_engine.trainer import dist as dist_mod
    from mrt_engine.trainer.train import load_data, seed_everything

    dist = dist_mod.DistInfo()
    seed_everything(cfg.seed, 0)
    model_dir = cfg.resolved_model_path()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    llm = LLM(model_dir, dtype=cfg.dtype, seed=cfg.seed, num_blocks=cfg.engine_num_blocks,
              kv_cache_memory_gb=cfg.engine_kv_memory_gb)
    tok = llm.get_tokenizer()
    return policy, llm, tok, load_data(cfg, tok), dist


def one_step(cfg, policy, llm, tok, data, dist, start_state) -> dict:
    """Seconds per phase of the first optimizer step of a run of `cfg` (reset to the start)."""
    from mrt_engine.trainer.grading import get_verifier
    from mrt_engine.trainer.reward_modes import RewardContext, get_reward_mode
    from mrt_engine.trainer.rewards import build_reward
    from mrt_engine.trainer.round import train_pass
    from mrt_engine.trainer.sampler import PromptSampler
    from mrt_engine.trainer.train import apply_update, build_optimizer, make_round

    policy.load_state_dict(start_state)
    llm.update_weights(start_state)
    optimizer = build_optimizer(cfg, policy)
    sampler = PromptSampler(len(data.problems), cfg.seed)
    ctx = RewardContext(llm=llm, cfg=cfg, tokenizer=tok, verifier=get_verifier(cfg.verifier),
                        reward=build_reward(cfg), dist=dist)
    mode = get_reward_mode(cfg.reward_mode, ctx)
    llm.reset_stats()
    rd, t_prep = make_round(cfg, mode, ctx, policy, None, data, sampler, dist, 0)
    engine = llm.kv_stats()
    t0 = time.perf_counter()
    train_pass(policy, rd, cfg, 1, measure_mismatch=True)
    apply_update(cfg, policy.parameters(), optimizer)
    t_train = time.perf_counter() - t0 + t_prep
    t0 = time.perf_counter()
    llm.update_weights(policy.state_dict())
    t_sync = time.perf_counter() - t0
    m = rd.metrics
    fork = float(m.get("fork_s", 0.0))
    out = {"generate": m["generate_s"], "fork": fork, "score": max(m["credit_s"] - fork, 0.0),
           "train": t_train, "sync": t_sync}
    out["total"] = sum(out[p] for p in PHASES)
    out.update(completions=len(rd.tb), completion_tokens=float(rd.tb.completion_mask.sum()),
               accuracy=m["accuracy"], engine_decode_tokens=engine["decode_tokens"],
               engine_prefill_tokens=engine["prefill_tokens"],
               engine_cache_hit_tokens=engine["prefix_cache_hit_tokens"],
               engine_steps=engine["num_steps"], episodes_mean=m.get("episodes_mean"))
    return out


def run(config: str, reps: int, overrides) -> dict:
    import torch

    from mrt_engine.trainer.config import load_config

    cfg_mrt = load_config(config, list(overrides) + ["--reward_mode", "mrt_progress",
                                                       "--eval_steps", "0"])
    cfg_grpo = copy.deepcopy(cfg_mrt)
    cfg_grpo.reward_mode = "outcome"
    policy, llm, tok, data, dist = setup(cfg_mrt)
    start = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    runs = {"grpo": [], "mrt": []}
    order = []
    for r in range(reps):
        order += [("grpo", cfg_grpo), ("mrt", cfg_mrt)] if r % 2 == 0 else \
                 [("mrt", cfg_mrt), ("grpo", cfg_grpo)]
    print(f"warm-up (one step of each), then {reps} steps of each; load {loadavg()}", flush=True)
    for name, cfg in (("grpo", cfg_grpo), ("mrt", cfg_mrt)):
        one_step(cfg, policy, llm, tok, data, dist, start)
    for name, cfg in order:
        res = one_step(cfg, policy, llm, tok, data, dist, start)
        res["loadavg"] = loadavg()
        runs[name].append(res)
        print(f"  {name:4s} " + "  ".join(f"{p}={res[p]:.3f}s" for p in PHASES + ("total",))
              + f"  (load {res['loadavg']})", flush=True)
    med = {name: {p: statistics.median(r[p] for r in rs) for p in PHASES + ("total",)}
           for name, rs in runs.items()}
    ratio = med["mrt"]["total"] / med["grpo"]["total"]
    return {"config": config, "overrides": list(overrides), "reps": reps,
            "torch_threads": torch.get_num_threads(), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "median_s": med, "runs": runs,
            "ratio": ratio, "cfg": {k: getattr(cfg_mrt, k) for k in (
                "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                "max_completion_length", "progress_k", "episode_max_episodes", "alpha", "seed")}}


def print_table(res: dict) -> None:
    med = res["median_s"]
    print(f"\nmedian seconds over {res['reps']} steps ({res['cfg']['per_device_train_batch_size'] * res['cfg']['gradient_accumulation_steps']} "
          f"completions, K={res['cfg']['progress_k']}, torch threads {res['torch_threads']})")
    print(f"{'phase':10s}{'grpo':>10s}{'mrt':>10s}")
    for p in PHASES + ("total",):
        print(f"{p:10s}{med['grpo'][p]:10.3f}{med['mrt'][p]:10.3f}")
    g, m = res["runs"]["grpo"][0], res["runs"]["mrt"][0]
    print(f"engine decode tokens per step: grpo {g['engine_decode_tokens']}, mrt "
          f"{m['engine_decode_tokens']}; engine steps: grpo {g['engine_steps']}, mrt {m['engine_steps']}")
    print(f"mrt step / grpo step: {res['ratio']:.2f}x")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="trainer/configs/toy_mrt.yaml")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    a, overrides = ap.parse_known_args(argv)
    if a.reps < 1 or a.threads < 1:
        raise ValueError(f"--reps and --threads must be >= 1, got {a.reps}, {a.threads}")
    if not os.path.isfile(a.config):
        raise FileNotFoundError(f"no config at {a.config!r}")
    import torch

    torch.set_num_threads(a.threads)
    res = run(a.config, a.reps, overrides)
    res["loadavg_end"] = loadavg()
    print_table(res)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
