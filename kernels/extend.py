"""extend: prefill/extend attention of new tokens over a cached paged prefix, causal over themselves.

Kernel -> launcher -> public function. The step's new K/V are stored in the cache first (kv_store),
so one loop over the sequence's block table covers both the cached prefix and the new tokens;
only the tiles that reach the new tokens need the causal mask. Program (sequence, query tile,
KV head) packs (new token, GQA head) pairs of one KV head into the BLOCK_M rows of its tl.dot tile,
as paged_decode and cascade_decode do, so each K/V tile loaded serves all GROUP query heads
(one program per query head would read the sequence's K/V GROUP times).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrt_engine.kernels.paged_range import attend_paged_range
from mrt_engine.kernels.checks import (cdiv, check_cache, check_index, check_launchable, check_query,
                                       dot_rows, is_interpreted, next_pow2, output)
from mrt_engine.kernels.tuning import num_stages

LOG2E = 1.4426950408889634


@triton.jit
def extend_kernel(
    q_ptr,                      # [N, Hq, Dh]
    k_cache_ptr, v_cache_ptr,   # [num_blocks, bs, Hkv, Dh]
    o_ptr,                      # [N, Hq, Dh]
    block_tables_ptr,           # [P, Bmax] int64
    q_start_ptr, num_new_ptr, context_lens_ptr,   # [P] int64
    scale_log2,
    stride_qn, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_on, stride_oh,
    stride_btp,
    block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    m_tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    q0 = tl.load(q_start_ptr + seq)
    n_new = tl.load(num_new_ptr + seq)
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - n_new
    f = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)               # [BLOCK_M] flat (new token, head) index
    qi = f // GROUP                                              # index among the new tokens
    head = kv_head * GROUP + f % GROUP
    qmask = qi < n_new
    qpos = prefix + qi                                           # absolute position of each query
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + ((q0 + qi) * stride_qn + head * stride_qh)[:, None] + d[None, :],
                mask=qmask[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # keys up to the tile's last query token; a tile past the sequence's new tokens reads nothing
    last = (m_tile * BLOCK_M + BLOCK_M - 1) // GROUP
    hi = tl.where(m_tile * BLOCK_M < n_new * GROUP, tl.minimum(prefix + last + 1, ctx), 0)
    table = block_tables_ptr + seq * stride_btp
    m, l, acc = attend_paged_range(q, table, 0, hi, k_cache_ptr, v_cache_ptr,
                                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                   kv_head, block_size, scale_log2, d, dmask, qpos,
                                   BLOCK_M, BLOCK_D, BLOCK_N, DOT_FP32, True)
    o = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    tl.store(o_ptr + ((q0 + qi) * stride_on + head * stride_oh)[:, None] + d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


def extend_config(dtype: torch.dtype, head_dim: int, group: int, *, interpreted: bool = False) -> dict:
    """Compile-time constants of a launch (shared with the ahead-of-time compile test)."""
    block_d = max(16, next_pow2(head_dim))
    block = 32 if (dtype == torch.float32 or block_d > 128) else 64
    # BLOCK_M rows hold BLOCK_M / GROUP new tokens x GROUP heads (a power of two >= the group's rows)
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=max(block, dot_rows(group)), BLOCK_D=block_d, BLOCK_N=block,
                DOT_FP32=interpreted)


def _launch(q, k_cache, v_cache, block_tables, q_start, num_new, context_lens, scale, max_num_new, out):
    bs, hkv, dh = check_cache(k_cache, v_cache)
    group = check_query(q, k_cache)
    dev = k_cache.device
    check_index("block_tables", block_tables, 2, dev)
    p = block_tables.shape[0]
    for name, t in (("q_start", q_start), ("num_new", num_new), ("context_lens", context_lens)):
        check_index(name, t, 1, dev)
        if t.shape[0] != p:
            raise ValueError(f"{name} must have P={p} entries (one per block table row), got {t.shape[0]}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along its last dim")
    out = output(out, tuple(q.shape), q.dtype, dev)
    if max_num_new is None:
        max_num_new = int(num_new.max()) if p else 0   # one host sync; the engine passes it
    if p == 0 or max_num_new == 0:
        return out
    cfg = extend_config(q.dtype, dh, group, interpreted=is_interpreted(extend_kernel))
    check_launchable(extend_kernel, q, k_cache)
    extend_kernel[(p, cdiv(max_num_new * group, cfg["BLOCK_M"]), hkv)](
        q, k_cache, v_cache, out, block_tables, q_start, num_new, context_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        bs, **cfg, num_warps=4, num_stages=num_stages(),
    )
    return out


def extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           q_start: torch.Tensor, num_new: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
           max_num_new: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of new tokens q [N, Hq, Dh] (sequence p's at rows q_start[p] .. + num_new[p]) over
    tokens [0, context_lens[p]) of block_tables [P, Bmax], causal: new token i sits at position
    context_lens[p] - num_new[p] + i. The new K/V must already be in the cache. Returns o [N, Hq, Dh]
    in q's dtype; rows outside every sequence are left as they were in `out`.
    """
    return _launch(q, k_cache, v_cache, block_tables, q_start, num_new, context_lens, scale, max_num_new, out)
