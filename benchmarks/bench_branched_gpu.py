"""The fork phase of an MRT step on a GPU: mrt_engine (device="cuda", Triton attention) vs transformers.

Same workload for both (benchmarks/bench_branched.py's, sized for a GPU): T traces of L tokens
(random ids, prefilled once and kept by the engine), E evenly spaced fork positions per trace, a
forced F-token suffix at each, K sampled branches of A tokens per fork. Timed: the fork phase only.
  mrt_engine     forks share the trace's KV (prefill only the suffix; cascade decode)
  transformers   generate(num_return_sequences=K) on prefix + suffix, left-padded batches of forks
Model: random weights in bf16 of a Llama-3-8B shape (32 layers, hidden 4096, 32/8 heads, head_dim
128, intermediate 14336, vocab 128256) when memory and the time budget allow, else a Llama-3.2-1B
shape, else a tiny one (--shape forces one). Both engines use the same weights (transformers' model
object is built on the GPU, saved once for the engine). A greedy check scores the engine's greedy
tokens on one fork with transformers, teacher-forced: how many are its argmax, how far (nats) the
others are from it, how close our logprobs are to its (bf16 near-ties may round either way).
Prints `fork-phase speedup vs transformers (cuda): <X>x` and writes bench_branched_gpu.json to
--results-dir (and $OUT when set).

    python benchmarks/bench_branched_gpu.py                    # on a CUDA machine
    python benchmarks/bench_branched_gpu.py --budget-s 120     # pick a shape that fits 120 s
    python benchmarks/bench_branched_gpu.py --profile          # + device vs host time, top ops
    python benchmarks/bench_branched_gpu.py --device cpu --shape tiny --quick   # CPU smoke run
Without CUDA (and without --device cpu) it prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

import torch

# (layers, hidden, heads, kv heads, intermediate, vocab): Llama-3-8B, Llama-3.2-1B, a tiny one
SHAPES = {"8b": (32, 4096, 32, 8, 14336, 128256), "1b": (16, 2048, 32, 8, 8192, 128256),
          "tiny": (2, 128, 4, 2, 256, 512)}
# rough seconds to build, save and load each shape, plus its run (for --budget-s)
SETUP_S = {"8b": 150, "1b": 60, "tiny": 10}


def pick_shape(budget_s: float, device: str) -> str:
    if device != "cuda":
        return "tiny"
    free = torch.cuda.mem_get_info()[0] / 2**30
    if free > 70 and budget_s >= SETUP_S["8b"]:
        return "8b"
    return "1b" if free > 20 and budget_s >= SETUP_S["1b"] else "tiny"


def build_model(shape: str, device: str, dtype: torch.dtype):
    """A seeded random Llama of `shape` on `device` (transformers), saved for the engine."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv_heads, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    path = tempfile.mkdtemp(prefix=f"mrt_branched_gpu_{shape}_")
    model.save_pretrained(path)
    return model, path


def workload(args, vocab: int):
    rng = random.Random(0)
    traces = [[rng.randrange(3, vocab) for _ in range(args.trace_len)] for _ in range(args.traces)]
    positions = [args.trace_len * (e + 1) // args.positions for e in range(args.positions)]
    suffix = [rng.randrange(3, vocab) for _ in range(args.suffix_len)]
    return traces, positions, suffix


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel")   # runtime/driver launch APIs


def profile_table(prof, wall_s: float, steps: int, top: int = 20) -> dict:
    """torch.profiler's averages of one profiled fork phase: where the device and the host spend it.

    Device time counts kernel events only (an op's own "self device time" is the same kernels
    again); `device_busy_fraction` far below 1 means the GPU waits on the host (launches, Python).
    """
    from torch.autograd import DeviceType

    avgs = prof.key_averages()

    def dev(e):   # torch renamed cuda -> device; accept both
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    kernels = [e for e in avgs if e.device_type == DeviceType.CUDA]
    ops = [e for e in avgs if e.device_type != DeviceType.CUDA]
    busy_s = sum(dev(e) for e in kernels) / 1e6
    launches = sum(e.count for e in ops if e.key in LAUNCH_CALLS)
    rows = lambda evs, key: [{"name": e.key[:90], "calls": e.count, "self_ms": round(key(e) / 1e3, 3)}
                             for e in sorted(evs, key=key, reverse=True)[:top] if key(e) > 0]
    return {"wall_s": round(wall_s, 4), "steps": steps, "device_busy_s": round(busy_s, 4),
            "device_busy_fraction": round(busy_s / wall_s, 3) if wall_s and kernels else None,
            "kernel_launches": launches, "launches_per_step": round(launches / steps, 1) if steps else None,
            "host_ops_s": round(sum(e.self_cpu_time_total for e in ops) / 1e6, 4),
            "top_kernels": rows(kernels, dev), "top_host_ops": rows(ops, lambda e: e.self_cpu_time_total)}


def _alternate(forks, device: str, switch, pairs: int = 3, seed: int = 100) -> dict:
    """Median fork-phase time with `switch(True)` vs `switch(False)`, alternated in this process,
    the order flipped every pair (the machine's drift hits both alike)."""
    times = {True: [], False: []}
    for i in range(pairs):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            switch(on)
            t0 = time.perf_counter()
            forks(seed + 2 * i + on)
            _sync(device)
            times[on].append(time.perf_counter() - t0)
    on, off = sorted(times[True])[pairs // 2], sorted(times[False])[pairs // 2]
    return {"on_s": round(on, 4), "off_s": round(off, 4), "speedup": round(off / on, 3), "pairs": pairs,
            "on_all_s": [round(t, 4) for t in times[True]], "off_all_s": [round(t, 4) for t in times[False]]}


def layer_ops_ab(forks, device: str) -> dict:
    """The fused RMSNorm / RoPE / SiLU kernels (on) vs the torch path (off). On a CPU both run the
    CPU path."""
    from mrt_engine.models import triton_ops

    saved = triton_ops.ENABLED
    try:
        return _alternate(forks, device, lambda on: setattr(triton_ops, "ENABLED", on))
    finally:
        triton_ops.ENABLED = saved


def graphs_ab(llm, forks, device: str) -> dict:
    """Piecewise CUDA graphs for decode steps (on) vs eager (off); the first call with graphs,
    which captures them, is timed apart. On a CPU the pieces run eagerly (exercises the code only)."""
    from mrt_engine.models.cuda_graphs import PiecewiseDecode

    saved = llm.runner.graphs
    pieces = PiecewiseDecode(llm.model, "capture" if device == "cuda" else "eager")
    try:
        llm.runner.graphs = pieces
        t0 = time.perf_counter()
        forks(90)
        _sync(device)
        first = time.perf_counter() - t0
        result = _alternate(forks, device, lambda on: setattr(llm.runner, "graphs", pieces if on else None), seed=300)
    finally:
        llm.runner.graphs = saved
    return dict(result, first_call_with_capture_s=round(first, 4), buckets=sorted(pieces.buckets), mode=pieces.mode)


def run_engine(path, args, traces, positions, suffix, dtype_name):
    from mrt_engine import LLM, Fork, SamplingParams

    bs = 16
    fork_rows = len(traces) * len(positions) * args.branches
    per_fork = -(-(args.suffix_len + args.answer_len) // bs) + 2      # own blocks + the copied partial tail
    blocks = len(traces) * -(-(args.trace_len + 1) // bs) + fork_rows * per_fork
    llm = LLM(path, dtype=dtype_name, device=args.device, block_size=bs, num_blocks=int(blocks * 1.3) + 64,
              max_num_seqs=max(256, fork_rows), max_num_batched_tokens=8192)
    keep = SamplingParams(temperature=1.0, max_tokens=1, ignore_eos=True, seed=0)
    handles = [o.outputs[0].handle for o in llm.generate([t[:-1] for t in traces], keep, keep=True)]

    def forks(seed, sel=None):
        items = [Fork(h, at=p, suffix=suffix) for h in handles for p in positions]
        items = items if sel is None else items[:sel]
        sp = SamplingParams(n=args.branches, temperature=1.0, max_tokens=args.answer_len, ignore_eos=True, seed=seed)
        return llm.generate(items, sp)

    forks(-1, sel=2)                     # warm-up: compiles the kernels for these shapes
    _sync(args.device)
    llm.reset_stats()
    t0 = time.perf_counter()
    outs = forks(1)
    _sync(args.device)
    wall = time.perf_counter() - t0
    gen = sum(len(c.token_ids) for o in outs for c in o.outputs)
    stats = llm.kv_stats()
    profile = None
    if args.profile:   # the same fork phase again (new seed) under torch.profiler
        from torch.profiler import ProfilerActivity, profile as torch_profile

        from mrt_engine import profiling

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        steps0 = llm.kv_stats()["num_steps"]
        with torch_profile(activities=acts) as prof:
            t1 = time.perf_counter()
            forks(2)
            _sync(args.device)
            profiled_wall = time.perf_counter() - t1
        profile = profile_table(prof, profiled_wall, llm.kv_stats()["num_steps"] - steps0)
        profile["layer_ops_ab"] = layer_ops_ab(forks, args.device)
        profile["graphs_ab"] = graphs_ab(llm, forks, args.device)
        # and once more with the engine's own sections: HOST seconds per category (CUDA ops are
        # asynchronous, so a section holds its launches; the sampler's holds the wait for the GPU)
        profiling.enable(llm.model)
        try:
            t1 = time.perf_counter()
            forks(3)
            _sync(args.device)
            profile["host_sections"] = {"wall_s": round(time.perf_counter() - t1, 4), **profiling.report()}
        finally:
            profiling.disable()
    greedy = llm.generate([Fork(handles[0], at=positions[0], suffix=suffix)],
                          SamplingParams(temperature=0, max_tokens=min(16, args.answer_len), ignore_eos=True))
    for h in handles:
        llm.release(h)
    result = {"wall_s": round(wall, 4), "gen_tokens": gen, "gen_tok_s": round(gen / wall, 1),
              "prefill_tokens": stats.get("prefill_tokens"), "steps": stats.get("num_steps"),
              "preemptions": stats.get("num_preemptions")}
    if profile:
        result["profile"] = profile
    g = greedy[0].outputs[0]
    return result, (greedy[0].prompt_token_ids, g.token_ids, g.logprobs), llm


def run_transformers(model, args, traces, positions, suffix):
    prompts = [t[:p] + suffix for t in traces for p in positions]
    rows_per_call = max(1, args.hf_max_rows // args.branches)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + rows_per_call] for i in range(0, len(order), rows_per_call)]

    def generate(idx, new_tokens, sample=True):
        rows = [prompts[i] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):     # left padding: the new tokens line up
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.branches) \
            if sample else dict(do_sample=False)
        out = model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kw)
        return out[:, width:]

    with torch.inference_mode():
        generate(batches[0][:1], 2)      # warm-up
        _sync(args.device)
        torch.manual_seed(1)
        t0 = time.perf_counter()
        gen = 0
        for idx in batches:
            gen += generate(idx, args.answer_len).numel()
        _sync(args.device)
        wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 4), "gen_tokens": gen, "gen_tok_s": round(gen / wall, 1),
            "generate_calls": len(batches), "max_rows": rows_per_call * args.branches}


def greedy_check(model, prompt: list[int], tokens: list[int], logprobs: list[float], device: str) -> dict:
    """The engine's greedy tokens scored by transformers, teacher-forced on the engine's own tokens.

    Comparing free-running greedy texts says little in bf16: the first near-tie that rounds the
    other way makes every later token differ. Scored on one shared context instead, each of our
    tokens must be transformers' argmax or within rounding of it (`max_gap_to_argmax`, in nats),
    and our logprob of it must be close to transformers' (`max_abs_logprob_diff`).
    """
    ids = torch.tensor([prompt + tokens[:-1]], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float()
    lp = torch.log_softmax(logits, dim=-1)
    ours = torch.tensor(tokens, device=device)
    theirs = lp.gather(1, ours[:, None])[:, 0]
    gap = lp.max(dim=-1).values - theirs
    return {"tokens": len(tokens), "argmax_equal": int((lp.argmax(dim=-1) == ours).sum()),
            "max_gap_to_argmax": round(float(gap.max()), 5),
            "max_abs_logprob_diff": round(float((theirs.cpu() - torch.tensor(logprobs)).abs().max()), 5)}


def _print_profile(p: dict) -> None:
    busy = f"{p['device_busy_s']:.3f} s ({100 * p['device_busy_fraction']:.0f}% of wall)" \
        if p["device_busy_fraction"] is not None else "n/a"
    print(f"  profiled fork phase: wall {p['wall_s']:.3f} s over {p['steps']} steps, kernels {busy}, "
          f"{p['launches_per_step']} launches per step, host time inside torch ops {p['host_ops_s']:.3f} s")
    for title, rows in (("kernels", p["top_kernels"]), ("host ops", p["top_host_ops"])):
        print(f"    top {title} (self ms, calls):")
        for r in rows[:12]:
            print(f"      {r['self_ms']:>10.2f} {r['calls']:>7}  {r['name']}")
    ab = p.get("layer_ops_ab")
    if ab:
        print(f"    fused layer ops vs the torch path (median of {ab['pairs']} alternated pairs): {ab['on_s']:.3f} s vs "
              f"{ab['off_s']:.3f} s, {ab['speedup']}x")
    g = p.get("graphs_ab")
    if g:
        print(f"    decode graphs ({g['mode']}) vs eager (median of {g['pairs']} alternated pairs): {g['on_s']:.3f} s vs "
              f"{g['off_s']:.3f} s, {g['speedup']}x; first call with capture {g['first_call_with_capture_s']:.3f} s, "
              f"buckets {g['buckets']}")
    hs = p.get("host_sections") or {}
    print(f"    engine sections (host s; wall {hs.get('wall_s')}): " + ", ".join(
        f"{k} {v['s']:.3f}" for k, v in hs.items() if k != "wall_s"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: the largest that fits memory and budget")
    ap.add_argument("--budget-s", type=float, default=200.0, help="seconds this run may take (picks the shape)")
    ap.add_argument("--traces", "-T", type=int, default=4)
    ap.add_argument("--trace-len", "-L", type=int, default=2048)
    ap.add_argument("--positions", "-E", type=int, default=8)
    ap.add_argument("--suffix-len", "-F", type=int, default=16)
    ap.add_argument("--branches", "-K", type=int, default=8)
    ap.add_argument("--answer-len", "-A", type=int, default=64)
    ap.add_argument("--hf-max-rows", type=int, default=64, help="rows (forks x K) per transformers generate call")
    ap.add_argument("--quick", action="store_true", help="a tiny workload (smoke run)")
    ap.add_argument("--skip-transformers", action="store_true",
                    help="time the engine only (no baseline, no speedup, no greedy check)")
    ap.add_argument("--profile", action="store_true",
                    help="run the engine's fork phase once more under torch.profiler: device vs host time, top ops")
    ap.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_branched_gpu: no CUDA device here (use --device cpu for a smoke run); nothing to do.")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.quick:
        args.traces, args.trace_len, args.positions, args.suffix_len, args.branches, args.answer_len = 2, 64, 2, 4, 2, 4
    t_start = time.time()
    shape = args.shape or pick_shape(args.budget_s, args.device)
    dtype, dtype_name = (torch.bfloat16, "bfloat16") if args.device == "cuda" else (torch.float32, "float32")
    print(f"bench_branched_gpu: shape {shape} {dtype_name} on {args.device}; T={args.traces} L={args.trace_len} "
          f"E={args.positions} F={args.suffix_len} K={args.branches} A={args.answer_len}", flush=True)
    t0 = time.time()
    model, path = build_model(shape, args.device, dtype)
    setup_s = round(time.time() - t0, 1)
    try:
        traces, positions, suffix = workload(args, SHAPES[shape][5])
        engine, (g_prompt, g_tokens, g_logprobs), llm = run_engine(path, args, traces, positions, suffix,
                                                                     dtype_name)
        del llm
        print(f"  mrt_engine:   fork phase {engine['wall_s']:.3f} s ({engine['gen_tok_s']:.0f} tok/s)", flush=True)
        if "profile" in engine:
            _print_profile(engine["profile"])
        hf = check = None
        if not args.skip_transformers:
            hf = run_transformers(model, args, traces, positions, suffix)
            print(f"  transformers: fork phase {hf['wall_s']:.3f} s ({hf['gen_tok_s']:.0f} tok/s)", flush=True)
            check = greedy_check(model, g_prompt, g_tokens, g_logprobs, args.device)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    speedup = None if hf is None else round(hf["wall_s"] / engine["wall_s"], 2)
    report = {
        "benchmark": "bench_branched_gpu",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "shape": shape, "dims": dict(zip(("layers", "hidden", "heads", "kv_heads",
                                                                      "intermediate", "vocab"), SHAPES[shape])),
        "dtype": dtype_name,
        "workload": {k: getattr(args, k) for k in ("traces", "trace_len", "positions", "suffix_len", "branches",
                                                    "answer_len")},
        "mrt_engine": engine, "transformers": hf, "model_setup_s": setup_s,
        "greedy_check": check,
        "headline": {"speedup_vs_transformers": speedup, "shape": shape, "engine_s": engine["wall_s"],
                     "transformers_s": None if hf is None else hf["wall_s"]},
        "seconds": round(time.time() - t_start, 1),
    }
    os.makedirs(args.results_dir, exist_ok=True)
    paths = [os.path.join(args.results_dir, "bench_branched_gpu.json")]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "bench_branched_gpu.json"))
    for p in dict.fromkeys(paths):
        with open(p, "w") as f:
            json.dump(report, f, indent=1)
    if hf is None:
        print("transformers skipped (--skip-transformers): no speedup, no greedy check")
        return 0
    print(f"greedy check (teacher-forced): {check['argmax_equal']}/{check['tokens']} of our tokens are transformers' "
          f"argmax, largest gap to it {check['max_gap_to_argmax']} nats, logprobs within {check['max_abs_logprob_diff']}")
    print(f"fork-phase speedup vs transformers ({args.device}): {speedup}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
