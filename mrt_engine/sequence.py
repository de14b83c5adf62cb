"""Generation state of one request and its sequences, handles that pin KV, and the Fork prompt.

No torch here. A sequence's `token_ids` are prompt + generated tokens; `num_computed` of them have
KV in the cache. The last sampled token has none until it is fed back, so a decoding sequence has
exactly one uncomputed token and a prefilling one has more.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class SequenceHandle:
    """Returned as `CompletionOutput.handle` with keep=True: pins the sequence's KV (prompt and
    generated tokens) until `LLM.release(handle)`. Fork from it with `Fork(handle, at=t)`."""

    __slots__ = ("seq_id", "token_ids", "num_prompt_tokens", "version", "released", "_owner")

    def __init__(self, seq_id, token_ids, num_prompt_tokens, version, owner):
        self.seq_id = seq_id
        self.token_ids = tuple(token_ids)
        self.num_prompt_tokens = num_prompt_tokens
        self.version = version
        self.released = False
        self._owner = owner   # id() of the LLM that holds the KV, to refuse foreign handles

    def __len__(self):
        return len(self.token_ids)

    def __repr__(self):
        state = "released" if self.released else "live"
        return f"SequenceHandle(seq_id={self.seq_id}, len={len(self.token_ids)}, {state})"


@dataclass(frozen=True)
class Fork:
    """A prompt made of the first `at` tokens (prompt + generated) of a kept sequence, then an
    optional suffix (token ids or text). Only the suffix (plus one re-fed token) is prefilled."""
    handle: SequenceHandle
    at: int
    suffix: str | list[int] | None = None


class Status(enum.Enum):
    WAITING = 0     # not in the KV cache (new, or preempted: everything is recomputed)
    RUNNING = 1
    FINISHED = 2


class Request:
    """One prompt of a generate call; its n samples are sequences sharing the prompt's KV."""

    __slots__ = ("index", "prompt", "prompt_token_ids", "params", "seed", "keep", "fork_source",
                 "fork_at", "seqs", "num_finished", "num_cached_tokens", "stop_checker", "prompt_logprobs")

    def __init__(self, index, prompt, prompt_token_ids, params, seed, keep, fork_source=None, fork_at=0):
        self.index = index
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.keep = keep
        self.fork_source = fork_source   # seq id of a kept handle whose first fork_at tokens are ours
        self.fork_at = fork_at
        self.seqs = [None] * params.n
        self.num_finished = 0
        self.num_cached_tokens = 0
        # with SamplingParams.prompt_logprobs: per prompt position (logprob, rank, [(id, logprob,
        # rank)] of the k most likely ids) of that token given the ones before, filled by the runner
        # from sample 0's prefill (position 0 stays None, and so does a Fork's reused prefix)
        self.prompt_logprobs = None if params.prompt_logprobs is None else [None] * len(self.prompt_token_ids)

    @property
    def computes_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.seqs)


class Sequence:
    __slots__ = ("seq_id", "request", "sample_index", "token_ids", "num_prompt_tokens", "num_computed",
                 "status", "logprobs", "finish_reason", "stop_reason", "spawn", "detok")

    def __init__(self, seq_id, request, sample_index, token_ids, spawn=1):
        self.seq_id = seq_id
        self.request = request
        self.sample_index = sample_index
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed = 0
        self.status = Status.WAITING
        self.logprobs = []
        self.finish_reason = None
        self.stop_reason = None
        self.spawn = spawn     # samples to draw from the logits at the prompt end (n for a leader)
        self.detok = None      # IncrementalDetokenizer, only when stop strings are set

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def __repr__(self):
        return (f"Sequence(id={self.seq_id}, req={self.request.index}.{self.sample_index}, "
                f"len={len(self.token_ids)}, computed={self.num_computed}, {self.status.name})")


class IncrementalDetokenizer:
    """Decodes output tokens a few at a time to find stop strings without re-decoding the whole
    output each step: keep a short window of already-emitted tokens as left context, because a
    token's text can depend on its neighbours (leading spaces, multi-byte characters)."""

    __slots__ = ("tok", "ids", "prefix_offset", "read_offset", "text")

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text it completes ('' while a character is partial)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += new
            return new
        return ""


class StopChecker:
    """Decides after each sampled token whether a sequence is done and why (vLLM semantics: a stop
    string ends generation and is cut from the text; stop/eos token ids stay in token_ids)."""

    def __init__(self, tokenizer, eos_token_ids, max_model_len):
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def __call__(self, seq: Sequence, token: int) -> bool:
        p = seq.request.params
        if not p.ignore_eos and token in self.eos:
            seq.finish_reason, seq.stop_reason = "stop", None
            return True
        if token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return True
        if p.stop and self.tokenizer is not None:
            if seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.tokenizer)
                for t in seq.output_token_ids[:-1]:     # recompute after preemption re-creates it
                    seq.detok.add(t)
            new = seq.detok.add(token)
            if new:
                text = seq.detok.text
                window = text[max(0, len(text) - len(new) - max(len(s) for s in p.stop) + 1):]
                for s in p.stop:
                    if s in window:
                        seq.finish_reason, seq.stop_reason = "stop", s
                        return True
        if (p.max_tokens is not None and seq.num_output >= p.max_tokens) or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False


def final_text(tokenizer, seq: Sequence) -> str:
    """Text of the generated tokens; cut at (or, with include_stop_str_in_output, after) the stop
    string that ended the sequence; "" without a tokenizer or with detokenize=False."""
    params = seq.request.params
    if tokenizer is None or not params.detokenize:
        return ""
    text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=params.skip_special_tokens)
    if isinstance(seq.stop_reason, str):
        cut = text.find(seq.stop_reason)
        if cut >= 0:
            text = text[:cut + (len(seq.stop_reason) if params.include_stop_str_in_output else 0)]
    return text
