"""evaluate.py: regret, maj@k and clustering on hand-computed values; `mrt eval` end to end on the
shipped toy model (--data toy) and on a local JSONL with a tiny random Qwen2 behind a chat
template; clear errors for bad input."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from mrt_engine.trainer import evaluate as ev


def test_area_under_curve_by_hand():
    # (0,0) -> (10, .5) -> (30, 1), flat after: triangle 2.5, trapezoid 15, flat 10
    assert ev.area_under_curve([10, 30], [0.5, 1.0], 40) == pytest.approx(27.5)
    # cut inside the second segment at x=20 (y=.75): 2.5 + (.5+.75)/2*10
    assert ev.area_under_curve([10, 30], [0.5, 1.0], 20) == pytest.approx(8.75)
    # inside the first segment: y(5) = .25 -> 5*.25/2
    assert ev.area_under_curve([10, 30], [0.5, 1.0], 5) == pytest.approx(0.625)
    # points are sorted by x first
    assert ev.area_under_curve([30, 10], [1.0, 0.5], 40) == pytest.approx(27.5)
    with pytest.raises(ValueError):
        ev.area_under_curve([1], [1], 0)
    with pytest.raises(ValueError):
        ev.area_under_curve([1, 2], [1], 5)


def test_normalized_regret_by_hand():
    curves = [([10, 30], [0.5, 1.0]), ([20], [0.0])]
    assert ev.normalized_regret(curves, 40) == pytest.approx(1 - (27.5 + 0.0) / 80)
    assert ev.normalized_regret([([5], [1.0])], 10) == pytest.approx(1 - 7.5 / 10)
    # an oracle from the start has regret only from the ramp (0,0) -> (1,1)
    assert ev.normalized_regret([([1], [1.0])], 100) == pytest.approx(0.005)


def test_regret_vs_episodes_by_hand():
    got = ev.regret_vs_episodes([[0.0, 0.5, 1.0], [0.2, 0.4]], 3)
    assert got == pytest.approx([1 - (0.5 + 0.4) / 2, 1 - (0.75 + 0.4) / 2, 1 - (2.5 / 3 + 0.4) / 2])


def test_maj_at_k_by_hand():
    clusters, correct = [0, 0, 1, None], [1, 1, 0, 0]
    assert ev.maj_at_k(clusters, correct, 1) == pytest.approx(0.5)
    # 6 pairs: {01}:1 {02}:tie .5 {03}:1 {12}:.5 {13}:1 {23}:0
    assert ev.maj_at_k(clusters, correct, 2) == pytest.approx(4 / 6)
    assert ev.maj_at_k(clusters, correct, 4) == 1.0
    assert ev.maj_at_k([None, None], [0, 0], 2) == 0.0
    with pytest.raises(ValueError):
        ev.maj_at_k(clusters, correct, 5)
    with pytest.raises(ValueError):
        ev.maj_at_k(clusters, correct[:2], 1)


def test_maj_at_k_monte_carlo_matches_exact(monkeypatch):
    import random

    rng = random.Random(0)
    clusters = [rng.randrange(4) for _ in range(16)]
    correct = [1.0 if c == 2 else 0.0 for c in clusters]
    exact = ev.maj_at_k(clusters, correct, 5)
    monkeypatch.setattr(ev, "EXACT_SUBSETS", 0)
    assert ev.maj_at_k(clusters, correct, 5, seed=1) == pytest.approx(exact, abs=0.03)


def test_cluster_answers_uses_the_graders_equivalence():
    extract, equivalent = ev.answer_key("math")
    keys = [extract(t) for t in ("so \\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}", "no answer",
                                 "\\boxed{\\dfrac12}")]
    assert ev.cluster_answers(keys, equivalent) == [0, 0, 1, None, 0]
    assert ev.cluster_answers(["a", "b", "a"]) == [0, 1, 0]
    toy_key, _ = ev.answer_key("toy")
    assert toy_key("\\boxed{3+9}") == toy_key("\\boxed{9+3}") and toy_key("x") is None


# ---- mrt eval end to end -----------------------------------------------------------------------

def _recomputed_regret(res, budget):
    curves = [(t["cost"], t["J"]) for t in res["traces"]]
    return ev.normalized_regret(curves, budget)


def test_mrt_eval_toy_end_to_end(tmp_path, capsys):
    from mrt_engine.cli import main as cli

    out = tmp_path / "ev"
    # None: the `mrt` console script's sys.exit(main()) then exits 0
    assert cli(["eval", "--data", "toy", "--num-problems", "2", "--difficulty", "4", "--samples", "2", "--k", "2",
         "--budgets", "16,1000", "--max-tokens", "100", "--answer-tokens", "10", "--extend", "1",
         "--extend-tokens", "16", "--seed", "3", "--out", str(out), "--no-progress-bar"]) is None
    printed = capsys.readouterr().out
    assert "accuracy vs thinking budget" in printed and "normalized regret" in printed
    res = json.loads((out / "eval.json").read_text())
    for png in ("accuracy_vs_budget.png", "regret_vs_budget.png"):
        assert (out / png).stat().st_size > 1000
    assert res["num_traces"] == 4 and res["config"]["verifier"] == "toy"
    acc = dict(zip(res["accuracy_vs_budget"]["budgets"], res["accuracy_vs_budget"]["accuracy"]))
    assert all(0 <= a <= 1 for a in acc.values())
    # a budget past every closed trace keeps its own answer: maj@1 and the natural accuracy agree
    if all(t["closed"] and t["think_len"] <= 1000 for t in res["traces"]):
        assert acc[1000] == pytest.approx(res["natural_accuracy"])
    assert res["maj_at_k"]["accuracy"][0] == pytest.approx(res["natural_accuracy"])
    assert res["natural_accuracy"] == pytest.approx(sum(t["natural_correct"] for t in res["traces"]) / 4)
    rb = res["regret_vs_budget"]
    for b, r in zip(rb["budgets"], rb["normalized_regret"]):
        assert r == pytest.approx(_recomputed_regret(res, b)) and 0 <= r <= 1
    assert res["J_by_point"]["J"][0] == pytest.approx(sum(t["J"][0] for t in res["traces"]) / 4)
    assert res["mean_episodes"] >= 1 and len(res["regret_vs_episodes"]["normalized_regret"]) >= 1
    x = res["extrapolation"]
    assert x["extensions"] == [0, 1] and x["mean_thinking_tokens"][1] > 0


def test_mrt_eval_jsonl_with_a_chat_template(tmp_path, tiny_qwen2_dir, capsys):
    from mrt_engine.trainer.evaluate import main

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2_dir, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}<assistant><think>\n{% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"What is {i}+1?", "answer": str(i + 1)})
                              for i in range(3)) + "\n")
    out = tmp_path / "ev"
    assert main(["--model", str(model), "--data", str(path), "--samples", "2", "--k", "2",
                "--max-tokens", "24", "--answer-tokens", "6", "--budgets", "8", "16",
                "--system", "Think.", "--out", str(out), "--no-progress-bar"]) is None
    res = json.loads((out / "eval.json").read_text())
    assert os.path.isfile(out / "eval.json") and os.path.isfile(out / "regret_vs_budget.png")
    assert res["num_traces"] == 6 and res["config"]["verifier"] == "math"
    assert res["accuracy_vs_budget"]["budgets"] == [8, 16]
    assert all(len(t["J"]) == len(t["points"]) == len(t["cost"]) >= 2 for t in res["traces"])
    # the prompt went through the chat template: system + user turns, thinking already open
    from transformers import AutoTokenizer

    from mrt_engine.trainer import data

    tok = AutoTokenizer.from_pretrained(model)
    text = data.build_prompt({"problem": "What is 0+1?"}, tok, system="Think.")
    assert text == "<system>Think.\n<user>What is 0+1?\n<assistant><think>\n"


def test_mrt_eval_bad_input(tmp_path, capsys):
    from mrt_engine.trainer.evaluate import main

    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    for bad in (["0"], ["16", "x"], ["-3"], ["1.5"]):
        with pytest.raises(SystemExit):
            main(["--data", str(good), "--budgets", *bad, "--out", str(tmp_path / "o")])
        assert "--budgets must be positive ints" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such data file"):
        main(["--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    noans = tmp_path / "n.jsonl"
    noans.write_text(json.dumps({"problem": "1+1?"}) + "\n")
    with pytest.raises(ValueError, match="'answer'"):
        main(["--data", str(noans), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        main(["--data", "toy", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "o")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="does not load"):
        main(["--data", "toy", "--model", str(broken), "--out", str(tmp_path / "o")])
