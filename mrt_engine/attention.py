"""Attention backends over the paged KV cache, and the one place that picks a backend.

Backend interface (every backend, torch or Triton):
    forward(q [N, Hq, Dh], k [N, Hkv, Dh], v [N, Hkv, Dh], k_cache, v_cache, meta, scale) -> [N, Hq, Dh]
It first stores the step's new K/V at `meta.slot_mapping`, then attends (see attention_metadata.py
for the token order and the decode sharing groups).

`TorchAttentionBackend` is the CPU default and the oracle for the Triton kernels:
- prefill/extend: one SDPA call per sequence, causal over (cached prefix + new tokens);
- decode, shared part: the groups' shared blocks are read ONCE per group; groups of similar shared
  length are batched into one padded matmul with every query row of the group and all GQA heads of
  a KV head packed as rows (Hydragen's idea);
- decode, own part: each row's remaining tokens in length buckets (padded gather + mask);
- the two partial results are merged by log-sum-exp in fp32.
The gather indices and masks are built once per step (`_DecodePlan`) and reused by every layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mrt_engine.attention_metadata import AttentionMetadata

BACKEND_ENV = "MRT_ENGINE_ATTENTION_BACKEND"
BACKENDS = ("auto", "torch", "triton")

# A shared-prefix batch may waste up to this fraction of padded keys before a new batch starts.
_SHARED_PAD_SLACK = 1.25


def get_attention_backend(name: str = "auto", device="cpu"):
    """The attention backend for `device`: "auto" is Triton on CUDA and torch elsewhere.

    The environment variable MRT_ENGINE_ATTENTION_BACKEND overrides `name` (tests use it).
    """
    name = os.environ.get(BACKEND_ENV) or name
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    try:
        from mrt_engine.attention_triton import TritonAttentionBackend
    except ImportError as exc:
        raise ValueError(f"attention backend 'triton' is not available ({exc}); use 'torch'") from exc
    return TritonAttentionBackend()


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new K/V [N, Hkv, Dh] into the paged caches [num_blocks, bs, Hkv, Dh] at flat slots [N]."""
    hkv, dh = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, hkv, dh).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, dh).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Merge two partial softmax-attention results; o [..., Dh] fp32, lse [...] fp32 (-inf = empty)."""
    lse = torch.logaddexp(lse1, lse2)
    # an all-empty pair gives lse = -inf; nan_to_num turns its 0/0 weights into 0
    w1 = torch.exp(lse1 - lse).nan_to_num_(0.0)
    w2 = torch.exp(lse2 - lse).nan_to_num_(0.0)
    return o1 * w1[..., None] + o2 * w2[..., None], lse


@dataclass
class _Batch:
    """One padded batch of decode work: `rows` query rows per item against `blocks` cache blocks."""
    rows: torch.Tensor        # [I, R] decode row index per (item, slot); padding repeats a valid row
    blocks: torch.Tensor      # [I, Bk] block ids, padding block 0
    key_mask: torch.Tensor    # [I, 1, 1, Bk*bs] fp32 additive: 0 for valid keys, -inf for padding
    out_rows: torch.Tensor    # [V] decode rows receiving results (valid slots only)
    out_sel: torch.Tensor     # [V] flat (item * R + slot) positions of those results


@dataclass
class _DecodePlan:
    shared: list[_Batch]      # per batch of groups: shared blocks, all rows of the group
    own: list[_Batch]         # per length bucket: one row per item, its non-shared blocks


def _build_decode_plan(meta: AttentionMetadata, block_size: int, device) -> _DecodePlan:
    """Index tensors for the decode part, built once per step on the host."""
    bs = block_size
    ctx = meta.decode_context_lens.tolist()
    tables = meta.decode_block_tables
    ptr = meta.group_ptr_host or [0, len(ctx)]
    nshared_g = meta.group_num_shared_host or [0] * (len(ptr) - 1)
    rows_by_group = meta.group_rows.tolist() if meta.group_rows is not None else list(range(len(ctx)))
    row_shared = [0] * len(ctx)

    # 1. groups worth sharing: more than one row and at least one shared block
    groups = []
    for g in range(len(ptr) - 1):
        rows = rows_by_group[ptr[g]:ptr[g + 1]]
        ns = nshared_g[g]
        if len(rows) > 1 and ns > 0:
            groups.append((ns, rows))
            for r in rows:
                assert ns * bs < ctx[r], "shared blocks must end before the row's current token"
                row_shared[r] = ns
    groups.sort(key=lambda x: x[0])
    shared = []
    for batch in _pack_by_length(groups, key=lambda x: x[0]):
        lens = [ns * bs for ns, _ in batch]
        first_rows = torch.tensor([rows[0] for _, rows in batch], dtype=torch.long)
        nb = max(ns for ns, _ in batch)
        blocks = tables.index_select(0, first_rows.to(tables.device))[:, :nb]
        shared.append(_make_batch([rows for _, rows in batch], blocks, lens, nb * bs, device))

    # 2. each row's own tokens: from its first non-shared block to its context length
    own_lens = [ctx[r] - row_shared[r] * bs for r in range(len(ctx))]
    order = sorted(range(len(ctx)), key=lambda r: own_lens[r])
    own = []
    for bucket in _pack_by_length(order, key=lambda r: own_lens[r]):
        nb = max(-(-own_lens[r] // bs) for r in bucket)
        idx = torch.tensor(bucket, dtype=torch.long, device=tables.device)
        starts = torch.tensor([row_shared[r] for r in bucket], dtype=torch.long, device=tables.device)
        cols = (starts[:, None] + torch.arange(nb, device=tables.device)[None, :]).clamp_(max=tables.shape[1] - 1)
        blocks = tables[idx[:, None], cols]
        own.append(_make_batch([[r] for r in bucket], blocks, [own_lens[r] for r in bucket], nb * bs, device))
    return _DecodePlan(shared, own)


def _pack_by_length(items: list, key) -> list[list]:
    """Split items sorted by ascending length into batches whose padding stays within the slack."""
    batches, cur, total = [], [], 0
    for it in items:
        n = key(it)
        if cur and n * (len(cur) + 1) > _SHARED_PAD_SLACK * (total + n):
            batches.append(cur)
            cur, total = [], 0
        cur.append(it)
        total += n
    if cur:
        batches.append(cur)
    return batches


def _make_batch(rows_per_item: list[list[int]], blocks: torch.Tensor, lens: list[int], width: int,
                device) -> _Batch:
    r_max = max(len(r) for r in rows_per_item)
    rows, out_rows, out_sel = [], [], []
    for i, rs in enumerate(rows_per_item):
        rows.append(rs + [rs[0]] * (r_max - len(rs)))
        out_rows.extend(rs)
        out_sel.extend(i * r_max + j for j in range(len(rs)))
    lens_t = torch.tensor(lens, dtype=torch.long)
    mask = torch.zeros(len(lens), width, dtype=torch.float32)
    mask.masked_fill_(torch.arange(width)[None, :] >= lens_t[:, None], float("-inf"))

    def dev(x):
        return x.to(device, non_blocking=True)

    return _Batch(rows=dev(torch.tensor(rows, dtype=torch.long)), blocks=blocks.to(device),
                  key_mask=dev(mask[:, None, None, :]), out_rows=dev(torch.tensor(out_rows, dtype=torch.long)),
                  out_sel=dev(torch.tensor(out_sel, dtype=torch.long)))


def _attend_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: _Batch, scale: float):
    """Attention of the batch's query rows over its blocks; returns (o [V, Hq, Dh] fp32, lse [V, Hq])."""
    num_items, r = b.rows.shape
    hq, dh = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    grp = hq // hkv
    # [I, R, Hq, Dh] -> [I, Hkv, R*grp, Dh]: all query rows and GQA heads of a KV head become rows
    qb = q[b.rows].view(num_items, r, hkv, grp, dh).permute(0, 2, 1, 3, 4).reshape(num_items, hkv, r * grp, dh)
    kb = k_cache[b.blocks].view(num_items, -1, hkv, dh)    # [I, L, Hkv, Dh]
    vb = v_cache[b.blocks].view(num_items, -1, hkv, dh)
    scores = torch.matmul(qb, kb.permute(0, 2, 3, 1)).float() * scale + b.key_mask  # [I, Hkv, R*grp, L]
    lse = torch.logsumexp(scores, dim=-1)                  # [I, Hkv, R*grp]
    probs = torch.exp(scores - lse[..., None]).to(vb.dtype)
    o = torch.matmul(probs, vb.transpose(1, 2)).float()    # [I, Hkv, R*grp, Dh]
    o = o.view(num_items, hkv, r, grp, dh).permute(0, 2, 1, 3, 4).reshape(num_items * r, hq, dh)
    lse = lse.view(num_items, hkv, r, grp).permute(0, 2, 1, 3).reshape(num_items * r, hq)
    return o.index_select(0, b.out_sel), lse.index_select(0, b.out_sel)


class TorchAttentionBackend:
    """Paged attention in plain PyTorch (CPU default; the oracle for the Triton backend)."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.num_prefill_tokens:
            self._prefill(q, k, v, k_cache, v_cache, meta, scale, out)
        if meta.num_decode:
            n0 = meta.num_prefill_tokens
            out[n0:] = self._decode(q[n0:], k_cache, v_cache, meta, scale).to(q.dtype)
        return out

    @staticmethod
    def _prefill(q, k, v, k_cache, v_cache, meta, scale, out):
        hkv, dh = k_cache.shape[2], k_cache.shape[3]
        bs = k_cache.shape[1]
        for s in meta.prefill_seqs:
            a, n, ctx = s.token_start, s.num_new, s.context_len
            qq = q[a:a + n].transpose(0, 1)                                            # [Hq, n, Dh]
            if n == ctx:  # nothing cached before: the new K/V are the whole context
                kk, vv = k[a:a + n].transpose(0, 1), v[a:a + n].transpose(0, 1)
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
            else:
                nb = -(-ctx // bs)
                kk = k_cache[s.block_table[:nb]].view(-1, hkv, dh)[:ctx].transpose(0, 1)  # [Hkv, ctx, Dh]
                vv = v_cache[s.block_table[:nb]].view(-1, hkv, dh)[:ctx].transpose(0, 1)
                # query i sits at position ctx - n + i and sees keys 0 .. ctx - n + i
                mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril_(diagonal=ctx - n)
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)
            out[a:a + n] = o.transpose(0, 1)

    @staticmethod
    def _decode(q, k_cache, v_cache, meta, scale):
        plan = meta.backend_cache.get("torch_decode_plan")
        if plan is None:
            plan = _build_decode_plan(meta, k_cache.shape[1], q.device)
            meta.backend_cache["torch_decode_plan"] = plan
        d, hq, dh = q.shape
        o_own = torch.empty(d, hq, dh, dtype=torch.float32, device=q.device)
        lse_own = torch.empty(d, hq, dtype=torch.float32, device=q.device)
        for b in plan.own:
            o, lse = _attend_batch(q, k_cache, v_cache, b, scale)
            o_own[b.out_rows] = o
            lse_own[b.out_rows] = lse
        if not plan.shared:
            return o_own
        o_sh = torch.zeros_like(o_own)
        lse_sh = torch.full_like(lse_own, float("-inf"))
        for b in plan.shared:
            o, lse = _attend_batch(q, k_cache, v_cache, b, scale)
            o_sh[b.out_rows] = o
            lse_sh[b.out_rows] = lse
        return merge_lse(o_own, lse_own, o_sh, lse_sh)[0]

