"""Torch attention backend vs a dense per-sequence oracle on random paged caches.

Every case mixes prefill/extend sequences and decode rows in one step, with odd block sizes, GQA
ratios, lengths that are multiples of nothing, groups of one, and groups with no shared blocks.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from mrt_engine.attention import cpu_kernel
from mrt_engine.attention import torch_backend as attention
from mrt_engine.attention import (BACKEND_ENV, TorchAttentionBackend, get_attention_backend, merge_lse,
                                  store_kv)
from mrt_engine.attention.metadata import AttentionMetadata, PrefillSeq


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_attention(q, k_cache, v_cache, block_table, context_len, scale):
    """Oracle: queries q [n, Hq, Dh] are the last n tokens of a sequence of `context_len` tokens."""
    bs, hkv, dh = k_cache.shape[1:]
    n, hq = q.shape[0], q.shape[1]
    slots = torch.arange(context_len)
    rows = block_table[slots // bs] * bs + slots % bs
    kk = k_cache.reshape(-1, hkv, dh)[rows].double().repeat_interleave(hq // hkv, dim=1)
    vv = v_cache.reshape(-1, hkv, dh)[rows].double().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), kk) * scale
    qpos = torch.arange(context_len - n, context_len)[:, None]
    scores = scores.masked_fill(torch.arange(context_len)[None, :] > qpos, -math.inf)
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), vv)


class StepBuilder:
    """Builds one step's metadata over a random block assignment (the model runner's job, simplified)."""

    def __init__(self, num_blocks, block_size, seed):
        self.bs = block_size
        self.rng = random.Random(seed)
        self.free = list(range(num_blocks))
        self.rng.shuffle(self.free)
        self.trunks: dict[str, list[int]] = {}

    def blocks(self, n):
        assert len(self.free) >= n, "test needs more blocks"
        out, self.free = self.free[:n], self.free[n:]
        return out

    def trunk(self, name, n):
        """The first n blocks of a named trunk (a trace that several groups forked from)."""
        blocks = self.trunks.setdefault(name, [])
        if len(blocks) < n:
            blocks += self.blocks(n - len(blocks))
        return blocks[:n]

    def build(self, prefills, groups, device="cpu"):
        """prefills: [(cached_len, num_new)]; groups: [(num_shared_blocks, [own_len per row], trunk?)].

        With a third element (name, k), the group's first k shared blocks are the named trunk's, so
        groups forked from one trace at different points share a prefix of their shared blocks.

        Returns (meta, per-token (block_table, context_len, query index within its sequence)).
        """
        bs = self.bs
        slots, positions, pseqs, seqs = [], [], [], []
        n = 0
        for cached, new in prefills:
            ctx = cached + new
            table = self.blocks(-(-ctx // bs))
            pos = list(range(cached, ctx))
            positions += pos
            slots += [table[p // bs] * bs + p % bs for p in pos]
            t = torch.tensor(table, dtype=torch.long)
            pseqs.append(PrefillSeq(token_start=n, num_new=new, context_len=ctx, block_table=t))
            seqs.append((n, new, t, ctx))
            n += new
        num_prefill = n
        tables, ctxs, ptr, rows, nshared = [], [], [0], [], []
        for ns, own_lens, *trunk in groups:
            shared = self.trunk(*trunk[0]) if trunk else []
            shared = shared + self.blocks(ns - len(shared))
            for own in own_lens:
                ctx = ns * bs + own
                table = shared + self.blocks(-(-own // bs))
                p = ctx - 1
                rows.append(len(tables))
                tables.append(table)
                ctxs.append(ctx)
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                seqs.append((n, 1, torch.tensor(table, dtype=torch.long), ctx))
                n += 1
            ptr.append(len(rows))
            nshared.append(ns)
        kw = {}
        if tables:
            width = max(len(t) for t in tables)
            kw = dict(
                decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
                decode_context_lens=torch.tensor(ctxs, device=device),
                group_ptr=torch.tensor(ptr, device=device), group_rows=torch.tensor(rows, device=device),
                group_num_shared=torch.tensor(nshared, device=device),
                group_ptr_host=ptr, group_num_shared_host=nshared)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=device),
                                 positions=torch.tensor(positions, device=device),
                                 num_prefill_tokens=num_prefill, prefill_seqs=pseqs, **kw)
        return meta, seqs


def run_case(prefills, groups, *, bs, hkv, grp, dh=12, dtype=torch.float32, seed=0, num_blocks=None):
    torch.manual_seed(seed)
    need = sum(-(-(c + n) // bs) for c, n in prefills) + sum(g[0] + sum(-(-o // bs) for o in g[1])
                                                             for g in groups)
    builder = StepBuilder(num_blocks or need + 3, bs, seed)
    meta, seqs = builder.build(prefills, groups)
    n = meta.slot_mapping.shape[0]
    hq = hkv * grp
    k_cache = torch.randn(need + 3 if num_blocks is None else num_blocks, bs, hkv, dh).to(dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(n, hq, dh).to(dtype)
    k = torch.randn(n, hkv, dh).to(dtype)
    v = torch.randn(n, hkv, dh).to(dtype)
    scale = dh ** -0.5
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape and out.dtype == dtype
    # the new K/V landed in their slots
    flat_k = k_cache.view(-1, hkv, dh)
    torch.testing.assert_close(flat_k[meta.slot_mapping], k, rtol=0, atol=0)
    for start, cnt, table, ctx in seqs:
        ref = dense_attention(q[start:start + cnt], k_cache, v_cache, table, ctx, scale)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out[start:start + cnt].double(), ref, rtol=tol, atol=tol)
    return meta


@pytest.fixture(params=["fused", "matmul", "cpp"])
def kernel(request, monkeypatch):
    """Run a test with the fused CPU flash kernel, with its matmul twin (both with the C++ decode
    kernel off) and with the C++ decode kernel (head size 16: it needs a multiple of 16)."""
    if request.param == "fused" and not attention._flash_cpu_available():
        pytest.skip("this torch has no fused CPU attention kernel")
    if request.param == "cpp" and not cpu_kernel.simd_available():
        pytest.skip("the C++ decode kernel needs the extension and AVX-512F")
    monkeypatch.setenv(cpu_kernel.ENV, "1" if request.param == "cpp" else "0")
    monkeypatch.setattr(attention, "USE_FUSED_CPU_KERNEL", request.param == "fused")
    return request.param


def kernel_dh(kernel):
    return 16 if kernel == "cpp" else 12


def check_decode_path(meta, kernel):
    """The step ran the decode path the fixture asked for."""
    if meta.num_decode:
        assert ("cpu_kernel_plan" in meta.backend_cache) == (kernel == "cpp")
    # short extends over a cached prefix run as kernel query rows too
    extends = {i for i, s in enumerate(meta.prefill_seqs) if 0 < s.num_new < s.context_len and s.num_new <= 64}
    if kernel == "cpp" and meta.prefill_seqs:
        assert meta.backend_cache["cpu_kernel_extend"][2] == extends
    else:
        assert "cpu_kernel_extend" not in meta.backend_cache


@pytest.mark.parametrize("bs", [16, 5])
@pytest.mark.parametrize("grp", [1, 2, 4])
def test_mixed_step_matches_dense(bs, grp, kernel):
    prefills = [(0, 23), (2 * bs + 3, 7), (bs, 1), (0, 1)]   # fresh prompt, extend over a cache, 1-token chunks
    groups = [
        (3, [1, 4, bs + 2, 9]),     # shared prefix, rows of different private lengths
        (1, [bs]),                  # group of one with a shared block (degenerates to paged attention)
        (0, [17, 3]),               # no shared blocks
        (2, [2, 2, 2, 2, 2, 2, 2]),  # a wide fork
        (5, [bs, 1]),               # private part that fills its block exactly
    ]
    meta = run_case(prefills, groups, bs=bs, hkv=2, grp=grp, seed=grp * 10 + bs, dh=kernel_dh(kernel))
    check_decode_path(meta, kernel)


@pytest.mark.parametrize("seed", range(4))
def test_random_steps(seed, kernel):
    rng = random.Random(seed)
    bs = rng.choice([5, 16, 7])
    prefills = [(rng.choice([0, rng.randrange(1, 60)]), rng.randrange(1, 40)) for _ in range(rng.randrange(0, 3))]
    groups = [(rng.randrange(0, 6), [rng.randrange(1, 3 * bs) for _ in range(rng.randrange(1, 6))])
              for _ in range(rng.randrange(1 if not prefills else 0, 9))]
    meta = run_case(prefills, groups, bs=bs, hkv=rng.choice([1, 2, 3]), grp=rng.choice([1, 2, 4]), seed=seed,
                    dh=kernel_dh(kernel))
    check_decode_path(meta, kernel)


def test_decode_only_and_prefill_only():
    run_case([], [(4, [3, 5, 1]), (0, [40])], bs=16, hkv=2, grp=2)
    run_case([(0, 50), (33, 20)], [], bs=16, hkv=2, grp=2)


def test_many_groups_of_similar_length_share_batches():
    # 12 groups, shared lengths close together: batched into few padded matmuls; still exact
    groups = [(6 + (g % 3), [1 + (g + r) % 7 for r in range(5)]) for g in range(12)]
    meta = run_case([], groups, bs=5, hkv=2, grp=3, seed=3)
    plan = meta.backend_cache["torch_decode_plan"]
    assert 1 <= len(plan.shared) < 12


@pytest.mark.parametrize("bs", [16, 5])
def test_groups_forked_from_one_trace_share_tree_segments(bs, kernel):
    # two traces; groups forked at several points of each (nested shared prefixes), one group whose
    # shared blocks equal a trunk prefix exactly, one fork of a fork, and unrelated groups
    groups = [
        (4, [3, 1, 7], ("t0", 2)), (6, [2, 2], ("t0", 5)), (9, [bs, 4, 1, 2], ("t0", 9)),
        (7, [5, 6], ("t0", 7)), (3, [1, 1, 1], ("t1", 3)), (5, [9, 2], ("t1", 3)),
        (2, [4, 4]), (0, [30]), (3, [1], ("t1", 3)),
    ]
    meta = run_case([(bs + 2, 5)], groups, bs=bs, hkv=2, grp=2, seed=bs, dh=kernel_dh(kernel))
    check_decode_path(meta, kernel)
    per_group = sum(g[0] for g in groups if len(g[1]) > 1)
    if kernel == "cpp":
        segments = [(blk, rows) for blk, _, rows in attention._kernel_items(meta, bs) if len(rows) > 1]
        rows_per_row = torch.bincount(torch.tensor([r for _, rows in segments for r in rows]),
                                      minlength=meta.num_decode)
        keys_read = sum(len(blk) for blk, _ in segments)
    else:
        plan = meta.backend_cache["torch_decode_plan"]
        rows_per_row = torch.bincount(plan.shared_rows, minlength=meta.num_decode)
        keys_read = sum(b.blocks.numel() for b in plan.shared)
    assert rows_per_row.max() >= 3, "rows of nested groups must see several tree segments"
    assert keys_read < per_group, "the tree reads trunk blocks once, not once per group"


def test_bfloat16_close_to_fp32_oracle(kernel):
    meta = run_case([(10, 9)], [(3, [4, 6]), (0, [11])], bs=16, hkv=2, grp=2, dtype=torch.bfloat16,
                    dh=kernel_dh(kernel))
    check_decode_path(meta, kernel)


def test_metadata_without_groups_is_plain_paged_attention():
    builder = StepBuilder(20, 5, seed=1)
    meta, seqs = builder.build([], [(2, [3]), (0, [12])])
    meta.group_ptr_host, meta.group_num_shared_host = [], []   # no sharing info at all
    meta.group_ptr = meta.group_rows = meta.group_num_shared = None
    k_cache, v_cache = torch.randn(20, 5, 1, 8), torch.randn(20, 5, 1, 8)
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.3)
    for start, cnt, table, ctx in seqs:
        torch.testing.assert_close(out[start:start + cnt].double(),
                                   dense_attention(q[start:start + cnt], k_cache, v_cache, table, ctx, 0.3))


def test_store_kv_writes_only_the_slots():
    k_cache, v_cache = torch.zeros(4, 5, 2, 3), torch.zeros(4, 5, 2, 3)
    k, v = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    store_kv(k, v, k_cache, v_cache, torch.tensor([0, 7, 19]))
    flat = k_cache.view(-1, 2, 3)
    assert torch.equal(flat[torch.tensor([0, 7, 19])], k)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[torch.tensor([0, 7, 19])] = False
    assert torch.all(flat[untouched] == 0)
    assert torch.equal(v_cache.view(-1, 2, 3)[7], v[1])


def test_merge_lse_matches_joint_softmax_and_handles_empty():
    s1, s2 = torch.randn(3, 4, 10), torch.randn(3, 4, 6)
    v1, v2 = torch.randn(3, 4, 10, 5), torch.randn(3, 4, 6, 5)
    part = [(torch.einsum("bhl,bhld->bhd", s.softmax(-1), v), s.logsumexp(-1)) for s, v in ((s1, v1), (s2, v2))]
    o, lse = merge_lse(*part[0], *part[1])
    joint = torch.einsum("bhl,bhld->bhd", torch.cat([s1, s2], -1).softmax(-1), torch.cat([v1, v2], 2))
    torch.testing.assert_close(o, joint)
    torch.testing.assert_close(lse, torch.cat([s1, s2], -1).logsumexp(-1))
    empty = torch.full((3, 4), -math.inf)
    o, lse = merge_lse(part[0][0], part[0][1], torch.zeros(3, 4, 5), empty)
    torch.testing.assert_close(o, part[0][0])
    o, lse = merge_lse(torch.zeros(3, 4, 5), empty, torch.zeros(3, 4, 5), empty)
    assert torch.all(o == 0) and torch.all(lse == -math.inf)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert isinstance(get_attention_backend("auto", "cpu"), TorchAttentionBackend)
    assert isinstance(get_attention_backend("torch", "cpu"), TorchAttentionBackend)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        get_attention_backend("flash", "cpu")
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert isinstance(get_attention_backend("triton", "cuda"), TorchAttentionBackend)
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        get_attention_backend("auto", "cpu")


def test_triton_backend_missing_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "mrt_engine.attention.triton_backend", None)   # import now fails
    with pytest.raises(ValueError, match="'triton' is not available"):
        get_attention_backend("triton", "cpu")
