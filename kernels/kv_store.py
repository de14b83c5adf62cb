"""kv_store: write a step's new K/V rows into the paged caches at their slots.

Kernel -> launcher -> public function. One program per new token copies its [Hkv, Dh] K and V rows
to cache[slot // bs, slot % bs]; slot < 0 marks a padding token and is skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrt_engine.kernels.checks import (FLOAT_DTYPES, check_cache, check_index, check_inner_contiguous,
                                       check_launchable, check_tensor, next_pow2)


@triton.jit
def kv_store_kernel(
    k_ptr, v_ptr,               # [N, Hkv, Dh]
    k_cache_ptr, v_cache_ptr,   # [num_blocks, bs, Hkv, Dh]
    slot_ptr,                   # [N] int64
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    block_size,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + n)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # a padding token (slot < 0) masks every head; (block < scalar) because the interpreter
    # mis-types (block bool) & (scalar bool)
    num_heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)
    mask = (h[:, None] < num_heads) & (d[None, :] < HEAD_DIM)
    blk = slot // block_size
    off = slot % block_size
    k = tl.load(k_ptr + n * stride_kn + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + n * stride_vn + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + blk * stride_kcb + off * stride_kct + h[:, None] * stride_kch + d[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vct + h[:, None] * stride_vch + d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def kv_store_config(num_kv_heads: int, head_dim: int) -> dict:
    """Compile-time constants of a launch (shared with the ahead-of-time compile test)."""
    return dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=next_pow2(num_kv_heads),
                BLOCK_D=next_pow2(head_dim))


def _launch(k, v, k_cache, v_cache, slot_mapping):
    bs, hkv, dh = check_cache(k_cache, v_cache)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, 3, FLOAT_DTYPES, k_cache.device)
        check_inner_contiguous(name, t)
        if tuple(t.shape[1:]) != (hkv, dh):
            raise ValueError(f"{name} must be [N, {hkv}, {dh}] to match the cache, got {tuple(t.shape)}")
    n = k.shape[0]
    if v.shape[0] != n:
        raise ValueError(f"k and v disagree on N: {k.shape[0]} vs {v.shape[0]}")
    check_index("slot_mapping", slot_mapping, 1, k_cache.device)
    if slot_mapping.shape[0] != n:
        raise ValueError(f"slot_mapping must have N={n} entries, got {slot_mapping.shape[0]}")
    if n == 0:
        return
    check_launchable(kv_store_kernel, k, k_cache)
    kv_store_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bs, **kv_store_config(hkv, dh), num_warps=1,
    )


def kv_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [N, Hkv, Dh] at flat slots [N] int64 (block * bs + offset); slot < 0 skips."""
    _launch(k, v, k_cache, v_cache, slot_mapping)
