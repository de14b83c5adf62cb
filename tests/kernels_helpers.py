"""Shared pieces of the kernel tests: interpreter switch, random paged caches, tolerances, NaN poison,
and the deterministic-mode batch-invariance check (run under the interpreter and natively on CUDA).

Importing mrt_engine.kernels first turns the Triton interpreter on when CUDA is absent (it must be on
before triton is imported; tests/conftest.py imports the package for that reason).
"""
from __future__ import annotations

import math

import mrt_engine.kernels  # noqa: F401  (interpreter switch, before triton is imported)
import torch

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
NAN = float("nan")


def assert_close(actual, expected, dtype, *, lse=False):
    """One tolerance rule for every kernel test: tight for fp32, loose for 16-bit; -inf must match."""
    tol = (LSE_TOL if lse else TOL)[dtype]
    actual, expected = actual.float(), expected.float()
    assert not torch.isnan(actual).any(), "kernel left NaN (unwritten memory?)"
    inf_a, inf_e = torch.isinf(actual), torch.isinf(expected)
    assert torch.equal(inf_a, inf_e), "empty (-inf) entries differ"
    torch.testing.assert_close(actual[~inf_a], expected[~inf_e], rtol=tol, atol=tol)


def random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def random_tables(lengths, block_size, num_blocks, seed=0, shared=None):
    """Block tables [R, Bmax] int64 with distinct random blocks per row; `shared` = (rows, n) makes
    those rows share their first n blocks. Padding is block 0."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / block_size) for n in lengths]
    width = max(need + [1])
    perm = torch.randperm(num_blocks, generator=g).tolist()
    assert sum(need) <= num_blocks, "test needs more blocks"
    tables = torch.zeros(len(lengths), width, dtype=torch.int64)
    for r, nb in enumerate(need):
        tables[r, :nb] = torch.tensor(perm[:nb], dtype=torch.int64)
        perm = perm[nb:]
    for rows, n in (shared or []):
        for r in rows[1:]:
            tables[r, :n] = tables[rows[0], :n]
    return tables


def poisoned(*shape, dtype=torch.float32):
    return torch.full(shape, NAN, dtype=dtype)


def build_step(prefills, groups, block_size, seed=0, num_blocks=None):
    """One step's AttentionMetadata over a random block assignment.

    prefills: [(cached_len, num_new)]; groups: [(num_shared_blocks, [own tokens per row])], each
    decode row's context = shared blocks + own tokens (its current token included).
    Returns (meta, num_blocks used).
    """
    import random

    from mrt_engine.attention.metadata import AttentionMetadata, PrefillSeq

    bs = block_size
    need = sum(math.ceil((c + n) / bs) for c, n in prefills) + sum(
        ns + sum(math.ceil(o / bs) for o in own) for ns, own in groups)
    num_blocks = num_blocks or need + 2
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)

    def take(n):
        nonlocal free
        out, free = free[:n], free[n:]
        return out

    slots, positions, pseqs, n = [], [], [], 0
    for cached, new in prefills:
        ctx = cached + new
        table = take(math.ceil(ctx / bs))
        for p in range(cached, ctx):
            slots.append(table[p // bs] * bs + p % bs)
            positions.append(p)
        pseqs.append(PrefillSeq(token_start=n, num_new=new, context_len=ctx, block_table=torch.tensor(table)))
        n += new
    tables, lens, ptr, rows, nshared = [], [], [0], [], []
    for ns, own_lens in groups:
        shared = take(ns)
        for own in own_lens:
            table = shared + take(math.ceil(own / bs))
            ctx = ns * bs + own
            rows.append(len(tables))
            tables.append(table)
            lens.append(ctx)
            slots.append(table[(ctx - 1) // bs] * bs + (ctx - 1) % bs)
            positions.append(ctx - 1)
        ptr.append(len(rows))
        nshared.append(ns)
    kw = {}
    if tables:
        width = max(len(t) for t in tables)
        kw = dict(decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                  decode_context_lens=torch.tensor(lens), group_ptr=torch.tensor(ptr), group_rows=torch.tensor(rows),
                  group_num_shared=torch.tensor(nshared), group_ptr_host=ptr, group_num_shared_host=nshared)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), positions=torch.tensor(positions),
                             num_prefill_tokens=n, prefill_seqs=pseqs, **kw)
    return meta, num_blocks


# --- deterministic mode: the batch-invariance property (tests/test_kernels_determinism.py, and
# natively on CUDA tests/test_kernels_gpu.py) -----------------------------------------------------
DET_BS, DET_HKV, DET_GRP, DET_DH = 16, 2, 4, 64
DET_SHARED = [0, 1, 2, 3, 4]                    # 80 shared tokens: not a multiple of the 32-token chunk
DET_ROWS = {                                     # name: (block table, context length)
    "T": (DET_SHARED + [5, 6], 100),
    "S1": (DET_SHARED + [7, 8], 101),
    "S2": (DET_SHARED + [9], 85),
    "S3": (DET_SHARED + [10, 11], 110),
    "U": (list(range(12, 26)), 220),
}


def det_meta(decode_rows, groups, prefill=None, device="cpu"):
    """decode_rows: names in row order; groups: [(row indices, num_shared)]; prefill: (table, n) or None."""
    from mrt_engine.attention.metadata import AttentionMetadata, PrefillSeq

    slots, positions, seqs, n = [], [], [], 0
    if prefill is not None:
        table, num_new = prefill
        seqs.append(PrefillSeq(0, num_new, num_new, torch.tensor(table)))
        slots += [table[p // DET_BS] * DET_BS + p % DET_BS for p in range(num_new)]
        positions += list(range(num_new))
        n = num_new
    width = max(len(DET_ROWS[r][0]) for r in decode_rows)
    tables, lens = [], []
    for r in decode_rows:
        table, ctx = DET_ROWS[r]
        tables.append(table + [0] * (width - len(table)))
        lens.append(ctx)
        slots.append(table[(ctx - 1) // DET_BS] * DET_BS + (ctx - 1) % DET_BS)
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


def det_run(backend, meta, q_by_row, kv_by_row, decode_rows, prefill_n=0, dtype=torch.float32):
    dev = meta.slot_mapping.device
    k_cache, v_cache = (c.to(dev) for c in random_cache(40, DET_BS, DET_HKV, DET_DH, dtype, seed=1))
    g = torch.Generator().manual_seed(5)
    q = [torch.randn(prefill_n, DET_HKV * DET_GRP, DET_DH, generator=g)] + [q_by_row[r][None] for r in decode_rows]
    k = [torch.randn(prefill_n, DET_HKV, DET_DH, generator=g)] + [kv_by_row[r][0][None] for r in decode_rows]
    v = [torch.randn(prefill_n, DET_HKV, DET_DH, generator=g)] + [kv_by_row[r][1][None] for r in decode_rows]
    q, k, v = (torch.cat(x).to(dev, dtype) for x in (q, k, v))
    out = backend.forward(q, k, v, k_cache, v_cache, meta, DET_DH ** -0.5)
    return {r: out[prefill_n + i] for i, r in enumerate(decode_rows)}


def check_bitwise_independence(q, kv, device="cpu", dtype=torch.float32):
    """The property itself; also run natively on CUDA by tests/test_kernels_gpu.py."""
    from mrt_engine.attention.triton_backend import TritonAttentionBackend

    det = TritonAttentionBackend(deterministic=True, det_chunk=32)
    alone = det_run(det, det_meta(["T"], [([0], 5)], device=device), q, kv, ["T"], dtype=dtype)["T"]
    batch = ["U", "S1", "T", "S2", "S3"]
    shared_meta = det_meta(batch, [([0], 0), ([2, 1, 3, 4], 5)], prefill=([30, 31], 21), device=device)
    shared = det_run(det, shared_meta, q, kv, batch, prefill_n=21, dtype=dtype)
    assert shared_meta.backend_cache["triton_plan_det"].shared is not None, "the cascade path was not taken"
    unshared = det_run(det, det_meta(batch, [([i], 0) for i in range(5)], prefill=([30, 31], 21), device=device), q, kv,
                    batch, prefill_n=21, dtype=dtype)
    assert torch.equal(alone, shared["T"])
    assert torch.equal(alone, unshared["T"])
    for r in ("S1", "S2", "S3"):
        assert torch.equal(shared[r], unshared[r])
    return alone


def assert_rounds_like_torch(got, want, dtype, min_equal: float = 0.999):
    """The layer kernels (rms_norm, silu_mul, rope_) against their torch twins: every element
    written, fp32 to float rounding, 16-bit within one unit in the last place and bit-equal in at
    least `min_equal` of the elements (a kernel rounding in another place fails that by far)."""
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), "NaN left: an element was not written"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        return
    eps = torch.finfo(dtype).eps   # one unit in the last place, relative
    torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=1e-6)
    equal = (got == want).float().mean().item()
    assert equal >= min_equal, f"only {equal:.1%} of elements bit-equal to torch's"
