"""MRT evaluation: accuracy vs thinking budget, maj@k vs tokens, normalized regret, budget forcing.

    mrt eval --model DIR --data FILE.jsonl|DATASET|toy --out DIR [--samples N] [--k K] [--budgets ...]
    res = evaluate(llm, problems, "math", samples=4, k=8)      # from a trainer: a JSON-able dict

Over a set of problems (mrt.md §1 for the definitions):
1. Sample `samples` traces per problem (kept KV); the natural accuracy grades each trace's own
   answer (the text after `</think>`; a trace that never closes its thinking scores 0).
2. J at every point of every trace (`progress.estimate_progress`: empty thinking, each episode
   boundary, natural end) -> J by point, progress per episode, normalized regret vs token budget
   (§1.6: piecewise-linear J curve from (0, 0) over cost = prompt + kept tokens + mean answer
   tokens, area up to C0, flat after the last point, comparator J* = 1) and vs episodes
   (1 - mean J after the first 1..k episodes, flat after a trace's last one).
3. Accuracy vs thinking budget B: a trace that closed its thinking within B tokens keeps its own
   answer; any other is cut after B thinking tokens and K forced answers are sampled there.
4. maj@k vs total tokens (§1.7): majority vote over k of the natural answers of a problem, votes
   clustered by the grader's equivalence, ties split evenly, exact over all k-subsets (seeded
   Monte Carlo when there are too many). Votes are uniform, not the paper code's 2^mean-logprob.
5. Budget forcing (§1.8), with `extend` > 0: the thinking is extended W times with "Wait"-style
   continuations (each up to `extend_tokens`, stopped at `</think>`); after each, K answers from
   the closed thinking give J. The extension points lengthen the J curves, so regret is also
   reported at budgets past the natural traces. (The paper scores every 2nd extension with free
   continuations; we score every one with the natural close, as at the natural end.)
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from typing import Callable, Sequence

from mrt_engine.trainer import data as data_mod
from mrt_engine.trainer import episodes, grading, progress

CONTINUE_STRS = ("Wait", "But wait", "Alternatively", "But hold on")   # mrt.md §1.8
EXACT_SUBSETS = 20000    # maj@k: enumerate every k-subset up to this many, else Monte Carlo
MC_DRAWS = 4000


# ---- pure functions (tested on hand-computed values) -------------------------------------------

def area_under_curve(xs: Sequence[float], ys: Sequence[float], budget: float) -> float:
    """Area under the piecewise-linear curve through (0, 0) and the points (xs, ys) sorted by x,
    from 0 to `budget`; linear interpolation inside, the last y held flat past the last x."""
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need matching non-empty xs and ys, got {len(xs)} and {len(ys)}")
    pts = [(0.0, 0.0)] + sorted((float(x), float(y)) for x, y in zip(xs, ys))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 >= budget:
            break
        if x1 > budget:   # cut this segment at the budget
            y1 = y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
            x1 = budget
        area += (x1 - x0) * (y0 + y1) / 2
    last_x, last_y = pts[-1]
    if budget > last_x:
        area += (budget - last_x) * last_y
    return area


def normalized_regret(curves: Sequence[tuple], budget: float) -> float:
    """1 - mean over curves (xs, ys) of area(budget) / budget: regret against J* = 1 (§1.6)."""
    if not curves:
        raise ValueError("normalized_regret needs at least one curve")
    return 1.0 - sum(area_under_curve(xs, ys, budget) for xs, ys in curves) / (len(curves) * budget)


def regret_vs_episodes(js: Sequence[Sequence[float]], max_episodes: int) -> list[float]:
    """Normalized regret after k = 1..max_episodes episodes: 1 - mean over traces of the mean J
    after episodes 1..k (J[j] is J after j episodes, J[0] the empty thinking); a trace shorter
    than k holds its last J (its natural end)."""
    out = []
    for k in range(1, max_episodes + 1):
        per = [sum(J[min(j, len(J) - 1)] for j in range(1, k + 1)) / k for J in js]
        out.append(1.0 - sum(per) / len(per))
    return out


def cluster_answers(answers: Sequence, equivalent: Callable | None = None) -> list[int | None]:
    """Cluster id per answer (None stays None: no vote); answers in one cluster are equivalent to
    its first member (`equivalent(a, b)`, default ==)."""
    reps, ids = [], []
    for a in answers:
        if a is None:
            ids.append(None)
            continue
        for c, r in enumerate(reps):
            if a == r or (equivalent is not None and equivalent(a, r)):
                ids.append(c)
                break
        else:
            reps.append(a)
            ids.append(len(reps) - 1)
    return ids


def maj_at_k(clusters: Sequence[int | None], correct: Sequence[float], k: int,
             seed: int = 0) -> float:
    """Expected success of a majority vote over k of the N samples drawn without replacement:
    the most-voted cluster wins; a tie splits the credit evenly among the tied clusters; samples
    with no answer (None) do not vote; no vote at all scores 0. A cluster's correctness is the
    mean of its members'. Exact when C(N, k) <= EXACT_SUBSETS, else seeded Monte Carlo."""
    n = len(clusters)
    if len(correct) != n:
        raise ValueError(f"got {n} answers but {len(correct)} correctness values")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    members: dict = {}
    for c, r in zip(clusters, correct):
        if c is not None:
            members.setdefault(c, []).append(float(r))
    value = {c: sum(v) / len(v) for c, v in members.items()}

    def vote(subset) -> float:
        counts: dict = {}
        for i in subset:
            if clusters[i] is not None:
                counts[clusters[i]] = counts.get(clusters[i], 0) + 1
        if not counts:
            return 0.0
        top = max(counts.values())
        tied = [c for c, v in counts.items() if v == top]
        return sum(value[c] for c in tied) / len(tied)

    if math.comb(n, k) <= EXACT_SUBSETS:
        subsets = list(itertools.combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [rng.sample(range(n), k) for _ in range(MC_DRAWS)]
    return sum(vote(s) for s in subsets) / len(subsets)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ---- answers as votes ----------------------------------------------------------------------------

def answer_key(verifier) -> tuple[Callable, Callable | None]:
    """(extract, equivalent) for maj@k votes: the toy task votes on its boxed pair (order-free);
    math on the extracted answer, clustered by the grader's equivalence; a custom verifier on the
    extracted answer's normal form."""
    if verifier == "toy":
        from mrt_engine.trainer.toy import task

        def toy_key(text):
            pair = task.parse_answer(text)
            return None if pair is None else tuple(sorted(pair))
        return toy_key, None
    if verifier == "math":
        return grading.extract_answer, lambda a, b: grading.math_equal(a, b)

    def norm_key(text):
        a = grading.extract_answer(text)
        return None if a is None else grading.normalize_answer(a)
    return norm_key, None


# ---- the evaluation ------------------------------------------------------------------------------

def _check_int_list(name, values, minimum):
    values = list(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} must be ints >= {minimum}, got {values}")
    return values


def _strip_trailing_space(ids: Sequence[int], end: int, tok) -> int:
    """Move a cut left past whitespace-only tokens, so a continuation opens its own paragraph."""
    while end > 0 and not tok.decode([ids[end - 1]], skip_special_tokens=False).strip():
        end -= 1
    return end


def budget_forcing(llm, tps, handles, problems, verifier, *, extend: int, extend_tokens: int,
                   continue_strs: Sequence[str], k: int, sampling, natural_suffix, stop_at: str,
                   seed: int, use_tqdm: bool = False) -> list[list[tuple[float, float, int]]]:
    """Per trace, (cost, J, thinking tokens) after each of `extend` budget-forcing extensions
    (fewer when no trace has room left under max_model_len)."""
    from mrt_engine import Fork, SamplingParams

    tok = llm.get_tokenizer()
    natural = progress._suffix_ids(natural_suffix, tok, "natural_suffix")
    max_len = getattr(getattr(llm, "config", None), "max_model_len", None) or float("inf")
    cur = list(handles)
    think = [tp.think_len for tp in tps]
    out = [[] for _ in tps]
    kept = []
    try:
        for w in range(extend):
            text = "\n\n" + continue_strs[w % len(continue_strs)]
            suffix = list(progress._suffix_ids(text, tok, "continuation"))
            # a trace with no room left under max_model_len stops extending (held flat)
            live, reqs = [], []
            for i, (h, tp) in enumerate(zip(cur, tps)):
                cut = max(_strip_trailing_space(h.token_ids, tp.prompt_len + think[i], tok), 1)
                if cut + len(suffix) + 1 < max_len and (not out[i] or out[i][-1][3]):
                    live.append(i)
                    reqs.append(Fork(h, at=cut, suffix=suffix))
            if not live:
                break
            params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                    max_tokens=extend_tokens, stop=[stop_at], seed=seed + 7919 * (w + 1))
            outs = llm.generate(reqs, params, keep=True, use_tqdm=use_tqdm)
            cuts = []
            for i, o in zip(live, outs):
                h = cur[i] = o.outputs[0].handle
                kept.append(h)
                tp = tps[i]
                think[i] = episodes.think_length(list(h.token_ids[tp.prompt_len:]), tok, stop_at)
                c, _, _ = progress.trace_cuts(h, tp.prompt_len, tok, [think[i]], think[i], (),
                                              natural, stop_at, None if sampling.seed is None
                                              else sampling.seed + i)
                cuts += c
            answers = progress.forced_answers(llm, cuts, [problems[i] for i in live], verifier, k=k,
                                              sampling=sampling, use_tqdm=use_tqdm)
            for i in range(len(tps)):
                if i not in live:
                    prev = out[i][-1] if out[i] else (tps[i].cost[-1], tps[i].J[-1], think[i], False)
                    out[i].append(prev[:3] + (False,))
            for i, c, a in zip(live, cuts, answers):
                out[i].append((c.at + a.mean_tokens, a.mean_reward, think[i], True))
    finally:
        for h in kept:
            llm.release(h)
    return [[e[:3] for e in per] for per in out]


def evaluate(llm, problems: Sequence[dict], verifier="math", *, prompts: Sequence | None = None,
             samples: int = 4, k: int = 8, budgets: Sequence[int] | None = None,
             max_tokens: int = 1024, temperature: float = 0.6, top_p: float = 0.95, seed: int = 0,
             answer_tokens: int = 512, answer_temperature: float | None = None,
             rule=None, forced_suffix=progress.DEFAULT_FORCED_SUFFIX,
             natural_suffix=progress.DEFAULT_NATURAL_SUFFIX, stop_at: str | None = None,
             regret_budgets: Sequence[int] | None = None, extend: int = 0,
             extend_tokens: int | None = None, continue_strs: Sequence[str] = CONTINUE_STRS,
             use_chat_template: bool = True, system: str | None = None,
             keep_traces: bool = True, use_tqdm: bool = False) -> dict:
    """Evaluate `llm` on `problems` (dicts with `problem`/`answer`, or toy dicts); see the module
    docstring for what is measured. prompts: text or token ids per problem (default:
    `data.build_prompt` with the model's chat template). Returns a JSON-able dict."""
    from mrt_engine import SamplingParams

    t0 = time.perf_counter()
    problems = list(problems)
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    for name, v in (("samples", samples), ("k", k), ("max_tokens", max_tokens),
                    ("answer_tokens", answer_tokens)):
        _check_int_list(name, [v], 1)
    _check_int_list("extend", [extend], 0)
    budgets = sorted(set(_check_int_list("budgets", budgets, 0))) if budgets is not None else \
        sorted({max(1, max_tokens * f // 8) for f in (1, 2, 4, 8)})
    verify = grading.get_verifier(verifier)
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("evaluate needs the model's tokenizer; the model folder has none")
    rule = rule if rule is not None else episodes.EpisodeRule()
    stop_at = stop_at or getattr(rule, "stop_at", None) or progress.STOP_AT
    answer_sampling = SamplingParams(
        temperature=temperature if answer_temperature is None else answer_temperature,
        top_p=top_p, max_tokens=answer_tokens, seed=seed + 1)

    # 1. traces
    if prompts is None:
        prompts = [data_mod.encode_prompt(data_mod.build_prompt(p, tok, use_chat_template, system), tok)
                   for p in problems]
    elif len(prompts) != len(problems):
        raise ValueError(f"got {len(prompts)} prompts for {len(problems)} problems")
    else:
        prompts = [data_mod.encode_prompt(p, tok) if isinstance(p, str) else list(p) for p in prompts]
    # a prompt that leaves no room to think is dropped (and counted), not an error mid-run
    max_len = getattr(getattr(llm, "config", None), "max_model_len", None)
    room = [max_len is None or len(p) + 16 < max_len for p in prompts]
    skipped = room.count(False)
    if skipped:
        import warnings

        warnings.warn(f"{skipped} of {len(prompts)} prompts leave under 16 tokens before the "
                      f"model's max_model_len ({max_len}); they are skipped")
        problems = [p for p, ok in zip(problems, room) if ok]
        prompts = [p for p, ok in zip(prompts, room) if ok]
        if not problems:
            raise ValueError(f"every prompt is too long for the model (max_model_len {max_len})")
    outs = llm.generate(prompts, SamplingParams(n=samples, temperature=temperature, top_p=top_p,
                                                max_tokens=max_tokens, seed=seed),
                        keep=True, use_tqdm=use_tqdm)
    comps = [c for o in outs for c in o.outputs]
    owner = [i for i, o in enumerate(outs) for _ in o.outputs]
    handles = [c.handle for c in comps]
    trace_probs = [problems[i] for i in owner]
    t_traces = time.perf_counter() - t0
    try:
        # 2. J at every point
        tps = progress.estimate_progress(llm, handles, trace_probs, verifier, rule=rule, k=k,
                                         forced_suffix=forced_suffix, natural_suffix=natural_suffix,
                                         sampling=answer_sampling, stop_at=stop_at, use_tqdm=use_tqdm)
        t_progress = time.perf_counter() - t0 - t_traces
        answers_text = []
        for c, tp in zip(comps, tps):
            # the trace's own answer: the text after its closing `</think>` (generated text only)
            answers_text.append(tok.decode(list(c.token_ids[tp.fork_at[-1] - tp.prompt_len:]),
                                           skip_special_tokens=True) if tp.closed else None)
        natural = [float(verify(a, p)) if a is not None else 0.0
                   for a, p in zip(answers_text, trace_probs)]

        # 3. accuracy vs thinking budget: one forced-answer call over every (trace, budget) cut
        forced = progress._suffix_ids(forced_suffix, tok, "forced_suffix")
        cuts, cut_probs, where = [], [], []
        for i, (h, tp) in enumerate(zip(handles, tps)):
            for b in budgets:
                if not (tp.closed and tp.think_len <= b):
                    at = tp.prompt_len + min(b, tp.think_len)
                    cuts.append(progress.Cut(h, at, forced, answer_sampling.seed + i))
                    cut_probs.append(trace_probs[i])
                    where.append((i, b))
        got = progress.forced_answers(llm, cuts, cut_probs, verifier, k=k, sampling=answer_sampling,
                                      use_tqdm=use_tqdm)
        forced_j = {key: a.mean_reward for key, a in zip(where, got)}
        acc_budget = [_mean(forced_j.get((i, b), natural[i]) for i in range(len(tps))) for b in budgets]

        # 5. budget forcing
        ext = None
        if extend:
            ext = budget_forcing(llm, tps, handles, trace_probs, verifier, extend=extend,
                                 extend_tokens=extend_tokens or max(16, max_tokens // 4),
                                 continue_strs=continue_strs, k=k, sampling=answer_sampling,
                                 natural_suffix=natural_suffix, stop_at=stop_at, seed=seed,
                                 use_tqdm=use_tqdm)
    finally:
        for h in handles:
            llm.release(h)

    # 2b. regret, J by point, progress
    curves = [(tp.cost, tp.J) for tp in tps]
    max_cost = max(max(tp.cost) for tp in tps)
    if regret_budgets is None:
        regret_budgets = sorted({max(1, round(max_cost * f / 8)) for f in range(1, 9)})
    regret_budgets = _check_int_list("regret_budgets", regret_budgets, 1)
    max_points = max(len(tp.J) for tp in tps)
    j_by_point = [_mean(tp.J[e] for tp in tps if len(tp.J) > e) for e in range(max_points)]
    n_by_point = [sum(len(tp.J) > e for tp in tps) for e in range(max_points)]
    fractions = (0.0, 0.25, 0.5, 0.75, 1.0)
    j_by_fraction = [_mean(tp.J[round(f * (len(tp.J) - 1))] for tp in tps) for f in fractions]
    max_eps = max(tp.num_episodes for tp in tps)
    all_progress = [p for tp in tps for p in tp.progress]

    # 4. maj@k over the natural answers of each problem
    extract, equivalent = answer_key(verifier if isinstance(verifier, str) else None)
    maj = {"k": list(range(1, samples + 1)), "accuracy": [], "mean_total_tokens": []}
    per_problem = [[t for t in range(len(tps)) if owner[t] == i] for i in range(len(problems))]
    clusters = []
    for idx in per_problem:
        keys = [extract(answers_text[t]) if answers_text[t] is not None else None for t in idx]
        clusters.append(cluster_answers(keys, equivalent))
    for kk in maj["k"]:
        maj["accuracy"].append(_mean(maj_at_k(cl, [natural[t] for t in idx], kk, seed)
                                     for cl, idx in zip(clusters, per_problem)))
        maj["mean_total_tokens"].append(kk * _mean(tp.completion_len for tp in tps))

    res = {
        "config": {"num_problems": len(problems), "samples": samples, "k": k,
                   "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                   "answer_tokens": answer_tokens, "answer_temperature": answer_sampling.temperature,
                   "seed": seed, "stop_at": stop_at, "forced_suffix": forced_suffix
                   if isinstance(forced_suffix, str) else list(forced_suffix),
                   "verifier": verifier if isinstance(verifier, str) else getattr(
                       verifier, "__name__", "custom"), "extend": extend},
        "num_traces": len(tps),
        "skipped_problems": skipped,
        "natural_accuracy": _mean(natural),
        "closed_thinking_rate": _mean(tp.closed for tp in tps),
        "mean_completion_tokens": _mean(tp.completion_len for tp in tps),
        "mean_thinking_tokens": _mean(tp.think_len for tp in tps),
        "mean_episodes": _mean(tp.num_episodes for tp in tps),
        "accuracy_vs_budget": {"budgets": budgets, "accuracy": acc_budget},
        "J_by_point": {"J": j_by_point, "traces": n_by_point},
        "J_by_trace_fraction": {str(f): j for f, j in zip(fractions, j_by_fraction)},
        "J_empty_thinking": j_by_point[0],
        "J_natural_end": _mean(tp.J[-1] for tp in tps),
        "mean_progress_per_episode": _mean(all_progress),
        "fraction_traces_J_rises": _mean(tp.J[-1] > tp.J[0] for tp in tps),
        "regret_vs_budget": {"budgets": regret_budgets,
                             "normalized_regret": [normalized_regret(curves, b) for b in regret_budgets]},
        "regret_vs_episodes": {"episodes": list(range(1, max_eps + 1)),
                               "normalized_regret": regret_vs_episodes([tp.J for tp in tps], max_eps)},
        "maj_at_k": maj,
        "extrapolation": None,
        "example_trace": comps[0].text,
        "seconds": {"traces": round(t_traces, 3), "progress": round(t_progress, 3),
                    "total": round(time.perf_counter() - t0, 3)},
    }
    if ext is not None:
        done = len(ext[0])   # extensions made (fewer than asked when no trace had room left)
        ext_curves = [(tp.cost + [c for c, _, _ in e], tp.J + [j for _, j, _ in e])
                      for tp, e in zip(tps, ext)]
        top = max(max(xs) for xs, _ in ext_curves)
        ext_budgets = sorted({max(1, round(top * f / 8)) for f in range(1, 9)} | set(regret_budgets))
        res["extrapolation"] = {
            "extensions": list(range(done + 1)),
            "accuracy": [res["J_natural_end"]] + [_mean(e[w][1] for e in ext) for w in range(done)],
            "mean_thinking_tokens": [res["mean_thinking_tokens"]] +
                                    [_mean(e[w][2] for e in ext) for w in range(done)],
            "regret_budgets": ext_budgets,
            "normalized_regret": [normalized_regret(ext_curves, b) for b in ext_budgets]}
    if keep_traces:
        res["traces"] = [dict(tp.to_dict(), problem=owner[t], natural_correct=natural[t])
                         for t, tp in enumerate(tps)]
    return res


# ---- printing, plots, CLI ------------------------------------------------------------------------

def print_tables(res: dict, file=None) -> None:
    p = lambda *a: print(*a, file=file or sys.stdout)  # noqa: E731
    c = res["config"]
    p(f"{c['num_problems']} problems x {c['samples']} traces (T={c['temperature']}, max "
      f"{c['max_tokens']} tokens), K={c['k']} answers per point, verifier {c['verifier']}")
    p(f"natural accuracy {res['natural_accuracy']:.3f}  closed thinking {res['closed_thinking_rate']:.3f}"
      f"  thinking tokens {res['mean_thinking_tokens']:.1f}  episodes {res['mean_episodes']:.2f}")
    p("accuracy vs thinking budget (answer forced at the budget):")
    for b, a in zip(res["accuracy_vs_budget"]["budgets"], res["accuracy_vs_budget"]["accuracy"]):
        p(f"  B={b:>6}  acc={a:.3f}  " + "#" * int(round(40 * a)))
    p("J at each point (0 = empty thinking, then after each episode; traces reaching it):")
    for e, (j, n) in enumerate(zip(res["J_by_point"]["J"], res["J_by_point"]["traces"])):
        p(f"  j={e:>3}  J={j:.3f}  (n={n})")
    p(f"mean progress per episode {res['mean_progress_per_episode']:+.4f}; traces with J rising "
      f"{res['fraction_traces_J_rises']:.3f}")
    p("normalized regret vs token budget C0 (J* = 1):")
    rb = res["regret_vs_budget"]
    p("  " + "  ".join(f"{b}: {r:.3f}" for b, r in zip(rb["budgets"], rb["normalized_regret"])))
    re_ = res["regret_vs_episodes"]
    p("normalized regret vs episodes: " + "  ".join(
        f"{e}: {r:.3f}" for e, r in list(zip(re_["episodes"], re_["normalized_regret"]))[:12]))
    m = res["maj_at_k"]
    p("maj@k vs total tokens: " + "  ".join(
        f"k={k}: {a:.3f} ({t:.0f} tok)" for k, a, t in zip(m["k"], m["accuracy"], m["mean_total_tokens"])))
    x = res.get("extrapolation")
    if x:
        p("budget forcing: " + "  ".join(f"w={w}: J={a:.3f} ({t:.0f} think tok)" for w, a, t in
                                         zip(x["extensions"], x["accuracy"], x["mean_thinking_tokens"])))


def plot(res: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(name, xlabel, ylabel, curves):
        """One 5x3.5 in figure of (x, y, style, label) curves, y in [0, 1]."""
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for x, y, style, label in curves:
            ax.plot(x, y, style, label=label)
        if len(curves) > 1:
            ax.legend()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    ab, rb, x = res["accuracy_vs_budget"], res["regret_vs_budget"], res.get("extrapolation")
    regret = [(rb["budgets"], rb["normalized_regret"], "o-", "sampled traces")]
    if x:
        regret.append((x["regret_budgets"], x["normalized_regret"], "s--", "with budget forcing"))
    paths = [save("accuracy_vs_budget.png", "thinking budget (tokens)", "accuracy (answer forced at budget)",
                  [(ab["budgets"], ab["accuracy"], "o-", None)]),
             save("regret_vs_budget.png", "token budget C0", "normalized regret (J* = 1)", regret)]
    return paths


def _int_list(text_items: Sequence[str], flag: str) -> list[int]:
    vals = []
    for item in text_items:
        for part in str(item).replace(",", " ").split():
            try:
                v = int(part)
            except ValueError:
                raise ValueError(f"{flag} must be positive ints, got {part!r}") from None
            if v < 1:
                raise ValueError(f"{flag} must be positive ints, got {v}")
            vals.append(v)
    if not vals:
        raise ValueError(f"{flag} needs at least one positive int")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mrt eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Hugging Face model folder (default: the shipped "
                    "tiny reasoner)")
    ap.add_argument("--data", required=True, help="a JSONL file with 'problem' and 'answer' fields, "
                    "a datasets name, or 'toy' (the tiny reasoner's task)")
    ap.add_argument("--split", default=None, help="dataset split (default 'train')")
    ap.add_argument("--num-problems", type=int, default=None, help="first N problems (toy: 64)")
    ap.add_argument("--difficulty", type=int, default=5, help="toy set size (3..7)")
    ap.add_argument("--samples", type=int, default=4, help="traces per problem")
    ap.add_argument("--k", type=int, default=8, help="forced answers per point")
    ap.add_argument("--budgets", nargs="+", default=None,
                    help="thinking budgets in tokens (space or comma separated; default: 1/8, 1/4, "
                    "1/2 and all of --max-tokens)")
    ap.add_argument("--regret-budgets", nargs="+", default=None, help="C0 values for the regret")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per trace (toy 320, else 2048)")
    ap.add_argument("--answer-tokens", type=int, default=None, help="tokens per forced answer "
                    "(toy 16, else 512)")
    ap.add_argument("--temperature", type=float, default=None, help="toy 1.0, else 0.6")
    ap.add_argument("--top-p", type=float, default=None, help="toy 1.0, else 0.95")
    ap.add_argument("--forced-suffix", default=None, help="text appended at a cut before the "
                    "forced answer (default: the paper's 'Time is up. ... </think>' text; toy: its own)")
    ap.add_argument("--extend", type=int, default=0, help="budget-forcing extensions W (0: off)")
    ap.add_argument("--extend-tokens", type=int, default=None, help="tokens per extension")
    ap.add_argument("--verifier", choices=("auto", "math", "toy"), default="auto")
    ap.add_argument("--no-chat-template", action="store_true", help="plain prompts, no chat template")
    ap.add_argument("--system", default=None, help="system message for the chat template")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True, help="folder for eval.json and the PNG plots")
    ap.add_argument("--no-progress-bar", action="store_true")
    a = ap.parse_args(argv)
    for name in ("samples", "k", "num_problems", "max_tokens", "answer_tokens", "extend_tokens"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive int, got {v}")
    if a.extend < 0:
        ap.error(f"--extend must be >= 0, got {a.extend}")
    try:
        a.budgets = _int_list(a.budgets, "--budgets") if a.budgets is not None else None
        a.regret_budgets = (_int_list(a.regret_budgets, "--regret-budgets")
                            if a.regret_budgets is not None else None)
    except ValueError as e:
        ap.error(str(e))
    return a


def main(argv=None) -> None:
    """`mrt eval`: returns None, so a console-script wrapper's sys.exit(main()) exits 0."""
    run_cli(argv)


def run_cli(argv=None) -> dict:
    """`mrt eval` that returns the results dict (for scripts and tests)."""
    from mrt_engine import LLM, default_model_path

    a = parse_args(argv)
    toy = a.data == data_mod.TOY
    verifier = a.verifier if a.verifier != "auto" else ("toy" if toy else "math")
    problems = data_mod.load_problems(a.data, a.split, a.num_problems, a.difficulty, a.seed)
    model = a.model or default_model_path()
    if not os.path.isdir(model):
        raise FileNotFoundError(f"--model {model!r} is not a folder (expected a Hugging Face model "
                                "folder with config.json and safetensors)")
    try:
        llm = LLM(model, dtype=a.dtype, device=a.device, seed=a.seed)
    except (FileNotFoundError, ValueError, OSError, KeyError) as e:
        raise ValueError(f"--model {model!r} does not load: {e}") from e
    if llm.get_tokenizer() is None:
        raise ValueError(f"--model {model!r} has no tokenizer; mrt eval needs one")
    rule = episodes.TOY_RULE if toy else None
    kwargs = dict(
        samples=a.samples, k=a.k, budgets=a.budgets, regret_budgets=a.regret_budgets,
        max_tokens=a.max_tokens or (320 if toy else 2048),
        answer_tokens=a.answer_tokens or (16 if toy else 512),
        temperature=a.temperature if a.temperature is not None else (1.0 if toy else 0.6),
        top_p=a.top_p if a.top_p is not None else (1.0 if toy else 0.95),
        seed=a.seed, rule=rule, extend=a.extend, extend_tokens=a.extend_tokens,
        use_chat_template=not a.no_chat_template, system=a.system, use_tqdm=not a.no_progress_bar)
    if toy:
        from mrt_engine.trainer.toy import traces as toy_traces

        kwargs.update(forced_suffix=toy_traces.FORCED_SUFFIX, natural_suffix=toy_traces.NATURAL_END,
                      continue_strs=toy_traces.TRIGGERS)
    if a.forced_suffix is not None:
        kwargs["forced_suffix"] = a.forced_suffix.replace("\\n", "\n")   # a typed \n: newline
    res = evaluate(llm, problems, verifier, **kwargs)
    res["config"].update(model=model, data=a.data, split=a.split, difficulty=a.difficulty if toy else None)
    print_tables(res)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "eval.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    pngs = plot(res, a.out)
    print(f"wrote {path}, " + ", ".join(pngs))
    return res


if __name__ == "__main__":
    main()
