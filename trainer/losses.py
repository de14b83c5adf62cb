"""GRPO-family policy losses with TRL's exact normalisers: grpo, bnpo, dapo, dr_grpo; token or
sequence (GSPO) importance ratios; PPO clipping with separate low/high epsilons; k3 KL.

Per token (ratio rho = pi_theta / pi_old, advantage A, mask m):
    l_t = -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t) + beta * D_t
    D_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                        (k3 estimator)
GSPO (`importance_sampling_level="sequence"`): rho_t = exp(sum_t m_t (logp_t - old_t) / sum_t m_t),
one ratio per sequence, broadcast over its tokens.

How the per-token losses are reduced (exactly TRL's `GRPOTrainer._compute_loss`):
    grpo     mean over each sequence's tokens, then mean over the micro-batch's sequences, / GA
    bnpo     sum over the micro-batch's tokens / the micro-batch's token count, / GA
    dr_grpo  sum over the micro-batch's tokens / (B_micro * max_completion_length), / GA
    dapo     sum over the micro-batch's tokens / (num_items_in_batch / num_processes)
GA = `gradient_accumulation_steps`. Gradient-accumulation / data-parallel invariance:
  * grpo and dr_grpo: summing the GA micro-batch gradients (and DDP's mean over P ranks) gives the
    one-big-batch gradient exactly when every micro-batch holds the same number of sequences (TRL's
    fixed `per_device_train_batch_size`).
  * dapo: `num_items_in_batch` must be the number of active (mask = 1) completion tokens of the whole
    *global* batch the optimizer step sees: all GA micro-batches on all P ranks (sum it, then
    all-reduce it across ranks). Each rank then divides by N/P; DDP's mean over P ranks makes the
    gradient sum_global / N, identical to one big batch however the tokens are split. In one process
    with one micro-step it may be omitted (it is then the micro-batch's token count); it is required
    when GA > 1 or P > 1, since a local count would silently reweight micro-batches.
  * bnpo: by design normalises by the *local* micro-batch token count (TRL documents that it depends
    on the micro-batch size): it equals the big-batch loss only when micro-batches hold equally many
    tokens. Use dapo for exact invariance.

Stats (detached 0-dim tensors, token-weighted over active tokens so micro-batch stats combine with
`num_tokens` as weights): clip_ratio/low_mean (ratio below 1-eps_low with A<0: the clip is active),
clip_ratio/high_mean (above 1+eps_high with A>0), clip_ratio/region_mean (either), ratio_mean, kl
(k3 mean; 0 when no ref_logps are given), entropy (when logits [B, T, V] are given), num_tokens.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
IS_LEVELS = ("token", "sequence")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) from sampled tokens: e^d - d - 1, d = ref - logp."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) over the last dim, [B, T, V] -> [B, T], in fp32."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _check_inputs(logps, old_logps, advantages, mask, loss_type, epsilon, epsilon_high,
                  ref_logps, beta, max_completion_length, importance_sampling_level, logits,
                  num_items_in_batch, num_processes, gradient_accumulation_steps):
    for name, t in (("logps", logps), ("old_logps", old_logps), ("advantages", advantages),
                    ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if logps.dim() != 2:
        raise ValueError(f"logps: expected shape [B, T], got {tuple(logps.shape)}")
    if not logps.is_floating_point():
        raise TypeError(f"logps: expected a floating tensor, got {logps.dtype}")
    shape = tuple(logps.shape)
    for name, t in (("old_logps", old_logps), ("mask", mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (as logps), got {tuple(t.shape)}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"advantages: expected shape [B]={shape[:1]} or [B, T]={shape}, got "
                         f"{tuple(advantages.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level: expected one of {', '.join(IS_LEVELS)}, got "
                         f"{importance_sampling_level!r}")
    if not 0.0 <= float(epsilon) < 1.0:
        raise ValueError(f"epsilon: expected a number in [0, 1), got {epsilon!r}")
    if epsilon_high is not None and float(epsilon_high) < 0:
        raise ValueError(f"epsilon_high: expected a number >= 0 or None, got {epsilon_high!r}")
    if beta < 0:
        raise ValueError(f"beta: expected a number >= 0, got {beta!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("ref_logps: required when beta > 0 (the k3 KL needs the reference "
                         "policy's logprobs)")
    if ref_logps is not None:
        if tuple(ref_logps.shape) != shape:
            raise ValueError(f"ref_logps: expected shape {shape} (as logps), got "
                             f"{tuple(ref_logps.shape)}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(f"max_completion_length: dr_grpo needs the constant budget L >= 1, got "
                         f"{max_completion_length!r}")
    if logits is not None and (logits.dim() != 3 or tuple(logits.shape[:2]) != shape):
        raise ValueError(f"logits: expected shape [B, T, V] with [B, T]={shape}, got "
                         f"{tuple(logits.shape)}")
    if num_processes < 1:
        raise ValueError(f"num_processes: expected an int >= 1, got {num_processes!r}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps: expected an int >= 1, got "
                         f"{gradient_accumulation_steps!r}")
    if loss_type == "dapo":
        if num_items_in_batch is None and (gradient_accumulation_steps > 1 or num_processes > 1):
            raise ValueError("num_items_in_batch: dapo with gradient_accumulation_steps > 1 or "
                             "num_processes > 1 needs the active-token count of the whole global "
                             "batch (all micro-steps, all ranks)")
        if num_items_in_batch is not None and float(num_items_in_batch) <= 0:
            raise ValueError(f"num_items_in_batch: expected a count > 0, got {num_items_in_batch!r}")


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, loss_type: str, epsilon: float,
                epsilon_high: Optional[float] = None, ref_logps: Optional[torch.Tensor] = None,
                beta: float = 0.0, max_completion_length: Optional[int] = None,
                importance_sampling_level: str = "token", logits: Optional[torch.Tensor] = None,
                num_items_in_batch=None, num_processes: int = 1,
                gradient_accumulation_steps: int = 1,
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO-family loss of one micro-batch, to minimise. See the module docstring.

    logps      [B, T] current policy's logprobs of the sampled tokens (requires grad)
    old_logps  [B, T] sampling policy's logprobs (detached here)
    advantages [B] or [B, T] (per-token, e.g. MRT's per-episode advantages)
    mask       [B, T] 1 for completion tokens in the loss, 0 for padding / masked rows
    ref_logps  [B, T] reference policy's logprobs (needed when beta > 0)
    logits     [B, T, V] optional, only for the entropy stat
    num_items_in_batch  dapo: active tokens of the global batch (int or 0-dim tensor)
    """
    _check_inputs(logps, old_logps, advantages, mask, loss_type, epsilon, epsilon_high,
                  ref_logps, beta, max_completion_length, importance_sampling_level, logits,
                  num_items_in_batch, num_processes, gradient_accumulation_steps)
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    mask = mask.to(logps.dtype)
    old_logps = old_logps.detach()
    adv = advantages.detach().to(logps.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # [B, 1] or [B, T]

    # 1. importance ratio, per token or one per sequence (GSPO)
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_w = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        log_w = log_ratio
    ratio = torch.exp(log_w)  # [B, T] or [B, 1]

    # 2. clipped surrogate (pessimistic of the two), then the KL penalty
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # [B, T]
    kl = None
    if ref_logps is not None:  # also logged when beta == 0
        kl = k3_kl(logps, ref_logps.detach())
        if beta > 0:
            per_token = per_token + beta * kl

    # 3. reduction, exactly as TRL
    B = logps.shape[0]
    if loss_type == "grpo":
        seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        loss = seq.mean() / gradient_accumulation_steps
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0) / gradient_accumulation_steps
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (B * max_completion_length) / gradient_accumulation_steps
    else:  # dapo
        n = mask.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        n = torch.as_tensor(n, dtype=logps.dtype, device=logps.device)
        loss = (per_token * mask).sum() / (n / num_processes)

    # 4. stats (no grad), token-weighted over active tokens
    with torch.no_grad():
        r = ratio.expand_as(logps)
        a = adv.expand_as(logps)
        low = ((r < 1.0 - eps_low) & (a < 0)).to(logps.dtype)
        high = ((r > 1.0 + eps_high) & (a > 0)).to(logps.dtype)
        stats = {
            "clip_ratio/low_mean": _masked_mean(low, mask),
            "clip_ratio/high_mean": _masked_mean(high, mask),
            "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask),
            "ratio_mean": _masked_mean(r, mask),
            "kl": _masked_mean(kl, mask) if kl is not None else logps.new_zeros(()),
            "num_tokens": mask.sum(),
        }
        if logits is not None:
            stats["entropy"] = _masked_mean(entropy_from_logits(logits), mask.float())
        stats = {k: v.detach() for k, v in stats.items()}
    return loss, stats
