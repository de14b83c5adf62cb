"""The torch attention backend over the paged KV cache (CPU default; the oracle for the Triton kernels).

On a CPU with AVX-512 the decode part and short extends over a cached prefix (fork suffixes) run
through the C++ kernel (`cpu_kernel.py`) on work items from the same prefix tree; everything below
is the PyTorch path, used elsewhere (and with MRT_ENGINE_CPU_KERNEL=0) and tested against it.

- prefill/extend: one SDPA call per sequence, causal over (cached prefix + new tokens);
- decode: the decode groups' shared blocks form a prefix tree (groups forked from one trace at
  several points share the trace's blocks), and each tree segment is read ONCE for all the rows
  below it; segments of similar size are padded into one batch, with every query row and all GQA
  heads of a KV head packed as rows of one attention call (Hydragen's idea, which pays on a CPU);
- each row's own tokens (after its group's shared blocks) go in length buckets (padded gather + mask);
- the partial results are merged by log-sum-exp in fp32.
The attention call is PyTorch's fused CPU flash kernel (returns the LSE, accumulates in fp32) with
a matmul twin for other devices. Gather indices and masks are built once per step (`_DecodePlan`,
cached in `meta.backend_cache`) and reused by every layer. Loops run over batches, never tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mrt_engine.attention import cpu_kernel
from mrt_engine.attention.metadata import AttentionMetadata
from mrt_engine.attention.share_tree import segment_blocks
from mrt_engine.profiling import section

# A padded batch may hold up to this factor of (rows x keys) over its real work before a new one starts.
_SHARED_PAD_SLACK = 1.25


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new K/V [N, Hkv, Dh] into the paged caches [num_blocks, bs, Hkv, Dh] at flat slots [N]."""
    if cpu_kernel.store_usable(k, v, k_cache, v_cache, slot_mapping):   # one call for both, rows copied
        cpu_kernel.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
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
    key_mask: torch.Tensor | None  # [I, 1, 1, Bk*bs] fp32 additive: -inf on padding; None if none
    out_rows: torch.Tensor    # [V] decode rows receiving results (valid slots only)
    out_sel: torch.Tensor | None  # [V] flat (item * R + slot) positions of those results; None: all
    _masks: dict = field(default_factory=dict)

    def mask_in(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The key mask cast to `dtype` once per step, not once per layer."""
        if self.key_mask is None or self.key_mask.dtype == dtype:
            return self.key_mask
        if dtype not in self._masks:
            self._masks[dtype] = self.key_mask.to(dtype)
        return self._masks[dtype]


@dataclass
class _DecodePlan:
    own: list[_Batch]         # per length bucket: one row per item, its tokens after the shared blocks
    shared: list[_Batch]      # per batch of prefix-tree segments: a run of blocks, every row below it
    shared_rows: torch.Tensor | None  # [P] decode row of each shared partial, in batch order
    own_inv: torch.Tensor     # [D] position of each decode row in the concatenated own buckets


def _share_segments(meta: AttentionMetadata, block_size: int):
    """The step's decode rows in prefix-tree form: (ctx [D], segments [(block ids, rows)], row_shared [D]).

    Groups with more than one row and shared blocks go into a prefix tree over their shared block
    ids: groups forked from one trace at several boundaries share the trace's blocks, so each tree
    segment (a run of blocks) is read once for all the rows below it, not once per group.
    `row_shared[r]` is the number of leading blocks of row r covered by segments.
    """
    bs = block_size
    ctx = meta.decode_context_lens_host or meta.decode_context_lens.tolist()
    ptr = meta.group_ptr_host or [0, len(ctx)]
    nshared_g = meta.group_num_shared_host or [0] * (len(ptr) - 1)
    rows_by_group = meta.group_rows.tolist() if meta.group_rows is not None else list(range(len(ctx)))
    row_shared = [0] * len(ctx)

    groups = []
    for g in range(len(ptr) - 1):
        rows = rows_by_group[ptr[g]:ptr[g + 1]]
        ns = nshared_g[g]
        if len(rows) > 1 and ns > 0:
            groups.append((ns, rows))
            for r in rows:
                assert ns * bs < ctx[r], "shared blocks must end before the row's current token"
                row_shared[r] = ns
    segments = []
    if groups:
        if meta.decode_block_tables_host:
            lists = [meta.decode_block_tables_host[rows[0]] for _, rows in groups]
        else:
            tables = meta.block_tables()
            first = torch.tensor([rows[0] for _, rows in groups], dtype=torch.long, device=tables.device)
            lists = tables.index_select(0, first).tolist()
        segments = segment_blocks([(lst[:ns], rows) for lst, (ns, rows) in zip(lists, groups)])
    return ctx, segments, row_shared


def _kernel_items(meta: AttentionMetadata, block_size: int) -> list:
    """Work items (block ids, keys, rows) of the C++ kernel: each row's own tail, then the segments."""
    bs = block_size
    ctx, segments, row_shared = _share_segments(meta, bs)
    tables = meta.decode_block_tables_host or meta.block_tables().tolist()
    items = [(tables[r][row_shared[r]:-(-ctx[r] // bs)], ctx[r] - row_shared[r] * bs, [r]) for r in range(len(ctx))]
    items += [(blk, len(blk) * bs, rows) for blk, rows in segments]
    return items


def cpu_decode_plan(meta: AttentionMetadata, num_rows: int, num_heads: int, k_cache: torch.Tensor):
    """The step's C++ decode-attention plan, made on first use and kept in meta.backend_cache for
    every layer."""
    kplan = meta.backend_cache.get("cpu_kernel_plan")
    if kplan is None:
        kplan = cpu_kernel.DecodePlan(_kernel_items(meta, k_cache.shape[1]), num_rows, num_heads, k_cache)
        meta.backend_cache["cpu_kernel_plan"] = kplan
    return kplan


# extends of at most this many tokens over a cached prefix (a fork's suffix) share their prefix
# across sequences through the prefix tree; longer prefills go in query blocks (below)
_KERNEL_EXTEND_MAX = 64
# a long prefill's query tokens in blocks of this many rows: each block's rows share one item, the
# full cache blocks before the block's first token (read once for its rows), and each row has its
# own tail up to itself (at most a cache block plus the query block), so the causal triangle costs
# the kernel's shared-item rate instead of PyTorch's fused CPU kernel's (~3x slower measured here)
_QUERY_BLOCK = 16


def _extend_kernel_plan(meta: AttentionMetadata, num_heads: int, k_cache: torch.Tensor):
    """(plan, token index [R], seq indices) for the step's prefill sequences the C++ kernel takes.

    Token j of a sequence with `cached` tokens before it attends to keys [0, cached + j]. A short
    extend (at most _KERNEL_EXTEND_MAX new tokens after a cached prefix): the full blocks before
    `cached` are one item shared by all its new tokens (and, through the prefix tree, by other
    sequences forked from the same trace); the rest is one item per token. A longer prefill
    (a whole prompt or a long chunk): per query block, the full blocks before the block's first
    token as one item for its rows, the rest one item per token.
    """
    bs = k_cache.shape[1]
    groups, own, blocked, token_idx, chosen = [], [], [], [], set()
    for i, s in enumerate(meta.prefill_seqs):
        n, ctx = s.num_new, s.context_len
        short = n <= _KERNEL_EXTEND_MAX
        if n == 0 or (short and n == ctx):
            continue      # a short prompt with nothing cached: PyTorch's causal kernel
        chosen.add(i)
        cached = ctx - n
        table = s.block_table_host if s.block_table_host is not None else s.block_table.tolist()
        rows = list(range(len(token_idx), len(token_idx) + n))
        token_idx += range(s.token_start, s.token_start + n)
        step = n if short else _QUERY_BLOCK
        for b0 in range(0, n, step):
            nfull = (cached + b0) // bs
            if nfull:
                (groups if short else blocked).append((table[:nfull], rows[b0:b0 + step]))
            for j in range(b0, min(b0 + step, n)):
                end = cached + j + 1
                own.append((table[nfull:-(-end // bs)], end - nfull * bs, [rows[j]]))
    if not chosen:
        return None, None, chosen
    items = own + [(blk, len(blk) * bs, rows) for blk, rows in segment_blocks(groups) + blocked]
    idx = torch.tensor(token_idx, dtype=torch.long)
    return cpu_kernel.DecodePlan(items, len(token_idx), num_heads, k_cache), idx, chosen


def _build_decode_plan(meta: AttentionMetadata, block_size: int, device) -> _DecodePlan:
    """Index tensors for the decode part, built once per step on the host.

    1. The prefix tree's segments (`_share_segments`). 2. Segments of similar (rows, length) are
    padded into batches. 3. Each row's own tokens (after its group's shared blocks) go into length
    buckets.
    """
    bs = block_size
    tables = meta.block_tables()
    ctx, segments, row_shared = _share_segments(meta, bs)
    shared, shared_rows = [], []
    if segments:
        segments.sort(key=lambda seg: (len(seg[1]), len(seg[0])))
        for batch in _pack_segments(segments):
            nb = max(len(blk) for blk, _ in batch)
            blocks = [blk + [0] * (nb - len(blk)) for blk, _ in batch]
            b = _make_batch([rows for _, rows in batch], blocks, [len(blk) * bs for blk, _ in batch], nb * bs,
                            device)
            shared.append(b)
            shared_rows.append(b.out_rows)

    own_lens = [ctx[r] - row_shared[r] * bs for r in range(len(ctx))]
    order = sorted(range(len(ctx)), key=lambda r: own_lens[r])
    own = []
    if ctx:
        # every row's own blocks in one gather: table[r, row_shared[r] + j], padded past the table end
        max_nb = max(-(-n // bs) for n in own_lens)
        starts = torch.tensor(row_shared + order, dtype=torch.long).to(tables.device)
        cols = (starts[:len(ctx), None] + torch.arange(max_nb, device=tables.device)[None, :])
        own_blocks = tables.gather(1, cols.clamp_(max=tables.shape[1] - 1))    # [D, max_nb]
        sorted_blocks = own_blocks.index_select(0, starts[len(ctx):])         # rows in `order`
        at = 0
        for bucket in _pack_by_length(order, key=lambda r: own_lens[r]):
            nb = max(-(-own_lens[r] // bs) for r in bucket)
            blocks = sorted_blocks[at:at + len(bucket), :nb]
            at += len(bucket)
            own.append(_make_batch([[r] for r in bucket], blocks, [own_lens[r] for r in bucket], nb * bs, device))
    inv = [0] * len(ctx)
    for i, r in enumerate(order):
        inv[r] = i
    own_inv = torch.tensor(inv, dtype=torch.long).to(device)
    return _DecodePlan(own, shared, torch.cat(shared_rows) if shared_rows else None, own_inv)


def _pack_segments(segments: list) -> list[list]:
    """Batches of (blocks, rows) segments, sorted by (rows, length), whose padded area stays in the slack."""
    batches, cur = [], []
    area = r_max = l_max = 0
    for blk, rows in segments:
        r, n = len(rows), len(blk)
        rm, lm = max(r_max, r), max(l_max, n)
        if cur and (len(cur) + 1) * rm * lm > _SHARED_PAD_SLACK * (area + r * n):
            batches.append(cur)
            cur, area, rm, lm = [], 0, r, n
        cur.append((blk, rows))
        area += r * n
        r_max, l_max = rm, lm
    if cur:
        batches.append(cur)
    return batches


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


def _make_batch(rows_per_item: list[list[int]], blocks, lens: list[int], width: int, device) -> _Batch:
    """Pack one batch; `blocks` is a padded [I, Bk] tensor or a list of equal-length lists."""
    r_max = max(len(r) for r in rows_per_item)
    num_items = len(rows_per_item)
    rows, out_rows, out_sel = [], [], []
    for i, rs in enumerate(rows_per_item):
        rows += rs
        if len(rs) < r_max:
            rows += [rs[0]] * (r_max - len(rs))
        out_rows += rs
        out_sel += range(i * r_max, i * r_max + len(rs))
    flat = rows + out_rows + out_sel + lens   # one host tensor, one device copy
    if isinstance(blocks, list):
        for blk in blocks:
            flat += blk
    host = torch.from_numpy(np.fromiter(flat, dtype=np.int64, count=len(flat)))   # faster than torch.tensor
    nv = len(out_rows)
    t = host.to(device, non_blocking=True) if torch.device(device).type != "cpu" else host
    o = num_items * r_max
    if isinstance(blocks, list):
        blocks = t[o + 2 * nv + num_items:].view(num_items, -1)
    mask = None
    if min(lens) < width:
        lens_t = host[o + 2 * nv:o + 2 * nv + num_items]
        mask = torch.zeros(num_items, width, dtype=torch.float32)
        mask = mask.masked_fill_(torch.arange(width)[None, :] >= lens_t[:, None], float("-inf"))[:, None, None, :]
        mask = mask.to(device)
    # no padded rows: the results are already in out_rows order and need no selection
    out_sel = None if nv == o else t[o + nv:o + 2 * nv]
    return _Batch(rows=t[:o].view(num_items, r_max), blocks=blocks.to(device).contiguous(), key_mask=mask,
                  out_rows=t[o:o + nv], out_sel=out_sel)


def _attend_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: _Batch, scale: float):
    """Attention of the batch's query rows over its blocks; returns (o [V, Hq, Dh] fp32, lse [V, Hq])."""
    num_items, r = b.rows.shape
    hq, dh = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    grp = hq // hkv
    # one gather of whole blocks per batch (contiguous chunks); the kernels read strided views of it
    kb = k_cache.index_select(0, b.blocks.view(-1)).view(num_items, -1, hkv, dh)   # [I, L, Hkv, Dh]
    vb = v_cache.index_select(0, b.blocks.view(-1)).view(num_items, -1, hkv, dh)
    # [I*R, Hq, Dh] -> [I, Hkv, R*grp, Dh]: all query rows and GQA heads of one KV head become rows
    qb = q.index_select(0, b.rows.view(-1)).view(num_items, r, hkv, grp, dh)
    qb = qb.permute(0, 2, 1, 3, 4).reshape(num_items, hkv, r * grp, dh)
    o, lse = _partial_attention(qb, kb, vb, b.mask_in(q.dtype), scale)   # [I, Hkv, M, Dh], [I, Hkv, M]
    o = o.view(num_items, hkv, r, grp, dh).permute(0, 2, 1, 3, 4).reshape(num_items * r, hq, dh)
    lse = lse.view(num_items, hkv, r, grp).permute(0, 2, 1, 3).reshape(num_items * r, hq)
    if b.out_sel is None:
        return o, lse
    return o.index_select(0, b.out_sel), lse.index_select(0, b.out_sel)


def _flash_cpu_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


# the fused CPU kernel (no materialised scores, fp32 accumulation, returns the LSE); tests flip this
# to check the matmul twin too
USE_FUSED_CPU_KERNEL = _flash_cpu_available()


def _partial_attention(qb, kb, vb, key_mask, scale):
    """Softmax attention with its log-sum-exp.

    qb [I, Hkv, M, Dh]; kb, vb [I, L, Hkv, Dh] (views are fine); key_mask None or [I, 1, 1, L] fp32
    additive. Returns (o [I, Hkv, M, Dh] in q's dtype or fp32, lse [I, Hkv, M] fp32).
    """
    if USE_FUSED_CPU_KERNEL and qb.device.type == "cpu":
        mask = None if key_mask is None else key_mask.to(qb.dtype)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qb, kb.transpose(1, 2), vb.transpose(1, 2), 0.0, False, attn_mask=mask, scale=scale)
        return o, lse
    num_items, hkv, m, dh = qb.shape
    length = kb.shape[1]
    # per-head matmuls read strided views of the gathered blocks: BLAS takes them without a copy;
    # the softmax scale is folded into q (a small tensor) instead of the scores
    qs = (qb * scale).transpose(0, 1)                                  # [Hkv, I, M, Dh]
    scores = torch.empty(hkv, num_items, m, length, dtype=qb.dtype, device=qb.device)
    for h in range(hkv):
        torch.bmm(qs[h], kb[:, :, h].transpose(1, 2), out=scores[h])
    s = scores.float()
    if key_mask is not None:
        s = s.add_(key_mask.transpose(0, 1))                          # -inf on padded keys
    mx = s.amax(-1, keepdim=True)
    p = s.sub_(mx).exp_()
    denom = p.sum(-1, keepdim=True)                                   # [Hkv, I, M, 1] fp32
    p = p.to(qb.dtype)
    o = torch.empty(hkv, num_items, m, dh, dtype=qb.dtype, device=qb.device)
    for h in range(hkv):
        torch.bmm(p[h], vb[:, :, h], out=o[h])
    o = o.float().div_(denom)
    lse = mx.squeeze(-1) + denom.squeeze(-1).log()
    return o.transpose(0, 1), lse.transpose(0, 1)


class TorchAttentionBackend:
    """Paged attention in plain PyTorch (CPU default; the oracle for the Triton backend)."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        with section("attn_store"):
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.num_prefill_tokens:
            with section("attn_prefill"):
                self._prefill(q, k, v, k_cache, v_cache, meta, scale, out)
        if meta.num_decode:
            n0 = meta.num_prefill_tokens
            dst = out[n0:]
            o = self._decode(q[n0:], k_cache, v_cache, meta, scale, dst)
            if o is not dst:   # the C++ kernel fills dst itself; the PyTorch path returns its own
                with section("cast"):
                    dst.copy_(o)
        return out

    @staticmethod
    def _prefill(q, k, v, k_cache, v_cache, meta, scale, out):
        hkv, dh = k_cache.shape[2], k_cache.shape[3]
        bs = k_cache.shape[1]
        masks = meta.backend_cache.setdefault("torch_prefill_masks", {})
        short = set()
        if cpu_kernel.usable(q, k_cache):
            # short extends over a cached prefix (fork suffixes): every new token is a query row of
            # the C++ kernel, the prefix blocks one item for all of them (a tree across forks)
            kp = meta.backend_cache.get("cpu_kernel_extend")
            if kp is None:
                kp = meta.backend_cache["cpu_kernel_extend"] = _extend_kernel_plan(meta, q.shape[1], k_cache)
            plan, idx, short = kp
            if plan is not None:
                out[idx] = plan.run(q.index_select(0, idx), k_cache, v_cache, scale).to(out.dtype)
        for i, s in enumerate(meta.prefill_seqs):
            if i in short:
                continue
            a, n, ctx = s.token_start, s.num_new, s.context_len
            if n == ctx:  # nothing cached before: the new K/V are the whole context
                qq, kk, vv = q[a:a + n].transpose(0, 1), k[a:a + n].transpose(0, 1), v[a:a + n].transpose(0, 1)
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
                out[a:a + n] = o.transpose(0, 1)
                continue
            # SDPA with a mask and GQA falls back to its unfused math path on CPU; instead the query
            # heads of one KV head are packed as rows (token j, head g) of one fused-kernel call
            grp = q.shape[1] // hkv
            blocks = s.block_table[:-(-ctx // bs)]
            kk = k_cache.index_select(0, blocks).view(1, -1, hkv, dh)[:, :ctx]        # [1, ctx, Hkv, Dh]
            vv = v_cache.index_select(0, blocks).view(1, -1, hkv, dh)[:, :ctx]
            mask = masks.get(i)
            if mask is None:
                # query j sits at position ctx - n + j and sees keys 0 .. ctx - n + j
                hidden = torch.ones(n, ctx, dtype=torch.bool, device=q.device).triu_(ctx - n + 1)
                mask = torch.zeros(n, ctx, dtype=torch.float32, device=q.device).masked_fill_(hidden, float("-inf"))
                # built once per step in q's dtype (the kernel takes the mask in q's dtype: no
                # per-layer cast)
                mask = masks[i] = mask.repeat_interleave(grp, 0)[None, None].to(q.dtype)   # [1, 1, n*grp, ctx]
            qb = q[a:a + n].view(n, hkv, grp, dh).transpose(0, 1).reshape(1, hkv, n * grp, dh)
            o, _ = _partial_attention(qb, kk, vv, mask, scale)                        # [1, Hkv, n*grp, Dh]
            out[a:a + n] = o.view(hkv, n, grp, dh).transpose(0, 1).reshape(n, hkv * grp, dh)

    @staticmethod
    def _decode(q, k_cache, v_cache, meta, scale, out=None):
        """Decode rows: own parts, prefix-tree segment parts, LSE-merged; returns [D, Hq, Dh] (fp32
        after a merge, q's dtype when no row shares), or `out` filled in by the C++ kernel."""
        if cpu_kernel.usable(q, k_cache):
            with section("attn_plan"):
                kplan = cpu_decode_plan(meta, q.shape[0], q.shape[1], k_cache)
            with section("attn_decode"):
                return kplan.run(q, k_cache, v_cache, scale, out=out)
        plan = meta.backend_cache.get("torch_decode_plan")
        if plan is None:
            with section("attn_plan"):
                plan = _build_decode_plan(meta, k_cache.shape[1], q.device)
            meta.backend_cache["torch_decode_plan"] = plan
        with section("attn_own"):
            own = [_attend_batch(q, k_cache, v_cache, b, scale) for b in plan.own]
            # the buckets hold the rows in `order`; one selection puts them back in row order
            o_own = (torch.cat([o for o, _ in own]) if len(own) > 1 else own[0][0]).index_select(0, plan.own_inv)
            lse_own = (torch.cat([x for _, x in own]) if len(own) > 1 else own[0][1]).index_select(0, plan.own_inv)
        if not plan.shared:
            return o_own
        with section("attn_shared"):
            parts = [_attend_batch(q, k_cache, v_cache, b, scale) for b in plan.shared]
            o_p = torch.cat([o for o, _ in parts]) if len(parts) > 1 else parts[0][0]       # [P, Hq, Dh]
            lse_p = torch.cat([lse for _, lse in parts]) if len(parts) > 1 else parts[0][1]  # [P, Hq]
        with section("attn_merge"):
            return _merge_parts(o_own, lse_own, o_p, lse_p, plan.shared_rows)


def _merge_parts(o_own, lse_own, o_p, lse_p, idx):
    """LSE merge of each row's own part with its prefix-tree segment parts; fp32 [D, Hq, Dh]."""
    o_own = o_own.float()
    # LSE merge of each row's own part with any number of tree segments, in a fixed order
    # (own first, then segments in plan order), so results do not depend on timing
    mx = lse_own.scatter_reduce(0, idx[:, None].expand_as(lse_p), lse_p, "amax")  # own lse finite
    w_own = torch.exp(lse_own - mx)
    w_p = torch.exp(lse_p - mx.index_select(0, idx))
    num = (o_own * w_own[..., None]).index_add_(0, idx, o_p * w_p[..., None])
    den = w_own.index_add_(0, idx, w_p)
    return num.div_(den[..., None])
