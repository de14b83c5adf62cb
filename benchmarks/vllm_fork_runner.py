"""Baseline (d): the fork phase on vLLM's CPU build, run under vLLM's own Python.

    <vllm-python> vllm_fork_runner.py JOB.json RESULT.json

JOB.json (written by vllm_baseline.py): model_dir, dtype, traces (token ids), positions,
branches K, answer_len A, suffixes (one forced suffix per timed repetition), warmup_suffix, seed,
interleave. With interleave on, after the warm-up it prints "@@MRT READY" and times one repetition
per "rep" line on stdin (answering "@@MRT WALL <s>") until "end"; the benchmark runs one of its
own repetitions between them, so the two engines are timed within seconds of each other.
Only the standard library and vllm are imported: this runs in a venv without mrt_engine.

What runs: prefill the traces once (untimed, max_tokens=1) so their blocks are cached; then, per
repetition, time one generate() with every fork prompt (trace[:t] + suffix) and
SamplingParams(n=K, max_tokens=A, ignore_eos=True, temperature=1.0, logprobs=0 when the job asks:
the sampled tokens' logprobs, which RL needs and mrt_engine always returns). Prefix caching is vLLM's
way to share a prefix: each of the K children finds the prompt's full blocks in the cache. Every
repetition has its own fresh suffix, so nothing a previous repetition computed past the traces
can be reused (the cache is not reset between repetitions: re-prefilling long traces after a
reset costs minutes at a real model's size and changes nothing that is timed; `reset_each_rep`
in the job restores the old behaviour).
Prefill tokens computed and cache hits come from vLLM's own counters (deltas around the timed
call). Peak KV comes from an extra untimed pass that polls vLLM's kv_cache_usage gauge, so polling
never perturbs a timed run; it counts blocks held by requests (shared blocks once).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time


MARK = "@@MRT "   # protocol lines for vllm_baseline.VllmSession (vLLM's own output never starts so)


def metric_totals(llm) -> dict:
    """Sum of each counter/gauge over label sets, by name (prometheus snapshot)."""
    totals: dict = {}
    for m in llm.get_metrics():
        value = getattr(m, "value", None)
        if isinstance(value, (int, float)):
            key = m.name
            if m.name == "vllm:prompt_tokens_by_source":
                key = f"{m.name}:{m.labels.get('source')}"
            totals[key] = totals.get(key, 0) + value
    return totals


def load_job(usage: str) -> dict | None:
    """The JOB.json of `<script> JOB.json RESULT.json`, or None after printing `usage`."""
    if len(sys.argv) != 3:
        print(usage, file=sys.stderr)
        return None
    with open(sys.argv[1]) as f:
        return json.load(f)


def main() -> int:
    job = load_job(__doc__)
    if job is None:
        return 2
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    traces, positions, K, A = job["traces"], job["positions"], job["branches"], job["answer_len"]
    longest = max(len(t) for t in traces) + len(job["warmup_suffix"]) + A
    n_branches = len(traces) * len(positions) * K
    t0 = time.perf_counter()
    llm = LLM(model=job["model_dir"], dtype=job["dtype"], enable_prefix_caching=True,
              skip_tokenizer_init=True, max_model_len=longest + 16, seed=job["seed"],
              max_num_seqs=max(256, n_branches), disable_log_stats=False)
    startup = time.perf_counter() - t0
    cache_cfg = llm.llm_engine.vllm_config.cache_config
    block_size, num_blocks = cache_cfg.block_size, cache_cfg.num_gpu_blocks

    def fork_prompts(suffix, n_traces=None):
        return [TokensPrompt(prompt_token_ids=tr[:t] + suffix) for tr in traces[:n_traces] for t in positions]

    def prefill_traces():
        llm.generate([TokensPrompt(prompt_token_ids=tr) for tr in traces],
                     SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False), use_tqdm=False)

    # logprobs=0: each sampled token's logprob, as TRL and veRL ask vLLM for (and as mrt_engine always
    # returns); off only to compare with rounds measured before the job carried this field
    want_logprobs = bool(job.get("logprobs", False))
    fork_params = SamplingParams(n=K, max_tokens=A, ignore_eos=True, temperature=1.0, top_p=1.0,
                                 top_k=-1, detokenize=False, logprobs=0 if want_logprobs else None)

    # warm-up: same shapes of work (the forks of `warmup_traces` traces), a different suffix
    reset_each_rep = bool(job.get("reset_each_rep", False))
    prefill_traces()
    llm.generate(fork_prompts(job["warmup_suffix"], job.get("warmup_traces")), fork_params, use_tqdm=False)
    walls, gen, counts = [], None, []

    def timed(suffix) -> float:
        if reset_each_rep:
            llm.reset_prefix_cache()
            prefill_traces()
        before = metric_totals(llm)
        t0 = time.perf_counter()
        outs = llm.generate(fork_prompts(suffix), fork_params, use_tqdm=False)
        walls.append(time.perf_counter() - t0)
        after = metric_totals(llm)
        counts.append({k: after.get(k, 0) - before.get(k, 0) for k in after})
        lens = [len(c.token_ids) for o in outs for c in o.outputs]
        if len(lens) != n_branches or set(lens) != {A}:
            raise RuntimeError(f"vLLM returned {len(lens)} branches of lengths {sorted(set(lens))}, "
                               f"expected {n_branches} of {A}")
        if want_logprobs and any(c.logprobs is None or len(c.logprobs) != A for o in outs for c in o.outputs):
            raise RuntimeError("vLLM was asked for logprobs=0 but did not return one per generated token")
        return sum(lens)

    if job.get("interleave"):
        # the benchmark asks for each repetition after one of its own (vllm_baseline.VllmSession)
        print(MARK + "READY", flush=True)
        pending = list(job["suffixes"])
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "end":
                break
            if cmd != "rep" or not pending:
                print(MARK + f"ERROR unexpected {cmd!r} ({len(pending)} repetitions left)", flush=True)
                return 2
            gen = timed(pending.pop(0))
            print(MARK + f"WALL {walls[-1]!r}", flush=True)
        if not walls:
            raise RuntimeError("the session ended before any timed repetition")
    else:
        for suffix in job["suffixes"]:
            gen = timed(suffix)

    # untimed pass for peak KV: poll the usage gauge while the fork call runs (blocks held by
    # requests; cached blocks nobody holds count as free); skipped when the job says so
    peak = [0.0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            usage = metric_totals(llm).get("vllm:kv_cache_usage_perc")
            if usage is not None:
                peak[0] = max(peak[0], usage)
            time.sleep(0.005)

    if job.get("peak_pass", True):
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        llm.generate(fork_prompts(job["suffixes"][0]), fork_params, use_tqdm=False)
        done.set()
        poller.join()

    c = counts[len(counts) // 2]
    hf_cfg = llm.llm_engine.vllm_config.model_config.hf_config
    heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads
    elem = torch.empty((), dtype=llm.llm_engine.vllm_config.model_config.dtype).element_size()
    block_bytes = block_size * 2 * hf_cfg.num_hidden_layers * hf_cfg.num_key_value_heads * head_dim * elem
    peak_blocks = round(peak[0] * num_blocks) if peak[0] and num_blocks else None
    result = {
        "walls_s": walls, "gen_tokens": gen,
        "prefill_tokens": int(c.get("vllm:prompt_tokens_by_source:local_compute", 0)) or None,
        "prompt_tokens": int(c.get("vllm:prompt_tokens", 0)) or None,
        "prefix_cache_hit_tokens": int(c.get("vllm:prefix_cache_hits", 0)),
        "peak_kv_bytes": peak_blocks * block_bytes if peak_blocks else None,
        "peak_kv_blocks": peak_blocks, "block_size": block_size, "num_blocks": num_blocks,
        "vllm": vllm.__version__, "torch": torch.__version__,
        "engine_startup_s": round(startup, 2), "reset_each_rep": reset_each_rep, "logprobs": want_logprobs,
        "max_num_batched_tokens": getattr(llm.llm_engine.vllm_config.scheduler_config, "max_num_batched_tokens", None),
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU") or k in ("VLLM_TARGET_DEVICE", "OMP_NUM_THREADS")},
    }
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    print(json.dumps({"walls_s": walls, "median_s": statistics.median(walls), "gen_tokens": gen}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
