"""Answer extraction, normalisation and grading of generated text, plus pluggable verifiers.

`grade(generated_text, reference)` is what the MRT layer calls for every forced answer:
1. `extract_answer` takes the answer out of the generated text only (last `\\boxed{}`/`\\fbox{}`,
   else an "answer is X" / "Answer: X" sentence); no answer -> False.
2. Fast path: Hendrycks-MATH-style string normalisation (`normalize_answer`) of both sides; equal
   strings are equal answers. Most correct answers stop here, so grading a batch costs microseconds.
3. Otherwise `math-verify` parses both sides as LaTeX and compares them symbolically/numerically.
   Parses are cached (the K forced answers of a boundary share one reference and often one answer).

math-verify guards its work with `signal.alarm`, which only works in the main thread: there we keep
its timeouts; in any other thread we switch them off (`parsing_timeout=None`,
`timeout_seconds=None`), so grading also works in worker threads, at the price of no time limit
there; answers longer than MV_MAX_CHARS never reach math-verify, which bounds that risk.

A verifier is any callable `(generated_text, problem) -> float in [0, 1]`; `get_verifier("math")`,
`get_verifier("toy")` or a callable of your own plug into progress estimation and evaluation.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Mapping, Optional, Union

Verifier = Callable[[str, Any], float]

MV_TIMEOUT_S = 5  # math-verify's own per-call limit, in the main thread only
# Longer "answers" skip math-verify (string fast path only): MATH500's longest answer has 53
# characters, and a runaway box of thousands could stall sympy where no timeout applies (threads).
MV_MAX_CHARS = 400

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# "final answer is X", "answer is X", "Answer: X": the marker; X follows it on the same line.
_SENTENCE_RE = re.compile(r"(?:answer\s+is|answer\s*:)\**\s*:?[ \t]*", re.IGNORECASE)


# ---- extraction ----

def _braced(text: str, start: int) -> Optional[str]:
    """Content of the `{...}` group opening at `text[start]`, or None when unbalanced.

    `\\{` and `\\}` are literal braces in LaTeX, so an escaped character never counts.
    """
    assert text[start] == "{"
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def _box_content(text: str, end: int) -> Optional[str]:
    """The argument of a `\\boxed` command ending at `end`: `{...}` or the bare `\\boxed 5` form."""
    i = end
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced(text, i)
    if i == end:  # `\boxed` glued to something that is not a brace: not an argument we understand
        return None
    m = re.match(r"[^\s$]+", text[i:])  # `\boxed 5$` / `\boxed 5.` : up to space or `$`
    return m.group(0).rstrip(".") if m else None


def _sentence_answer(rest: str) -> str:
    """X in "answer is X": a `$...$` / `\\(...\\)` group when X opens with one, else the line up to
    the first sentence end (a period before whitespace), without markdown stars."""
    line = rest.split("\n", 1)[0].strip().strip("*").strip()
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(open_):
            end = line.find(close, len(open_))
            while end > 0 and close.startswith("$") and line[end - 1] == "\\":
                end = line.find(close, end + 1)  # `\$` is a dollar sign, not the closing `$`
            if end > len(open_):
                return line[len(open_):end].strip()
    m = re.search(r"\.(\s|$)", line)
    return (line[:m.start()] if m else line).strip()


def extract_answer(text: str) -> Optional[str]:
    """The final answer written in `text`: the last well-formed `\\boxed{...}` / `\\fbox{...}` (nested
    braces kept, also `\\boxed 5`), else the last "final answer is X" / "answer is X" / "Answer: X";
    None when there is none (or the only box is cut off before its closing brace)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    for m in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, m.end())
        if content is not None and content.strip():
            return content.strip()
    for m in reversed(list(_SENTENCE_RE.finditer(text))):
        ans = _sentence_answer(text[m.end():])
        if ans:
            return ans
    return None


# ---- normalisation (fast path) ----

_UNIT_WORDS = (
    "cm|m|km|mm|in|inch|inches|ft|cubic|feet|foot|yd|yards?|miles?|meters?|centimeters?|units?|"
    "square|sq|degrees?|seconds?|minutes?|hours?|days?|weeks?|years?|cents?|dollars?|pounds?|"
    "kg|g|grams?|liters?|mph|people|students?|ways|times|points?")
_UNITS = r"(?:%s)(?:\s+(?:%s))*" % (_UNIT_WORDS, _UNIT_WORDS)  # "square units", "cubic feet"
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
# a number (or expression holding a digit) followed by a unit in \\text{}; or a plain number and a
# unit word after a space (`5 cm`; never `2m`, which may be a product)
_TRAILING_UNIT = re.compile(
    r"^(?P<num>.*\d.*?)\s*\\(?:text|mbox|mathrm)\s*\{\s*(?:%s)\s*\}(?:\^\{?\d\}?)?$"
    r"|^(?P<plain>-?[\d.,]+)\s+(?:%s)(?:\^\{?\d\}?)?$" % (_UNITS, _UNITS))


def _fix_fracs(s: str) -> str:
    r"""`\frac12` -> `\frac{1}{2}`, `\frac1{2}` -> `\frac{1}{2}`: single-token arguments get braces."""
    out = []
    parts = s.split("\\frac")
    out.append(parts[0])
    for part in parts[1:]:
        out.append("\\frac")
        if part.startswith("{") or len(part) < 2:
            out.append(part)
            continue
        a, rest = part[0], part[1:]
        if rest.startswith("{"):
            out.append("{" + a + "}" + rest)
        else:
            out.append("{" + a + "}{" + rest[0] + "}" + rest[1:])
    return "".join(out)


def _canonical_number(s: str) -> str:
    """`1,000` -> `1000`, `3.50` -> `3.5`, `5.` / `5.0` -> `5`, `-0` -> `0`; other strings unchanged."""
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d*)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
        try:
            d = Decimal(s)
        except InvalidOperation:
            return s
        d = d.normalize()
        text = format(d, "f")
        return "0" if text in ("-0", "0") else text
    return s


def normalize_answer(ans: str) -> str:
    r"""Hendrycks-MATH-style canonical string of an answer, for the equality fast path.

    Drops spacing commands, `\left`/`\right`, `$`, degree marks, percent signs, trailing units and
    `\text{}` wrappers; `\dfrac`/`\tfrac` -> `\frac`; `x = 3` -> `3` (short left side only);
    `\frac12` / `a/b` -> `\frac{a}{b}`; canonical decimals. Two answers with equal normal forms are
    equal; unequal forms say nothing (math-verify decides).
    """
    if not isinstance(ans, str):
        raise TypeError(f"ans must be a str, got {type(ans).__name__}")
    s = ans.strip().replace("\n", "")
    s = s.rstrip(".").strip()
    for space in ("\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "~"):
        s = s.replace(space, " ")
    s = s.replace("\\ ", " ")
    s = re.sub(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\dbinom", "\\binom").replace("\\tbinom", "\\binom")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    m = _TRAILING_UNIT.match(s.strip())
    if m:
        s = m.group("num") if m.group("num") is not None else m.group("plain")
    s = s.strip()
    # `\text{Evelyn}` -> `Evelyn`, repeatedly for nested wrappers
    while True:
        t = _TEXT_CMD.sub(r"\1", s)
        if t == s:
            break
        s = t
    # `x = 3` -> `3` when the left side is a short name (as in the MATH grader)
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs.strip()) <= 2 and rhs.strip():
            s = rhs
    s = s.replace(" ", "")
    # `(073)` / `(A)`: the parenthesised-choice style of AoPS solutions; a lone number or letter in
    # parentheses is that number or letter (a 1-tuple is not a MATH answer)
    m = re.fullmatch(r"\((-?[\d.]+|[A-Za-z])\)", s)
    if m:
        s = m.group(1)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    s = re.sub(r"(?<![\w.])\.(\d)", r"0.\1", s)  # `.5` -> `0.5`, `{.5}` -> `{0.5}`
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = "\\frac{%s}{%s}" % (m.group(1), m.group(2))
    s = _canonical_number(s)
    return s


# ---- math-verify (slow path) ----

def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=8192)
def _parse(latex: str, with_timeout: bool):
    from math_verify import parse
    # Boxing the bare answer makes math-verify take exactly this expression (its boxed extractor
    # has the highest priority) instead of searching the string for something parseable.
    return parse("\\boxed{" + latex + "}", parsing_timeout=MV_TIMEOUT_S if with_timeout else None)


_quiet = False


def _silence_math_verify_warnings() -> None:
    """math-verify logs a warning when timeouts are off (worker threads); that is our choice."""
    global _quiet
    if not _quiet:
        for name in ("math_verify.parser", "math_verify.grader", "math_verify.utils"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _quiet = True


def math_equal(pred: str, reference: str, fast_path: bool = True) -> bool:
    """True if two answer strings are equal by normal form or by math-verify (reference = gold).

    `fast_path=False` skips the string comparison (to test math-verify on its own)."""
    if fast_path and normalize_answer(pred) == normalize_answer(reference):
        return True
    if len(pred) > MV_MAX_CHARS or len(reference) > MV_MAX_CHARS:
        return False
    from math_verify import verify
    _silence_math_verify_warnings()
    main = _in_main_thread()
    gold = _parse(reference, main)
    target = _parse(pred, main)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=MV_TIMEOUT_S if main else None))


def _reference_answer(reference: str) -> str:
    """A reference may be a bare answer or a worked solution holding a box: take the box then."""
    if _BOX_RE.search(reference):
        boxed = extract_answer(reference)
        if boxed is not None:
            return boxed
    return reference.strip()


def grade(generated_text: str, reference: str) -> bool:
    """True if the answer written in `generated_text` (and only there) equals `reference`."""
    if not isinstance(generated_text, str):
        raise TypeError(f"generated_text must be a str, got {type(generated_text).__name__}")
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a str, got {type(reference).__name__}")
    pred = extract_answer(generated_text)
    if pred is None:
        return False
    ref = _reference_answer(reference)
    if not ref:
        raise ValueError("reference answer is empty")
    return math_equal(pred, ref)


# ---- verifiers ----

def math_verifier(generated_text: str, problem: Union[Mapping[str, Any], str]) -> float:
    """1.0 if the generated answer equals the problem's `answer` field (or a str reference)."""
    if isinstance(problem, str):
        ref = problem
    elif isinstance(problem, Mapping):
        if "answer" not in problem:
            raise ValueError(f"problem must have an 'answer' field, got keys {sorted(problem)}")
        ref = problem["answer"]
        if not isinstance(ref, str):
            ref = str(ref)
    else:
        raise TypeError(f"problem must be a mapping with 'answer' or a str, got "
                        f"{type(problem).__name__}")
    return 1.0 if grade(generated_text, ref) else 0.0


def toy_verifier(generated_text: str, problem: Any) -> float:
    """1.0 if the last boxed pair of the text solves the toy problem (a Problem or its to_json())."""
    from mrt_engine.trainer.toy.task import Problem, grade as toy_grade
    if isinstance(problem, Mapping):
        try:
            problem = Problem.from_json(problem)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"toy problem dict must have numbers/target/answer, got "
                             f"{sorted(problem)}") from e
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a toy Problem or its to_json() dict, got "
                        f"{type(problem).__name__}")
    if not isinstance(generated_text, str):
        raise TypeError(f"generated_text must be a str, got {type(generated_text).__name__}")
    return 1.0 if toy_grade(generated_text, problem) else 0.0


VERIFIERS = {"math": math_verifier, "toy": toy_verifier}


def get_verifier(name_or_callable: Union[str, Verifier]) -> Verifier:
    """A verifier by name ("math", "toy") or a callable `(generated_text, problem) -> float`."""
    if isinstance(name_or_callable, str):
        if name_or_callable not in VERIFIERS:
            raise ValueError(f"unknown verifier {name_or_callable!r}; expected one of "
                             f"{sorted(VERIFIERS)} or a callable")
        return VERIFIERS[name_or_callable]
    if not callable(name_or_callable):
        raise TypeError(f"verifier must be a name or a callable (generated_text, problem) -> float, "
                        f"got {type(name_or_callable).__name__}")
    return name_or_callable
