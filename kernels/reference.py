"""Torch twins of the Triton kernels: the same signatures and semantics, written for clarity.

They are the oracles of the kernel tests. Each computes in fp32 from the cache's values; the
kernels round probabilities to the cache dtype before the P @ V product (as FlashAttention does),
so 16-bit results agree to 16-bit tolerance and fp32 results agree tightly.

Shape letters: R query rows, Hq query heads, Hkv KV heads, Dh head dim, S partial slots per row,
G groups, P prefill sequences, Bmax blocks per padded block table, bs block size.
A partial is (o [R, Hq, S, Dh] fp32 normalised, lse [R, Hq, S] fp32 natural log); an empty partial
has o = 0 and lse = -inf.
"""
from __future__ import annotations

import torch


def kv_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [N, Hkv, Dh] at flat slots [N] (block * bs + offset) of the caches; slot < 0 skips."""
    bs = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache[slots // bs, slots % bs] = k[keep].to(k_cache.dtype)
    v_cache[slots // bs, slots % bs] = v[keep].to(v_cache.dtype)


def _gather(cache: torch.Tensor, table: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Tokens [lo, hi) of one paged sequence: [hi - lo, Hkv, Dh] in fp32."""
    bs = cache.shape[1]
    pos = torch.arange(lo, hi, device=cache.device)
    return cache[table[pos // bs], pos % bs].float()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None):
    """q [M, Hq, Dh], k/v [L, Hkv, Dh] -> (o [M, Hq, Dh], lse [M, Hq]) in fp32; L == 0 gives empty."""
    m, hq, dh = q.shape
    if k.shape[0] == 0:
        return q.new_zeros(m, hq, dh, dtype=torch.float32), q.new_full((m, hq), float("-inf"), dtype=torch.float32)
    grp = hq // k.shape[1]
    kk = k.repeat_interleave(grp, dim=1)                               # [L, Hq, Dh]
    vv = v.repeat_interleave(grp, dim=1)
    s = torch.einsum("mhd,lhd->mhl", q.float(), kk) * scale            # [M, Hq, L]
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("mhl,lhd->mhd", p, vv), lse


def _new_partials(rows: int, heads: int, slots: int, head_dim: int, device, out):
    if out is not None:
        return out
    o = torch.zeros(rows, heads, slots, head_dim, dtype=torch.float32, device=device)
    lse = torch.full((rows, heads, slots), float("-inf"), dtype=torch.float32, device=device)
    return o, lse


def paged_decode(q, k_cache, v_cache, block_tables, kv_start, context_lens, scale, *, split_size,
                 num_splits=None, out=None):
    """One query token per row over tokens [kv_start, context_len) of its block table, split-K.

    Split s of row r covers [kv_start[r] + s * split_size, ... + split_size) clipped to the row's
    context length; every split of every row is written (empty ones as o = 0, lse = -inf).
    Returns partials (o [D, Hq, S, Dh], lse [D, Hq, S]).
    """
    d, hq, dh = q.shape
    spans = (context_lens - kv_start).clamp(min=0)
    if num_splits is None:
        num_splits = max(1, -(-int(spans.max()) // split_size)) if d else 1
    o, lse = _new_partials(d, hq, num_splits, dh, q.device, out)
    for r in range(d):
        start, end = int(kv_start[r]), int(context_lens[r])
        for s in range(num_splits):
            lo, hi = start + s * split_size, min(start + (s + 1) * split_size, end)
            kk = _gather(k_cache, block_tables[r], lo, max(lo, hi))
            vv = _gather(v_cache, block_tables[r], lo, max(lo, hi))
            po, pl = _attend(q[r:r + 1], kk, vv, scale)
            o[r, :, s], lse[r, :, s] = po[0], pl[0]
    return o, lse


def cascade_chunk_span(c: int, start: int, end: int, chunk_size: int, absolute: bool):
    """Token span [lo, hi) of chunk c of a group range [start, end); written only when lo < hi."""
    if absolute:
        return max(c * chunk_size, start), min((c + 1) * chunk_size, end)
    lo = start + c * chunk_size
    return lo, min(lo + chunk_size, end)


def cascade_decode(q, k_cache, v_cache, block_tables, group_ptr, group_rows, range_start, range_end, scale,
                   *, chunk_size, num_chunks=None, absolute=False, max_group_rows=None, out=None, block_m=None,
                   slot_base=None):
    """Decode rows grouped over a shared token range read once per group (cascade / Hydragen).

    The rows of group g are group_rows[group_ptr[g]:group_ptr[g+1]]; all of them attend to tokens
    [range_start[g], range_end[g]) of the block table of the group's first row. The range is cut
    into chunks of `chunk_size` tokens, chunk c going to partial slot slot_base[g] + c:
    - relative (default): chunk c covers [start + c*chunk_size, ...) clipped to the range;
    - absolute: chunk c covers [c*chunk_size, (c+1)*chunk_size) clipped to the range
      (deterministic mode: the slots are the same whether a token range is read shared or per row).
    Only chunks with tokens are written; everything else keeps `out`'s values (out=None: empty,
    o = 0 and lse = -inf). `block_m` (the kernel's tile rows) does not change the result.
    Returns partials (o [D, Hq, S, Dh], lse [D, Hq, S]).
    """
    d, hq, dh = q.shape
    ptr = group_ptr.tolist()
    starts, ends = range_start.tolist(), range_end.tolist()
    if num_chunks is None:
        spans = [e - (0 if absolute else s) for s, e in zip(starts, ends)]
        num_chunks = max([1] + [-(-sp // chunk_size) for sp in spans])
    base = [0] * (len(ptr) - 1) if slot_base is None else slot_base.tolist()
    o, lse = _new_partials(d, hq, num_chunks + max(base, default=0), dh, q.device, out)
    for g in range(len(ptr) - 1):
        rows = group_rows[ptr[g]:ptr[g + 1]]
        if rows.numel() == 0:
            continue
        table = block_tables[int(rows[0])]
        for c in range(num_chunks):
            lo, hi = cascade_chunk_span(c, starts[g], ends[g], chunk_size, absolute)
            if lo >= hi:
                continue
            po, pl = _attend(q[rows], _gather(k_cache, table, lo, hi), _gather(v_cache, table, lo, hi), scale)
            o[rows, :, base[g] + c], lse[rows, :, base[g] + c] = po, pl
    return o, lse


def extend(q, k_cache, v_cache, block_tables, q_start, num_new, context_lens, scale, *, max_num_new=None,
           out=None):
    """Prefill/extend: the num_new[p] new tokens of sequence p (rows q_start[p] ...) attend to its
    cached prefix and causally to each other; the new K/V must already be in the cache.

    New token i of sequence p sits at position context_lens[p] - num_new[p] + i. Rows of q that
    belong to no sequence are not written. Returns o [N, Hq, Dh] in q's dtype.
    """
    if out is None:
        out = torch.zeros_like(q)
    for p in range(q_start.shape[0]):
        a, n, ctx = int(q_start[p]), int(num_new[p]), int(context_lens[p])
        if n == 0:
            continue
        kk = _gather(k_cache, block_tables[p], 0, ctx)
        vv = _gather(v_cache, block_tables[p], 0, ctx)
        qpos = torch.arange(ctx - n, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
        o, _ = _attend(q[a:a + n], kk, vv, scale, mask)
        out[a:a + n] = o.to(out.dtype)
    return out


def merge(o_parts, lse_parts, *, out_dtype=torch.float32, out=None):
    """LSE-merge S partials per (row, head): o [R, H, S, Dh], lse [R, H, S] -> (o [R, H, Dh], lse [R, H]).

    All-empty rows give o = 0 and lse = -inf (no NaN).
    """
    lse = torch.logsumexp(lse_parts, dim=-1)                            # [R, H]
    w = torch.exp(lse_parts - lse[..., None]).nan_to_num_(0.0)         # all -inf -> 0/0 -> 0
    o = torch.where(w[..., None] > 0, w[..., None] * o_parts, 0.0).sum(dim=-2)   # empty slots' o unread
    if out is not None:
        out.copy_(o)
        return out, lse
    return o.to(out_dtype), lse


# --- the decoder layer's elementwise ops (the engine's torch path, which they replace on CUDA) ---

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, H] -> RMSNorm; 16-bit: normalised in fp32, cast, then times the weight in x's dtype."""
    if x.dtype == torch.float32:
        y = torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    else:
        y = weight * torch.nn.functional.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)
    return y if out is None else out.copy_(y)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [N, 2I] -> silu(gate) * up [N, I], each op rounded to the dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.nn.functional.silu(gate) * up
    return y if out is None else out.copy_(y)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, Dh] <- x * cos + rotate_half(x) * sin (cos, sin [N, 1, Dh]); in place, returns x."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x.copy_(x * cos + rotated * sin)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias) computed in float64, rounded once to x's dtype."""
    y = x.double() @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    y = y.to(x.dtype)
    return y if out is None else out.copy_(y)
