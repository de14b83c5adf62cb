"""Rollouts: sample G completions per prompt from the in-process engine, then lay them out as tensors.

    batch = generate_rollouts(llm, prompt_ids, problems, cfg, seed)   # handles kept (keep=True)
    ...   # a reward mode turns the batch into per-token advantages (forks need the handles)
    batch.release(llm)                                                  # every kept handle, once
    tb = batch.to_tensors(pad_id)                                       # [B, L] ids, [B, T] masks

Row b of a batch is completion `b % G` of prompt `b // G`, so a group is G consecutive rows and
lives on one rank. Generation is seeded per call (`seed`), so a round is a pure function of the
weights, the prompts and the seed: what exact resume and identical DDP ranks rely on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch


@dataclass
class RolloutBatch:
    """B = num_prompts * G completions, row-major by prompt."""

    num_generations: int
    prompt_ids: List[List[int]]          # [B] prompt token ids (after left truncation)
    completion_ids: List[List[int]]      # [B] sampled token ids (EOS included when it stopped)
    engine_logps: List[List[float]]      # [B] engine log_softmax(logits / T) of each sampled token
    texts: List[str]
    finish_reasons: List[str]            # "stop" | "length"
    problems: List[Any]                  # [B] the problem of each row (repeated G times)
    handles: List[Any] = field(default_factory=list)   # [B] kept engine handles (keep=True)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_groups(self) -> int:
        return len(self) // self.num_generations

    @property
    def truncated(self) -> List[bool]:
        """A completion that hit max_completion_length without an end token."""
        return [r == "length" for r in self.finish_reasons]

    def release(self, llm) -> None:
        """Unpin every kept handle's KV (each one once)."""
        for h in self.handles:
            if h is not None and not h.released:
                llm.release(h)
        self.handles = []

    def to_tensors(self, pad_id: int, device="cpu") -> "TensorBatch":
        return TensorBatch.build(self.prompt_ids, self.completion_ids, self.engine_logps, pad_id, device)


def generate_rollouts(llm, prompt_ids: Sequence[Sequence[int]], problems: Sequence[Any], *,
                      num_generations: int, max_completion_length: int, temperature: float,
                      top_p: float, seed: int, max_prompt_length: Optional[int] = None,
                      keep: bool = True) -> RolloutBatch:
    """G seeded completions of every prompt (token ids), with the engine's sampling logprobs."""
    from mrt_engine import SamplingParams

    if len(prompt_ids) != len(problems):
        raise ValueError(f"got {len(prompt_ids)} prompts for {len(problems)} problems")
    prompts = [list(p) for p in prompt_ids]
    if max_prompt_length is not None:
        # left truncation keeps the end of the prompt, where the task's question and <think> are
        prompts = [p[-max_prompt_length:] for p in prompts]
    params = SamplingParams(n=num_generations, temperature=temperature, top_p=top_p,
                            max_tokens=max_completion_length, seed=seed, logprobs=True)
    outs = llm.generate(prompts, params, keep=keep) if prompts else []
    b = RolloutBatch(num_generations, [], [], [], [], [], [], [])
    for out, prob in zip(outs, problems):
        assert len(out.outputs) == num_generations
        for c in out.outputs:
            b.prompt_ids.append(list(out.prompt_token_ids))
            b.completion_ids.append(list(c.token_ids))
            b.engine_logps.append(list(c.logprobs))
            b.texts.append(c.text)
            b.finish_reasons.append(c.finish_reason)
            b.problems.append(prob)
            b.handles.append(c.handle)
    return b


@dataclass
class TensorBatch:
    """Right-padded prompt+completion rows and the completion-token views of them.

    input_ids [B, L]; logp_index [B, T]: position in the row whose logits predict completion
    token t (prompt_len - 1 + t); completion_ids, completion_mask, engine_logps [B, T]."""

    input_ids: torch.Tensor
    logp_index: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    engine_logps: torch.Tensor

    @classmethod
    def build(cls, prompt_ids, completion_ids, engine_logps, pad_id: int, device="cpu") -> "TensorBatch":
        bsz = len(prompt_ids)
        if bsz == 0:
            raise ValueError("empty batch")
        t_max = max(1, max(len(c) for c in completion_ids))
        l_max = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
        ids = torch.full((bsz, l_max), pad_id, dtype=torch.long)
        index = torch.zeros((bsz, t_max), dtype=torch.long)
        comp = torch.full((bsz, t_max), pad_id, dtype=torch.long)
        mask = torch.zeros((bsz, t_max), dtype=torch.float32)
        elp = torch.zeros((bsz, t_max), dtype=torch.float32)
        for b, (p, c, lp) in enumerate(zip(prompt_ids, completion_ids, engine_logps)):
            n = len(c)
            ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
            if n:
                ids[b, len(p):len(p) + n] = torch.tensor(c, dtype=torch.long)
                comp[b, :n] = torch.tensor(c, dtype=torch.long)
                mask[b, :n] = 1.0
                elp[b, :n] = torch.tensor(lp, dtype=torch.float32)
            # pads point at the last real position: harmless (masked) and always in range
            index[b] = (len(p) - 1 + torch.arange(t_max)).clamp(max=len(p) + max(n, 1) - 2)
        to = dict(device=device)
        return cls(ids.to(**to), index.to(**to), comp.to(**to), mask.to(**to), elp.to(**to))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, sl) -> "TensorBatch":
        """A micro-batch (a slice or a tensor of row indices), trimmed to its own longest row."""
        mask = self.completion_mask[sl]
        t = max(1, int(mask.sum(1).max().item())) if mask.numel() else 1
        ids = self.input_ids[sl]
        l_need = int((self.logp_index[sl, :t].max().item())) + 2
        return TensorBatch(ids[:, :min(ids.shape[1], l_need)], self.logp_index[sl, :t],
                           self.completion_ids[sl, :t], mask[:, :t], self.engine_logps[sl, :t])


def completion_logps(model, tb: TensorBatch, temperature: float, want_logits: bool = False):
    """Per-token log-probs [B, T] of the completion tokens under `model`, at `temperature`
    (log_softmax(logits / T), the quantity the engine samples with and returns), and the
    temperature-scaled completion logits [B, T, V] when asked (for the entropy metric).

    Rows are right-padded and attention is causal, so pads never influence real positions: no
    attention mask is needed and position ids are the default arange."""
    logits = model(input_ids=tb.input_ids, use_cache=False).logits      # [B, L, V]
    idx = tb.logp_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    logits = torch.gather(logits, 1, idx).float() / temperature          # [B, T, V]
    logps = torch.log_softmax(logits, dim=-1)
    out = torch.gather(logps, 2, tb.completion_ids.unsqueeze(-1)).squeeze(-1)   # [B, T]
    return (out, logits) if want_logits else (out, None)
