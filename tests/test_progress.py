"""progress.py: J, progress, cost and cuts on a scripted stub engine (hand-computed values), and on
the shipped toy model: fork-based J equals J from each cut prompt generated from scratch with the
same seeds, in one generate call whose prefill is the suffixes only."""
from __future__ import annotations

import pytest

from mrt_engine import SamplingParams, default_model_path
from mrt_engine.trainer import episodes, progress
from mrt_engine.trainer.toy import task, traces

MODEL = default_model_path()


@pytest.fixture(scope="module")
def toy_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


class StubHandle:
    def __init__(self, token_ids, num_prompt_tokens):
        self.token_ids = tuple(token_ids)
        self.num_prompt_tokens = num_prompt_tokens


class StubOut:
    def __init__(self, texts, ntok):
        self.outputs = [type("C", (), {"text": t, "token_ids": [0] * ntok})() for t in texts]


class StubLLM:
    """Answers scripted by cut position: `script[(handle index, at)] -> list of K answer texts`."""

    def __init__(self, tok, script, handles, ntok=3):
        self.tok, self.script, self.handles, self.ntok = tok, script, handles, ntok
        self.calls = []

    def get_tokenizer(self):
        return self.tok

    def generate(self, reqs, params, use_tqdm=False):
        self.calls.append((reqs, params))
        outs = []
        for r, p in zip(reqs, params):
            texts = self.script[(self.handles.index(r.handle), r.at)]
            assert len(texts) == p.n
            outs.append(StubOut(texts, self.ntok))
        return outs


def _toy_trace(tok, problem, completion, eos=True):
    prompt = tok(problem.prompt())["input_ids"]
    comp = tok(completion, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    return StubHandle(prompt + comp, len(prompt)), len(prompt), comp


def test_hand_computed_J_progress_cost_on_a_stub_engine(toy_tok):
    tok = toy_tok
    prob = task.Problem((1, 2, 4, 5), 9, (4, 5))
    pd = dict(prob.to_json(), problem="x")
    closed = "Let me try 1+2=3, not 9.\n\nWait, 4+5=9. Found it: 4+5.\n</think>\n\\boxed{4+5}"
    h1, p1, comp1 = _toy_trace(tok, prob, closed)
    # an unclosed trace (cut by max_tokens): its natural end gets the natural suffix
    h2, p2, comp2 = _toy_trace(tok, prob, "Let me try 1+2=3, not 9.\n\nAlternatively, 1+4=5", eos=False)
    b1 = episodes.segment(comp1, tok, episodes.TOY_RULE)
    t1 = episodes.think_length(comp1, tok)
    b2 = episodes.segment(comp2, tok, episodes.TOY_RULE)
    t2 = len(comp2)
    assert len(b1) == 1 and len(b2) == 1 and episodes.think_length(comp2, tok) == t2
    end1 = t1 + 1  # "</think>" is one token of the toy vocabulary
    right, wrong = "\\boxed{4+5}", "\\boxed{1+2}"
    script = {(0, p1): [wrong] * 4, (0, p1 + b1[0]): [right, wrong, right, wrong],
              (0, p1 + end1): [right] * 4,
              (1, p2): [wrong, wrong, wrong, right], (1, p2 + b2[0]): [wrong] * 4,
              (1, p2 + t2): [right, right, wrong, wrong]}
    llm = StubLLM(tok, script, [h1, h2])
    tps = progress.estimate_progress(
        llm, [h1, h2], [pd, pd], "toy", rule=episodes.TOY_RULE, k=4,
        forced_suffix=traces.FORCED_SUFFIX, natural_suffix=traces.NATURAL_END,
        sampling=SamplingParams(temperature=1.0, max_tokens=8, seed=100))
    a, b = tps
    assert a.points == [0, b1[0], t1] and a.closed
    assert a.fork_at == [p1, p1 + b1[0], p1 + end1]
    assert a.J == [0.0, 0.5, 1.0] and a.progress == [0.5, 0.5]
    assert a.cost == [p1 + 3.0, p1 + b1[0] + 3.0, p1 + end1 + 3.0]
    assert a.episode_ids == [0] * b1[0] + [1] * (len(comp1) - b1[0])
    assert a.num_episodes == 2 and a.boundaries == b1
    assert b.points == [0, b2[0], t2] and not b.closed and b.fork_at[-1] == p2 + t2
    assert b.J == [0.25, 0.0, 0.5] and b.progress == [-0.25, 0.5]
    # one engine call; forced suffix at the cuts, nothing after a model's own </think>, the natural
    # suffix at an unclosed end; per-trace seeds; K answers per point
    assert len(llm.calls) == 1
    reqs, params = llm.calls[0]
    forced = tok(traces.FORCED_SUFFIX, add_special_tokens=False)["input_ids"]
    natural = tok(traces.NATURAL_END, add_special_tokens=False)["input_ids"]
    assert [list(r.suffix) for r in reqs] == [forced, forced, [], forced, forced, natural]
    assert [p.seed for p in params] == [100] * 3 + [101] * 3 and {p.n for p in params} == {4}
    assert a.to_dict()["J"] == a.J and "answers" not in a.to_dict()


def test_given_boundaries_are_validated(toy_tok):
    prob = task.Problem((1, 2, 4, 5), 9, (4, 5))
    h, p, comp = _toy_trace(toy_tok, prob, "Let me try 1+2=3, not 9.\n\nWait, 4+5=9.\n</think>\n")
    llm = StubLLM(toy_tok, {}, [h])
    think = episodes.think_length(comp, toy_tok)
    for bad in ([0], [think], [5, 3], [3, 3], [2.5]):
        with pytest.raises(ValueError):
            progress.estimate_progress(llm, [h], [{}], "toy", boundaries=[bad], k=2)
    with pytest.raises(ValueError):
        progress.estimate_progress(llm, [h], [{}, {}], "toy", k=2)
    with pytest.raises(ValueError):
        progress.estimate_progress(llm, [h], [{}], "toy", k=0)
    with pytest.raises(TypeError):
        progress.estimate_progress(llm, ["not a handle"], [{}], "toy", k=2)


def test_progress_of():
    assert progress.progress_of([0.0, 0.25, 0.75, 0.5]) == [0.25, 0.5, -0.25]
    assert progress.progress_of([0.3]) == []


@pytest.fixture(scope="module")
def toy_run():
    from mrt_engine import LLM

    llm = LLM(MODEL, dtype="float32", seed=0)
    tok = llm.get_tokenizer()
    probs = task.generate_problems(2, 4, seed=11)
    pds = [p.to_json() for p in probs]
    outs = llm.generate([p.prompt() for p in probs],
                        SamplingParams(n=1, temperature=1.0, max_tokens=120, seed=3), keep=True)
    handles = [o.outputs[0].handle for o in outs]
    calls = []
    real_generate = llm.generate

    def counting_generate(*a, **kw):
        calls.append(a)
        return real_generate(*a, **kw)

    llm.generate = counting_generate
    llm.reset_stats()
    sampling = SamplingParams(temperature=1.0, max_tokens=10, seed=7)
    tps = progress.estimate_progress(llm, handles, pds, "toy", rule=episodes.TOY_RULE, k=4,
                                     forced_suffix=traces.FORCED_SUFFIX,
                                     natural_suffix=traces.NATURAL_END, sampling=sampling)
    stats = llm.kv_stats()
    llm.generate = real_generate
    seqs = [list(h.token_ids) for h in handles]
    for h in handles:
        llm.release(h)
    yield dict(llm=llm, tok=tok, tps=tps, pds=pds, seqs=seqs, stats=stats, calls=calls,
               sampling=sampling)


def test_fork_J_equals_from_scratch_J_with_the_same_seeds(toy_run):
    from mrt_engine import LLM

    r = toy_run
    tok = r["tok"]
    forced = tok(traces.FORCED_SUFFIX, add_special_tokens=False)["input_ids"]
    scratch_llm = LLM(MODEL, dtype="float32", enable_prefix_caching=False)
    prompts, params, owners = [], [], []
    for i, (tp, seq) in enumerate(zip(r["tps"], r["seqs"])):
        assert tp.num_episodes >= 2, "the seeded traces should have several episodes"
        for j, at in enumerate(tp.fork_at):
            last = j == len(tp.fork_at) - 1
            suffix = [] if (last and tp.closed) else (tok(traces.NATURAL_END, add_special_tokens=False)
                                                      ["input_ids"] if last else forced)
            prompts.append(seq[:at] + suffix)
            params.append(SamplingParams(n=4, temperature=1.0, max_tokens=10, seed=r["sampling"].seed + i))
            owners.append((i, j))
    scratch_llm.reset_stats()
    outs = scratch_llm.generate(prompts, params)
    scratch_prefill = scratch_llm.kv_stats()["prefill_tokens"]
    from mrt_engine.trainer.grading import toy_verifier

    for (i, j), out in zip(owners, outs):
        tp = r["tps"][i]
        texts = [c.text for c in out.outputs]
        assert texts == tp.answers[j], (i, j)
        J = sum(toy_verifier(t, r["pds"][i]) for t in texts) / 4
        assert J == tp.J[j]
    # one generate call for every point of every trace; only the suffixes (plus the re-fed token
    # at each cut) were prefilled, once per point, not once per answer and never the prefixes
    assert len(r["calls"]) == 1
    per_point = sum(len(tp.points) for tp in r["tps"])
    suffix_budget = sum(len(forced) + 1 for tp in r["tps"] for _ in tp.points)
    assert 0 < r["stats"]["prefill_tokens"] <= suffix_budget
    assert r["stats"]["prefill_tokens"] * 3 < scratch_prefill
    assert per_point == len(prompts)


def test_rewards_and_costs_are_consistent(toy_run):
    for tp in toy_run["tps"]:
        assert len(tp.J) == len(tp.points) == len(tp.cost) == len(tp.fork_at) == tp.num_episodes + 1
        assert all(len(r) == 4 for r in tp.rewards)
        assert tp.J == [sum(r) / 4 for r in tp.rewards]
        assert tp.cost == [at + sum(n) / 4 for at, n in zip(tp.fork_at, tp.answer_tokens)]
        assert tp.points == sorted(tp.points) and tp.points[0] == 0
        assert len(tp.episode_ids) == tp.completion_len and max(tp.episode_ids) == tp.num_episodes - 1


def test_cuts_without_room_score_zero_and_are_not_sent(toy_tok):
    from types import SimpleNamespace

    prob = task.Problem((1, 2, 4, 5), 9, (4, 5))
    pd = prob.to_json()
    h, p, comp = _toy_trace(toy_tok, prob, "Let me try 4+5=9. Found it: 4+5.\n</think>\n\\boxed{4+5}")
    llm = StubLLM(toy_tok, {(0, p): ["\\boxed{4+5}"] * 2}, [h])
    llm.config = SimpleNamespace(max_model_len=p + 3)
    cuts = [progress.Cut(h, p, (5,), 1), progress.Cut(h, p + 2, (5,), 1), progress.Cut(h, p, (5, 5, 5), 1)]
    got = progress.forced_answers(llm, cuts, [pd] * 3, "toy", k=2)
    assert [a.no_room for a in got] == [False, True, True]
    assert [a.rewards for a in got] == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert len(llm.calls) == 1 and [r.at for r in llm.calls[0][0]] == [p]
