"""paged_decode: one query token per row over a token range of its paged KV, split-K.

Kernel -> launcher -> public function. Program (row, kv_head, split) packs the GQA query heads of
one KV head into the rows of a tl.dot tile (padded to 16, the MMA minimum), walks the split's
tokens BLOCK_N at a time through the block table with an online softmax, and writes an fp32
partial: o normalised by its own softmax sum, and lse (natural log). Empty splits write o = 0,
lse = -inf, so `merge` can combine any number of them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrt_engine.kernels.paged_range import attend_paged_range, finish_partial
from mrt_engine.kernels.checks import (cdiv, check_cache, check_index, check_launchable, check_partials,
                                       check_query, dot_rows, is_interpreted, next_pow2)
from mrt_engine.kernels.tuning import num_stages, target_programs

LOG2E = 1.4426950408889634
# Splits aim at tuning.target_programs() programs (4 per SM by default) and never go below MIN_SPLIT tokens.
MIN_SPLIT = 256


@triton.jit
def paged_decode_kernel(
    q_ptr,                      # [D, Hq, Dh]
    k_cache_ptr, v_cache_ptr,   # [num_blocks, bs, Hkv, Dh]
    block_tables_ptr,           # [D, Bmax] int64
    kv_start_ptr, kv_end_ptr,   # [D] int64 token range per row
    o_ptr,                      # [D, Hq, S, Dh] fp32
    lse_ptr,                    # [D, Hq, S] fp32
    scale_log2,                 # softmax scale * log2(e)
    split_size,                 # tokens per split (multiples of BLOCK_N load best)
    stride_qr, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btr,
    stride_or, stride_oh, stride_os,
    stride_lr, stride_lh, stride_ls,
    block_size,
    GROUP: tl.constexpr,        # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,     # interpreter only: its tl.dot cannot take bf16
):
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    start = tl.load(kv_start_ptr + row)
    end = tl.load(kv_end_ptr + row)
    lo = start + split * split_size
    hi = tl.minimum(lo + split_size, end)

    i = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + i                                  # [BLOCK_H]
    d = tl.arange(0, BLOCK_D)
    hmask = i < GROUP
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qr + head[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)

    table = block_tables_ptr + row * stride_btr
    m, l, acc = attend_paged_range(q, table, lo, hi, k_cache_ptr, v_cache_ptr,
                                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                   kv_head, block_size, scale_log2, d, dmask, lo,
                                   BLOCK_H, BLOCK_D, BLOCK_N, DOT_FP32, False)
    o, lse = finish_partial(m, l, acc)
    tl.store(o_ptr + row * stride_or + head[:, None] * stride_oh + split * stride_os + d[None, :], o,
             mask=hmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + row * stride_lr + head * stride_lh + split * stride_ls, lse, mask=hmask)


def paged_decode_config(dtype: torch.dtype, head_dim: int, group: int, *, interpreted: bool = False) -> dict:
    """Compile-time constants of a launch (shared with the ahead-of-time compile test)."""
    block_n = 32 if dtype == torch.float32 else 64
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_H=dot_rows(group),
                BLOCK_D=max(16, next_pow2(head_dim)), BLOCK_N=block_n, DOT_FP32=interpreted)


def choose_split_size(max_span: int, parallel: int, block_n: int, programs: int | None = None) -> int:
    """Split size (a multiple of block_n) giving about `programs` (default: tuning.target_programs())
    programs over `parallel` ones."""
    programs = target_programs() if programs is None else programs
    splits = max(1, min(cdiv(programs, max(parallel, 1)), cdiv(max_span, MIN_SPLIT)))
    return max(block_n, cdiv(cdiv(max(max_span, 1), splits), block_n) * block_n)


def _launch(q, k_cache, v_cache, block_tables, kv_start, context_lens, scale, split_size, num_splits, out):
    bs, hkv, dh = check_cache(k_cache, v_cache)
    group = check_query(q, k_cache)
    d, hq = q.shape[0], q.shape[1]
    dev = k_cache.device
    check_index("block_tables", block_tables, 2, dev)
    check_index("kv_start", kv_start, 1, dev)
    check_index("context_lens", context_lens, 1, dev)
    if block_tables.shape[0] != d or kv_start.shape[0] != d or context_lens.shape[0] != d:
        raise ValueError(f"block_tables {tuple(block_tables.shape)}, kv_start {tuple(kv_start.shape)} and "
                         f"context_lens {tuple(context_lens.shape)} must all have D={d} rows")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along its last dim")
    cfg = paged_decode_config(q.dtype, dh, group, interpreted=is_interpreted(paged_decode_kernel))
    max_span = None
    if split_size is None or num_splits is None:
        max_span = int((context_lens - kv_start).clamp(min=0).max()) if d else 0  # one host sync
    if split_size is None:
        split_size = choose_split_size(max_span, d * hkv, cfg["BLOCK_N"], target_programs(dev))
    if split_size <= 0:
        raise ValueError(f"split_size must be positive, got {split_size}")
    if num_splits is None:
        num_splits = max(1, cdiv(max_span, split_size))
    if out is None:
        out = (torch.empty(d, hq, num_splits, dh, dtype=torch.float32, device=dev),
               torch.empty(d, hq, num_splits, dtype=torch.float32, device=dev))
    check_partials(out, d, hq, num_splits, dh, dev)
    o, lse = out
    if d == 0 or num_splits == 0:
        return out
    check_launchable(paged_decode_kernel, q, k_cache)
    paged_decode_kernel[(d, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, kv_start, context_lens, o, lse,
        scale * LOG2E, split_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        bs, **cfg, num_warps=4, num_stages=num_stages(),
    )
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 kv_start: torch.Tensor, context_lens: torch.Tensor, scale: float, *, split_size: int | None = None,
                 num_splits: int | None = None, out=None):
    """Split-K paged decode: q [D, Hq, Dh] over tokens [kv_start, context_lens) of block_tables [D, Bmax].

    Split s of row r covers [kv_start[r] + s*split_size, ... + split_size) clipped to context_lens[r];
    all D x S splits are written. `split_size` (None picks one
    for occupancy) fixed across calls makes results batch-invariant. `out` may be views into a
    larger partial buffer. Returns (o [D, Hq, S, Dh] fp32, lse [D, Hq, S] fp32).
    """
    return _launch(q, k_cache, v_cache, block_tables, kv_start, context_lens, scale, split_size, num_splits, out)
