"""Baseline (c): the fork phase with `transformers` generate, as a skilled user would run it.

Every fork is an independent prompt (prefix + suffix), expanded K times by `num_return_sequences`
before prefill, so HF prefills every branch's whole prefix and each decode step reads every
branch's own copy of it. What a careful user does, and this does: batch prompts, sort them by
length and group equal lengths (no padding is then needed for this workload; mixed lengths are
left-padded), keep the KV cache on, sample with temperature 1 and no truncation, force exactly A
new tokens (min_new_tokens = max_new_tokens), and split into sub-batches of at most `max_rows`
rows when memory requires.
"""
from __future__ import annotations

import time

import torch

from workload import PAD_ID


def _cache_bytes(cache) -> int | None:
    """Bytes held by a transformers KV cache object (DynamicCache in 4.x and 5.x layouts)."""
    if cache is None:
        return None
    tensors = []
    if hasattr(cache, "layers"):                      # transformers >= 4.56
        for layer in cache.layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif hasattr(cache, "key_cache"):
        tensors = list(cache.key_cache) + list(cache.value_cache)
    else:                                             # legacy tuple of (k, v) per layer
        tensors = [t for kv in cache for t in kv]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) if tensors else None


def batches(prompts: list[list[int]], branches: int, max_rows: int) -> list[list[int]]:
    """Indices of prompts per generate call: equal lengths together, at most max_rows rows."""
    if max_rows < branches:
        raise ValueError(f"hf max_rows ({max_rows}) must be >= branches K ({branches})")
    per_call = max_rows // branches
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out = []
    for length in sorted(by_len):
        idx = by_len[length]
        out += [idx[j:j + per_call] for j in range(0, len(idx), per_call)]
    return out


class HFForker:
    def __init__(self, model_dir: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    def _generate(self, rows: list[list[int]], branches: int, new_tokens: int):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):                   # left padding: the new tokens line up
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, num_return_sequences=branches, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=PAD_ID, use_cache=True,
            return_dict_in_generate=True)
        return out, width

    def fork_phase(self, prompts: list[list[int]], branches: int, new_tokens: int, seed: int,
                   max_rows: int) -> dict:
        """Run every fork prompt with K samples of exactly `new_tokens` tokens; returns timing
        and counters. Only the generate calls are timed."""
        torch.manual_seed(seed)
        plan = batches(prompts, branches, max_rows)
        wall = 0.0
        gen = prefill = prefill_padded = 0
        peak_kv = 0
        with torch.inference_mode():
            for idx in plan:
                rows = [prompts[i] for i in idx]
                t0 = time.perf_counter()
                out, width = self._generate(rows, branches, new_tokens)
                wall += time.perf_counter() - t0
                new = out.sequences.shape[1] - width
                if new != new_tokens:
                    raise RuntimeError(f"HF generated {new} tokens per row, expected {new_tokens}")
                gen += out.sequences.shape[0] * new
                prefill += branches * sum(len(r) for r in rows)
                prefill_padded += branches * len(rows) * width
                cache = getattr(out, "cache", None)           # transformers >= 5.x name
                kv = _cache_bytes(cache if cache is not None else getattr(out, "past_key_values", None))
                peak_kv = max(peak_kv, kv or 0)
                del out
        return {"wall_s": wall, "gen_tokens": gen, "prefill_tokens": prefill,
                "prefill_tokens_padded": prefill_padded, "peak_kv_bytes": peak_kv or None,
                "generate_calls": len(plan), "max_rows": max_rows}
