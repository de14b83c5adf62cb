"""Allocation and sizing of the per-layer paged KV cache [num_blocks, block_size, Hkv, Dh]."""
from __future__ import annotations

import torch


def kv_cache_bytes_per_block(model, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes one block takes over all layers, K and V together (for sizing num_blocks)."""
    dtype = dtype or model.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def allocate_kv_caches(model, num_blocks: int, block_size: int, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k_cache, v_cache) pair per layer in the model dtype.

    Zero-filled, not empty: padded gathers read never-written slots, and garbage NaNs there would
    leak through masked softmax weights of 0 (0 * NaN = NaN).
    """
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    device = model.device if device is None else torch.device(device)
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [(torch.zeros(shape, dtype=model.dtype, device=device), torch.zeros(shape, dtype=model.dtype, device=device))
            for _ in range(model.num_layers)]
