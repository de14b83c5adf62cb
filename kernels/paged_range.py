"""Shared device code of the attention kernels: online softmax of a tile of query rows over one
token range of a paged KV cache, and the normalisation of its fp32 partial.

`paged_decode` (one row's GQA heads), `cascade_decode` (every row of a sharing group) and `extend`
(a tile of new tokens, causal) differ only in which query rows form the tile and where the result
goes; the walk through the block table is this one function, so all of them round and accumulate
identically (deterministic mode relies on it).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_paged_range(
    q,                          # [ROWS, BLOCK_D] query tile (fp32 when DOT_FP32)
    table,                      # pointer to the block table to walk (int64 block ids)
    lo, hi,                     # token range [lo, hi)
    k_cache_ptr, v_cache_ptr,   # [num_blocks, bs, Hkv, Dh]
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    kv_head, block_size, scale_log2,
    d, dmask,                   # [BLOCK_D] head-dim offsets and their mask
    qpos,                       # [ROWS] absolute query positions; read only when CAUSAL
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.full([ROWS], 0.0, tl.float32)
    acc = tl.full([ROWS, BLOCK_D], 0.0, tl.float32)
    # block ids one tile ahead: the K/V addresses of a tile never wait on a load issued in the same
    # iteration, so the pipeliner (num_stages) can put the K/V loads of later tiles in flight
    first = lo + tl.arange(0, BLOCK_N)
    blk = tl.load(table + first // block_size, mask=first < hi, other=0)
    for t0 in range(lo, hi, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)
        tmask = tok < hi
        off = tok % block_size
        kmask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + (blk * stride_kb + off * stride_kt + kv_head * stride_kh)[:, None] + d[None, :],
                    mask=kmask, other=0.0)                      # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + (blk * stride_vb + off * stride_vt + kv_head * stride_vh)[:, None] + d[None, :],
                    mask=kmask, other=0.0)
        nxt = tok + BLOCK_N
        blk = tl.load(table + nxt // block_size, mask=nxt < hi, other=0)   # next tile's block ids
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2   # [ROWS, BLOCK_N]
        if CAUSAL:
            s = tl.where(tmask[None, :] & (tok[None, :] <= qpos[:, None]), s, float("-inf"))
        else:
            s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a causal row with no key yet stays empty
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        p_lo = p.to(v.dtype)                                    # FlashAttention's rounding of P
        if DOT_FP32:
            pv = tl.dot(p_lo.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_lo, v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m = m_new
    return m, l, acc


@triton.jit
def finish_partial(m, l, acc):
    """(o, lse): o normalised by its own softmax sum, lse in natural log; empty rows give 0, -inf."""
    nonempty = l > 0.0
    o = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, (m + tl.log2(tl.where(nonempty, l, 1.0))) * 0.6931471805599453, float("-inf"))
    return o, lse
