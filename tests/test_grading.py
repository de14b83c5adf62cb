"""Grading: answer extraction edge cases, a table of equal / unequal answer pairs, verifiers, grading
from worker threads, and real data (every MATH500 and AIME24 solution against its answer field;
shuffled pairs must not match)."""
from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from mrt_engine.trainer import grading
from mrt_engine.trainer.grading import (extract_answer, get_verifier, grade, math_equal,
                                        math_verifier, normalize_answer, toy_verifier)
from mrt_engine.trainer.toy import task

# shared/ lies beside the checkout (CI copies it there); a user's fresh clone has none: skip
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "math500.jsonl")),
                                reason="shared MATH500 / AIME24 data not present")


# ---- extraction ----

@pytest.mark.parametrize("text,want", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),                      # nested braces
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),                          # the last box
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$", "5"), ("so \\boxed 5.", "5"),                        # the bare form
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                                 # escaped braces
    ("\\boxed{1} and a cut-off \\boxed{2", "1"),                         # unbalanced last box
    ("\\boxed{} The answer is 4.", "4"),                                 # empty box skipped
    ("\\boxedfoo{3}. Answer: 9", "9"),                                   # not a \boxed command
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("Thus the final answer is 7.", "7"),
    ("**Final Answer:** 42", "42"),
    ("Answer: x = 5\nmore text", "x = 5"),
    ("answer is 1. Later: the answer is \\(3\\).", "3"),
    ("no answer here", None), ("", None), ("\\boxed{", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_extract_type_errors():
    with pytest.raises(TypeError, match="text"):
        extract_answer(None)
    with pytest.raises(TypeError, match="generated_text"):
        grade(5, "5")
    with pytest.raises(TypeError, match="reference"):
        grade("\\boxed{5}", 5)
    with pytest.raises(ValueError, match="reference"):
        grade("\\boxed{5}", "  ")


# ---- equivalence table ----

EQUAL = [
    # fractions and decimals
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "\\frac12"), ("1/2", "\\tfrac{1}{2}"),
    ("\\frac{3}{4}", "0.75"), ("0.50", ".5"), ("2.0", "2"), ("1,000", "1000"), ("025", "25"),
    ("-\\frac{\\pi}{6}", "-\\pi/6"), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("11\\sqrt2", "11\\sqrt{2}"), ("\\sqrt{12}", "2\\sqrt{3}"), ("10^{3}", "1000"),
    # text, choices, units
    ("\\text{Evelyn}", "Evelyn"), ("\\textbf{(C)}", "C"), ("\\textbf{(073)}", "073"),
    ("10\\text{ cm}", "10"), ("10 \\text{cm}^2", "10"), ("5 \\text{ square units}", "5"),
    ("\\$18.90", "18.90"), ("18.9 dollars", "18.90"),
    # degrees, percentages
    ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("50\\%", "50"), ("12.5\\%", "12.5"),
    # intervals, tuples, sets, matrices
    ("(1, 2]", "(1,2]"), ("[-3, \\infty)", "[-3,\\infty)"),
    ("(-\\infty, 0) \\cup (1, \\infty)", "(-\\infty,0)\\cup(1,\\infty)"),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("(1,-2)", "(1, -2)"),
    ("1, -2", "-2, 1"), ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    # equations and expressions
    ("x = 3", "3"), ("3", "x=3"), ("y=2x+1", "2x+1"), ("x^2+2x+1", "(x+1)^2"),
    ("6 - 5i", "6-5i"), ("2\\pi", "2 \\pi"),
]
UNEQUAL = [
    ("\\frac{1}{2}", "0.51"), ("\\frac{2}{3}", "0.66"), ("0.333", "\\frac{1}{3}"), ("2", "3"),
    ("-2", "2"), ("12", "21"), ("1,000", "1"), ("10^{3}", "103"), ("\\sqrt{2}", "2"),
    ("\\text{Evelyn}", "Bob"), ("10 \\text{cm}", "100"), ("90^\\circ", "91"), ("50\\%", "5"),
    ("(1, 2]", "[1,2)"), ("[0,1]", "(0,1)"), ("(1,2)", "(2,1)"), ("1,2,3", "1,2"),
    ("(3, \\frac{\\pi}{2})", "(3, \\pi)"), ("x = 4", "3"), ("x^2+1", "(x+1)^2"), ("2x", "2"),
    ("6+5i", "6-5i"), ("\\infty", "-\\infty"),
]


@pytest.mark.parametrize("pred,ref", EQUAL)
def test_equal_pairs(pred, ref):
    assert grade(f"Thinking...\n\nSo the result is $\\boxed{{{pred}}}$.", ref)
    assert grade(f"\\boxed{{{ref}}}", pred)  # and the other way round


@pytest.mark.parametrize("pred,ref", UNEQUAL)
def test_unequal_pairs(pred, ref):
    assert not grade(f"\\boxed{{{pred}}}", ref)
    assert not grade(f"\\boxed{{{ref}}}", pred)


def test_normalize_answer_fast_path():
    # what the string fast path alone makes equal (no math-verify involved)
    for a, b in [("\\dfrac12", "\\frac{1}{2}"), ("3/4", "\\frac{3}{4}"), (".5", "0.5"),
                 ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("x = 3", "3"),
                 ("90^\\circ", "90"), ("50\\%", "50"), ("\\$1,000.50", "1000.5"),
                 ("\\text{(B) }", "B"), ("10\\text{ cm}^2", "10"), ("5 square units", "5")]:
        assert normalize_answer(a) == normalize_answer(b), (a, b)
    for a, b in [("2m", "2"), ("f(x) = 3", "3"), ("(1,2)", "1,2"), ("\\text{Evelyn}", "Bob")]:
        assert normalize_answer(a) != normalize_answer(b), (a, b)


def test_grade_reads_only_the_generated_text():
    prompt = "What is 2+3? Put the answer in \\boxed{5}."
    assert not grade("I am not sure.", "5")
    assert grade(prompt + " \\boxed{5}", "5") and not grade(" \\boxed{5}", "6")
    assert math_verifier("no answer", {"problem": prompt, "answer": "5"}) == 0.0
    assert math_verifier("so \\boxed{5}", {"problem": prompt, "answer": "5"}) == 1.0
    # a reference given as a worked solution is reduced to its box
    assert grade("\\boxed{5}", "2+3 = \\boxed{5}")


def test_runaway_answers_skip_math_verify():
    long_sum = "+".join(["1"] * 300)  # 599 characters, equal to 300 only symbolically
    assert not grade(f"\\boxed{{{long_sum}}}", "300")
    assert grade(f"\\boxed{{{long_sum}}}", long_sum)  # the string fast path still applies
    assert grade("\\boxed{1+1+1}", "3")  # short ones go through math-verify


def test_grading_in_worker_threads():
    """math-verify's signal-based timeouts fail outside the main thread: the grader turns them off
    there, and the results match the main thread's."""
    pairs = [(f"\\boxed{{{p}}}", r) for p, r in EQUAL + UNEQUAL]
    grading._parse.cache_clear()  # make the threads parse, not hit the main thread's cache
    with ThreadPoolExecutor(4) as pool:
        in_threads = list(pool.map(lambda pr: grade(*pr), pairs))
    assert in_threads == [grade(*pr) for pr in pairs]
    assert sum(in_threads) == len(EQUAL)


# ---- verifiers ----

def test_verifiers():
    p = task.generate_problems(1, 5, seed=0)[0]
    a, b = p.answer
    good, bad = f"</think>\n\\boxed{{{a}+{b}}}", f"</think>\n\\boxed{{{a}+{a}}}"
    assert toy_verifier(good, p) == 1.0 and toy_verifier(bad, p) == 0.0
    assert toy_verifier(good, p.to_json()) == 1.0
    assert get_verifier("toy") is toy_verifier and get_verifier("math") is math_verifier
    # a math grader would accept any pair with the right sum; the toy verifier checks membership
    assert math_verifier(f"\\boxed{{{p.target}}}", str(p.target)) == 1.0
    assert toy_verifier(f"\\boxed{{{p.target - 1}+1}}", p) == float(
        task.verify(p, (p.target - 1, 1)))
    assert math_verifier("\\boxed{27}", {"answer": 27.0}) == 1.0  # AMC answers are floats
    mine = lambda text, prob: 0.5  # noqa: E731
    assert get_verifier(mine) is mine
    with pytest.raises(ValueError, match="unknown verifier"):
        get_verifier("nope")
    with pytest.raises(TypeError, match="callable"):
        get_verifier(3)
    with pytest.raises(ValueError, match="answer"):
        math_verifier("\\boxed{1}", {"problem": "x"})
    with pytest.raises(TypeError, match="problem"):
        math_verifier("\\boxed{1}", 1)
    with pytest.raises(ValueError, match="numbers"):
        toy_verifier(good, {"numbers": [1, 2]})
    with pytest.raises(TypeError, match="Problem"):
        toy_verifier(good, "3+4")


# ---- real data ----

def _rows(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@needs_data
def test_math500_solutions_grade_equal_to_answers():
    rows = _rows("math500.jsonl")
    assert len(rows) == 500 and all({"problem", "solution", "answer"} <= set(r) for r in rows)
    misses = [i for i, r in enumerate(rows) if not grade(r["solution"], r["answer"])]
    # Measured: 500/500 (2026-11-29). No known misses.
    assert misses == []
    # math-verify on its own (string fast path off) agrees on every answer, so the slow path never
    # rejects a real MATH answer form it is handed
    slow = [i for i, r in enumerate(rows)
            if not math_equal(extract_answer(r["solution"]), r["answer"], fast_path=False)]
    assert slow == []


@needs_data
def test_math500_answers_in_other_written_forms():
    """The sentence fallbacks and LaTeX variants on every real answer."""
    for r in _rows("math500.jsonl"):
        a = r["answer"]
        assert grade(f"We are done.\n\nThe final answer is ${a}$.", a), a
        assert grade(f"Answer: {a}", a), a
        assert grade("\\boxed{ " + a.replace("\\frac", "\\dfrac") + " }", a), a


@needs_data
def test_math500_shuffled_pairs_grade_unequal():
    rows = _rows("math500.jsonl")
    n = len(rows)
    rng = random.Random(0)
    perm = list(range(n))
    while any(perm[i] == i for i in range(n)):  # a seeded derangement
        rng.shuffle(perm)
    # pairs whose answer strings are identical (8 of 500 with this seed) are genuinely equal
    pairs = [(i, perm[i]) for i in range(n) if rows[i]["answer"] != rows[perm[i]]["answer"]]
    false_pos = [(i, j) for i, j in pairs if grade(rows[i]["solution"], rows[j]["answer"])]
    # Measured: 0 false positives of 492 pairs.
    assert len(pairs) > 480 and len(false_pos) <= 1, false_pos


@needs_data
def test_aime24_solutions():
    rows = _rows("aime24.jsonl")
    misses = [i for i, r in enumerate(rows) if not grade(r["solution"], r["answer"])]
    # Known miss: row 0's AoPS solution ends "$180 + 24 = 204$. -sepehr2010" with no box and no
    # "answer is" sentence, so no answer can be extracted. Measured 29/30.
    assert misses == [0]
