"""Episode boundaries of a thinking trace, as character offsets and as token positions.

The paper's rule (MRT, `break_into_meta_steps`; `../shared/reference/mrt.md` §1.2): the thinking is
the text before `</think>`; it is split on "\\n\\n" into paragraphs; a paragraph whose text *starts
with* a trigger ("Wait", "But wait", ...; a plain `startswith`, so "Waiting" matches too) opens a new
episode, unless the previous boundary (or the start of the trace, paragraph 0) is fewer than
`min_gap` paragraphs back; at most `max_episodes` boundaries are kept; then `group_size` consecutive
episodes are merged into one meta-step (only every `group_size`-th boundary is kept).

Whitespace (`EpisodeRule.lstrip`, default True): a run of three or more newlines, or a blank
paragraph, leaves pieces that hold only whitespace, or that begin with "\\n" before the trigger. We
skip whitespace-only pieces (they are not paragraphs and do not count towards `min_gap`) and match
triggers after a paragraph's leading whitespace; the episode starts at its first non-blank
character. `lstrip=False` is the paper's literal behaviour (every piece of `text.split(sep)` is a
paragraph, matched as is).

Token positions (`segment`): the completion's token ids are decoded once, every token's character
span is computed from that decoding (never by re-tokenising pieces), and a boundary is the index of
the token that holds the paragraph's first character. When a tokenizer merges the separator with
the paragraph ("\\n\\nWait" or even ".\\n\\nWait" as one token), that token holds characters of the
separator (or of the previous paragraph) as well: the cut then falls *before* them, so the prefix
up to the boundary lacks part of the separator (and at most the tail of the previous paragraph
inside that one token). That is the only cut that keeps whole tokens; the forced-answer suffix starts
a new paragraph anyway. A boundary that would land on token 0 is dropped (it would be the empty
thinking point, which the caller adds itself); two boundaries in one token count once.
"""
from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

PAPER_TRIGGERS = ("Wait", "But wait", "Alternatively", "Is there another way to think about this?",
                  "But let me double-check", "But hold on")


@dataclass(frozen=True)
class EpisodeRule:
    """How a thinking trace is cut into episodes. Defaults are the paper's."""

    triggers: Tuple[str, ...] = PAPER_TRIGGERS  # a paragraph starting with one opens an episode
    separator: str = "\n\n"  # paragraphs are split on this
    min_gap: int = 3  # a boundary needs >= this many paragraphs since the previous one (or start)
    max_episodes: Optional[int] = None  # keep at most this many boundaries (the paper's max_steps)
    group_size: int = 1  # merge this many consecutive episodes into one meta-step
    stop_at: Optional[str] = "</think>"  # segment only the text before the first occurrence
    lstrip: bool = True  # skip blank pieces and leading whitespace (False: the paper's literal split)

    def __post_init__(self):
        if isinstance(self.triggers, str) or not isinstance(self.triggers, (tuple, list)):
            raise TypeError(f"triggers must be a tuple of str, got {type(self.triggers).__name__}")
        if not self.triggers or not all(isinstance(t, str) and t for t in self.triggers):
            raise ValueError(f"triggers must be non-empty strings, got {self.triggers!r}")
        object.__setattr__(self, "triggers", tuple(self.triggers))
        if not isinstance(self.separator, str) or not self.separator:
            raise ValueError(f"separator must be a non-empty str, got {self.separator!r}")
        for name, value in (("min_gap", self.min_gap), ("group_size", self.group_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_episodes is not None and (isinstance(self.max_episodes, bool)
                                              or not isinstance(self.max_episodes, int)
                                              or self.max_episodes < 0):
            raise ValueError(f"max_episodes must be None or an int >= 0, got {self.max_episodes!r}")
        if self.stop_at is not None and (not isinstance(self.stop_at, str) or not self.stop_at):
            raise ValueError(f"stop_at must be None or a non-empty str, got {self.stop_at!r}")
        if not isinstance(self.lstrip, bool):
            raise TypeError(f"lstrip must be a bool, got {type(self.lstrip).__name__}")


def _toy_rule() -> EpisodeRule:
    from mrt_engine.trainer.toy import traces
    # Every toy paragraph is an episode (the searcher writes one attempt per paragraph).
    return EpisodeRule(triggers=tuple(traces.EPISODE_STARTS), separator=traces.EPISODE_SEP,
                       min_gap=1, stop_at=traces.THINK_END)


TOY_RULE = _toy_rule()


# ---- text level ----

def _paragraph_starts(text: str, rule: EpisodeRule) -> List[Tuple[int, bool]]:
    """(character offset, opens-with-trigger) of every paragraph of `text`, in order."""
    out = []
    pos = 0
    for piece in text.split(rule.separator):
        start = pos
        pos += len(piece) + len(rule.separator)
        if rule.lstrip:
            body = piece.lstrip()
            if not body:
                continue  # blank piece: part of a longer gap, not a paragraph
            start += len(piece) - len(body)
        else:
            body = piece
        out.append((start, body.startswith(rule.triggers)))
    return out


def thinking_text(text: str, stop_at: Optional[str] = "</think>") -> str:
    """`text` up to the first `stop_at` (all of it when absent or `stop_at` is None)."""
    if stop_at is None:
        return text
    cut = text.find(stop_at)
    return text if cut < 0 else text[:cut]


def segment_text(text: str, rule: Optional[EpisodeRule] = None) -> List[int]:
    """Character offsets (sorted, > 0) where episodes after the first start in `text`'s thinking.

    1. keep the text before `rule.stop_at`; 2. split into paragraphs; 3. walk them: a trigger
    paragraph at index i >= prev + min_gap becomes a boundary (prev starts at 0, the first
    paragraph), up to `max_episodes`; 4. keep every `group_size`-th boundary (meta-steps).
    """
    rule = rule or EpisodeRule()
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(rule, EpisodeRule):
        raise TypeError(f"rule must be an EpisodeRule, got {type(rule).__name__}")
    paragraphs = _paragraph_starts(thinking_text(text, rule.stop_at), rule)
    bounds = []
    prev = 0
    for i, (offset, is_trigger) in enumerate(paragraphs):
        if rule.max_episodes is not None and len(bounds) >= rule.max_episodes:
            break
        if is_trigger and i - prev >= rule.min_gap:
            bounds.append(offset)
            prev = i
    # Meta-step k (0-based) covers episodes [k*g, (k+1)*g): it opens at boundary number k*g
    # (boundary number j opens episode j, and episode 0 has no boundary).
    g = rule.group_size
    return [b for j, b in enumerate(bounds, start=1) if j % g == 0]


# ---- token level ----

def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)


def _decoder(tokenizer, ids: List[int]) -> Tuple[Callable[[List[int]], str], str]:
    """A decode function for many small windows, and the full text. A fast tokenizer's Rust
    backend decodes without transformers' per-call Python overhead (10x fewer microseconds); it is
    used only if it reproduces `tokenizer.decode` on the whole completion."""
    text = _decode(tokenizer, ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        def fast(window: List[int]) -> str:
            return backend.decode(window, skip_special_tokens=False)
        try:
            if fast(ids) == text:
                return fast, text
        except Exception:  # noqa: BLE001 - any backend quirk: use the public decode instead
            pass
    return (lambda window: _decode(tokenizer, window)), text


def token_offsets(token_ids: Sequence[int], tokenizer) -> Tuple[List[int], str]:
    """End character offset of every token in the decoded text, and that text.

    Token k spans `text[ends[k-1]:ends[k]]` (ends[-1] taken as 0). Fast path: per-token decodes
    that concatenate to the full decode. Otherwise (SentencePiece leading spaces, multi-byte
    characters split over byte tokens) incremental detokenisation as vLLM does it: a token's text
    is what decoding it after the previous emission's tokens adds; a token that leaves an
    incomplete character adds nothing until the token that completes it.
    """
    ids = [int(i) for i in token_ids]
    decode, text = _decoder(tokenizer, ids)
    pieces = [decode([i]) for i in ids]
    if "".join(pieces) == text and not any("\ufffd" in p for p in pieces):
        ends, total = [], 0
        for p in pieces:
            total += len(p)
            ends.append(total)
        return ends, text
    ends = []
    emitted = 0
    prefix_offset = read_offset = 0
    prefix_len = 0  # len(decode(ids[prefix_offset:read_offset]))
    for k in range(len(ids)):
        new_len = len(new_text := decode(ids[prefix_offset:k + 1]))
        if new_len > prefix_len and not new_text.endswith("\ufffd"):
            emitted += new_len - prefix_len
            # the tokens of the last emission stay as left context (leading-space rules)
            prefix_offset, read_offset = read_offset, k + 1
            prefix_len = len(decode(ids[prefix_offset:read_offset]))
        ends.append(emitted)
    if emitted != len(text):
        # A tokenizer whose decoding is not left-to-right additive; fall back to exact prefixes.
        ends = [len(decode(ids[:k + 1])) for k in range(len(ids))]
    return ends, text


def _token_at(ends: List[int], char: int) -> int:
    """Index of the token holding character `char`; back over zero-width tokens before it, so a
    cut never splits the bytes of one character."""
    k = bisect.bisect_right(ends, char)
    while k > 0 and ends[k - 1] == (ends[k - 2] if k >= 2 else 0):
        k -= 1
    return k


def think_length(token_ids: Sequence[int], tokenizer, stop_at: Optional[str] = "</think>") -> int:
    """Tokens before the stop text: index of the token holding its first character (all tokens
    when it is absent or `stop_at` is None)."""
    ends, text = token_offsets(token_ids, tokenizer)
    if stop_at is None:
        return len(ends)
    cut = text.find(stop_at)
    return len(ends) if cut < 0 else _token_at(ends, cut)


def segment(token_ids: Sequence[int], tokenizer, rule: Optional[EpisodeRule] = None) -> List[int]:
    """Token positions (sorted, 0 < pos <= think_length) where the generated completion's episodes
    after the first start: the token holding each boundary paragraph's first character."""
    rule = rule or EpisodeRule()
    if not isinstance(rule, EpisodeRule):
        raise TypeError(f"rule must be an EpisodeRule, got {type(rule).__name__}")
    ends, text = token_offsets(token_ids, tokenizer)
    out: List[int] = []
    for char in segment_text(text, rule):
        pos = _token_at(ends, char)
        if pos > 0 and (not out or pos > out[-1]):
            out.append(pos)
    return out


def episode_ids(num_tokens: int, boundaries: Sequence[int]) -> List[int]:
    """Per-token episode index: 0 before the first boundary, 1 from it to the next, ..."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    try:
        b = [operator.index(x) for x in boundaries]  # ints, numpy ints; not floats or bools
    except TypeError as e:
        raise TypeError(f"boundaries must be ints, got {list(boundaries)!r}") from e
    if any(isinstance(x, bool) for x in boundaries):
        raise TypeError(f"boundaries must be ints, got {list(boundaries)!r}")
    if any(x < 0 or x > num_tokens for x in b) or any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"boundaries must be strictly increasing positions in [0, {num_tokens}], "
                         f"got {b!r}")
    return [bisect.bisect_right(b, t) for t in range(num_tokens)]
