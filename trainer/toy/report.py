"""Measured properties of the tiny reasoner, through the MRT evaluation (`trainer/evaluate.py`).

    python -m mrt_engine.trainer.toy.report [--model DIR] [--problems 64] [--samples 2]

A thin view over `evaluate.evaluate` on the toy task (its forced suffix, episode rule and
verifier), which samples traces through the engine and forks forced answers from them:
1. natural accuracy, closed-thinking rate, thinking tokens and episodes per trace;
2. accuracy vs token budget B (thinking cut after B tokens, FORCED_SUFFIX, K answers; a trace that
   closed its thinking within B keeps its own answer);
3. J at every episode boundary (forced answer after 0, 1, 2, ... episodes), along each trace, and
   the normalized regret and maj@k that `mrt eval` reports.
Prints a table and writes JSON (default benchmarks/results/toy_report.json). `mrt demo` calls
`run` and `print_report`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence

ANSWER_TOKENS = 12  # "\boxed{a+b}" plus EOS is 7-8 tokens


def run(model_dir: str, difficulty: int = 5, problems: int = 64, samples: int = 2, k: int = 4,
        budgets: Sequence[int] = (0, 16, 32, 48, 64, 96, 128, 192), temperature: float = 1.0,
        max_tokens: int = 320, seed: int = 1234, backend: str = "engine") -> dict:
    """Evaluate the model on `problems` toy problems; returns the report dict (JSON-able)."""
    if backend not in ("auto", "engine"):
        raise ValueError(f"backend must be 'engine' (the report runs on mrt_engine.LLM), got "
                         f"{backend!r}")
    from mrt_engine import LLM
    from mrt_engine.trainer import data, episodes, evaluate
    from mrt_engine.trainer.toy import traces

    t_start = time.time()
    llm = LLM(model_dir, dtype="float32", device="cpu", seed=seed)
    probs = data.load_problems("toy", num_problems=problems, difficulty=difficulty, seed=seed)
    res = evaluate.evaluate(
        llm, probs, "toy", samples=samples, k=k, budgets=list(budgets), max_tokens=max_tokens,
        temperature=temperature, top_p=1.0, seed=seed, answer_tokens=ANSWER_TOKENS,
        rule=episodes.TOY_RULE, forced_suffix=traces.FORCED_SUFFIX,
        natural_suffix=traces.NATURAL_END, continue_strs=traces.TRIGGERS)
    js = [t["J"] for t in res["traces"]]
    n = len(js)
    ab = res["accuracy_vs_budget"]
    return {
        "backend": "mrt_engine", "model": model_dir, "difficulty": difficulty,
        "problems": problems, "samples_per_problem": samples, "answer_samples_k": k,
        "temperature": temperature, "max_tokens": max_tokens, "seed": seed,
        "forced_suffix": traces.FORCED_SUFFIX,
        "natural_accuracy": res["natural_accuracy"],
        "closed_thinking_rate": res["closed_thinking_rate"],
        "mean_thinking_tokens": res["mean_thinking_tokens"],
        "mean_episodes": res["mean_episodes"],
        "accuracy_vs_budget": {str(b): a for b, a in zip(ab["budgets"], ab["accuracy"])},
        "J_by_episode_boundary": res["J_by_point"]["J"],
        "traces_per_boundary": res["J_by_point"]["traces"],
        "J_first_mid_last": [sum(J[0] for J in js) / n, sum(J[len(J) // 2] for J in js) / n,
                             sum(J[-1] for J in js) / n],
        "fraction_traces_J_rises": res["fraction_traces_J_rises"],
        "J_by_trace_fraction": res["J_by_trace_fraction"],
        "mean_progress_per_episode": res["mean_progress_per_episode"],
        "regret_vs_budget": res["regret_vs_budget"],
        "maj_at_k": res["maj_at_k"],
        "example_trace": res["example_trace"], "seconds": round(time.time() - t_start, 1),
    }


def print_report(rep: dict) -> None:
    print(f"backend: {rep['backend']}")
    print(f"{rep['problems']} problems x {rep['samples_per_problem']} traces, difficulty "
          f"{rep['difficulty']}, K={rep['answer_samples_k']}, T={rep['temperature']}")
    print(f"natural accuracy {rep['natural_accuracy']:.3f}  closed thinking "
          f"{rep['closed_thinking_rate']:.3f}  mean thinking tokens "
          f"{rep['mean_thinking_tokens']:.1f}  mean episodes {rep['mean_episodes']:.2f}")
    print("accuracy vs thinking-token budget (forced answer at the budget):")
    for b, a in rep["accuracy_vs_budget"].items():
        print(f"  B={b:>4}  acc={a:.3f}  " + "#" * int(round(40 * a)))
    print("J at episode boundaries (forced answer after e episodes; traces reaching e):")
    for e, (j, n) in enumerate(zip(rep["J_by_episode_boundary"], rep["traces_per_boundary"])):
        print(f"  e={e:>2}  J={j:.3f}  (n={n})")
    print("J along the trace (boundary at that fraction of each trace's episodes): " +
          "  ".join(f"{f}: {j:.3f}" for f, j in rep["J_by_trace_fraction"].items()))
    f, m, l_ = rep["J_first_mid_last"]
    print(f"J first/mid/last boundary: {f:.3f} / {m:.3f} / {l_:.3f};  traces with J rising: "
          f"{rep['fraction_traces_J_rises']:.3f};  mean progress per episode "
          f"{rep['mean_progress_per_episode']:+.4f}")
    rb = rep["regret_vs_budget"]
    print("normalized regret vs token budget: " + "  ".join(
        f"{b}: {r:.3f}" for b, r in zip(rb["budgets"], rb["normalized_regret"])))
    mk = rep["maj_at_k"]
    print("maj@k: " + "  ".join(f"k={k}: {a:.3f}" for k, a in zip(mk["k"], mk["accuracy"])) +
          f";  {rep['seconds']}s")


def main(argv=None) -> None:
    from mrt_engine import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the shipped one)")
    ap.add_argument("--difficulty", type=int, default=5)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2, help="traces per problem")
    ap.add_argument("--k", type=int, default=4, help="forced answers per cut")
    ap.add_argument("--budgets", default="0,16,32,48,64,96,128,192")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default="benchmarks/results/toy_report.json")
    a = ap.parse_args(argv)
    try:
        budgets = [int(x) for x in a.budgets.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--budgets must be non-negative ints, got {a.budgets!r}")
    if any(b < 0 for b in budgets) or not budgets:
        ap.error(f"--budgets must be non-negative ints, got {a.budgets!r}")
    model = a.model or default_model_path()
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"no model at {model!r} (expected config.json there); train one "
                                "with python -m mrt_engine.trainer.toy.sft")
    rep = run(model, a.difficulty, a.problems, a.samples, a.k, budgets, a.temperature,
              a.max_tokens, a.seed)
    print_report(rep)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
