"""What bounds the fork phase on this machine: its arithmetic, the machine's matmul rate, the floor.

Every engine that runs the fork phase exactly must do the projections of every fed token, the LM
head of every sampled row, and the attention arithmetic (q.k and p.v for every query row and key;
sharing a prefix saves reading keys, not multiplying by them). At the best matmul rate this
machine reaches, measured in the same run, that work alone takes `floor_s`; so no engine can beat
vLLM by more than vllm_wall / floor_s here (`ceiling_vs_vllm`). For a speedup bar B, the time left
beside the GEMMs at that rate is vllm_wall / B - gemm_floor_s (`budget_beside_gemm_s`), to be set
against the attention floor and what our profiled step spends outside the GEMMs.
"""
from __future__ import annotations

import time

from workload import Workload


def _heads(config: dict) -> tuple[int, int]:
    """(query heads, head size) from a Hugging Face config.json dict."""
    heads = config["num_attention_heads"]
    return heads, config.get("head_dim") or config["hidden_size"] // heads


def gemm_roofline(config: dict, w: Workload, r: dict) -> dict:
    """Matmul work of the fork phase and the rate the profiled GEMMs ran at: every fed token
    (prefill + decode) goes through every layer's projections, every sampled row through the LM
    head (a fork's K samples share its first row). The GEMM floor = this work at that rate."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, dh = _heads(config)
    kvh = config.get("num_key_value_heads") or heads
    layer = h * (heads * dh + 2 * kvh * dh) + heads * dh * h + 3 * h * inter
    fed = (r.get("prefill_tokens") or 0) + w.fork_tokens() * w.branches * (w.answer_len - 1)
    logit_rows = w.fork_tokens() * (1 + w.branches * (w.answer_len - 1))
    flop_layers = 2 * layer * config["num_hidden_layers"] * fed
    flop_head = 2 * h * config["vocab_size"] * logit_rows
    bd = r["breakdown"]["seconds"]
    out = {"gemm_flop": flop_layers + flop_head, "gemm_gflop": round((flop_layers + flop_head) / 1e9, 3)}
    if bd.get("gemm"):
        out["gemm_gflop_per_s"] = round(flop_layers / bd["gemm"] / 1e9, 1)
    if bd.get("gemm_lm_head"):
        out["lm_head_gflop_per_s"] = round(flop_head / bd["gemm_lm_head"] / 1e9, 1)
    return out


def attention_flop(config: dict, w: Workload) -> int:
    """q.k and p.v multiply-adds of the fork phase, as flops: a fork at t feeds token t-1 and the
    F suffix tokens (contexts t .. t+F), then each of its K branches feeds A-1 tokens (contexts
    t+F+1 .. t+F+A-1); every (row, key) pair costs 4 * Hq * Dh flops in every layer."""
    heads, dh = _heads(config)
    F, K, A = w.suffix_len, w.branches, w.answer_len
    pairs = 0
    for t in w.fork_positions():
        pairs += sum(t + i for i in range(F + 1))
        pairs += K * sum(t + F + i for i in range(1, A))
    return 4 * heads * dh * config["num_hidden_layers"] * pairs * w.traces


def matmul_rate(dtype: str, size: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of a size^3 torch.mm in `dtype` on torch's threads (oneDNN on a CPU)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(size, size).to(dt)
    b = torch.randn(size, size).to(dt)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def bounds(config: dict, w: Workload, ours: dict, vllm_wall: float | None, mm_gflops: float,
           bars=(1.3, 2.0)) -> dict:
    """The floor of the fork phase and, with vLLM's wall time, the ceiling of any speedup over it.
    `ours` is the engine's result with its breakdown (gemm_flop and the profiled GEMM rates)."""
    bd = ours["breakdown"]
    sec = bd["seconds"]
    rates = [mm_gflops] + [bd[k] for k in ("gemm_gflop_per_s", "lm_head_gflop_per_s") if bd.get(k)]
    rate = max(rates) * 1e9
    gemm_flop, attn = bd["gemm_flop"], attention_flop(config, w)
    gemm_floor, attn_floor = gemm_flop / rate, attn / rate
    ours_gemm = sec.get("gemm", 0.0) + sec.get("gemm_lm_head", 0.0)
    ours_attn = sum(v for k, v in sec.items() if k.startswith("attn_"))
    out = {"matmul_gflop_per_s_measured": round(mm_gflops, 1), "rate_used_gflop_per_s": round(rate / 1e9, 1),
           "gemm_gflop": round(gemm_flop / 1e9, 2), "attention_gflop": round(attn / 1e9, 2),
           "gemm_floor_s": round(gemm_floor, 3), "attention_floor_s": round(attn_floor, 3),
           "floor_s": round(gemm_floor + attn_floor, 3),
           "ours_profiled_s": {"wall": bd["wall_s"], "gemm": round(ours_gemm, 3), "attention": round(ours_attn, 3),
                               "rest": round(bd["wall_s"] - ours_gemm - ours_attn, 3)},
           "attention_gflop_per_s": round(attn / ours_attn / 1e9, 1) if ours_attn else None,
           "how": "floor = (GEMM + attention flops) / the best matmul rate seen in this run (a 2048^3 "
                  "torch.mm, or the profiled GEMMs if faster); rate_used is that best"}
    probe = ours.get("attention_probe")
    if probe:
        # what decode attention waits on memory, from the probe's repetition (another call than
        # the profiled one: compare the two figures with each other, not with ours_profiled_s)
        out["attention_probe"] = {k: probe[k] for k in ("calls", "in_place_s", "again_at_once_s", "ratio")}
    if vllm_wall:
        out["vllm_wall_s"] = vllm_wall
        out["ceiling_vs_vllm"] = round(vllm_wall / (gemm_floor + attn_floor), 2)
        out["budget_beside_gemm_s"] = {f"{b}x": round(vllm_wall / b - gemm_floor, 3) for b in bars}
    return out


def print_bounds(b: dict) -> None:
    print(f"\nbounds (matmul rate {b['rate_used_gflop_per_s']} GFLOP/s, measured in this run): "
          f"GEMMs {b['gemm_gflop']} GFLOP -> {b['gemm_floor_s']} s, attention {b['attention_gflop']} GFLOP "
          f"-> {b['attention_floor_s']} s, floor {b['floor_s']} s")
    o = b["ours_profiled_s"]
    print(f"  ours (profiled): GEMMs {o['gemm']} s, attention {o['attention']} s "
          f"({b['attention_gflop_per_s']} GFLOP/s), rest {o['rest']} s, wall {o['wall']} s")
    if "attention_probe" in b:
        p = b["attention_probe"]
        print(f"  decode attention, {p['calls']} calls of one more repetition: {p['in_place_s']} s as the steps "
              f"met them, {p['again_at_once_s']} s run again at once with their data in cache ({p['ratio']}x)")
    if "ceiling_vs_vllm" in b:
        budget = ", ".join(f"{k}: {v} s" for k, v in b["budget_beside_gemm_s"].items())
        print(f"  vLLM {b['vllm_wall_s']} s: no engine can beat it by more than {b['ceiling_vs_vllm']}x here; "
              f"time left beside the GEMMs at a bar of {budget}")
