"""Measured properties of the tiny reasoner, sampled through our engine (`mrt_engine.LLM`).

    python -m mrt_engine.trainer.toy.report [--model DIR] [--problems 64] [--samples 2]

1. Sample traces (temperature 1) for seeded problems, keeping their KV.
2. Accuracy vs token budget B: cut the thinking after B tokens, append FORCED_SUFFIX, sample K short
   answers from the cut (a fork), grade them; a trace that closed its thinking within B keeps its
   own answer.
3. Episodes per trace, and J at every episode boundary (forced answer after 0, 1, 2, ... episodes).
Prints a table and writes JSON (default benchmarks/results/toy_report.json). If the engine cannot be
imported it falls back to `transformers` generate and says so in the output and the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Sequence

from mrt_engine.trainer.toy import task, traces

ANSWER_TOKENS = 12  # "\boxed{a+b}" plus EOS is 7-8 tokens


def _load_engine(model_dir: str, seed: int):
    from mrt_engine import LLM  # noqa: F401  (ImportError -> fallback)

    return LLM(model_dir, dtype="float32", device="cpu", seed=seed)


class EngineSampler:
    """Traces with kept KV, then batched forks at arbitrary positions (no prefix recompute)."""

    name = "mrt_engine"

    def __init__(self, llm, eos_id: int):
        self.llm = llm
        self.eos_id = eos_id
        self.handles = []

    def traces(self, prompts: List[List[int]], n: int, temperature: float, max_tokens: int,
               seed: int) -> List[List[List[int]]]:
        from mrt_engine import SamplingParams

        outs = self.llm.generate(prompts, SamplingParams(n=n, temperature=temperature,
                                                         max_tokens=max_tokens, seed=seed),
                                 keep=True)
        result = []
        for out in outs:
            result.append([list(c.token_ids) for c in out.outputs])
            self.handles.append([c.handle for c in out.outputs])
        return result

    def forks(self, points: Sequence[tuple], suffix: List[int], k: int, temperature: float,
              seed: int) -> List[List[List[int]]]:
        """points: (problem index, sample index, cut position in prompt+generated tokens)."""
        from mrt_engine import Fork, SamplingParams

        if not points:
            return []
        reqs = [Fork(self.handles[i][j], at=t, suffix=suffix) for i, j, t in points]
        outs = self.llm.generate(reqs, SamplingParams(n=k, temperature=temperature,
                                                      max_tokens=ANSWER_TOKENS, seed=seed))
        return [[list(c.token_ids) for c in out.outputs] for out in outs]

    def close(self) -> None:
        for hs in self.handles:
            for h in hs:
                self.llm.release(h)
        self.handles = []


class TransformersSampler:
    """The slow twin: left-padded batched `generate`; every fork re-prefills its whole prefix."""

    name = "transformers"

    def __init__(self, model_dir: str, eos_id: int, pad_id: int, batch: int = 64):
        import torch
        from transformers import LlamaForCausalLM

        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.eos_id, self.pad_id, self.batch = eos_id, pad_id, batch
        self.seqs = []  # prompt + generated ids of every trace, for forks

    def _generate(self, inputs: List[List[int]], n: int, temperature: float, max_tokens: int,
                  seed: int) -> List[List[List[int]]]:
        torch = self.torch
        torch.manual_seed(seed)
        result = []
        for s in range(0, len(inputs), self.batch):
            chunk = inputs[s:s + self.batch]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, x in enumerate(chunk):
                ids[r, width - len(x):] = torch.tensor(x)
                mask[r, width - len(x):] = 1
            greedy = temperature == 0
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                    do_sample=not greedy, temperature=None if greedy else temperature,
                    top_p=None, top_k=None, num_return_sequences=n, eos_token_id=self.eos_id,
                    pad_token_id=self.pad_id)
            gen = out[:, width:].tolist()
            for r in range(len(chunk)):
                group = []
                for row in gen[r * n:(r + 1) * n]:
                    # keep up to and including EOS, like the engine's token_ids
                    group.append(row[:row.index(self.eos_id) + 1] if self.eos_id in row else row)
                result.append(group)
        return result

    def traces(self, prompts, n, temperature, max_tokens, seed):
        result = self._generate(prompts, n, temperature, max_tokens, seed)
        self.seqs = [[p + g for g in group] for p, group in zip(prompts, result)]
        return result

    def forks(self, points, suffix, k, temperature, seed):
        inputs = [self.seqs[i][j][:t] + list(suffix) for i, j, t in points]
        return self._generate(inputs, k, temperature, ANSWER_TOKENS, seed) if inputs else []

    def close(self) -> None:
        self.seqs = []


def make_sampler(model_dir: str, seed: int, backend: str, eos_id: int, pad_id: int):
    if backend in ("auto", "engine"):
        try:
            return EngineSampler(_load_engine(model_dir, seed), eos_id)
        except ImportError as e:
            if backend == "engine":
                raise
            print("=" * 78 + f"\nWARNING: mrt_engine.LLM is not importable ({e}).\n"
                  "Falling back to transformers generate: same numbers in expectation, much "
                  "slower forks.\n" + "=" * 78, file=sys.stderr, flush=True)
            sampler = TransformersSampler(model_dir, eos_id, pad_id)
            sampler.name = f"transformers (FALLBACK: mrt_engine.LLM not importable: {e})"
            return sampler
    return TransformersSampler(model_dir, eos_id, pad_id)


def run(model_dir: str, difficulty: int = 5, problems: int = 64, samples: int = 2, k: int = 4,
        budgets: Sequence[int] = (0, 16, 32, 48, 64, 96, 128, 192), temperature: float = 1.0,
        max_tokens: int = 320, seed: int = 1234, backend: str = "auto") -> dict:
    from transformers import AutoTokenizer

    t_start = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    think_end = tok.convert_tokens_to_ids(traces.THINK_END)
    sep = tok.convert_tokens_to_ids(traces.EPISODE_SEP)
    starts = {tok.convert_tokens_to_ids(t) for t in traces.EPISODE_STARTS}
    suffix = tok(traces.FORCED_SUFFIX, add_special_tokens=False)["input_ids"]
    sampler = make_sampler(model_dir, seed, backend, tok.eos_token_id, tok.pad_token_id)

    probs = task.generate_problems(problems, difficulty, seed)
    prompts = [tok(p.prompt())["input_ids"] for p in probs]
    gens = sampler.traces(prompts, samples, temperature, max_tokens, seed)

    # 1. parse traces: thinking length (tokens before </think>), episode starts, natural outcome
    rows = []
    for i, group in enumerate(gens):
        for j, ids in enumerate(group):
            think_len = ids.index(think_end) if think_end in ids else len(ids)
            ep = [t for t in range(think_len) if ids[t] in starts and (t == 0 or ids[t - 1] == sep)]
            text = tok.decode(ids, skip_special_tokens=True)
            rows.append({"i": i, "j": j, "think_len": think_len, "closed": think_end in ids,
                         "episodes": ep, "correct": task.grade(text, probs[i]) and
                         think_end in ids, "text": text})

    def graded(points, outs):
        return [sum(task.grade(tok.decode(o, skip_special_tokens=True), probs[i]) for o in group)
                / len(group) for (i, _, _), group in zip(points, outs)]

    # 2. accuracy vs budget: one batched fork call over all cut points
    points, owner = [], []
    for r_idx, r in enumerate(rows):
        for b in budgets:
            if not (r["closed"] and r["think_len"] <= b):
                points.append((r["i"], r["j"], len(prompts[r["i"]]) + min(b, r["think_len"])))
                owner.append((r_idx, b))
    scores = graded(points, sampler.forks(points, suffix, k, temperature, seed + 1))
    forced = {key: s for key, s in zip(owner, scores)}
    acc = {}
    for b in budgets:
        vals = [forced.get((r_idx, b), float(r["correct"])) for r_idx, r in enumerate(rows)]
        acc[b] = sum(vals) / len(vals)

    # 3. J at each episode boundary (before episode e, e = 0..E-1) and after the whole thinking
    points, owner = [], []
    for r_idx, r in enumerate(rows):
        cuts = r["episodes"] + [r["think_len"]]
        for e, c in enumerate(cuts):
            points.append((r["i"], r["j"], len(prompts[r["i"]]) + c))
            owner.append((r_idx, e))
    scores = graded(points, sampler.forks(points, suffix, k, temperature, seed + 2))
    sampler.close()
    per_trace = {}
    for (r_idx, e), s in zip(owner, scores):
        per_trace.setdefault(r_idx, []).append(s)
    max_e = max(len(v) for v in per_trace.values())
    j_by_boundary, n_by_boundary = [], []
    for e in range(max_e):
        vals = [v[e] for v in per_trace.values() if len(v) > e]
        j_by_boundary.append(sum(vals) / len(vals))
        n_by_boundary.append(len(vals))
    # position-normalised: J at the first boundary, the middle one, and the end of thinking
    first = sum(v[0] for v in per_trace.values()) / len(per_trace)
    mid = sum(v[len(v) // 2] for v in per_trace.values()) / len(per_trace)
    last = sum(v[-1] for v in per_trace.values()) / len(per_trace)
    rising = sum(v[-1] > v[0] for v in per_trace.values()) / len(per_trace)
    # along each trace at the same relative position (boundary nearest to f of the way through),
    # so short and long traces weigh alike and the selection of long traces does not bias J
    fractions = (0.0, 0.25, 0.5, 0.75, 1.0)
    j_by_fraction = [sum(v[round(f * (len(v) - 1))] for v in per_trace.values()) / len(per_trace)
                     for f in fractions]

    n_ep = [len(r["episodes"]) for r in rows]
    report = {
        "backend": sampler.name, "model": model_dir, "difficulty": difficulty,
        "problems": problems, "samples_per_problem": samples, "answer_samples_k": k,
        "temperature": temperature, "max_tokens": max_tokens, "seed": seed,
        "forced_suffix": traces.FORCED_SUFFIX,
        "natural_accuracy": sum(r["correct"] for r in rows) / len(rows),
        "closed_thinking_rate": sum(r["closed"] for r in rows) / len(rows),
        "mean_thinking_tokens": sum(r["think_len"] for r in rows) / len(rows),
        "mean_episodes": sum(n_ep) / len(n_ep),
        "accuracy_vs_budget": {str(b): acc[b] for b in budgets},
        "J_by_episode_boundary": j_by_boundary, "traces_per_boundary": n_by_boundary,
        "J_first_mid_last": [first, mid, last], "fraction_traces_J_rises": rising,
        "J_by_trace_fraction": {str(f): j for f, j in zip(fractions, j_by_fraction)},
        "example_trace": rows[0]["text"], "seconds": round(time.time() - t_start, 1),
    }
    return report


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
          f"{rep['fraction_traces_J_rises']:.3f};  {rep['seconds']}s")


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
    ap.add_argument("--backend", choices=["auto", "engine", "transformers"], default="auto")
    ap.add_argument("--out", default="benchmarks/results/toy_report.json")
    a = ap.parse_args(argv)
    budgets = [int(x) for x in a.budgets.split(",") if x.strip()]
    if any(b < 0 for b in budgets) or not budgets:
        raise ValueError(f"--budgets must be non-negative ints, got {a.budgets!r}")
    model = a.model or default_model_path()
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"no model at {model!r} (expected config.json there); train one "
                                "with python -m mrt_engine.trainer.toy.sft")
    rep = run(model, a.difficulty, a.problems, a.samples, a.k, budgets, a.temperature,
              a.max_tokens, a.seed, a.backend)
    print_report(rep)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
