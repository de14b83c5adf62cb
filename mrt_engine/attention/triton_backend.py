"""Triton attention backend: the engine's GPU path over the paged, prefix-shared KV cache.

Same interface as `attention.TorchAttentionBackend` (its oracle):
    forward(q [N, Hq, Dh], k [N, Hkv, Dh], v, k_cache, v_cache, meta, scale) -> [N, Hq, Dh]
Per layer: kv_store (new K/V -> cache), extend for the prefill/extend tokens, and for the decode
rows cascade_decode + paged_decode writing fp32 partials into one buffer that merge reduces into
the output. Sharing groups (more than one row, shared blocks) are arranged in a prefix tree over
their shared block ids: groups forked from one trace at several boundaries share the trace's
trunk, and each tree segment (a run of blocks, every row below it) is one cascade group, so the
trunk is read once per step, not once per group; each row's own tokens go through paged_decode.
The launch plan (tree, slots, split sizes and every index array the kernels read) is built on the
first layer of a step, on the host from the metadata's host copies (model_runner fills them; a
caller that does not falls back to reading the device tensors), uploaded as ONE packed int64
host-to-device copy, and kept in `meta.backend_cache`. Kernel launches then need no host sync, so
a decode step can be captured in a CUDA graph (benchmarks/bench_kernels.py does).

Deterministic mode (`deterministic=True` or MRT_ENGINE_DETERMINISTIC=1): every decode row is cut
into fixed chunks of `det_chunk` tokens at absolute positions (k*det_chunk ...), tree segments are
trimmed to whole chunks, every chunk of every row goes through the same compiled cascade kernel
(own parts as groups of one) with one pinned tile shape into the slot of its position, and merge
walks the slots in order. A row's output then does not depend on what else is in the batch or on
whether its prefix was shared.
On CPU tensors the kernels run under the Triton interpreter (see mrt_engine.kernels).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mrt_engine.attention.metadata import AttentionMetadata
from mrt_engine.attention.share_tree import prefix_tree_segments
from mrt_engine.kernels.cascade_decode import cascade_decode, cascade_decode_config, choose_chunk_size
from mrt_engine.kernels.checks import cdiv, is_interpreted
from mrt_engine.kernels.extend import extend
from mrt_engine.kernels.kv_store import kv_store
from mrt_engine.kernels.merge import merge
from mrt_engine.kernels.paged_decode import choose_split_size, paged_decode, paged_decode_config, paged_decode_kernel
from mrt_engine.kernels.tuning import target_programs

DETERMINISTIC_ENV = "MRT_ENGINE_DETERMINISTIC"
DET_BLOCK_M = 64            # the one query-tile shape every deterministic decode launch uses


@dataclass
class _Launch:
    """One cascade launch: groups (CSR) over token ranges; group g's chunk c goes to slot slot_base[g] + c."""
    group_ptr: torch.Tensor
    group_rows: torch.Tensor
    range_start: torch.Tensor
    range_end: torch.Tensor
    slot_base: torch.Tensor              # [G] first slot of each group (deterministic mode: 0, absolute chunks)
    max_group_rows: int
    chunk_size: int
    num_chunks: int


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
    kv_start: torch.Tensor | None = None  # [D] first token of each row's own part
    split_size: int = 0
    num_splits: int = 0
    shared_slots: int = 0                 # fast mode: slots [0, shared_slots) hold tree-segment partials
    num_slots: int = 0
    partials: tuple | None = None         # (o [D, Hq, S, Dh], lse [D, Hq, S]) fp32, shared by the step's layers


class TritonAttentionBackend:
    """Paged attention with the Triton kernels of mrt_engine.kernels (GPU default)."""

    name = "triton"
    accepts_out = True   # forward(..., out=): writes the attention output into the caller's tensor

    def __init__(self, deterministic: bool | None = None, det_chunk: int = 256):
        if deterministic is None:
            deterministic = os.environ.get(DETERMINISTIC_ENV, "0") == "1"
        if det_chunk <= 0:
            raise ValueError(f"det_chunk must be a positive number of tokens, got {det_chunk}")
        self.deterministic = bool(deterministic)
        self.det_chunk = int(det_chunk)
        if not torch.cuda.is_available() and not is_interpreted(paged_decode_kernel):
            raise RuntimeError(
                "the triton attention backend needs CUDA, or on CPU the Triton interpreter, which must be on "
                "before triton is first imported: set TRITON_INTERPRET=1 (or import mrt_engine.kernels before "
                "transformers)")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """`out` [N, Hq, Dh] of q's dtype (optional): written instead of a fresh tensor (the CUDA
        graph runner's static buffer)."""
        kv_store(k, v, k_cache, v_cache, meta.slot_mapping)
        key = "triton_plan_det" if self.deterministic else "triton_plan"
        plan = meta.backend_cache.get(key)
        if plan is None:
            plan = self._build_plan(meta, k_cache, q.shape[1] // k_cache.shape[2])
            meta.backend_cache[key] = plan
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor on {q.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        n0 = meta.num_prefill_tokens
        if n0:
            extend(q, k_cache, v_cache, plan.p_tables, plan.p_qstart, plan.p_num_new, plan.p_ctx, scale,
                   max_num_new=plan.p_max_new, out=out)
        if meta.num_decode:
            self._decode(q[n0:], k_cache, v_cache, meta, plan, scale, out[n0:])
        return out

    # --- decode -------------------------------------------------------------------------------
    def _decode(self, q, k_cache, v_cache, meta, plan: _Plan, scale, out):
        if plan.partials is None:
            # one partial buffer per step, not per layer: every layer runs the same launches, so the
            # slots no chunk covers (filled empty here, once) stay empty, and the covered ones are
            # rewritten by each layer before its merge reads them
            d, hq, dh = q.shape
            o_parts = torch.empty(d, hq, plan.num_slots, dh, dtype=torch.float32, device=q.device)
            lse_parts = torch.empty(d, hq, plan.num_slots, dtype=torch.float32, device=q.device)
            fill = plan.num_slots if self.deterministic else plan.shared_slots
            lse_parts[:, :, :fill].fill_(float("-inf"))
            plan.partials = (o_parts, lse_parts)
        o_parts, lse_parts = plan.partials
        tables = meta.block_tables()
        for launch in (plan.shared, plan.private):
            if launch is not None:
                cascade_decode(q, k_cache, v_cache, tables, launch.group_ptr, launch.group_rows, launch.range_start,
                               launch.range_end, scale, chunk_size=launch.chunk_size, num_chunks=launch.num_chunks,
                               absolute=self.deterministic, max_group_rows=launch.max_group_rows,
                               out=(o_parts, lse_parts), block_m=DET_BLOCK_M if self.deterministic else None,
                               slot_base=launch.slot_base)
        if not self.deterministic:
            s0 = plan.shared_slots
            paged_decode(q, k_cache, v_cache, tables, plan.kv_start, meta.decode_context_lens, scale,
                         split_size=plan.split_size, num_splits=plan.num_splits,
                         out=(o_parts[:, :, s0:], lse_parts[:, :, s0:]))
        merge(o_parts, lse_parts, out=out)

    # --- the per-step plan ----------------------------------------------------------------------
    def _shared_launch(self, segments, bs, k_cache, group, pack):
        """Fast mode: one cascade launch over all tree segments; a row's segments (its chain from the
        root) get consecutive slot ranges: slot_base(child) = slot_base(parent) + chunks(parent).
        Returns (launch, slots used)."""
        if not segments:
            return None, 0
        spans = [(e - s) * bs for s, e, _, _ in segments]
        max_rows = max(len(rows) for _, _, rows, _ in segments)
        cfg = cascade_decode_config(k_cache.dtype, k_cache.shape[3], group, max_rows)
        tiles = cdiv(max_rows * group, cfg["BLOCK_M"])
        chunk = choose_chunk_size(max(spans), len(segments) * k_cache.shape[2] * tiles, cfg["BLOCK_N"],
                                  target_programs(k_cache.device))
        chunks = [cdiv(sp, chunk) for sp in spans]
        base = []
        for i, (_, _, _, parent) in enumerate(segments):
            base.append(0 if parent < 0 else base[parent] + chunks[parent])
        launch = _launch_from([rows for _, _, rows, _ in segments], [s * bs for s, _, _, _ in segments],
                              [e * bs for _, e, _, _ in segments], base, max_rows, chunk, max(chunks), pack)
        return launch, max(b + c for b, c in zip(base, chunks))

    def _det_shared_launch(self, segments, bs, pack):
        """Deterministic mode: segments trimmed to whole chunks, written at their absolute chunk slots."""
        S = self.det_chunk
        kept = [((s * bs // S) * S, (e * bs // S) * S, rows) for s, e, rows, _ in segments]
        kept = [k for k in kept if k[1] > k[0]]
        if not kept:
            return None
        max_rows = max(len(rows) for _, _, rows in kept)
        return _launch_from([rows for _, _, rows in kept], [s for s, _, _ in kept], [e for _, e, _ in kept],
                            [0] * len(kept), max_rows, S, max(e for _, e, _ in kept) // S, pack)

    def _build_plan(self, meta: AttentionMetadata, k_cache: torch.Tensor, group: int) -> _Plan:
        plan = _Plan()
        pack = _Pack()
        bs, hkv = k_cache.shape[1], k_cache.shape[2]
        if meta.prefill_seqs:
            seqs = meta.prefill_seqs
            tables = [s.block_table.tolist() if s.block_table_host is None else s.block_table_host for s in seqs]
            width = max(1, max(len(t) for t in tables))
            plan.p_qstart = pack.add([s.token_start for s in seqs])
            plan.p_num_new = pack.add([s.num_new for s in seqs])
            plan.p_ctx = pack.add([s.context_len for s in seqs])
            padded = []
            for t in tables:
                padded += t
                padded += [0] * (width - len(t))
            plan.p_tables = pack.add(padded, (len(seqs), width))
            plan.p_max_new = max(s.num_new for s in seqs)
        d = meta.num_decode
        if d == 0:
            pack.upload(k_cache.device, plan)
            return plan
        ctx = meta.decode_context_lens_host or meta.decode_context_lens.tolist()

        # 1. groups worth sharing (more than one row, shared blocks) -> prefix-tree segments
        ptr = meta.group_ptr_host if meta.group_rows is not None else []
        nshared = meta.group_num_shared_host
        groups = [(g, nshared[g]) for g in range(len(ptr) - 1) if ptr[g + 1] - ptr[g] > 1 and nshared[g] > 0]
        kv_start = [0] * d
        segments = []
        if groups:
            rows_host = meta.group_rows_host or meta.group_rows.tolist()
            members = [rows_host[ptr[g]:ptr[g + 1]] for g, _ in groups]
            if meta.decode_block_tables_host:
                lists = [meta.decode_block_tables_host[m[0]] for m in members]
            else:
                first = torch.tensor([m[0] for m in members], dtype=torch.int64, device=k_cache.device)
                lists = meta.block_tables().index_select(0, first).tolist()
            segments = prefix_tree_segments([(list(lst[:ns]), m) for lst, (_, ns), m in zip(lists, groups, members)])
            unit = self.det_chunk if self.deterministic else 1
            for (_, ns), m in zip(groups, members):
                for r in m:
                    kv_start[r] = (ns * bs // unit) * unit
        if self.deterministic:
            plan.shared = self._det_shared_launch(segments, bs, pack)
        else:
            plan.shared, plan.shared_slots = self._shared_launch(segments, bs, k_cache, group, pack)

        # 2. each row's own tokens [kv_start, ctx)
        plan.kv_start = pack.add(kv_start)
        if self.deterministic:
            num_slots = cdiv(max(ctx), self.det_chunk)
            plan.private = _Launch(
                group_ptr=pack.add(list(range(d + 1))), group_rows=pack.add(list(range(d))),
                range_start=plan.kv_start, range_end=meta.decode_context_lens, slot_base=pack.add([0] * d),
                max_group_rows=1,
                chunk_size=self.det_chunk, num_chunks=num_slots)
            plan.num_slots = num_slots
        else:
            max_own = max(c - s for c, s in zip(ctx, kv_start))
            block_n = paged_decode_config(k_cache.dtype, k_cache.shape[3], group)["BLOCK_N"]
            plan.split_size = choose_split_size(max_own, d * hkv, block_n, target_programs(k_cache.device))
            plan.num_splits = cdiv(max_own, plan.split_size)
            plan.num_slots = plan.shared_slots + plan.num_splits
        pack.upload(k_cache.device, plan)
        return plan


class _Pack:
    """The plan's int64 index arrays, gathered on the host and uploaded in one copy.

    `add` returns a placeholder (its index); `upload` makes one tensor on the device and replaces
    every placeholder held by the plan (and its launches) with its view.
    """

    def __init__(self):
        self.flat: list[int] = []
        self.views: list[tuple[int, int, tuple | None]] = []

    def add(self, values, shape: tuple | None = None) -> "_Slot":
        self.views.append((len(self.flat), len(values), shape))
        self.flat += values
        return _Slot(len(self.views) - 1)

    def upload(self, device, plan: _Plan) -> None:
        buf = torch.tensor(self.flat, dtype=torch.int64)
        if device.type != "cpu":
            buf = buf.to(device, non_blocking=True)
        views = [buf.narrow(0, off, n) if shape is None else buf.narrow(0, off, n).view(shape)
                 for off, n, shape in self.views]

        def resolve(obj):
            for name, value in vars(obj).items():
                if isinstance(value, _Slot):
                    setattr(obj, name, views[value.index])
                elif isinstance(value, _Launch):
                    resolve(value)

        resolve(plan)


@dataclass(frozen=True)
class _Slot:
    index: int


def _launch_from(rows_per_group, starts, ends, base, max_rows, chunk, num_chunks, pack: _Pack) -> _Launch:
    ptr, rows = [0], []
    for group_rows in rows_per_group:
        rows += group_rows
        ptr.append(len(rows))
    return _Launch(group_ptr=pack.add(ptr), group_rows=pack.add(rows), range_start=pack.add(starts),
                   range_end=pack.add(ends), slot_base=pack.add(base),
                   max_group_rows=max_rows, chunk_size=chunk, num_chunks=num_chunks)
