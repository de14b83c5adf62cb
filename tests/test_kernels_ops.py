"""Every Triton kernel vs its torch twin (kernels/reference.py) under the Triton interpreter.

Odd shapes throughout: block sizes 16 and 32, head_dim 64 and 128, GQA groups 1/4/8, lengths that
are multiples of nothing, empty ranges and suffixes, groups of one. Outputs are pre-filled with NaN
so memory a kernel should write but does not shows up, and memory it must not touch is checked
to still hold NaN.
"""
from __future__ import annotations

import pytest
import torch
from kernels_helpers import assert_close, poisoned, random_cache, random_tables

from mrt_engine.kernels import reference as ref
from mrt_engine.kernels.cascade_decode import cascade_decode
from mrt_engine.kernels.extend import extend
from mrt_engine.kernels.kv_store import kv_store
from mrt_engine.kernels.merge import merge
from mrt_engine.kernels.paged_decode import paged_decode

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (block_size, head_dim, GQA group, Hkv, dtype): a spread, not the full product (the interpreter is slow)
CASES = [(16, 64, 1, 2, F32), (32, 128, 4, 1, F32), (16, 128, 8, 1, BF16), (32, 64, 4, 2, F16),
         (16, 64, 4, 2, BF16)]
IDS = [f"bs{c[0]}-d{c[1]}-g{c[2]}-kv{c[3]}-{str(c[4])[6:]}" for c in CASES]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("bs,hkv,dh", [(16, 2, 64), (32, 3, 128)])
def test_kv_store_writes_exactly_the_slots(bs, hkv, dh, dtype):
    num_blocks = 5
    k_cache, v_cache = poisoned(num_blocks, bs, hkv, dh, dtype=dtype), poisoned(num_blocks, bs, hkv, dh, dtype=dtype)
    slots = torch.tensor([3, bs * 2 + 7, -1, bs * 4 + bs - 1, 0], dtype=torch.int64)   # -1: padding token
    k, v = torch.randn(5, hkv, dh).to(dtype), torch.randn(5, hkv, dh).to(dtype)
    kv_store(k, v, k_cache, v_cache, slots)
    k_ref, v_ref = poisoned(num_blocks, bs, hkv, dh, dtype=dtype), poisoned(num_blocks, bs, hkv, dh, dtype=dtype)
    ref.kv_store(k, v, k_ref, v_ref, slots)
    for got, want in ((k_cache, k_ref), (v_cache, v_ref)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert torch.isnan(k_cache).sum() == (num_blocks * bs - 4) * hkv * dh


def test_kv_store_strided_input():
    # q/k/v come out of a fused qkv projection as strided views
    qkv = torch.randn(6, 3 * 2 * 64)
    k = qkv[:, 128:256].view(6, 2, 64)
    v = qkv[:, 256:].view(6, 2, 64)
    kc, vc = torch.zeros(2, 16, 2, 64), torch.zeros(2, 16, 2, 64)
    slots = torch.tensor([0, 5, 17, 20, 31, 2])
    kv_store(k, v, kc, vc, slots)
    assert torch.equal(kc.view(-1, 2, 64)[slots], k) and torch.equal(vc.view(-1, 2, 64)[slots], v)


@pytest.mark.parametrize("bs,dh,grp,hkv,dtype", CASES, ids=IDS)
def test_paged_decode_matches_reference(bs, dh, grp, hkv, dtype):
    lens = [1, 37, 2 * bs + 5, 3 * bs]
    starts = [0, 0, bs, 3 * bs]          # the last row's range is empty: every split writes empty
    k_cache, v_cache = random_cache(16, bs, hkv, dh, dtype, seed=bs + dh)
    tables = random_tables(lens, bs, 16, seed=grp)
    q = torch.randn(len(lens), hkv * grp, dh).to(dtype)
    kv_start, ctx = torch.tensor(starts), torch.tensor(lens)
    num_splits, split = 3, 32           # more splits than some rows need: trailing empty splits
    out = (poisoned(len(lens), hkv * grp, num_splits, dh), poisoned(len(lens), hkv * grp, num_splits))
    o, lse = paged_decode(q, k_cache, v_cache, tables, kv_start, ctx, 0.3, split_size=split,
                          num_splits=num_splits, out=out)
    o_ref, lse_ref = ref.paged_decode(q, k_cache, v_cache, tables, kv_start, ctx, 0.3, split_size=split,
                                      num_splits=num_splits)
    assert o is out[0]
    assert_close(o, o_ref, dtype)
    assert_close(lse, lse_ref, dtype, lse=True)
    assert torch.isinf(lse[3]).all() and (o[3] == 0).all()


def test_paged_decode_default_split_and_merge_give_full_attention():
    bs, dh, hkv, grp = 16, 64, 2, 4
    lens = [300, 7, 129]
    k_cache, v_cache = random_cache(40, bs, hkv, dh, F32, seed=3)
    tables = random_tables(lens, bs, 40, seed=3)
    q = torch.randn(3, hkv * grp, dh)
    o_p, lse_p = paged_decode(q, k_cache, v_cache, tables, torch.zeros(3, dtype=torch.int64), torch.tensor(lens), 0.2)
    o, lse = merge(o_p, lse_p)
    o_ref, lse_ref = ref.paged_decode(q, k_cache, v_cache, tables, torch.zeros(3, dtype=torch.int64),
                                      torch.tensor(lens), 0.2, split_size=10_000)
    assert_close(o, o_ref[:, :, 0], F32)
    assert_close(lse, lse_ref[:, :, 0], F32, lse=True)


def _groups(sizes, spans, bs, hkv, dh, dtype, seed, extra_rows=1):
    """Rows [0, sum(sizes)) in groups sharing the blocks of their first span_g tokens, plus
    `extra_rows` rows in no group. Returns (lens, k_cache, v_cache, tables, group_ptr, group_rows)."""
    own = 9
    lens, shared, r = [], [], 0
    for size, span in zip(sizes, spans):
        lens += [span + own + i for i in range(size)]
        shared.append((list(range(r, r + size)), -(-span // bs)))
        r += size
    lens += [50] * extra_rows
    num_blocks = sum(-(-n // bs) for n in lens) + 2
    k_cache, v_cache = random_cache(num_blocks, bs, hkv, dh, dtype, seed=seed)
    tables = random_tables(lens, bs, num_blocks, seed=seed, shared=shared)
    ptr = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    rows = []                                  # CSR rows need not be sorted within a group
    for members, _ in shared:
        rows += [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
    return lens, k_cache, v_cache, tables, ptr, torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("bs,dh,grp,hkv,dtype", CASES[:4], ids=IDS[:4])
def test_cascade_decode_matches_reference(bs, dh, grp, hkv, dtype, absolute):
    sizes = [3, 1, 2, 5]                      # includes a group of one
    spans = [2 * bs, bs, 0, 3 * bs]            # includes an empty shared range
    lens, k_cache, v_cache, tables, ptr, rows = _groups(sizes, spans, bs, hkv, dh, dtype, seed=grp + bs)
    starts = torch.tensor([0, 0, 0, bs + 3])   # a range that does not start at 0
    ends = torch.tensor(spans)
    q = torch.randn(len(lens), hkv * grp, dh).to(dtype)
    chunk, num_chunks = 32, 4
    slot_base = torch.tensor([0, 2, 0, 1])    # groups' chunks start at different slots
    slots = num_chunks + 2
    out = (poisoned(len(lens), hkv * grp, slots, dh), poisoned(len(lens), hkv * grp, slots))
    kw = dict(chunk_size=chunk, num_chunks=num_chunks, absolute=absolute, slot_base=slot_base)
    # block_m=16 forces several query tiles per group at GQA 4/8
    o, lse = cascade_decode(q, k_cache, v_cache, tables, ptr, rows, starts, ends, 0.25, out=out, block_m=16, **kw)
    o_ref, lse_ref = ref.cascade_decode(q, k_cache, v_cache, tables, ptr, rows, starts, ends, 0.25,
                                        out=(poisoned(*out[0].shape), poisoned(*out[1].shape)), **kw)
    written = ~torch.isnan(lse_ref)
    assert torch.equal(~torch.isnan(lse), written), "kernel wrote a different set of slots than the reference"
    assert not written[-1].any(), "the row in no group must not be written"
    assert_close(o[written], o_ref[written], dtype)
    assert_close(lse[written], lse_ref[written], dtype, lse=True)


def test_cascade_equals_per_row_paged_decode_over_the_shared_range():
    bs, dh, grp, hkv = 16, 64, 4, 2
    lens, k_cache, v_cache, tables, ptr, rows = _groups([6], [5 * bs], bs, hkv, dh, F32, seed=7, extra_rows=0)
    q = torch.randn(len(lens), hkv * grp, dh)
    span = torch.tensor([5 * bs])
    o_c, lse_c = cascade_decode(q, k_cache, v_cache, tables, ptr, rows, torch.zeros(1, dtype=torch.int64), span,
                                0.2, chunk_size=48)
    d = len(lens)
    o_p, lse_p = paged_decode(q, k_cache, v_cache, tables, torch.zeros(d, dtype=torch.int64), span.repeat(d), 0.2,
                              split_size=48, num_splits=o_c.shape[2])
    assert_close(o_c, o_p, F32)
    assert_close(lse_c, lse_p, F32, lse=True)


@pytest.mark.parametrize("bs,dh,grp,hkv,dtype", CASES, ids=IDS)
def test_extend_matches_reference(bs, dh, grp, hkv, dtype):
    # (cached prefix, new tokens): fresh prompt, extend over a cache, empty suffix, one token
    seqs = [(0, 23), (37, 5), (bs, 0), (3, 1), (2 * bs - 1, 70)]
    lens = [c + n for c, n in seqs]
    num_blocks = sum(-(-n // bs) for n in lens) + 1
    k_cache, v_cache = random_cache(num_blocks, bs, hkv, dh, dtype, seed=dh + grp)
    tables = random_tables(lens, bs, num_blocks, seed=bs)
    gap = 2                                   # rows between sequences that belong to none: stay NaN
    starts, r = [], 0
    for _, n in seqs:
        starts.append(r)
        r += n + gap
    q = torch.randn(r, hkv * grp, dh).to(dtype)
    args = (q, k_cache, v_cache, tables, torch.tensor(starts), torch.tensor([n for _, n in seqs]),
            torch.tensor(lens), 0.17)
    o = extend(*args, out=poisoned(*q.shape, dtype=dtype))
    o_ref = ref.extend(*args, out=poisoned(*q.shape, dtype=dtype))
    covered = ~torch.isnan(o_ref[:, 0, 0].float())
    assert torch.equal(~torch.isnan(o[:, 0, 0].float()), covered)
    assert_close(o[covered], o_ref[covered], dtype)


@pytest.mark.parametrize("out_dtype", [F32, BF16])
def test_merge_matches_reference_and_is_empty_safe(out_dtype):
    r, h, s, dh = 5, 3, 4, 64
    o_p = torch.randn(r, h, s, dh)
    lse_p = torch.randn(r, h, s) * 3
    lse_p[0] = float("-inf")                  # a row with nothing at all
    lse_p[1, :, 1:3] = float("-inf")          # empty slots in the middle ...
    o_p[1, :, 1:3] = float("nan")             # ... whose o is garbage and must not be read
    lse_p[2, 0, 3] = 40.0                     # one dominant slot
    o, lse = merge(o_p, lse_p, out_dtype=out_dtype)
    o_ref, lse_ref = ref.merge(o_p, lse_p, out_dtype=out_dtype)
    assert o.dtype == out_dtype
    assert_close(o, o_ref, out_dtype)
    assert_close(lse, lse_ref, F32, lse=True)
    assert (o[0] == 0).all() and torch.isneginf(lse[0]).all()
    o0, lse0 = merge(o_p[:, :, :0], lse_p[:, :, :0])       # no slots at all
    assert (o0 == 0).all() and torch.isneginf(lse0).all()


def test_merge_trailing_empty_slots_do_not_change_a_bit():
    o_p, lse_p = torch.randn(3, 2, 3, 64), torch.randn(3, 2, 3)
    o_pad = torch.cat([o_p, torch.full((3, 2, 2, 64), float("nan"))], dim=2)
    lse_pad = torch.cat([lse_p, torch.full((3, 2, 2), float("-inf"))], dim=2)
    assert torch.equal(merge(o_p, lse_p)[0], merge(o_pad, lse_pad)[0])


def test_launchers_reject_bad_inputs():
    kc, vc = random_cache(4, 16, 2, 64, F32)
    q = torch.randn(2, 4, 64)
    tables = torch.zeros(2, 3, dtype=torch.int64)
    lens = torch.tensor([5, 9])
    with pytest.raises(TypeError, match="int64"):
        paged_decode(q, kc, vc, tables.int(), torch.zeros(2, dtype=torch.int64), lens, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        paged_decode(q.half(), kc, vc, tables, torch.zeros(2, dtype=torch.int64), lens, 0.1)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode(torch.randn(2, 3, 64), kc, vc, tables, torch.zeros(2, dtype=torch.int64), lens, 0.1)
    with pytest.raises(ValueError, match="head_dim"):
        extend(torch.randn(2, 4, 32), kc, vc, tables, torch.zeros(2, dtype=torch.int64), lens, lens, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        kv_store(torch.randn(2, 64, 2).transpose(1, 2), torch.randn(2, 2, 64), kc, vc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_store(torch.randn(2, 2, 64), torch.randn(2, 2, 64), kc, vc, torch.tensor([0]))
    with pytest.raises(ValueError, match="out shapes"):
        paged_decode(q, kc, vc, tables, torch.zeros(2, dtype=torch.int64), lens, 0.1, split_size=32, num_splits=2,
                     out=(torch.empty(2, 4, 3, 64), torch.empty(2, 4, 3)))
    with pytest.raises(ValueError, match="group_ptr"):
        cascade_decode(q, kc, vc, tables, torch.tensor([0, 2]), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.int64),
                       torch.zeros(1, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="lse_parts"):
        merge(torch.randn(2, 4, 3, 64), torch.randn(2, 4, 2))
