"""Runs (a) and (b) of bench_branched.py on mrt_engine: traces, then the timed fork phase.

(a) sharing on: T traces generated with keep=True, then one generate() of T*E `Fork`s with
    SamplingParams(n=K): each fork shares the trace's blocks and prefills only its suffix once.
(b) sharing off: a second engine with the prefix cache disabled gets the same token ids as plain
    prompts (trace[:t] + suffix). --no-sharing-mode branch (default) submits K copies with n=1,
    so every branch re-prefills its whole prefix and holds its own KV (what transformers and
    vLLM without prefix caching do); `fork` submits each prompt once with n=K (the K samples of
    one request still share its prompt).

Prefill tokens are measured, not taken from the engine's word: a hook on the model's token
embedding counts the tokens fed, minus the A-1 decode tokens of every branch (the engine's own
counter is reported beside it). Peak KV is the engine's peak of blocks held by sequences during
the call (`peak_used_blocks`; shared blocks count once) times bytes per block; the forks are
kept (keep=True) until the call returns, so the peak is the full fork tree.
"""
from __future__ import annotations

import gc
import json
import time

from workload import Workload, fork_prompts, random_traces, suffix_ids, trace_prompts


class EmbeddingCounter:
    """Counts token ids fed to the first nn.Embedding found inside an engine object."""

    def __init__(self, root):
        import torch

        self.count = 0
        self.module = _find_module(root, torch.nn.Embedding)
        self._handle = None
        if self.module is not None:
            self._handle = self.module.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        self.count += inputs[0].numel()

    def close(self):
        if self._handle is not None:
            self._handle.remove()


def _find_module(root, cls, depth: int = 4):
    """Breadth-first search of attributes (and nn.Module children) for an instance of cls."""
    import torch

    seen, frontier = set(), [root]
    for _ in range(depth):
        nxt = []
        for obj in frontier:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.nn.Module):
                for m in obj.modules():
                    if isinstance(m, cls):
                        return m
                continue
            attrs = getattr(obj, "__dict__", None)
            if attrs:
                nxt += [v for v in attrs.values() if not isinstance(v, (int, float, str, bytes, type(None)))]
            elif isinstance(obj, (list, tuple)):
                nxt += list(obj)
        frontier = nxt
    return None


def blocks_in_use(stats: dict) -> int:
    """Blocks held by sequences: every block that is neither free nor only cached (evictable)."""
    if "used_blocks" in stats:
        return stats["used_blocks"]
    return stats["total_blocks"] - stats["free_blocks"] - stats.get("cached_blocks", 0)


def predicted_blocks(w: Workload, bs: int, sharing: bool, branch_mode: str) -> int:
    """Blocks the sharing model predicts right after the fork call (DESIGN.md §5), with the
    engine's fork rule: a fork at t >= 2 shares the parent's KV of tokens [0, t-1) (full blocks
    by reference, the partial one copied) and re-feeds token t-1 for its logits. A sequence of n
    tokens whose last token was sampled, not fed, holds KV for n - 1 tokens."""
    ceil = lambda n: -(-n // bs)  # noqa: E731
    F, K, A = w.suffix_len, w.branches, w.answer_len
    if not sharing:
        if branch_mode == "branch":
            return w.traces * K * sum(ceil(t + F + A - 1) for t in w.fork_positions())
        # one request per fork: its prompt's full blocks shared by the K samples, tails private
        return w.traces * sum((t + F) // bs + K * (ceil(t + F + A - 1) - (t + F) // bs)
                              for t in w.fork_positions())
    total = w.traces * ceil(w.trace_len - 1)          # kept traces
    for t in w.fork_positions():
        shared_from = (t - 1) // bs if t >= 2 else 0  # full parent blocks taken by reference
        prompt_full = (t + F) // bs - shared_from     # copied partial + suffix blocks, once per fork
        tail = ceil(t + F + A - 1) - (t + F) // bs    # each branch's private blocks
        total += w.traces * (prompt_full + K * tail)
    return total


def _fork_call(llm, handles, w: Workload, suffix, seed):
    from mrt_engine import Fork, SamplingParams

    forks = [Fork(h, at=t, suffix=suffix) for h in handles for t in w.fork_positions()]
    # a seed per fork: one shared seed would give every fork the same uniforms
    params = [SamplingParams(n=w.branches, temperature=1.0, max_tokens=w.answer_len, ignore_eos=True,
                             seed=seed + i) for i in range(len(forks))]
    return llm.generate(forks, params, keep=True)


def _plain_call(llm, traces, w: Workload, suffix, branch_mode):
    from mrt_engine import SamplingParams

    prompts = fork_prompts(traces, w, suffix)
    if branch_mode == "branch":                       # every branch its own request
        prompts = [p for p in prompts for _ in range(w.branches)]
        n = 1
    else:
        n = w.branches
    params = SamplingParams(n=n, temperature=1.0, max_tokens=w.answer_len, ignore_eos=True)
    return llm.generate(prompts, params, keep=True)


def _check_and_release(llm, outs, w: Workload, traces: int) -> tuple[int, int]:
    """Checks every branch of the forks of `traces` traces got exactly A tokens; returns
    (generated tokens, distinct branches) and releases the kept branches."""
    comps = [c for o in outs for c in o.outputs]
    lens = {len(c.token_ids) for c in comps}
    expect = traces * w.positions * w.branches
    if len(comps) != expect or lens != {w.answer_len}:
        raise RuntimeError(f"engine returned {len(comps)} branches of lengths {sorted(lens)}, "
                           f"expected {expect} of {w.answer_len}")
    distinct = len({tuple(c.token_ids) for c in comps})
    for c in comps:
        llm.release(c.handle)
    return sum(len(c.token_ids) for c in comps), distinct


def _engine_model(llm):
    model = getattr(llm, "model", None)
    if model is None:
        import torch

        model = _find_module(llm, torch.nn.Module)
    return model


def _extra_call(llm, w: Workload, run_call, rep: int, start, stop, read):
    """One more repetition outside the timed ones, run between start() and stop() (an
    instrument); returns (wall, read() taken before stop, steps)."""
    vocab = llm_vocab(llm)
    gc.collect()
    llm.reset_stats()
    start()
    try:
        t0 = time.perf_counter()
        outs = run_call(suffix_ids(w, vocab, rep), rep, w.traces)
        wall = time.perf_counter() - t0
        got = read()
    finally:
        stop()
    steps = llm.kv_stats().get("num_steps") or 0
    _check_and_release(llm, outs, w, w.traces)
    return wall, got, steps


def profiled_call(llm, w: Workload, run_call, rep: int) -> dict:
    """One extra, untimed-for-the-median repetition with mrt_engine.profiling on: the per-step
    time breakdown. Categories are exclusive wall times; what no section covers inside the call
    (the scheduler, request bookkeeping, Python glue) is `scheduler_python`."""
    from mrt_engine import profiling

    wall, sections, steps = _extra_call(llm, w, run_call, rep, lambda: profiling.enable(_engine_model(llm)),
                                        profiling.disable, profiling.report)
    return _breakdown(wall, sections, steps, "one extra repetition with mrt_engine.profiling on (not "
                      "one of the timed repetitions)")


def attention_probe_call(llm, w: Workload, run_call, rep: int) -> dict | None:
    """One more repetition with mrt_engine.profiling's attention probe on: every decode-attention
    call of the CPU lean step timed as the step meets it, then run again at once (its data in
    cache). None where no call went through that step (a GPU, or a kernel not usable here)."""
    from mrt_engine import profiling

    _, probe, _ = _extra_call(llm, w, run_call, rep, profiling.probe_attention,
                              lambda: profiling.probe_attention(False), profiling.attention_probe_report)
    if not probe["calls"]:
        return None
    again = probe["again_at_once_s"]
    return {**probe, "ratio": round(probe["in_place_s"] / again, 3) if again > 0 else None,
            "how": "each decode-attention call of one extra repetition timed as the step met it, then "
                   "run again at once with the same inputs (its K/V and scratch then in cache): the "
                   "difference is the time the call waits on memory"}


def _breakdown(wall: float, sections: dict, steps: int, how: str) -> dict:
    """Per-category seconds, shares and ms per step; what no section covers is scheduler_python."""
    covered = sum(v["s"] for v in sections.values())
    cats = {k: v["s"] for k, v in sections.items()}
    cats["scheduler_python"] = round(max(wall - covered, 0.0), 4)
    order = sorted(cats, key=lambda k: -cats[k])
    return {"wall_s": round(wall, 4), "steps": steps,
            "seconds": {k: cats[k] for k in order},
            "share": {k: round(cats[k] / wall, 4) for k in order},
            "per_step_ms": {k: round(1000 * cats[k] / max(steps, 1), 2) for k in order},
            "calls": {k: v["calls"] for k, v in sections.items()},
            "how": how + "; exclusive wall time per category"}


def _time_forks(llm, w, reps, kv_block_bytes, warmup_traces, run_call, profile=False, profile_rep="extra",
                after_rep=None, attention_probe=False):
    """Warm-up, then `reps` timed calls, and the breakdown when `profile`: from one extra call
    (profile_rep "extra"), or from the last timed call itself ("last": for slow shapes, where
    the timers' ~1 ms per step is noise); returns the result dict (without the trace phase).
    run_call(suffix, rep, traces) runs the forks of the first `traces` traces; after_rep(rep),
    if given, runs after each timed call (the interleaved baseline's repetition)."""
    counter = EmbeddingCounter(llm)
    vocab = llm_vocab(llm)
    t0 = time.perf_counter()
    # warm-up on the same shapes (first calls of a shape pay one-off costs in torch's CPU
    # kernels); --light-warmup uses one trace's forks: every fork length, a T-th of the work
    _check_and_release(llm, run_call(suffix_ids(w, vocab, -1), -1, warmup_traces), w, warmup_traces)
    print(f"  warm-up: {time.perf_counter() - t0:.3f} s", flush=True)
    runs = []
    breakdown = None
    for rep in range(reps):
        gc.collect()
        counter.count = 0
        llm.reset_stats()
        profiled = profile and profile_rep == "last" and rep == reps - 1
        if profiled:
            from mrt_engine import profiling

            profiling.enable(_engine_model(llm))
        t0 = time.perf_counter()
        try:
            outs = run_call(suffix_ids(w, vocab, rep), rep, w.traces)
            wall = time.perf_counter() - t0
            if profiled:
                sections = profiling.report()
        finally:
            if profiled:
                profiling.disable()
        print(f"  rep {rep}: fork phase {wall:.3f} s", flush=True)
        stats = llm.kv_stats()
        if profiled:
            breakdown = _breakdown(wall, sections, stats.get("num_steps") or 0,
                                   "the last timed repetition, run with mrt_engine.profiling on")
        fed = counter.count
        gen, distinct = _check_and_release(llm, outs, w, w.traces)
        n_seq = w.fork_tokens() * w.branches
        runs.append({"wall": wall, "stats": stats, "gen": gen, "distinct": distinct,
                     # every branch feeds A-1 decode tokens; the rest of what was fed is prefill
                     "prefill": fed - n_seq * (w.answer_len - 1) if counter.module is not None else None})
        if after_rep is not None:
            after_rep(rep)
    counter.close()
    if profile and profile_rep == "extra":
        breakdown = profiled_call(llm, w, run_call, reps)
    probe = attention_probe_call(llm, w, run_call, reps + 1) if attention_probe else None
    med = sorted(runs, key=lambda r: r["wall"])[reps // 2]
    st = med["stats"]
    peak = max(r["stats"].get("peak_used_blocks", blocks_in_use(r["stats"])) for r in runs)
    return {"walls_s": [r["wall"] for r in runs], "gen_tokens": med["gen"],
            "prefill_tokens": med["prefill"], "engine_prefill_tokens": st.get("prefill_tokens"),
            "prefix_cache_hit_tokens": st.get("prefix_cache_hit_tokens"),
            "preemptions": st.get("num_preemptions"), "steps": st.get("num_steps"),
            "peak_kv_blocks": peak, "peak_kv_bytes": peak * kv_block_bytes,
            "kv_blocks_after_call": blocks_in_use(st), "distinct_branches": med["distinct"],
            **({"breakdown": breakdown} if breakdown else {}),
            **({"attention_probe": probe} if probe else {})}


def llm_vocab(llm) -> int:
    for path in (("vocab_size",), ("model_config", "vocab_size"), ("hf_config", "vocab_size"), ("config", "vocab_size")):
        obj = llm
        for p in path:
            obj = getattr(obj, p, None)
        if isinstance(obj, int):
            return obj
    raise AttributeError("cannot find the model's vocab_size on the LLM object")


def run_engines(model_dir: str, w: Workload, args, kv_bytes_token: int, paired=None):
    """Returns (traces as token-id lists, {name: result dict}) for the engines selected.
    `paired(traces)`, if given, is called once the traces exist and returns (after_rep, finish):
    after_rep(rep) runs after each timed repetition of (a), finish() right after (a), finish(ok=False)
    when (a) raised (or was interrupted)."""
    from mrt_engine import LLM, SamplingParams

    bs = args.block_size
    kv_block_bytes = bs * kv_bytes_token
    # each engine gets the blocks its sharing model predicts, with room to spare (the engine
    # preempts rather than fails if short; preemptions are reported)
    trace_blocks = w.traces * -(-(w.trace_len + 1) // bs)
    pool = {True: predicted_blocks(w, bs, True, args.no_sharing_mode),
            False: trace_blocks + predicted_blocks(w, bs, False, args.no_sharing_mode)}
    common = dict(dtype=args.dtype, device="cpu", block_size=bs, seed=w.seed,
                  max_num_seqs=max(256, w.fork_tokens() * w.branches))
    results = {}
    warmup = 1 if args.light_warmup else w.traces

    # (a) traces with keep=True, then forks
    llm = LLM(model_dir, num_blocks=int(pool[True] * 1.5) + 64, **common)
    vocab = llm_vocab(llm)
    if getattr(llm, "bytes_per_block", kv_block_bytes) != kv_block_bytes:
        raise RuntimeError(f"engine says {llm.bytes_per_block} bytes per KV block, config.json gives "
                           f"{kv_block_bytes}")
    if args.trace_source == "generate":
        prompts, new = trace_prompts(w, vocab), w.trace_len - w.prompt_len
    else:   # random ids prefilled in one pass: same KV layout, minutes less on a small CPU
        prompts, new = [t[:-1] for t in random_traces(w, vocab)], 1
    t0 = time.perf_counter()
    outs = llm.generate(prompts, [SamplingParams(n=1, temperature=1.0, max_tokens=new, ignore_eos=True,
                                                 seed=w.seed + i) for i in range(w.traces)], keep=True)
    trace_s = time.perf_counter() - t0
    handles = [o.outputs[0].handle for o in outs]
    traces = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]
    if any(len(t) != w.trace_len for t in traces):
        raise RuntimeError(f"trace lengths {[len(t) for t in traces]}, expected {w.trace_len}")
    print(f"traces: {w.traces} x {w.trace_len} tokens ({'sampled' if new > 1 else 'prefilled'} by mrt_engine, keep=True) in "
          f"{trace_s:.2f} s ({w.traces * new / trace_s:.1f} generated tok/s)", flush=True)
    if "mrt_engine" in args.engines:
        after_rep, finish = paired(traces) if paired else (None, None)
        print("running (a) mrt_engine, sharing on" + (" (interleaved with vLLM)" if after_rep else "") + " ...",
              flush=True)
        try:
            r = _time_forks(llm, w, args.reps, kv_block_bytes, warmup,
                            lambda suffix, rep, nt: _fork_call(llm, handles[:nt], w, suffix, w.seed + 1000 + rep),
                            profile=getattr(args, "profile", False),
                            profile_rep=getattr(args, "profile_rep", "extra"), after_rep=after_rep,
                            attention_probe=getattr(args, "attention_probe", False))
        except BaseException:
            if finish:
                finish(ok=False)
            raise
        if finish:
            finish()
        r.update(trace_phase_s=round(trace_s, 3), trace_source=args.trace_source,
                 predicted_kv_blocks=predicted_blocks(w, bs, True, args.no_sharing_mode),
                 # the suffix, plus the fork point's last token re-fed for its logits
                 expected_prefill_tokens=w.fork_tokens() * (w.suffix_len + 1))
        results["mrt_engine"] = r
        print(f"  -> {json.dumps(r)}", flush=True)
    for h in handles:
        llm.release(h)
    del llm, handles
    gc.collect()

    # (b) plain prompts, prefix cache off
    if "mrt_engine_no_sharing" in args.engines:
        print(f"running (b) mrt_engine, sharing off ({args.no_sharing_mode} mode) ...", flush=True)
        llm = LLM(model_dir, enable_prefix_caching=False, num_blocks=int(pool[False] * 1.5) + 64,
                  **common)
        r = _time_forks(llm, w, args.reps, kv_block_bytes, warmup,
                        lambda suffix, rep, nt: _plain_call(llm, traces[:nt], w, suffix,
                                                            args.no_sharing_mode))
        per_branch = sum(t + w.suffix_len for t in w.fork_positions()) * w.traces
        r.update(mode=args.no_sharing_mode,
                 predicted_kv_blocks=predicted_blocks(w, bs, False, args.no_sharing_mode),
                 expected_prefill_tokens=per_branch * (w.branches if args.no_sharing_mode == "branch" else 1))
        results["mrt_engine_no_sharing"] = r
        print(f"  -> {json.dumps(r)}", flush=True)
        del llm
        gc.collect()
    return traces, results
