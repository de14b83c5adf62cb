"""Toy task, searcher traces and tokenizer: generator vs verifier, trace parsing, exact round trip."""
from __future__ import annotations

import itertools
import random

import pytest

from mrt_engine.trainer.toy import task, traces
from mrt_engine.trainer.toy.task import Problem, generate_problems, grade, verify


def _brute_force_pairs(p: Problem):
    return [(a, b) for a, b in itertools.combinations(p.numbers, 2) if a + b == p.target]


@pytest.mark.parametrize("difficulty", range(task.MIN_DIFFICULTY, task.MAX_DIFFICULTY + 1))
def test_generator_and_verifier_agree(difficulty):
    probs = generate_problems(300, difficulty, seed=difficulty)
    for p in probs:
        assert len(p.numbers) == difficulty and len(set(p.numbers)) == difficulty
        assert _brute_force_pairs(p) == [p.answer]  # exactly one pair reaches the target
        assert verify(p, p.answer) and verify(p, p.answer[::-1])
        for pair in p.pairs():  # every other candidate is rejected
            assert verify(p, pair) == (set(pair) == set(p.answer))
        # outside the set, or the same member twice, is wrong even when the sum matches
        assert not verify(p, (p.target - 10, 10))
        half = p.target // 2
        if p.target % 2 == 0 and half in p.numbers:
            assert not verify(p, (half, half))
        assert not verify(p, None) and not verify(p, (p.answer[0],))


def test_generator_is_seeded_and_knob_is_checked():
    assert generate_problems(20, 5, seed=7) == generate_problems(20, 5, seed=7)
    assert generate_problems(20, 5, seed=7) != generate_problems(20, 5, seed=8)
    with pytest.raises(ValueError, match="difficulty"):
        generate_problems(1, task.MAX_DIFFICULTY + 1)
    with pytest.raises(TypeError, match="difficulty"):
        generate_problems(1, 4.0)
    with pytest.raises(ValueError, match="non-negative"):
        generate_problems(-1)


def test_grade_reads_last_boxed_answer():
    p = Problem((3, 2, 9, 1, 4), 13, (9, 4))
    assert grade("</think>\n\\boxed{9+4}", p)
    assert grade("\\boxed{1+2} no, \\boxed{ 4 + 9 }", p)
    assert not grade("\\boxed{9+4} no, \\boxed{1+2}", p)
    assert not grade("9+4=13", p)            # no box
    assert not grade("\\boxed{13}", p)       # not a pair
    assert not grade("\\boxed{9+4", p)       # unclosed
    assert not grade("\\boxed{10+3}", p)     # right sum, numbers not in the set


def test_jsonl_export_loads_with_datasets(tmp_path):
    import datasets

    probs = generate_problems(17, 4, seed=3)
    path = task.export_jsonl(probs, str(tmp_path / "toy.jsonl"))
    ds = datasets.load_dataset("json", data_files=path, split="train")
    assert len(ds) == 17
    assert ds[5]["prompt"] == probs[5].prompt()
    assert [Problem.from_json(r) for r in ds] == probs
    assert task.load_jsonl(path) == probs


def test_searcher_traces_parse():
    rng = random.Random(0)
    counts, repeats, continued = [], 0, 0
    for p in generate_problems(400, 5, seed=11):
        tr = traces.searcher_trace(p, rng)
        text = tr.completion()
        assert grade(text, p) and traces.final_answer(text) == tr.answer
        assert traces.count_episodes(text) == len(tr.episodes)
        assert all(e.startswith(traces.EPISODE_STARTS) for e in tr.episodes)
        assert tr.episodes[0].startswith(traces.FIRST_TRIGGER)
        # the found pair is the verified answer; nothing before it verified
        assert verify(p, tr.attempts[tr.found_at])
        assert not any(verify(p, a) for a in tr.attempts[:tr.found_at])
        starts = traces.episode_starts(tr.thinking)
        assert [tr.thinking[s:].startswith(e) for s, e in zip(starts, tr.episodes)] == \
            [True] * len(tr.episodes)
        counts.append(len(tr.episodes))
        repeats += len(set(tr.attempts[:tr.found_at + 1])) < tr.found_at + 1
        continued += len(tr.episodes) > tr.found_at + 1
    assert 4 < sum(counts) / len(counts) < 12   # several episodes on average
    assert repeats > 40 and continued > 40        # the searcher is noisy in both ways


def test_forced_answer_uses_what_was_found():
    p = Problem((3, 2, 9, 1, 4), 13, (9, 4))
    thinking = ("Let me try 3+2=5, not 13.\n\nWait, 9+2=11, not 13.\n\n"
                "Alternatively, 4+9=13. Found it: 4+9.")
    rng = random.Random(0)
    assert traces.forced_answer(p, thinking, rng) == (4, 9)
    # cut inside the winning sum ("=1" of "=13"): not found yet, so a guess among untried pairs
    cut = thinking[:thinking.index("4+9=1") + 5]
    assert traces.tried_pairs(p, cut) == [(3, 2), (2, 9)]
    guesses = {traces.forced_answer(p, cut, rng) for _ in range(200)}
    assert guesses == set(p.pairs()) - {(3, 2), (2, 9)}
    text = traces.forced_completion(p, cut, rng)
    assert text.startswith(cut + traces.FORCED_SUFFIX) and traces.final_answer(text) is not None


def test_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    from mrt_engine.trainer.toy.tokenizer import save_tokenizer

    tok = AutoTokenizer.from_pretrained(save_tokenizer(str(tmp_path)))
    assert len(tok) < 200
    assert tok.convert_tokens_to_ids("</think>") != tok.unk_token_id
    assert len(tok("</think>", add_special_tokens=False)["input_ids"]) == 1
    rng = random.Random(5)
    samples = ["", " ", "\n\n\n", "Wait,Wait, odd ~ text\t", "a </think></think>b \\boxed{}}"]
    for p in generate_problems(30, 6, seed=2):
        samples.append(p.prompt() + traces.searcher_trace(p, rng).completion())
        samples.append(traces.forced_completion(p, "Let me try 1+", rng))
    samples.append("".join(chr(rng.randrange(32, 127)) for _ in range(300)))
    for text in samples:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[1:]) == text
        assert tok.unk_token_id not in ids
