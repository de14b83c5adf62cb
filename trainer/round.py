"""RoundData: one generation round laid out for the optimizer, and the micro-step loop over it.

A round holds the tensors every optimizer pass over it needs: padded ids, per-token advantages,
old / reference / engine logprobs, the loss mask and (dapo) the global active-token count. It is
built once per round and reused `num_iterations` times; a checkpoint taken mid-round stores it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from mrt_engine.trainer.losses import policy_loss
from mrt_engine.trainer.rollout import TensorBatch, completion_logps


@dataclass
class RoundData:
    tb: TensorBatch
    advantages: torch.Tensor          # [B, T]
    loss_mask: torch.Tensor           # [B, T] completion mask, minus truncated rows when masked
    old_logps: torch.Tensor           # [B, T]
    ref_logps: Optional[torch.Tensor]  # [B, T] (beta > 0)
    num_items: float                  # active loss tokens of the global batch (all ranks)
    metrics: dict = field(default_factory=dict)   # round-level metrics, logged with every step

    def state_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "tb"}
        d["tb"] = dict(vars(self.tb))
        return d

    def to(self, device) -> "RoundData":
        tb = TensorBatch(**{k: v.to(device) for k, v in vars(self.tb).items()})
        ref = self.ref_logps.to(device) if self.ref_logps is not None else None
        return RoundData(tb, self.advantages.to(device), self.loss_mask.to(device),
                         self.old_logps.to(device), ref, self.num_items, self.metrics)

    @classmethod
    def from_state_dict(cls, d: dict) -> "RoundData":
        d = dict(d)
        d["tb"] = TensorBatch(**d["tb"])
        return cls(**d)


def micro_batches(tb: TensorBatch, accumulation_steps: int) -> list[torch.Tensor]:
    """Row indices of the `accumulation_steps` equal micro-batches of a round, rows sorted by
    length (longest first) so each micro-batch is padded only to rows of similar length. Which
    rows share a micro-batch does not change the accumulated gradient (every loss type's
    normaliser is per row or global, micro-batches being equal in size), only the padding work."""
    n = len(tb)
    if n % accumulation_steps:
        raise ValueError(f"a round of {n} rows cannot be split into "
                         f"gradient_accumulation_steps={accumulation_steps} equal micro-batches")
    lengths = tb.logp_index.max(dim=1).values.cpu()
    order = torch.sort(lengths, descending=True, stable=True).indices
    return list(order.view(accumulation_steps, -1).to(tb.input_ids.device))


@torch.no_grad()
def forward_logps(model, tb: TensorBatch, temperature: float, accumulation_steps: int) -> torch.Tensor:
    """[B, T] logprobs of the round under `model` (no grad), micro-batch by micro-batch."""
    out = torch.zeros_like(tb.engine_logps)
    for sl in micro_batches(tb, accumulation_steps):
        sub = tb.rows(sl)
        lp, _ = completion_logps(model, sub, temperature)
        out[sl, :lp.shape[1]] = lp
    return out


def train_pass(model, rd: RoundData, cfg, world_size: int, measure_mismatch: bool) -> dict:
    """Forward/backward over the round's micro-batches (gradients accumulate; DDP syncs on the
    last). Returns the summed loss and token-weighted stats (and the engine-vs-policy logprob
    mismatch when asked: on the first pass, the policy still has the weights that sampled)."""
    ga = cfg.gradient_accumulation_steps
    slices = micro_batches(rd.tb, ga)
    loss_sum, tok = 0.0, 0.0
    acc = {"kl": 0.0, "clip_ratio": 0.0, "clip_ratio_low": 0.0, "clip_ratio_high": 0.0, "entropy": 0.0}
    mm_sum, mm_max, mm_n = 0.0, 0.0, 0.0
    for i, sl in enumerate(slices):
        sub = rd.tb.rows(sl)
        t = sub.completion_mask.shape[1]
        sync = contextlib.nullcontext()
        if world_size > 1 and i < len(slices) - 1:
            sync = model.no_sync()   # all-reduce once, after the last micro-batch
        with sync:
            logps, logits = completion_logps(model, sub, cfg.temperature, want_logits=True)
            ref = rd.ref_logps[sl, :t] if rd.ref_logps is not None else None
            loss, st = policy_loss(
                logps, rd.old_logps[sl, :t], rd.advantages[sl, :t], rd.loss_mask[sl, :t],
                cfg.loss_type, cfg.epsilon, cfg.epsilon_high, ref_logps=ref, beta=cfg.beta,
                max_completion_length=cfg.max_completion_length,
                importance_sampling_level=cfg.importance_sampling_level, logits=logits,
                num_items_in_batch=rd.num_items if cfg.loss_type == "dapo" else None,
                num_processes=world_size, gradient_accumulation_steps=ga)
            loss.backward()
        loss_sum += float(loss.detach())
        n = float(st["num_tokens"])
        tok += n
        for k, sk in (("kl", "kl"), ("clip_ratio", "clip_ratio/region_mean"),
                      ("clip_ratio_low", "clip_ratio/low_mean"),
                      ("clip_ratio_high", "clip_ratio/high_mean"), ("entropy", "entropy")):
            acc[k] += float(st[sk]) * n
        if measure_mismatch:
            d = (logps.detach() - sub.engine_logps).abs() * sub.completion_mask
            mm_sum += float(d.sum())
            mm_max = max(mm_max, float(d.max()))
            mm_n += float(sub.completion_mask.sum())
    out = {"loss": loss_sum}
    out.update({k: v / max(tok, 1.0) for k, v in acc.items()})
    if measure_mismatch:
        out["logprob_mismatch_mean"] = mm_sum / max(mm_n, 1.0)
        out["logprob_mismatch_max"] = mm_max
    return out


def mismatch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict:
    d = (a - b).abs() * mask
    return {"logprob_mismatch_mean": float(d.sum() / mask.sum().clamp(min=1.0)),
            "logprob_mismatch_max": float(d.max()) if d.numel() else 0.0}
