"""data.py: problem loading (toy generator, local JSONL through datasets, bad input) and prompts
(chat template, opened thinking, toy prompt, no double BOS)."""
from __future__ import annotations

import json
import os

import pytest

from mrt_engine import default_model_path
from mrt_engine.trainer import data, grading
from mrt_engine.trainer.toy import task

# shared/ lies beside the checkout (CI copies it there); a fresh clone has none and skips
MATH500 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                       "math500.jsonl")


@pytest.fixture(scope="module")
def toy_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_toy_problems_are_seeded_and_graded_by_the_toy_verifier():
    a = data.load_problems("toy", num_problems=5, difficulty=4, seed=3)
    assert a == data.load_problems("toy", num_problems=5, difficulty=4, seed=3)
    assert a != data.load_problems("toy", num_problems=5, difficulty=4, seed=4)
    assert len(a) == 5 and len(data.load_problems("toy")) == 64
    for d in a:
        p = task.Problem.from_json(d)
        assert p.difficulty == 4 and d["prompt"] == p.prompt() and d["task"] == "toy"
        assert d["problem"] in p.prompt()
        assert grading.toy_verifier("\\boxed{%d+%d}" % p.answer, d) == 1.0
        assert data.build_prompt(d) == p.prompt()
    with pytest.raises(ValueError):
        data.load_problems("toy", difficulty=99)


def test_jsonl_loading(tmp_path):
    rows = [{"problem": "1+1?", "answer": "2", "extra": 1}, {"problem": "2+3?", "answer": 5, "extra": 2},
            {"problem": "x?", "answer": "\\frac12", "extra": 3}]
    path = _write(tmp_path / "p.jsonl", rows)
    got = data.load_problems(path)
    assert [g["problem"] for g in got] == ["1+1?", "2+3?", "x?"]
    assert [g["answer"] for g in got] == ["2", "5", "\\frac12"] and got[0]["extra"] == 1
    assert len(data.load_problems(path, num_problems=2)) == 2
    assert len(data.load_problems(path, num_problems=50)) == 3
    assert data.load_problems(path, split="test")[0]["problem"] == "1+1?"


@pytest.mark.skipif(not os.path.exists(MATH500), reason="shared/data not beside the checkout")
def test_math500_loads():
    probs = data.load_problems(MATH500, num_problems=7)
    assert len(probs) == 7 and all(p["problem"] and p["answer"] for p in probs)


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        data.load_problems(str(tmp_path / "missing.jsonl"))
    no_answer = _write(tmp_path / "a.jsonl", [{"problem": "1+1?"}, {"problem": "2+2?"}])
    with pytest.raises(ValueError, match="'answer'"):
        data.load_problems(no_answer)
    blank = _write(tmp_path / "b.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": " ", "answer": "3"}])
    with pytest.raises(ValueError, match="row 1 has an empty 'problem'"):
        data.load_problems(blank)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty|no problems|cannot load"):
        data.load_problems(str(empty))
    with pytest.raises(ValueError, match="num_problems"):
        data.load_problems("toy", num_problems=0)
    with pytest.raises(ValueError):
        data.load_problems("")
    txt = _write(tmp_path / "p.txt", ["hello"])
    with pytest.raises(ValueError, match="expected a"):
        data.load_problems(txt)


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_build_prompt_chat_template_opens_thinking(toy_tok):
    tok = toy_tok
    prob = {"problem": "What is 1+1?", "answer": "2"}
    plain = data.build_prompt(prob, tok)   # the toy tokenizer has no template
    assert plain == "What is 1+1?\n<think>\n"
    assert data.build_prompt(prob, tok, system="Be brief.") == "Be brief.\n\nWhat is 1+1?\n<think>\n"
    tok.chat_template = TEMPLATE
    try:
        text = data.build_prompt(prob, tok, system="Be brief.")
        assert text == "<|system|>Be brief.\n<|user|>What is 1+1?\n<|assistant|><think>\n"
        assert data.build_prompt(prob, tok, use_chat_template=False) == plain
        # a template that already opens the thinking is left as it is (R1-distill style)
        tok.chat_template = TEMPLATE.replace("<|assistant|>", "<|assistant|><think>\n")
        text = data.build_prompt(prob, tok)
        assert text.endswith("<|assistant|><think>\n") and text.count("<think>") == 1
        # a model without a <think> token is not given one
        tok.chat_template = TEMPLATE
        assert data.build_prompt(prob, _NoThink(tok)).endswith("<|assistant|>")
    finally:
        tok.chat_template = None
    with pytest.raises(TypeError):
        data.build_prompt({"answer": "2"}, tok)


class _NoThink:
    def __init__(self, tok):
        self.tok, self.chat_template = tok, tok.chat_template

    def apply_chat_template(self, *a, **kw):
        return self.tok.apply_chat_template(*a, **kw)

    def get_vocab(self):
        return {k: v for k, v in self.tok.get_vocab().items() if k != "<think>"}


def test_encode_prompt_adds_bos_once(toy_tok):
    ids = data.encode_prompt("Find two.", toy_tok)
    assert ids[0] == toy_tok.bos_token_id and ids.count(toy_tok.bos_token_id) == 1
    ids2 = data.encode_prompt(toy_tok.bos_token + "Find two.", toy_tok)
    assert ids2 == ids
