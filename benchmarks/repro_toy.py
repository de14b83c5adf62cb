"""CPU reproduction of MRT's claims on the shipped tiny reasoner: GRPO vs MRT-RL (mrt_progress, ours)
vs MRT-RL (mrt_termination, the paper's form) vs STaR vs MRT-STaR, from the same base model, with
the same steps, samples per step and seeds, evaluated with trainer/evaluate.py on held-out toy
problems.

    python benchmarks/repro_toy.py                              # 3 seeds x 5 methods, 2 jobs
    python benchmarks/repro_toy.py --seeds 0 --max-steps 10     # a smaller run

1. Train: `mrt train --config trainer/configs/<method>.yaml --seed S --max_steps N` for every
   (method, seed), in subprocesses (`--jobs` at once, each single-threaded: parallel-safe on a
   shared machine); a run whose output folder already holds its evaluation is skipped, so an
   interrupted invocation can simply be repeated.
2. Evaluate the final checkpoint (and the base model once) with `evaluate.evaluate` on held-out
   problems that appear in no seed's training set: natural accuracy, mean tokens to the answer,
   maj@k vs total tokens, normalized regret vs token budget (fixed budgets for every model), and
   accuracy vs forced thinking budget. Same eval seed for every model, so draws differ only by
   the weights.
3. Aggregate mean and spread (std over seeds), tokens each method needs to reach GRPO's accuracy
   (maj@k vs tokens, interpolated), and write JSON + PNG (default benchmarks/results/repro_toy.*)
   and a markdown table.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import loadavg  # noqa: E402

METHODS = {  # name -> config file
    "grpo": "trainer/configs/toy_grpo.yaml",
    "mrt_progress": "trainer/configs/toy_mrt.yaml",
    "mrt_termination": "trainer/configs/toy_mrt_termination.yaml",
    "star": "trainer/configs/toy_star.yaml",
    "mrt_star": "trainer/configs/toy_mrt_star.yaml",
}
EVAL_SEED = 20261129
HELDOUT_SEED = 777_777
BUDGETS = (0, 16, 32, 48, 64, 96, 128, 192, 256)
REGRET_BUDGETS = (32, 64, 96, 128, 160, 192, 256, 320)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- held-out problems and evaluation -------------------------------------------------------------

def heldout_problems(num: int, seeds, num_train: int, difficulty: int = 5) -> list:
    """`num` toy problems that are in no training set of the given seeds."""
    from mrt_engine.trainer import data

    def key(p):
        return (tuple(p["numbers"]), p["target"])

    seen = {key(p) for s in seeds for p in data.load_problems("toy", num_problems=num_train,
                                                              difficulty=difficulty, seed=s)}
    cand = data.load_problems("toy", num_problems=4 * num + 256, difficulty=difficulty,
                              seed=HELDOUT_SEED)
    held = [p for p in cand if key(p) not in seen][:num]
    if len(held) < num:
        raise ValueError(f"only {len(held)} held-out problems are disjoint from training; ask fewer")
    return held


def evaluate_model(model_dir: str, problems: list, samples: int, k: int, max_tokens: int) -> dict:
    """trainer/evaluate.py on the toy task with the toy task's episodes and suffixes."""
    import dataclasses

    from mrt_engine import LLM
    from mrt_engine.trainer import episodes
    from mrt_engine.trainer.evaluate import evaluate
    from mrt_engine.trainer.mrt_rollout import TOY_ANSWER_TOKENS
    from mrt_engine.trainer.toy import traces

    llm = LLM(model_dir, dtype="float32", seed=0, kv_cache_memory_gb=1.0)
    tok = llm.get_tokenizer()
    prompts = [tok(p["prompt"])["input_ids"] for p in problems]
    rule = dataclasses.replace(episodes.TOY_RULE, max_episodes=None)
    res = evaluate(llm, problems, "toy", prompts=prompts, samples=samples, k=k, budgets=BUDGETS,
                   max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=EVAL_SEED,
                   answer_tokens=TOY_ANSWER_TOKENS, rule=rule, forced_suffix=traces.FORCED_SUFFIX,
                   natural_suffix=traces.NATURAL_END, regret_budgets=REGRET_BUDGETS,
                   use_chat_template=False)
    res.pop("example_trace", None)
    res.pop("traces", None)
    return res


def analyze_progress(model_dir: str, problems: list, samples: int = 4, k_small: int = 4,
                     k_large: int = 16, max_tokens: int = 320) -> dict:
    """How informative is per-episode progress on the toy task? On the same kept traces:
    two independent K=k_small estimates of every episode's progress (their correlation is the
    signal's test-retest reliability), one K=k_large estimate (the reference), how concentrated
    a trace's progress is in its largest step, and whether that step is the "Found it" episode."""
    import dataclasses

    from mrt_engine import LLM, SamplingParams
    from mrt_engine.trainer import episodes
    from mrt_engine.trainer.mrt_rollout import TOY_ANSWER_TOKENS
    from mrt_engine.trainer.progress import estimate_progress
    from mrt_engine.trainer.toy import traces

    llm = LLM(model_dir, dtype="float32", seed=0, kv_cache_memory_gb=1.0)
    tok = llm.get_tokenizer()
    rule = dataclasses.replace(episodes.TOY_RULE, max_episodes=None)
    prompts = [tok(p["prompt"])["input_ids"] for p in problems]
    outs = llm.generate(prompts, SamplingParams(n=samples, temperature=1.0, max_tokens=max_tokens,
                                                seed=EVAL_SEED), keep=True)
    comps = [c for o in outs for c in o.outputs]
    probs = [problems[i] for i, o in enumerate(outs) for _ in o.outputs]
    handles = [c.handle for c in comps]
    try:
        def est(k, seed):
            return estimate_progress(llm, handles, probs, "toy", rule=rule, k=k,
                                     forced_suffix=traces.FORCED_SUFFIX,
                                     natural_suffix=traces.NATURAL_END,
                                     sampling=SamplingParams(temperature=1.0,
                                                             max_tokens=TOY_ANSWER_TOKENS, seed=seed))
        a, b, ref = est(k_small, 1), est(k_small, 2), est(k_large, 3)
    finally:
        for h in handles:
            llm.release(h)

    def corr(x, y):
        mx, my = statistics.fmean(x), statistics.fmean(y)
        sx = math.sqrt(sum((v - mx) ** 2 for v in x))
        sy = math.sqrt(sum((v - my) ** 2 for v in y))
        return sum((u - mx) * (v - my) for u, v in zip(x, y)) / (sx * sy) if sx and sy else None

    pa = [p for tp in a for p in tp.progress]
    pb = [p for tp in b for p in tp.progress]
    pr = [p for tp in ref for p in tp.progress]
    share, found_is_max, first_ep = [], [], []
    for tp, c in zip(ref, comps):
        pos = [p for p in tp.progress if p > 0]
        if sum(pos) > 0:
            share.append(max(pos) / sum(pos))
        if tp.num_episodes >= 2 and max(tp.progress) > 0:
            e = tp.progress.index(max(tp.progress))
            text = tok.decode(list(c.token_ids[tp.points[e]:tp.points[e + 1]]))
            found_is_max.append("Found it" in text)
        if tp.progress:
            first_ep.append(tp.progress[0])
    return {"traces": len(comps), "episodes": len(pr), "k_small": k_small, "k_large": k_large,
            "reliability_k_small": corr(pa, pb), "corr_k_small_vs_k_large": corr(pa, pr),
            "progress_std_k_small": statistics.pstdev(pa), "progress_std_k_large": statistics.pstdev(pr),
            "fraction_episodes_near_zero_k_large": statistics.fmean(abs(p) < 0.1 for p in pr),
            "largest_step_share_of_positive_progress": statistics.fmean(share) if share else None,
            "largest_step_is_found_it_episode": statistics.fmean(found_is_max) if found_is_max else None,
            "mean_first_episode_progress_k_large": statistics.fmean(first_ep) if first_ep else None,
            "J_by_trace_fraction_k_large": {
                str(f): statistics.fmean(tp.J[round(f * (len(tp.J) - 1))] for tp in ref)
                for f in (0.0, 0.25, 0.5, 0.75, 1.0)}}


# ---- one job: train (subprocess) then evaluate (subprocess) --------------------------------------

def _run(cmd, log, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {r.returncode}); see {log}")


def job(method: str, seed, a) -> dict:
    """Train (unless method == 'base') and evaluate; returns the job's record."""
    run_dir = os.path.join(a.runs_dir, method if seed is None else f"{method}/seed_{seed}")
    os.makedirs(run_dir, exist_ok=True)
    ev_path = os.path.join(run_dir, "eval.json")
    log = os.path.join(run_dir, "repro.log")
    if os.path.isfile(ev_path):
        with open(ev_path) as f:
            return json.load(f)
    t0 = time.time()
    rec = {"method": method, "seed": seed, "load_start": loadavg()}
    if method == "base":
        from mrt_engine import default_model_path
        model_dir = default_model_path()
    else:
        cmd = [sys.executable, "-m", "mrt_engine.trainer.train", "--config", METHODS[method],
               "--seed", str(seed), "--max_steps", str(a.max_steps), "--output_dir", run_dir,
               "--eval_steps", "0", "--save_steps", "0"] + list(a.train_args)
        _run(cmd, log, a.threads)
        model_dir = os.path.join(run_dir, f"checkpoint-{a.max_steps}")
        rec["train"] = training_summary(run_dir)
    rec["train_wall_s"] = time.time() - t0
    cmd = [sys.executable, os.path.abspath(__file__), "--_eval", model_dir, "--_eval_out",
           ev_path + ".tmp", "--eval-problems", str(a.eval_problems), "--eval-samples",
           str(a.eval_samples), "--k", str(a.k), "--max-tokens", str(a.max_tokens),
           "--seeds", *[str(s) for s in a.seeds]]
    _run(cmd, log, a.threads)
    with open(ev_path + ".tmp") as f:
        rec["eval"] = json.load(f)
    rec["load_end"] = loadavg()
    rec["wall_s"] = time.time() - t0
    with open(ev_path, "w") as f:
        json.dump(rec, f, indent=1)
    os.remove(ev_path + ".tmp")
    return rec


def training_summary(run_dir: str) -> dict:
    """Seconds and samples of a finished run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = [r for r in rows if r.get("step", 0) > 0]
    out = {"steps": len(rows)}
    for k in ("step_s", "generate_s", "fork_s", "credit_s", "train_s", "weight_sync_s"):
        out[k] = sum(float(r.get(k, 0.0) or 0.0) for r in rows)
    out["train_accuracy_first"] = rows[0].get("accuracy") if rows else None
    out["train_accuracy_last"] = rows[-1].get("accuracy") if rows else None
    out["completion_length_last"] = rows[-1].get("completion_length_mean") if rows else None
    return out


# ---- aggregation -----------------------------------------------------------------------------------

def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def tokens_to_reach(maj: dict, target: float):
    """Total tokens at which the maj@k curve first reaches `target` (linear interpolation between
    k points; None when it never does)."""
    xs, ys = maj["mean_total_tokens"], maj["accuracy"]
    if ys[0] >= target:
        return xs[0] * target / ys[0] if ys[0] > 0 else xs[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 >= target > y0:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return None


def aggregate(records: list) -> dict:
    by = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    grpo_acc = _ms(r["eval"]["natural_accuracy"] for r in by.get("grpo", []))[0]
    out = {}
    for m, rs in by.items():
        ev = [r["eval"] for r in rs]
        row = {"seeds": [r["seed"] for r in rs], "n": len(rs)}
        for key in ("natural_accuracy", "mean_completion_tokens", "mean_thinking_tokens",
                    "mean_episodes", "J_empty_thinking", "J_natural_end",
                    "mean_progress_per_episode", "closed_thinking_rate"):
            row[key] = _ms(e[key] for e in ev)
        row["regret_budgets"] = ev[0]["regret_vs_budget"]["budgets"]
        row["regret"] = [_ms(e["regret_vs_budget"]["normalized_regret"][i] for e in ev)
                         for i in range(len(row["regret_budgets"]))]
        row["budgets"] = ev[0]["accuracy_vs_budget"]["budgets"]
        row["accuracy_vs_budget"] = [_ms(e["accuracy_vs_budget"]["accuracy"][i] for e in ev)
                                     for i in range(len(row["budgets"]))]
        row["maj_k"] = ev[0]["maj_at_k"]["k"]
        row["maj_accuracy"] = [_ms(e["maj_at_k"]["accuracy"][i] for e in ev)
                               for i in range(len(row["maj_k"]))]
        row["maj_tokens"] = [_ms(e["maj_at_k"]["mean_total_tokens"][i] for e in ev)
                             for i in range(len(row["maj_k"]))]
        if grpo_acc is not None:
            row["tokens_to_grpo_accuracy"] = _ms(tokens_to_reach(e["maj_at_k"], grpo_acc) for e in ev)
        tr = [r.get("train") for r in rs if r.get("train")]
        if tr:
            for k in ("step_s", "generate_s", "fork_s", "train_s"):
                row[f"train_{k}"] = _ms(t[k] for t in tr)
        out[m] = row
    g = out.get("grpo", {}).get("tokens_to_grpo_accuracy", (None,))[0]
    for m, row in out.items():
        t = row.get("tokens_to_grpo_accuracy", (None,))[0]
        row["token_efficiency_vs_grpo"] = (g / t) if (g and t) else None
    return out


def _f(ms, digits=3):
    m, s = ms if ms else (None, None)
    return "n/a" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(agg: dict, meta: dict) -> str:
    order = [m for m in ("base", "grpo", "mrt_progress", "mrt_termination", "star", "mrt_star")
             if m in agg]
    rb = agg[order[0]]["regret_budgets"]
    pick = [i for i, b in enumerate(rb) if b in (64, 128, 320)]
    head = ("| method | seeds | accuracy | tokens to answer | J(end) | "
            + " | ".join(f"regret@{rb[i]}" for i in pick)
            + " | tokens to GRPO acc. | eff. vs GRPO | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in order:
        r = agg[m]
        eff = r.get("token_efficiency_vs_grpo")
        lines.append(
            f"| {m} | {r['n']} | {_f(r['natural_accuracy'])} | {_f(r['mean_completion_tokens'], 1)} | "
            f"{_f(r['J_natural_end'])} | " + " | ".join(_f(r['regret'][i]) for i in pick)
            + f" | {_f(r.get('tokens_to_grpo_accuracy'), 1)} | "
            + (f"{eff:.2f}x" if eff else "n/a") + f" | {_f(r.get('train_step_s'), 0)} |")
    lines.append("")
    lines.append(f"mean ± std over seeds; {meta['eval_problems']} held-out problems x "
                 f"{meta['eval_samples']} samples, K={meta['k']}; {meta['max_steps']} steps per run; "
                 f"machine {meta['machine']}, load {meta['load_start']} -> {meta['load_end']}")
    return "\n".join(lines)


def plot(agg: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for m, r in agg.items():
        ys = [v[0] for v in r["accuracy_vs_budget"]]
        ax[0].plot(r["budgets"], ys, marker="o", label=m)
        ax[1].plot(r["regret_budgets"], [v[0] for v in r["regret"]], marker="o", label=m)
        ax[2].plot([v[0] for v in r["maj_tokens"]], [v[0] for v in r["maj_accuracy"]], marker="o",
                   label=m)
    ax[0].set(xlabel="forced thinking budget (tokens)", ylabel="accuracy",
              title="accuracy vs forced budget")
    ax[1].set(xlabel="token budget C0", ylabel="normalized regret (J* = 1)",
              title="normalized regret vs budget")
    ax[2].set(xlabel="total tokens (k samples)", ylabel="maj@k accuracy", title="maj@k vs tokens")
    for a_ in ax:
        a_.grid(alpha=0.3)
        a_.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- command line -----------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--max-steps", type=int, default=30, help="optimizer steps of every run")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each single-threaded)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=4, help="traces per held-out problem")
    ap.add_argument("--k", type=int, default=4, help="forced answers per cut in evaluation")
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--runs-dir", default="runs/repro_toy")
    ap.add_argument("--out", default="benchmarks/results/repro_toy")
    ap.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                    help="extra `mrt train` overrides for every run (last on the line)")
    ap.add_argument("--analyze-progress", action="store_true",
                    help="only measure how informative per-episode progress is on the base model "
                         "(reliability at K, concentration; writes <out>_progress.json)")
    ap.add_argument("--_eval", help=argparse.SUPPRESS)
    ap.add_argument("--_eval_out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for name in ("max_steps", "jobs", "threads", "eval_problems", "eval_samples", "k", "max_tokens"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a._eval:   # worker mode: evaluate one model folder, write JSON
        import torch
        torch.set_num_threads(a.threads)
        problems = heldout_problems(a.eval_problems, a.seeds, 1024)
        res = evaluate_model(a._eval, problems, a.eval_samples, a.k, a.max_tokens)
        with open(a._eval_out, "w") as f:
            json.dump(res, f)
        return res
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    if a.analyze_progress:
        import torch

        from mrt_engine import default_model_path
        torch.set_num_threads(a.threads)
        problems = heldout_problems(a.eval_problems, a.seeds, 1024)
        res = analyze_progress(default_model_path(), problems, a.eval_samples, a.k)
        res.update(load=loadavg(), eval_problems=a.eval_problems)
        with open(a.out + "_progress.json", "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res, indent=1))
        return res
    os.makedirs(a.runs_dir, exist_ok=True)
    meta = {"seeds": a.seeds, "methods": a.methods, "max_steps": a.max_steps, "jobs": a.jobs,
            "eval_problems": a.eval_problems, "eval_samples": a.eval_samples, "k": a.k,
            "max_tokens": a.max_tokens, "train_args": a.train_args, "load_start": loadavg(),
            "machine": f"{os.cpu_count()} CPUs", "command": " ".join(sys.argv)}
    # seed-major order: when time runs out, whole seeds are done
    todo = ([] if a.no_base else [("base", None)]) + [(m, s) for s in a.seeds for m in a.methods]
    t0 = time.time()
    records = []
    with cf.ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = {ex.submit(job, m, s, a): (m, s) for m, s in todo}
        for fut in cf.as_completed(futs):
            m, s = futs[fut]
            try:
                rec = fut.result()
            except Exception as exc:  # keep the other runs going; report the failure
                print(f"FAILED {m} seed {s}: {exc}", file=sys.stderr, flush=True)
                continue
            records.append(rec)
            e = rec["eval"]
            print(f"[{time.time() - t0:6.0f}s] {m:16s} seed {s}: accuracy "
                  f"{e['natural_accuracy']:.3f} tokens {e['mean_completion_tokens']:.1f} regret@128 "
                  f"{dict(zip(e['regret_vs_budget']['budgets'], e['regret_vs_budget']['normalized_regret'])).get(128, float('nan')):.3f}"
                  f"  (load {loadavg()})", flush=True)
    meta["load_end"] = loadavg()
    meta["wall_s"] = time.time() - t0
    agg = aggregate(records)
    res = {"meta": meta, "aggregate": agg, "records": records}
    with open(a.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    plot(agg, a.out + ".png")
    table = markdown(agg, meta)
    print("\n" + table)
    with open(a.out + ".md", "w") as f:
        f.write(table + "\n")
    print(f"wrote {a.out}.json, {a.out}.png, {a.out}.md", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
