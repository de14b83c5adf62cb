"""cascade_decode: decode rows that share a token range read that range once per group.

Kernel -> launcher -> public function. Groups come in CSR form (group_ptr, group_rows), each with
a token range [range_start, range_end) of the block table of its first row. The engine passes
either its sharing groups ([0, num_shared * bs)) or the segments of a prefix tree: groups forked
from one trace at several boundaries share the trace's trunk, and each tree segment (a run of
blocks with every row below it) is one group here, so the trunk is read once per step. Program
(group, kv_head x query tile, chunk) packs (query row, GQA head) pairs of the group into the rows
of one tl.dot tile, so each K/V tile loaded serves every branch at once (Hydragen / FlashInfer
cascade); long ranges split into equal chunks so one big group still spreads over the SMs.
Each chunk with tokens writes an fp32 partial (o, lse) per row into slot slot_base[g] + chunk;
chunks without tokens write nothing (callers pre-set lse = -inf), so a row can collect partials
from several groups (its tree segments) in disjoint slots. `merge` combines them.
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
MAX_TILE_ROWS = 64          # query rows (row x head pairs) per program; more rows -> more query tiles
MIN_CHUNK = 256


@triton.jit
def cascade_decode_kernel(
    q_ptr,                      # [D, Hq, Dh]
    k_cache_ptr, v_cache_ptr,   # [num_blocks, bs, Hkv, Dh]
    block_tables_ptr,           # [D, Bmax] int64
    group_ptr_ptr,              # [G + 1] int64
    group_rows_ptr,             # [>= group_ptr[G]] int64
    range_start_ptr, range_end_ptr,  # [G] int64 token range per group
    slot_base_ptr,              # [G] int64 first partial slot of each group
    o_ptr,                      # [D, Hq, C, Dh] fp32
    lse_ptr,                    # [D, Hq, C] fp32
    scale_log2,
    chunk_size,                 # tokens per chunk (multiples of BLOCK_N load best)
    num_q_tiles,                # query tiles per KV head (grid axis 1 = Hkv * num_q_tiles)
    stride_qr, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btr,
    stride_or, stride_oh, stride_os,
    stride_lr, stride_lh, stride_ls,
    block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ABSOLUTE: tl.constexpr,     # chunk c is tokens [c*chunk, (c+1)*chunk) rather than relative to the start
    DOT_FP32: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // num_q_tiles
    q_tile = tl.program_id(1) % num_q_tiles
    chunk = tl.program_id(2)

    p0 = tl.load(group_ptr_ptr + g)
    n_rows = tl.load(group_ptr_ptr + g + 1) - p0
    start = tl.load(range_start_ptr + g)
    end = tl.load(range_end_ptr + g)
    # rows of this program's tile; 0 when the tile is past the group's rows or the chunk has no tokens
    if ABSOLUTE:
        lo = tl.maximum(chunk * chunk_size, start)
        hi = tl.minimum((chunk + 1) * chunk_size, end)
    else:
        lo = start + chunk * chunk_size
        hi = tl.minimum(lo + chunk_size, end)
    n_active = tl.where((q_tile * BLOCK_M < n_rows * GROUP) & (lo < hi), n_rows, 0)
    hi = tl.where(n_active > 0, hi, lo)
    slot = tl.load(slot_base_ptr + g) + chunk

    f = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)               # [BLOCK_M] flat (row, head) index
    j = f // GROUP
    # (block < scalar) masks only: the interpreter mis-types (block bool) & (scalar bool)
    rmask = j < n_active
    rows = tl.load(group_rows_ptr + p0 + j, mask=rmask, other=0)
    head = kv_head * GROUP + f % GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + (rows * stride_qr + head * stride_qh)[:, None] + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)   # [BLOCK_M, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)

    first_row = tl.load(group_rows_ptr + p0, mask=n_rows > 0, other=0)
    table = block_tables_ptr + first_row * stride_btr
    m, l, acc = attend_paged_range(q, table, lo, hi, k_cache_ptr, v_cache_ptr,
                                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                   kv_head, block_size, scale_log2, d, dmask, lo,
                                   BLOCK_M, BLOCK_D, BLOCK_N, DOT_FP32, False)
    o, lse = finish_partial(m, l, acc)
    tl.store(o_ptr + (rows * stride_or + head * stride_oh + slot * stride_os)[:, None] + d[None, :], o,
             mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + rows * stride_lr + head * stride_lh + slot * stride_ls, lse, mask=rmask)


def cascade_decode_config(dtype: torch.dtype, head_dim: int, group: int, max_group_rows: int, *,
                          absolute: bool = False, interpreted: bool = False) -> dict:
    """Compile-time constants of a launch (shared with the ahead-of-time compile test)."""
    block_m = min(dot_rows(max_group_rows * group), max(MAX_TILE_ROWS, dot_rows(group)))
    block_n = 32 if dtype == torch.float32 else 64
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=max(16, next_pow2(head_dim)),
                BLOCK_N=block_n, ABSOLUTE=absolute, DOT_FP32=interpreted)


def choose_chunk_size(max_span: int, parallel: int, block_n: int, programs: int | None = None) -> int:
    """Equal chunks (a multiple of block_n) so that about `programs` (default:
    tuning.target_programs()) programs run."""
    programs = target_programs() if programs is None else programs
    chunks = max(1, min(cdiv(programs, max(parallel, 1)), cdiv(max_span, MIN_CHUNK)))
    return max(block_n, cdiv(cdiv(max(max_span, 1), chunks), block_n) * block_n)


def _launch(q, k_cache, v_cache, block_tables, group_ptr, group_rows, range_start, range_end, scale,
            chunk_size, num_chunks, absolute, max_group_rows, out, block_m, slot_base):
    bs, hkv, dh = check_cache(k_cache, v_cache)
    group = check_query(q, k_cache)
    d, hq = q.shape[0], q.shape[1]
    dev = k_cache.device
    check_index("block_tables", block_tables, 2, dev)
    for name, t in (("group_ptr", group_ptr), ("group_rows", group_rows), ("range_start", range_start),
                    ("range_end", range_end)):
        check_index(name, t, 1, dev)
    if block_tables.shape[0] != d or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [D={d}, Bmax] and contiguous in Bmax, got {tuple(block_tables.shape)}")
    num_groups = group_ptr.shape[0] - 1
    if slot_base is None:
        slot_base = torch.zeros(max(num_groups, 0), dtype=torch.int64, device=dev)
    check_index("slot_base", slot_base, 1, dev)
    if num_groups < 0 or any(t.shape[0] != num_groups for t in (range_start, range_end, slot_base)):
        raise ValueError(f"group_ptr [G+1], range_start [G], range_end [G], slot_base [G] disagree: "
                         f"{tuple(group_ptr.shape)}, {tuple(range_start.shape)}, {tuple(range_end.shape)}, "
                         f"{tuple(slot_base.shape)}")
    if max_group_rows is None or num_chunks is None or chunk_size is None:
        # host copies of the small CSR arrays: one sync; the engine passes all three and skips it
        ptr = group_ptr.tolist()
        sizes = [b - a for a, b in zip(ptr[:-1], ptr[1:])]
        spans = (range_end - (0 if absolute else range_start)).clamp(min=0).tolist()
        if max_group_rows is None:
            max_group_rows = max(sizes, default=0)
    cfg = cascade_decode_config(q.dtype, dh, group, max(max_group_rows, 1), absolute=absolute,
                                interpreted=is_interpreted(cascade_decode_kernel))
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    num_q_tiles = max(1, cdiv(max_group_rows * group, cfg["BLOCK_M"]))
    if chunk_size is None:
        chunk_size = choose_chunk_size(max(spans, default=0), num_groups * hkv * num_q_tiles, cfg["BLOCK_N"],
                                       target_programs(dev))
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if num_chunks is None:
        num_chunks = max(1, cdiv(max(spans, default=0), chunk_size))
    if out is None:
        slots = num_chunks + (int(slot_base.max()) if num_groups > 0 else 0)
        out = (torch.zeros(d, hq, slots, dh, dtype=torch.float32, device=dev),
               torch.full((d, hq, slots), float("-inf"), dtype=torch.float32, device=dev))
    # a caller's buffer must hold slot_base + num_chunks slots (not checked: it would need a sync)
    check_partials(out, d, hq, out[0].shape[2] if isinstance(out, tuple) and len(out) == 2 else -1, dh, dev)
    o, lse = out
    if num_groups == 0 or num_chunks == 0 or max_group_rows == 0:
        return out
    check_launchable(cascade_decode_kernel, q, k_cache)
    cascade_decode_kernel[(num_groups, hkv * num_q_tiles, num_chunks)](
        q, k_cache, v_cache, block_tables, group_ptr, group_rows, range_start, range_end, slot_base, o, lse,
        scale * LOG2E, chunk_size, num_q_tiles,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        bs, **cfg, num_warps=4, num_stages=num_stages(),
    )
    return out


def cascade_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   group_ptr: torch.Tensor, group_rows: torch.Tensor, range_start: torch.Tensor,
                   range_end: torch.Tensor, scale: float, *, chunk_size: int | None = None,
                   num_chunks: int | None = None, absolute: bool = False, max_group_rows: int | None = None,
                   out=None, block_m: int | None = None, slot_base: torch.Tensor | None = None):
    """Grouped decode over shared token ranges (see the module docstring and reference.cascade_decode).

    q [D, Hq, Dh]; block_tables [D, Bmax]; CSR group_ptr [G+1], group_rows; range_start/end [G] in
    tokens. Chunk c of group g (if it has tokens) goes to slot slot_base[g] + c (slot_base None: 0)
    of each of its rows; `absolute` aligns chunks to multiples of chunk_size (chunk c is tokens
    [c*chunk_size, (c+1)*chunk_size) clipped to the range: deterministic mode). Slots no chunk
    writes keep `out`'s values (out=None: empty, lse = -inf). Passing chunk_size, num_chunks and
    max_group_rows avoids a host sync. `block_m` overrides the query-tile rows (deterministic mode
    pins it so every launch uses one compiled tile shape).
    Returns (o [D, Hq, S, Dh] fp32, lse [D, Hq, S] fp32).
    """
    return _launch(q, k_cache, v_cache, block_tables, group_ptr, group_rows, range_start, range_end, scale,
                   chunk_size, num_chunks, absolute, max_group_rows, out, block_m, slot_base)
