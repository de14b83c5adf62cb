"""Triton attention backend: the engine's GPU path over the paged, prefix-shared KV cache.

Same interface as `attention.TorchAttentionBackend` (its oracle):
    forward(q [N, Hq, Dh], k [N, Hkv, Dh], v, k_cache, v_cache, meta, scale) -> [N, Hq, Dh]
Per layer: kv_store (new K/V -> cache), extend for the prefill/extend tokens, and for the decode
rows cascade_decode (each sharing group's shared blocks read once) + paged_decode (each row's own
tokens, split-K) writing fp32 partials into one buffer that merge reduces into the output.
The launch plan (index tensors, split sizes, one host sync for the lengths) is built on the first
layer of a step and kept in `meta.backend_cache`.

Deterministic mode (`deterministic=True` or MRT_ENGINE_DETERMINISTIC=1): every decode row is cut
into fixed chunks of `det_chunk` tokens at absolute positions (k*det_chunk ...), groups share only
whole chunks, every chunk of every row goes through the same compiled cascade kernel (private parts
as groups of one) with one pinned tile shape, and merge walks the chunks in position order. A row's
output then does not depend on what else is in the batch or on whether its prefix was shared.
On CPU tensors the kernels run under the Triton interpreter (see mrt_engine.kernels).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mrt_engine.attention_metadata import AttentionMetadata
from mrt_engine.kernels.cascade_decode import cascade_decode, cascade_decode_config, choose_chunk_size
from mrt_engine.kernels.checks import cdiv
from mrt_engine.kernels.extend import extend
from mrt_engine.kernels.kv_store import kv_store
from mrt_engine.kernels.merge import merge
from mrt_engine.kernels.paged_decode import choose_split_size, paged_decode, paged_decode_config

DETERMINISTIC_ENV = "MRT_ENGINE_DETERMINISTIC"
DET_BLOCK_M = 64            # the one query-tile shape every deterministic decode launch uses


@dataclass
class _Launch:
    """One cascade launch: groups (CSR) over token ranges, written to partial slots [slot0, slot0 + num_chunks)."""
    group_ptr: torch.Tensor
    group_rows: torch.Tensor
    range_start: torch.Tensor
    range_end: torch.Tensor
    max_group_rows: int
    chunk_size: int
    num_chunks: int
    slot0: int


@dataclass
class _Plan:
    # prefill / extend
    p_tables: torch.Tensor | None = None
    p_qstart: torch.Tensor | None = None
    p_num_new: torch.Tensor | None = None
    p_ctx: torch.Tensor | None = None
    p_max_new: int = 0
    # decode
    shared: _Launch | None = None
    private: _Launch | None = None       # deterministic mode: rows' own parts as groups of one
    kv_start: torch.Tensor | None = None  # [D] first token of each row's own part (fast mode)
    split_size: int = 0
    num_splits: int = 0
    num_slots: int = 0


class TritonAttentionBackend:
    """Paged attention with the Triton kernels of mrt_engine.kernels (GPU default)."""

    name = "triton"

    def __init__(self, deterministic: bool | None = None, det_chunk: int = 256):
        if deterministic is None:
            deterministic = os.environ.get(DETERMINISTIC_ENV, "0") == "1"
        if det_chunk <= 0:
            raise ValueError(f"det_chunk must be a positive number of tokens, got {det_chunk}")
        self.deterministic = bool(deterministic)
        self.det_chunk = int(det_chunk)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        kv_store(k, v, k_cache, v_cache, meta.slot_mapping)
        key = "triton_plan_det" if self.deterministic else "triton_plan"
        plan = meta.backend_cache.get(key)
        if plan is None:
            plan = self._build_plan(meta, k_cache, q.shape[1] // k_cache.shape[2])
            meta.backend_cache[key] = plan
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        n0 = meta.num_prefill_tokens
        if n0:
            extend(q, k_cache, v_cache, plan.p_tables, plan.p_qstart, plan.p_num_new, plan.p_ctx, scale,
                   max_num_new=plan.p_max_new, out=out)
        if meta.num_decode:
            self._decode(q[n0:], k_cache, v_cache, meta, plan, scale, out[n0:])
        return out

    # --- decode -------------------------------------------------------------------------------
    def _decode(self, q, k_cache, v_cache, meta, plan: _Plan, scale, out):
        d, hq, dh = q.shape
        o_parts = torch.empty(d, hq, plan.num_slots, dh, dtype=torch.float32, device=q.device)
        lse_parts = torch.empty(d, hq, plan.num_slots, dtype=torch.float32, device=q.device)
        tables = meta.decode_block_tables
        block_m = DET_BLOCK_M if self.deterministic else None
        if plan.shared is not None and not self.deterministic:
            # rows outside the shared groups get nothing in the shared slots: mark those empty
            lse_parts[:, :, :plan.shared.num_chunks].fill_(float("-inf"))
        for launch in (plan.shared, plan.private):
            if launch is None:
                continue
            sl = slice(launch.slot0, launch.slot0 + launch.num_chunks)
            cascade_decode(q, k_cache, v_cache, tables, launch.group_ptr, launch.group_rows, launch.range_start,
                           launch.range_end, scale, chunk_size=launch.chunk_size, num_chunks=launch.num_chunks,
                           absolute=self.deterministic, max_group_rows=launch.max_group_rows,
                           out=(o_parts[:, :, sl], lse_parts[:, :, sl]), block_m=block_m)
        if not self.deterministic:
            s0 = plan.shared.num_chunks if plan.shared is not None else 0
            paged_decode(q, k_cache, v_cache, tables, plan.kv_start, meta.decode_context_lens, scale,
                         split_size=plan.split_size, num_splits=plan.num_splits,
                         out=(o_parts[:, :, s0:], lse_parts[:, :, s0:]))
        merge(o_parts, lse_parts, out=out)

    # --- the per-step plan ----------------------------------------------------------------------
    def _build_plan(self, meta: AttentionMetadata, k_cache: torch.Tensor, group: int) -> _Plan:
        plan = _Plan()
        dev = k_cache.device
        bs, hkv = k_cache.shape[1], k_cache.shape[2]
        if meta.prefill_seqs:
            seqs = meta.prefill_seqs
            width = max(1, max(int(s.block_table.shape[0]) for s in seqs))
            tables = torch.zeros(len(seqs), width, dtype=torch.int64, device=dev)
            for i, s in enumerate(seqs):
                tables[i, :s.block_table.shape[0]] = s.block_table
            plan.p_tables = tables
            plan.p_qstart = torch.tensor([s.token_start for s in seqs], dtype=torch.int64, device=dev)
            plan.p_num_new = torch.tensor([s.num_new for s in seqs], dtype=torch.int64, device=dev)
            plan.p_ctx = torch.tensor([s.context_len for s in seqs], dtype=torch.int64, device=dev)
            plan.p_max_new = max(s.num_new for s in seqs)
        d = meta.num_decode
        if d == 0:
            return plan
        ctx = meta.decode_context_lens

        # 1. groups worth sharing (more than one row, shared tokens); deterministic mode shares whole chunks only
        ptr = meta.group_ptr_host if meta.group_rows is not None else []
        nshared = meta.group_num_shared_host
        unit = self.det_chunk if self.deterministic else 1
        sel, row_pos, row_start = [], [], []
        for g in range(len(ptr) - 1):
            span = (nshared[g] * bs // unit) * unit
            if ptr[g + 1] - ptr[g] > 1 and span > 0:
                sel.append((g, span))
                row_pos.extend(range(ptr[g], ptr[g + 1]))
                row_start.extend([span] * (ptr[g + 1] - ptr[g]))
        kv_start = torch.zeros(d, dtype=torch.int64, device=dev)
        if sel:
            sh_rows = meta.group_rows.index_select(0, torch.tensor(row_pos, dtype=torch.int64, device=dev))
            kv_start.index_copy_(0, sh_rows, torch.tensor(row_start, dtype=torch.int64, device=dev))
            sizes = [ptr[g + 1] - ptr[g] for g, _ in sel]
            sh_ptr = [0]
            for s in sizes:
                sh_ptr.append(sh_ptr[-1] + s)
            spans = [span for _, span in sel]
            max_span = max(spans)
            if self.deterministic:
                chunk = self.det_chunk
            else:
                cfg = cascade_decode_config(k_cache.dtype, k_cache.shape[3], group, max(sizes))
                tiles = cdiv(max(sizes) * group, cfg["BLOCK_M"])
                chunk = choose_chunk_size(max_span, len(sel) * hkv * tiles, cfg["BLOCK_N"])
            plan.shared = _Launch(
                group_ptr=torch.tensor(sh_ptr, dtype=torch.int64, device=dev), group_rows=sh_rows,
                range_start=torch.zeros(len(sel), dtype=torch.int64, device=dev),
                range_end=torch.tensor(spans, dtype=torch.int64, device=dev),
                max_group_rows=max(sizes), chunk_size=chunk, num_chunks=cdiv(max_span, chunk), slot0=0)

        # 2. each row's own tokens [kv_start, ctx)
        if self.deterministic:
            max_ctx = int(ctx.max())   # the step's one host sync
            num_slots = cdiv(max_ctx, self.det_chunk)
            rows = torch.arange(d, dtype=torch.int64, device=dev)
            plan.private = _Launch(
                group_ptr=torch.arange(d + 1, dtype=torch.int64, device=dev), group_rows=rows,
                range_start=kv_start, range_end=ctx, max_group_rows=1, chunk_size=self.det_chunk,
                num_chunks=num_slots, slot0=0)
            plan.num_slots = num_slots
        else:
            max_own = int((ctx - kv_start).max())   # the step's one host sync
            block_n = paged_decode_config(k_cache.dtype, k_cache.shape[3], group)["BLOCK_N"]
            plan.split_size = choose_split_size(max_own, d * hkv, block_n)
            plan.num_splits = cdiv(max_own, plan.split_size)
            plan.kv_start = kv_start
            plan.num_slots = plan.num_splits + (plan.shared.num_chunks if plan.shared is not None else 0)
        return plan
