"""MRT mode of bench_branched.py: progress estimation (J at every boundary) through trainer/progress.py.

    python benchmarks/bench_branched.py --mode mrt            # the default workload
    python benchmarks/bench_progress.py --quick --out-dir /tmp/b   # same flags, tiny smoke run

Workload (bench_branched's knobs): T traces of L tokens (P-token random prompt) sampled by the
engine with kept KV; E episode boundaries per trace, evenly spaced in the completion; at each of
the E + 2 points (empty thinking, every boundary, the end) an F-token forced suffix and K answers
of A tokens (ignore_eos, temperature 1), graded by the math verifier -> J and progress.
Timed in the same run, on the same model and token ids:
  (a) generating the T traces themselves (engine, keep=True),
  (p) `progress.estimate_progress` on them: segmentation is replaced by the given boundaries (the
      benchmark model speaks random ids), the rest (forks in one call, decode, grading, J) is the
      real path,
  (b) transformers doing the same estimation: every point's prefix + suffix as a prompt, K samples
      of A tokens by `generate` (batched by length, KV cache on), decode, grade, J.
Ends with `progress estimation: <C>x of trace generation time, <S>x faster than transformers`,
C = (p) / (a), S = (b) / (p) in wall time (the same ratios in this process's CPU seconds are printed
and saved too: steadier on a shared machine); writes progress.json under --out-dir.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import (EOS_ID, QUICK_MODEL, SHAPES, Workload, machine_info, random_model,  # noqa: E402
                      read_config, suffix_ids, trace_prompts)

NATURAL_SUFFIX_LEN = 4   # stands for "\n</think>\n\n"
VERIFIER = "math"


def with_tokenizer(model_dir: str, vocab: int) -> str:
    """A copy of the benchmark model folder (weights symlinked) with a word-level tokenizer that
    gives every id a text "<id>" (specials <pad>/<s>/</s> at the workload's ids), so the text
    side of progress estimation (decode, grading) runs as for a real model. Cached beside it."""
    final = model_dir.rstrip("/") + "-tok"
    if os.path.isfile(os.path.join(final, "tokenizer.json")):
        return final
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {0: "<pad>", 1: "<s>", EOS_ID: "</s>"}
    tok = Tokenizer(models.WordLevel({names.get(i, f"<{i}>"): i for i in range(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[^<>]*>"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<pad>")
    tmp = tempfile.mkdtemp(prefix="tok-", dir=os.path.dirname(final))
    for f in os.listdir(model_dir):
        os.symlink(os.path.join(model_dir, f), os.path.join(tmp, f))
    fast.save_pretrained(tmp)
    try:
        os.rename(tmp, final)
    except OSError:   # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def boundaries(w: Workload) -> list[int]:
    """E boundaries evenly spaced strictly inside the completion of L - P tokens."""
    n = w.trace_len - w.prompt_len
    return [n * e // (w.positions + 1) for e in range(1, w.positions + 1)]


def run_engine(model_dir: str, w: Workload, args) -> tuple[list[list[int]], dict]:
    from mrt_engine import LLM, SamplingParams
    from mrt_engine.trainer import episodes, progress

    points = w.traces * (w.positions + 2)
    llm = LLM(model_dir, dtype=args.dtype, device="cpu", block_size=args.block_size, seed=w.seed,
              max_num_seqs=max(256, points * w.branches))
    vocab = llm.vocab_size
    prompts = trace_prompts(w, vocab)
    new = w.trace_len - w.prompt_len
    trace_params = [SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True, seed=w.seed + i)
                    for i in range(w.traces)]
    # warm-up of the trace decode on the same shapes (first calls pay one-off torch costs)
    llm.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=min(new, 32), ignore_eos=True)] *
                 w.traces)
    # (a) the traces themselves
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, trace_params, keep=True)
    trace_s, trace_cpu = time.perf_counter() - t0, time.process_time() - c0
    handles = [o.outputs[0].handle for o in outs]
    traces = [list(h.token_ids) for h in handles]
    print(f"(a) traces: {w.traces} x {w.trace_len} tokens sampled by mrt_engine (keep=True) in "
          f"{trace_s:.2f} s", flush=True)

    rule = episodes.EpisodeRule(stop_at=None)   # random ids: no </think>; the end is the trace end
    bounds = [boundaries(w)] * w.traces
    sampling = SamplingParams(temperature=1.0, max_tokens=w.answer_len, ignore_eos=True, seed=w.seed)
    natural = suffix_ids(Workload(suffix_len=NATURAL_SUFFIX_LEN, seed=w.seed), vocab, -2)

    def estimate(rep, hs):
        return progress.estimate_progress(
            llm, hs, [{"answer": "42"}] * len(hs), VERIFIER, boundaries=bounds[:len(hs)], rule=rule,
            k=w.branches, forced_suffix=suffix_ids(w, vocab, rep), natural_suffix=natural,
            sampling=sampling)

    t0 = time.perf_counter()
    estimate(-1, handles[:1] if args.light_warmup else handles)
    print(f"(p) warm-up: {time.perf_counter() - t0:.2f} s", flush=True)
    walls, cpus, stats, tps = [], [], [], None
    for rep in range(args.reps):
        gc.collect()
        llm.reset_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        tps = estimate(rep, handles)   # a fresh suffix per rep: no cached suffix KV is reused
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        stats.append(llm.kv_stats())
        print(f"(p) rep {rep}: progress estimation {walls[-1]:.3f} s", flush=True)
    for h in handles:
        llm.release(h)
    st = stats[walls.index(statistics.median(walls))] if len(walls) % 2 else stats[-1]
    expected_prefill = w.traces * ((w.positions + 1) * (w.suffix_len + 1) + NATURAL_SUFFIX_LEN + 1)
    res = {"trace_s": round(trace_s, 4), "progress_walls_s": [round(x, 4) for x in walls],
           "progress_s": round(statistics.median(walls), 4),
           # CPU seconds of this process: steadier than wall time on a shared machine
           "trace_cpu_s": round(trace_cpu, 4), "progress_cpu_s": round(statistics.median(cpus), 4),
           "points": points, "answers": points * w.branches,
           "prefill_tokens": st["prefill_tokens"], "expected_prefill_tokens": expected_prefill,
           "peak_kv_blocks": st["peak_used_blocks"], "preemptions": st["num_preemptions"],
           "mean_J": statistics.mean(j for tp in tps for j in tp.J)}
    return traces, res   # the engine (and its KV cache) goes with this frame


def run_transformers(model_dir: str, w: Workload, traces, args) -> dict:
    """The same estimation with transformers: prompts = prefix + suffix per point, K samples."""
    import torch
    from transformers import AutoTokenizer

    from hf_baseline import HFForker, batches
    from mrt_engine.trainer import grading

    forker = HFForker(model_dir, {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype])
    tok = AutoTokenizer.from_pretrained(model_dir)
    verify = grading.get_verifier(VERIFIER)
    vocab = forker.model.config.vocab_size
    natural = suffix_ids(Workload(suffix_len=NATURAL_SUFFIX_LEN, seed=w.seed), vocab, -2)

    def estimate(rep, trs):
        forced = suffix_ids(w, vocab, rep)
        prompts = []
        for tr in trs:
            cuts = [0] + boundaries(w)
            prompts += [tr[:w.prompt_len + c] + forced for c in cuts] + [tr + natural]
        torch.manual_seed(w.seed + rep)
        rewards = [None] * len(prompts)
        with torch.inference_mode():
            for idx in batches(prompts, w.branches, args.hf_max_rows):
                out, width = forker._generate([prompts[i] for i in idx], w.branches, w.answer_len)
                gen = out.sequences[:, width:].tolist()
                for r, i in enumerate(idx):
                    texts = tok.batch_decode(gen[r * w.branches:(r + 1) * w.branches],
                                             skip_special_tokens=True)
                    rewards[i] = sum(verify(t, {"answer": "42"}) for t in texts) / w.branches
        return rewards

    estimate(-1, traces[:1])   # warm-up: one trace's points
    walls, cpus = [], []
    for rep in range(args.hf_reps):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        J = estimate(rep, traces)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        print(f"(b) rep {rep}: transformers estimation {walls[-1]:.3f} s", flush=True)
    return {"hf_walls_s": [round(x, 4) for x in walls], "hf_s": round(statistics.median(walls), 4),
            "hf_cpu_s": round(statistics.median(cpus), 4),
            "points": len(J)}


def run(args) -> int:
    """bench_branched's parsed args (the same workload knobs); returns the exit status."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    w = Workload(traces=args.traces, trace_len=args.trace_len, prompt_len=args.prompt_len,
                 positions=args.positions, suffix_len=args.suffix_len, branches=args.branches,
                 answer_len=args.answer_len, seed=args.seed)
    base = args.model or random_model(QUICK_MODEL if args.quick else SHAPES[getattr(args, "shape", "small")])
    config = read_config(base)
    w.validate(config["vocab_size"], config.get("max_position_embeddings", 1 << 30))
    if w.positions >= w.trace_len - w.prompt_len:
        raise ValueError(f"positions ({w.positions}) must be < the completion length "
                         f"({w.trace_len - w.prompt_len})")
    model_dir = base if os.path.isfile(os.path.join(base, "tokenizer.json")) else \
        with_tokenizer(base, config["vocab_size"])
    machine = machine_info()
    workload = dict(asdict(w), boundaries=boundaries(w), points_per_trace=w.positions + 2,
                    natural_suffix_len=NATURAL_SUFFIX_LEN, dtype=args.dtype, verifier=VERIFIER,
                    model_dir=model_dir, model=f"{config.get('model_type')} layers="
                    f"{config['num_hidden_layers']} hidden={config['hidden_size']} vocab="
                    f"{config['vocab_size']}")
    print("workload:", json.dumps(workload))
    print("machine: ", json.dumps(machine), flush=True)
    traces, eng = run_engine(model_dir, w, args)
    gc.collect()
    hf = run_transformers(model_dir, w, traces, args)
    C = eng["progress_s"] / eng["trace_s"]
    S = hf["hf_s"] / eng["progress_s"]
    report = {"workload": workload, "machine": machine, "engine": eng, "transformers": hf,
              "progress_over_trace_time": round(C, 3), "speedup_vs_transformers": round(S, 2),
              "cpu_time_ratios": {"progress_over_trace": round(eng["progress_cpu_s"] / eng["trace_cpu_s"], 3),
                                  "speedup_vs_transformers": round(hf["hf_cpu_s"] / eng["progress_cpu_s"], 2)},
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "progress.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"(a) trace generation {eng['trace_s']:.3f} s | (p) progress estimation {eng['progress_s']:.3f} s"
          f" ({eng['points']} points x K={w.branches}, prefill {eng['prefill_tokens']} tokens, expected "
          f"{eng['expected_prefill_tokens']}) | (b) transformers {hf['hf_s']:.3f} s")
    cr = report["cpu_time_ratios"]
    print(f"in CPU seconds of this process: {cr['progress_over_trace']:.2f}x of trace generation, "
          f"{cr['speedup_vs_transformers']:.1f}x faster than transformers (load average at end "
          f"{report['load_avg_1m_at_end']})")
    print(f"wrote {path}")
    # printed from the values the JSON holds: rounding C twice (3 places, then 2) can differ from
    # rounding it once, and the headline must agree with the file (0.19496 printed 0.19 beside 0.195)
    print(f"progress estimation: {report['progress_over_trace_time']:.2f}x of trace generation time, "
          f"{report['speedup_vs_transformers']:.1f}x faster than transformers")
    return 0


def main(argv=None) -> int:
    from bench_branched import parse_args

    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
