"""What `LLM.generate` returns (vLLM's names): one RequestOutput per prompt, n CompletionOutputs each."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """vLLM's per-token logprob entry (`SamplingParams(logprobs=k)` with a count k): `rank` is the
    token's 1-based rank by logit in its row, `decoded_token` its text alone (None without a
    tokenizer)."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int                          # sample index within the request, 0..n-1
    text: str                           # generated text (cut before a matched stop string)
    token_ids: list[int]                # generated tokens (a matched stop/eos token included)
    # log_softmax(logits / T) of each sampled token (T=1 if greedy): floats, or with a count
    # `SamplingParams(logprobs=k)` vLLM's {token id: Logprob} per token, the sampled id first
    logprobs: list[float] | list[dict[int, Logprob]] | None
    finish_reason: str | None           # "stop" | "length"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    handle: object | None = None        # SequenceHandle with keep=True: pins prompt + generated KV

    @property
    def cumulative_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return float(sum(lp if isinstance(lp, float) else next(iter(lp.values())).logprob for lp in self.logprobs))

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None                  # the text prompt (None for token-id prompts and forks)
    prompt_token_ids: list[int]         # for a fork: the parent's first `at` tokens + the suffix
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0          # prompt tokens whose KV was reused (prefix cache or fork)
    # with SamplingParams(prompt_logprobs=k), vLLM's: None for the first prompt token, then per token
    # {prompt token: Logprob, then the k most likely ids: Logprob} (log_softmax of the raw logits)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
