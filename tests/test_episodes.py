"""Episode segmentation: hand-computed boundaries, the paper's literal rule as a slow twin, token
positions vs an O(n^2) prefix-decoding oracle, on two tokenizers (the toy's character-level one and
a byte-level BPE trained here so that ".\\n\\n", "\\n\\n" and even ".\\n\\nWait," are single tokens)."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

import mrt_engine
from mrt_engine.trainer import episodes as E
from mrt_engine.trainer.episodes import EpisodeRule, episode_ids, segment, segment_text, think_length
from mrt_engine.trainer.toy import task, traces

LOOSE = EpisodeRule(min_gap=1)  # every trigger paragraph after the first counts


# ---- tokenizers ----

@pytest.fixture(scope="module")
def toy_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(mrt_engine.default_model_path())


def _bpe_corpus():
    words = "the answer is seven so we add two numbers and check sum again carefully".split()
    rng = random.Random(0)
    out = []
    for _ in range(300):
        para = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        end = rng.choice([".", ".", "!", "?", " 12", ":"])
        opener = rng.choice(["Wait, ", "But wait, ", "Alternatively, ", "So ", "Hmm "])
        out.append(para.capitalize() + end + "\n\n" + opener + para + ".\n\n\n\n")
    return out


@pytest.fixture(scope="module")
def bpe_tok():
    """Byte-level BPE without the pre-tokenizer regex, so merges run across whitespace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_bpe_corpus(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    pieces = {hf.decode([i]) for i in hf.get_vocab().values()}
    # the premise of these tests: whitespace merges with its neighbours
    assert "\n\n" in pieces and ".\n\n" in pieces and ".\n\nWait," in pieces
    return hf


@pytest.fixture(params=["toy", "bpe"])
def tok(request):
    return request.getfixturevalue(request.param + "_tok")


# ---- oracles ----

def _paper_twin(text, triggers, min_gap, max_steps, group_size, stop="</think>"):
    """The paper's break_into_meta_steps as a slow twin (rewritten from its description in
    mrt.md §1.2): paragraph-index bookkeeping, then offsets of the kept meta-step starts."""
    if stop is not None and stop in text:
        text = text[:text.index(stop)]
    steps = text.split("\n\n")
    starts = [sum(len(s) + 2 for s in steps[:i]) for i in range(len(steps))]
    prev_i, left, accepted = 0, max_steps, []
    for i, step in enumerate(steps):
        if left == 0:
            break
        if any(step.startswith(t) for t in triggers):
            if i - prev_i < min_gap:
                continue
            accepted.append(i)
            left -= 1
            prev_i = i
    return [starts[i] for n, i in enumerate(accepted, 1) if n % group_size == 0]


def _token_of(tokenizer, ids, char):
    """Smallest k whose prefix decode reaches past `char` (a partial byte shows as U+FFFD)."""
    for k in range(len(ids)):
        if len(tokenizer.decode(ids[:k + 1])) > char:
            return k
    return len(ids)


def _check_tokens(tokenizer, text, rule):
    """segment() agrees with segment_text() through the prefix-decoding oracle, and each boundary
    token holds its paragraph's first character. Returns (ids, token boundaries, char offsets)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text  # round trip, so character offsets are the text's
    chars = segment_text(text, rule)
    got = segment(ids, tokenizer, rule)
    want = []
    for c in chars:
        k = _token_of(tokenizer, ids, c)
        if k > 0 and (not want or k > want[-1]):
            want.append(k)
    assert got == want
    for k, c in zip(got, chars):
        before, upto = len(tokenizer.decode(ids[:k])), len(tokenizer.decode(ids[:k + 1]))
        assert before <= c < upto
        if text[c].isascii():
            assert text[c] in tokenizer.decode([ids[k]])
    assert all(0 < b <= think_length(ids, tokenizer, rule.stop_at) for b in got)
    return ids, got, chars


# ---- hand-written traces ----

PAPER_TRACE = (
    "P0 start.\n\n"
    "P1 so Wait, mid-paragraph trigger.\n\n"
    "Wait, too early (2 paragraphs after the start).\n\n"
    "P3.\nWait, after a single newline is not a paragraph.\n\n"
    "Wait, first boundary.\n\n"
    "P5.\n\n"
    "P6.\n\n"
    "But wait, second boundary (3 after).\n\n"
    "Alternatively, too soon.\n\n"
    "P9.\n\n"
    "P10.\n\n"
    "Waiting also matches: plain startswith.\n\n"
    "P12 the end.</think>\n\nSo \\boxed{1}.\n\nWait, after the thinking does not count."
)


def test_paper_rule_by_hand(tok):
    t = PAPER_TRACE
    want = [t.index("Wait, first"), t.index("But wait, second"), t.index("Waiting also")]
    assert segment_text(t) == want
    _, got, _ = _check_tokens(tok, t, EpisodeRule())
    assert len(got) == 3
    # min_gap=1: the early trigger and "Alternatively" count too
    assert segment_text(t, LOOSE) == [t.index("Wait, too"), t.index("Wait, first"),
                                      t.index("But wait, second"), t.index("Alternatively"),
                                      t.index("Waiting also")]
    _check_tokens(tok, t, LOOSE)
    # without stop_at the trigger after </think> counts as well
    assert segment_text(t, EpisodeRule(stop_at=None))[-1] == t.index("Wait, after the")


WHITESPACE_TRACE = (
    "\n\n  P0 after blank lines.\n\n\n\n"
    "P1 after four newlines.\n\n"
    "P2.\n\n\n"
    "Wait, after three newlines.\n\n \n\n"
    "P4 after a blank paragraph.\n\n"
    "P5.\n\n"
    "  But wait, with leading spaces.\n\n"
    "P7 trailing blanks.  \n\n\n\n"
)


def test_tricky_whitespace(tok):
    t = WHITESPACE_TRACE
    # blank pieces are not paragraphs: "Wait" is paragraph 3, "But wait" paragraph 6
    want = [t.index("Wait, after three"), t.index("But wait, with")]
    assert segment_text(t) == want
    _check_tokens(tok, t, EpisodeRule())
    # the paper's literal split sees "\nWait" and "  But wait": no trigger at all
    literal = EpisodeRule(lstrip=False)
    assert segment_text(t, literal) == [] == _paper_twin(t, E.PAPER_TRIGGERS, 3, -1, 1)


def test_max_episodes_and_group_size(tok):
    paras = ["P0."] + [f"{'Wait' if i % 2 else 'Alternatively'}, attempt {i}." for i in range(1, 9)]
    t = "\n\n".join(paras)
    starts = [t.index(p) for p in paras[1:]]
    assert segment_text(t, LOOSE) == starts
    assert segment_text(t, EpisodeRule(min_gap=1, max_episodes=3)) == starts[:3]
    assert segment_text(t, EpisodeRule(min_gap=1, max_episodes=0)) == []
    # meta-steps of 2 episodes open at boundaries 2, 4, 6, 8 (episode 0 has none)
    assert segment_text(t, EpisodeRule(min_gap=1, group_size=2)) == starts[1::2]
    assert segment_text(t, EpisodeRule(min_gap=1, group_size=3, max_episodes=7)) == [
        starts[2], starts[5]]
    assert segment_text(t, EpisodeRule(min_gap=2)) == starts[1::2]
    for rule in (LOOSE, EpisodeRule(min_gap=1, group_size=2), EpisodeRule(min_gap=2, max_episodes=2)):
        _check_tokens(tok, t, rule)


def test_separator_merged_into_boundary_token(bpe_tok):
    """".\\n\\nWait," is one BPE token: the boundary is that token, so the prefix before it lacks the
    period and the separator (documented); segment_text still reports the "W"."""
    t = "We add two numbers.\n\nSo check.\n\nHmm sum.\n\nWait, the sum again."
    ids, got, chars = _check_tokens(bpe_tok, t, EpisodeRule())
    assert chars == [t.index("Wait")]
    piece = bpe_tok.decode([ids[got[0]]])
    assert piece.startswith(".\n\n") and "W" in piece
    assert bpe_tok.decode(ids[:got[0]]) == t[:t.index(".\n\nWait")]


def test_non_ascii_bytes_split_over_tokens(bpe_tok):
    """Characters the BPE never saw are several byte tokens: offsets come from incremental
    decoding, and a paragraph that starts with such a character is cut before its first byte."""
    t = "Déjà vu 😀.\n\nÉtape one.\n\nSo é.\n\nWait, 😀 again.\n\nÉtape two."
    rule = EpisodeRule(triggers=("Wait", "Étape"), min_gap=1)
    ids, got, chars = _check_tokens(bpe_tok, t, rule)
    assert chars == [t.index("Étape one"), t.index("Wait"), t.index("Étape two")]
    assert len(got) == 3
    ends, text = E.token_offsets(ids, bpe_tok)
    assert text == t and len(ends) == len(ids)
    for k in range(len(ids)):  # where a prefix decodes cleanly, its length is the offset
        prefix = bpe_tok.decode(ids[:k + 1])
        if not prefix.endswith("\ufffd"):
            assert ends[k] == len(prefix)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(
    ["Wait", "But wait", "Waiting", "Alternatively", "x", "y.", " ", "\n", "\n\n", "\n\n\n",
     "But hold on", "</think>"]), max_size=40),
    min_gap=st.integers(1, 4), max_steps=st.one_of(st.none(), st.integers(0, 5)),
    group=st.integers(1, 3))
def test_literal_rule_equals_paper_twin(pieces, min_gap, max_steps, group):
    text = "".join(pieces)
    rule = EpisodeRule(min_gap=min_gap, max_episodes=max_steps, group_size=group, lstrip=False)
    twin = _paper_twin(text, E.PAPER_TRIGGERS, min_gap, -1 if max_steps is None else max_steps,
                       group)
    assert segment_text(text, rule) == twin


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.sampled_from(
    ["Wait, ", "But wait", "So", "x.", " ", "\n", "\n\n", "\n\n\n"]), max_size=30))
def test_stripped_rule_invariants(pieces):
    """Default rule: every boundary starts with a trigger, right after a separator + blanks."""
    text = "".join(pieces)
    out = segment_text(text, LOOSE)
    assert out == sorted(set(out)) and all(o > 0 for o in out)
    for o in out:
        assert text[o:].startswith(E.PAPER_TRIGGERS)
        gap = text[len(text[:o].rstrip()):o]  # the whitespace run before the paragraph
        assert "\n\n" in gap and text[:o].strip()  # after a separator, never paragraph 0


# ---- toy traces ----

def test_toy_rule_on_toy_traces(toy_tok):
    rng = random.Random(3)
    n_bounds = 0
    for difficulty in (3, 5, 7):
        for p in task.generate_problems(8, difficulty, seed=difficulty):
            tr = traces.searcher_trace(p, rng)
            comp = tr.completion()
            ids = toy_tok.encode(comp, add_special_tokens=False)
            want_chars = [len(traces.EPISODE_SEP.join(tr.episodes[:j]) + traces.EPISODE_SEP)
                          for j in range(1, len(tr.episodes))]
            assert segment_text(comp, E.TOY_RULE) == want_chars
            assert want_chars == traces.episode_starts(traces.thinking_of(comp))[1:]
            want = [len(toy_tok.encode(comp[:c], add_special_tokens=False)) for c in want_chars]
            assert segment(ids, toy_tok, E.TOY_RULE) == want
            n_think = think_length(ids, toy_tok)
            assert toy_tok.decode(ids[n_think:]).startswith(traces.THINK_END)
            assert toy_tok.decode(ids[:n_think]) == tr.thinking + "\n"
            n_bounds += len(want)
    assert n_bounds > 24  # the traces really have several episodes


# ---- think_length, episode_ids, validation ----

def test_think_length(tok):
    t = "Some thinking.\n\nWait, more.\n</think>\n\nAnswer \\boxed{3}."
    ids = tok.encode(t, add_special_tokens=False)
    n = think_length(ids, tok)
    cut = t.index("</think>")
    assert len(tok.decode(ids[:n])) <= cut < len(tok.decode(ids[:n + 1]))
    assert think_length(ids, tok, stop_at=None) == len(ids)
    assert think_length(ids, tok, stop_at="NOT THERE") == len(ids)
    assert think_length([], tok) == 0 and segment([], tok) == []


def test_episode_ids():
    assert episode_ids(5, [2, 4]) == [0, 0, 1, 1, 2]
    assert episode_ids(3, []) == [0, 0, 0]
    assert episode_ids(3, [3]) == [0, 0, 0]
    assert episode_ids(0, []) == []
    for bad in ([2, 2], [3, 1], [6], [-1]):
        with pytest.raises(ValueError, match="boundaries"):
            episode_ids(5, bad)
    with pytest.raises(TypeError, match="boundaries"):
        episode_ids(5, [1.5])
    with pytest.raises(ValueError, match="num_tokens"):
        episode_ids(-1, [])


@pytest.mark.parametrize("kwargs,err,field", [
    ({"min_gap": 0}, ValueError, "min_gap"), ({"group_size": 0}, ValueError, "group_size"),
    ({"max_episodes": -1}, ValueError, "max_episodes"), ({"triggers": "Wait"}, TypeError, "triggers"),
    ({"triggers": ()}, ValueError, "triggers"), ({"triggers": ("Wait", "")}, ValueError, "triggers"),
    ({"separator": ""}, ValueError, "separator"), ({"stop_at": ""}, ValueError, "stop_at"),
    ({"min_gap": 2.0}, ValueError, "min_gap"), ({"lstrip": 1}, TypeError, "lstrip"),
])
def test_rule_validation(kwargs, err, field):
    with pytest.raises(err, match=field):
        EpisodeRule(**kwargs)


def test_bad_inputs(toy_tok):
    with pytest.raises(TypeError, match="rule"):
        segment_text("x", rule="paper")
    with pytest.raises(TypeError, match="text"):
        segment_text(b"x")
    with pytest.raises(TypeError, match="rule"):
        segment([1, 2], toy_tok, rule={"min_gap": 1})
    assert EpisodeRule(triggers=["Wait"]).triggers == ("Wait",)  # lists are accepted, frozen
