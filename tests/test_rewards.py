"""Reward callables: outcome from the toy / math verifiers and a custom callable, format, combine."""
import pytest

from mrt_engine.trainer.rewards import (build_reward, combine, format_ok, format_reward,
                                        outcome_reward)
from mrt_engine.trainer.toy.task import generate_problems


def toy_completion(pair):
    return "Let me try %d+%d=%d. Found it.\n</think>\n\\boxed{%d+%d}" % (pair[0], pair[1], sum(pair),
                                                                          pair[0], pair[1])


def test_outcome_toy():
    probs = generate_problems(3, 5, seed=1)
    comps = [toy_completion(probs[0].answer), toy_completion(probs[0].answer),
             toy_completion(probs[2].answer[::-1])]
    # the second completion answers problem 0's pair to problem 1: wrong unless the sums agree
    want = [1.0, 1.0 if sum(probs[0].answer) == probs[1].target else 0.0, 1.0]
    assert outcome_reward("toy")(comps, probs) == want
    assert outcome_reward("toy")(comps, [p.to_json() for p in probs]) == want


def test_outcome_math_and_callable():
    r = outcome_reward("math")
    assert r(["</think> so \\boxed{\\frac{1}{2}}", "\\boxed{3}"], [{"answer": "0.5"}, {"answer": "4"}]) == [1.0, 0.0]
    calls = []

    def v(text, prob):
        calls.append((text, prob))
        return 0.25
    assert outcome_reward(v)(["a", "b"], [1, 2]) == [0.25, 0.25]
    assert calls == [("a", 1), ("b", 2)]


@pytest.mark.parametrize("text,ok", [
    ("think\n</think>\n\\boxed{1+2}", True),
    ("think\n</think>\nso \\fbox{3} done", True),
    ("think \\boxed{9} more\n</think>\n\\boxed{1+2}", True),  # a box inside the thinking is fine
    ("no close \\boxed{1}", False),
    ("</think> no box", False),
    ("</think>\\boxed{1} and \\boxed{2}", False),
    ("a</think>b</think>\\boxed{1}", False),
])
def test_format(text, ok):
    assert format_ok(text) is ok
    assert format_reward([text]) == [1.0 if ok else 0.0]


def test_combine_weights_and_last():
    r = combine({"a": lambda c, p: [1.0] * len(c), "b": lambda c, p: [float(len(x)) for x in c]},
                {"b": 0.5})
    assert r(["xx", "yyyy"], [None, None]) == [1.0 + 1.0, 1.0 + 2.0]
    assert r.last == {"a": [1.0, 1.0], "b": [2.0, 4.0]}


def test_combine_errors():
    with pytest.raises(ValueError, match="unknown rewards"):
        combine({"a": format_reward}, {"b": 1.0})
    with pytest.raises(TypeError, match="'a'"):
        combine({"a": 3})
    bad = combine({"short": lambda c, p: [1.0]})
    with pytest.raises(ValueError, match="'short' returned 1 values for 2"):
        bad(["x", "y"], [None, None])
    with pytest.raises(ValueError, match="2 completions for 1 problems"):
        outcome_reward("toy")(["a", "b"], [generate_problems(1, 5, 0)[0]])
    with pytest.raises(TypeError, match="list of str"):
        format_reward("abc")
    with pytest.raises(ValueError, match="unknown verifier"):
        outcome_reward("sympy")


def test_build_reward_from_config():
    from mrt_engine.trainer.config import GRPOConfig
    p = generate_problems(1, 5, seed=2)[0]
    r = build_reward(GRPOConfig(verifier="toy", format_reward_weight=0.5))
    assert r([toy_completion(p.answer)], [p]) == [1.5]
    assert r.last["outcome"] == [1.0]
    assert set(build_reward(GRPOConfig(verifier="toy")).rewards) == {"outcome"}
