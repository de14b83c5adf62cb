"""Deterministic mode: a decode row's attention output does not depend on the rest of the batch or
on prefix sharing — bitwise, under the Triton interpreter.

One target row (a 100-token context whose first 5 blocks are shared with three siblings) is
computed (A) alone, (B) in a mixed batch with a prefill sequence, an unrelated longer row and its
siblings sharing the prefix through the cascade kernel, (C) in the same batch without sharing.
"""
from __future__ import annotations

import pytest
import torch
from kernels_helpers import random_cache

from mrt_engine.attention import TorchAttentionBackend
from mrt_engine.attention.metadata import AttentionMetadata, PrefillSeq
from mrt_engine.attention.triton_backend import TritonAttentionBackend

BS, HKV, GRP, DH = 16, 2, 4, 64
SHARED = [0, 1, 2, 3, 4]                    # 80 shared tokens: not a multiple of the 32-token chunk
ROWS = {                                     # name: (block table, context length)
    "T": (SHARED + [5, 6], 100),
    "S1": (SHARED + [7, 8], 101),
    "S2": (SHARED + [9], 85),
    "S3": (SHARED + [10, 11], 110),
    "U": (list(range(12, 26)), 220),
}


def _meta(decode_rows, groups, prefill=None, device="cpu"):
    """decode_rows: names in row order; groups: [(row indices, num_shared)]; prefill: (table, n) or None."""
    slots, positions, seqs, n = [], [], [], 0
    if prefill is not None:
        table, num_new = prefill
        seqs.append(PrefillSeq(0, num_new, num_new, torch.tensor(table)))
        slots += [table[p // BS] * BS + p % BS for p in range(num_new)]
        positions += list(range(num_new))
        n = num_new
    width = max(len(ROWS[r][0]) for r in decode_rows)
    tables, lens = [], []
    for r in decode_rows:
        table, ctx = ROWS[r]
        tables.append(table + [0] * (width - len(table)))
        lens.append(ctx)
        slots.append(table[(ctx - 1) // BS] * BS + (ctx - 1) % BS)
        positions.append(ctx - 1)
    ptr, rows, ns = [0], [], []
    for members, shared in groups:
        rows += members
        ptr.append(len(rows))
        ns.append(shared)
    t = lambda x: torch.tensor(x, device=device)  # noqa: E731
    for s in seqs:
        s.block_table = s.block_table.to(device)
    return AttentionMetadata(
        slot_mapping=t(slots), positions=t(positions), num_prefill_tokens=n, prefill_seqs=seqs,
        decode_block_tables=t(tables), decode_context_lens=t(lens), group_ptr=t(ptr), group_rows=t(rows),
        group_num_shared=t(ns), group_ptr_host=ptr, group_num_shared_host=ns)


def _run(backend, meta, q_by_row, kv_by_row, decode_rows, prefill_n=0, dtype=torch.float32):
    dev = meta.slot_mapping.device
    k_cache, v_cache = (c.to(dev) for c in random_cache(40, BS, HKV, DH, dtype, seed=1))
    g = torch.Generator().manual_seed(5)
    q = [torch.randn(prefill_n, HKV * GRP, DH, generator=g)] + [q_by_row[r][None] for r in decode_rows]
    k = [torch.randn(prefill_n, HKV, DH, generator=g)] + [kv_by_row[r][0][None] for r in decode_rows]
    v = [torch.randn(prefill_n, HKV, DH, generator=g)] + [kv_by_row[r][1][None] for r in decode_rows]
    q, k, v = (torch.cat(x).to(dev, dtype) for x in (q, k, v))
    out = backend.forward(q, k, v, k_cache, v_cache, meta, DH ** -0.5)
    return {r: out[prefill_n + i] for i, r in enumerate(decode_rows)}


def check_bitwise_independence(q, kv, device="cpu", dtype=torch.float32):
    """The property itself; also run natively on CUDA by tests/test_kernels_gpu.py."""
    det = TritonAttentionBackend(deterministic=True, det_chunk=32)
    alone = _run(det, _meta(["T"], [([0], 5)], device=device), q, kv, ["T"], dtype=dtype)["T"]
    batch = ["U", "S1", "T", "S2", "S3"]
    shared_meta = _meta(batch, [([0], 0), ([2, 1, 3, 4], 5)], prefill=([30, 31], 21), device=device)
    shared = _run(det, shared_meta, q, kv, batch, prefill_n=21, dtype=dtype)
    assert shared_meta.backend_cache["triton_plan_det"].shared is not None, "the cascade path was not taken"
    unshared = _run(det, _meta(batch, [([i], 0) for i in range(5)], prefill=([30, 31], 21), device=device), q, kv,
                    batch, prefill_n=21, dtype=dtype)
    assert torch.equal(alone, shared["T"])
    assert torch.equal(alone, unshared["T"])
    for r in ("S1", "S2", "S3"):
        assert torch.equal(shared[r], unshared[r])
    return alone


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    q = {r: torch.randn(HKV * GRP, DH, generator=g) for r in ROWS}
    kv = {r: (torch.randn(HKV, DH, generator=g), torch.randn(HKV, DH, generator=g)) for r in ROWS}
    return q, kv


def test_row_output_is_bitwise_independent_of_batch_and_sharing(inputs):
    q, kv = inputs
    alone = check_bitwise_independence(q, kv)
    # and it is the right answer
    oracle = _run(TorchAttentionBackend(), _meta(["T"], [([0], 5)]), q, kv, ["T"])["T"]
    torch.testing.assert_close(alone, oracle, rtol=1e-5, atol=1e-5)


def test_fast_mode_matches_deterministic_mode_closely(inputs):
    q, kv = inputs
    batch = ["U", "S1", "T", "S2", "S3"]
    groups = [([0], 0), ([2, 1, 3, 4], 5)]
    fast = _run(TritonAttentionBackend(deterministic=False), _meta(batch, groups), q, kv, batch)
    det = _run(TritonAttentionBackend(deterministic=True, det_chunk=32), _meta(batch, groups), q, kv, batch)
    for r in batch:
        torch.testing.assert_close(fast[r], det[r], rtol=1e-5, atol=1e-5)


def test_environment_switches_deterministic_mode(monkeypatch):
    monkeypatch.setenv("MRT_ENGINE_DETERMINISTIC", "1")
    assert TritonAttentionBackend().deterministic
    monkeypatch.setenv("MRT_ENGINE_DETERMINISTIC", "0")
    assert not TritonAttentionBackend().deterministic
    with pytest.raises(ValueError, match="det_chunk"):
        TritonAttentionBackend(det_chunk=0)
