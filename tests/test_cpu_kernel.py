"""The C++ CPU decode-attention kernel (mrt_engine._C.CpuDecodeAttention) against a dense oracle.

Random work items over a random paged cache: rows in several items (a prefix tree's segments plus
their own tails), odd block sizes, keys that end mid-block, GQA ratios 1 to 7, head sizes 16 to 128,
items wider than one task (more than 128 query vectors), float32 and bfloat16. Both the AVX-512
path and the scalar path are checked, and the result must not depend on the thread count.
"""
from __future__ import annotations

import random

import pytest
import torch

from mrt_engine.attention import cpu_kernel

pytestmark = pytest.mark.skipif(cpu_kernel._Kernel is None, reason="mrt_engine._C is not built")
SIMD = [True, False] if cpu_kernel.simd_available() else [False]


def oracle(q, k_cache, v_cache, items, scale):
    """Each row attends to the keys of all its items together (float64 softmax)."""
    num_rows, hq, dh = q.shape
    hkv = k_cache.shape[2]
    keys = {r: [] for r in range(num_rows)}
    for blocks, n, rows in items:
        kk = k_cache[torch.tensor(blocks)].reshape(-1, hkv, dh)[:n]
        vv = v_cache[torch.tensor(blocks)].reshape(-1, hkv, dh)[:n]
        for r in rows:
            keys[r].append((kk, vv))
    out = torch.empty(num_rows, hq, dh, dtype=torch.float64)
    for r in range(num_rows):
        kk = torch.cat([a for a, _ in keys[r]]).double().repeat_interleave(hq // hkv, 1)
        vv = torch.cat([b for _, b in keys[r]]).double().repeat_interleave(hq // hkv, 1)
        s = torch.einsum("hd,thd->ht", q[r].double(), kk) * scale
        out[r] = torch.einsum("ht,thd->hd", s.softmax(-1), vv)
    return out


def random_case(seed, *, hkv, grp, dh, bs, dtype, rows=29, num_blocks=60):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    k_cache = torch.randn(num_blocks, bs, hkv, dh).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, dh).to(dtype)
    q = torch.randn(rows, hkv * grp, dh).to(dtype)
    items = []
    for r in range(rows):          # every row's own tail: 1 key up to a few blocks, ending anywhere
        n = rng.randint(1, 3 * bs)
        items.append((rng.sample(range(num_blocks), -(-n // bs)), n, [r]))
    for _ in range(5):             # shared segments over random subsets of rows (whole blocks)
        nb = rng.randint(1, 4)
        items.append((rng.sample(range(num_blocks), nb), nb * bs, rng.sample(range(rows), rng.randint(2, rows))))
    return q, k_cache, v_cache, items


CASES = [dict(hkv=2, grp=3, dh=64, bs=16), dict(hkv=2, grp=7, dh=64, bs=16), dict(hkv=1, grp=1, dh=128, bs=16),
         dict(hkv=3, grp=2, dh=16, bs=5), dict(hkv=2, grp=4, dh=32, bs=7), dict(hkv=1, grp=5, dh=48, bs=1)]


# (simd, bf16_dot): the scalar path, the AVX-512F float32-FMA path, the AVX512_BF16 dot-product path
PATHS = [(False, False)] + ([(True, False)] if cpu_kernel.simd_available() else []) + \
        ([(True, True)] if cpu_kernel.bf16_dot_available() else [])


def over_cases_dtypes_paths(cases):
    """Parametrize a test over shape cases, both cache dtypes and every kernel path."""
    def deco(test):
        test = pytest.mark.parametrize("path", PATHS, ids=["scalar", "avx512", "avx512bf16"][:len(PATHS)])(test)
        test = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])(test)
        return pytest.mark.parametrize("case", cases, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))(test)
    return deco


def path_flags(path, dtype):
    simd, bf16_dot = path
    if bf16_dot and dtype != torch.bfloat16:
        pytest.skip("the dot-product path is for bfloat16 caches")
    return simd, bf16_dot


def assert_matches_oracle(out, ref, bf16_dot):
    if bf16_dot:
        # the probabilities are rounded to bf16 for PV (relative 2^-9), as in PyTorch's fused kernel
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=4e-3)
        assert (out.double() - ref).abs().mean() < 5e-4
    else:
        # the inputs are exactly representable, so float32 accumulation is the only error
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


@over_cases_dtypes_paths(CASES)
def test_matches_dense_oracle(case, dtype, path):
    simd, bf16_dot = path_flags(path, dtype)
    q, k_cache, v_cache, items = random_case(hash(tuple(case.values())) % 1000, dtype=dtype, **case)
    scale = case["dh"] ** -0.5
    plan = cpu_kernel.DecodePlan(items, q.shape[0], q.shape[1], k_cache)
    out = plan.run(q, k_cache, v_cache, scale, simd=simd, bf16_dot=bf16_dot)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert_matches_oracle(out, oracle(q, k_cache, v_cache, items, scale), bf16_dot)


@over_cases_dtypes_paths([dict(hkv=2, grp=7, dh=64, bs=16)])
def test_wide_items_and_strided_q(case, dtype, path):
    # 40 rows x 7 heads = 280 query vectors per KV head: tasks of 128 (the float32 kernel in passes of
    # 64) and a part-filled last one; q is a strided view
    simd, bf16_dot = path_flags(path, dtype)
    q, k_cache, v_cache, items = random_case(3, **case, dtype=dtype, rows=40)
    items.append((list(range(10)), 10 * 16, list(range(40))))
    wide = torch.randn(40, 14 * 2, 64).to(dtype)
    wide[:, ::2] = q
    qs = wide[:, ::2]
    assert not qs.is_contiguous()
    plan = cpu_kernel.DecodePlan(items, 40, 14, k_cache)
    out = plan.run(qs, k_cache, v_cache, 0.125, simd=simd, bf16_dot=bf16_dot)
    assert_matches_oracle(out, oracle(q, k_cache, v_cache, items, 0.125), bf16_dot)


# A row's first single-row item is its own tail, computed in the merge pass on the SIMD paths:
# rows with no such item, a second single-row item (a task), an own tail listed after the
# segments, a row of single-row items only; more than 16 query heads per KV head (no key-lanes
# kernel); 20 partials on one row.
LAYOUTS = [dict(hkv=2, grp=3, dh=64, bs=16), dict(hkv=1, grp=17, dh=32, bs=8), dict(hkv=2, grp=2, dh=48, bs=5)]


@over_cases_dtypes_paths(LAYOUTS)
def test_own_tail_layouts(case, dtype, path):
    simd, bf16_dot = path_flags(path, dtype)
    rng = random.Random(11)
    torch.manual_seed(11)
    hkv, grp, dh, bs, rows, nb = case["hkv"], case["grp"], case["dh"], case["bs"], 6, 80
    k_cache = torch.randn(nb, bs, hkv, dh).to(dtype)
    v_cache = torch.randn(nb, bs, hkv, dh).to(dtype)
    q = torch.randn(rows, hkv * grp, dh).to(dtype)

    def item(n, rs):
        return (rng.sample(range(nb), -(-n // bs)), n, rs)

    items = [item(3 * bs, [0, 1, 2, 4]),      # row 0: segments only
             item(bs + 3, [1]), item(2, [1]),  # row 1: own tail, then a second single-row item
             item(2 * bs, [2, 3, 4, 5]),
             item(7, [2]),                    # row 2: own tail after a segment
             item(1, [3]), item(bs, [3]),     # row 3: single-row items only
             item(2 * bs, [0, 4])]
    items += [item(bs, [5, 4]) for _ in range(18)] + [item(5, [5])]   # row 5: 20 partials
    plan = cpu_kernel.DecodePlan(items, rows, hkv * grp, k_cache)
    out = plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot)
    assert_matches_oracle(out, oracle(q, k_cache, v_cache, items, 0.2), bf16_dot)
    assert torch.equal(plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot, num_threads=1), out)


def mrt_fork_tree(seed, *, hkv, grp, dh, bs, dtype, traces=2, forks=4, branches=3, seg=None, suffix=None):
    """An MRT fork step's items: per trace, forks at increasing positions, each with `branches` rows;
    segment k of the trace is shared by the rows of forks k.. (nested row sets: one chain), then
    every fork's suffix and every row's own tail. seg: the segments' key counts (whole blocks);
    suffix: the suffixes' key count (default: random, 1 to 2 blocks)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seg = seg or [2 * bs, bs, 3 * bs, bs]
    nb = traces * (sum(-(-n // bs) for n in seg) + forks * -(-max(suffix or 0, 2 * bs) // bs)) \
        + traces * forks * branches * 2 + 4
    k_cache = torch.randn(nb, bs, hkv, dh).to(dtype)
    v_cache = torch.randn(nb, bs, hkv, dh).to(dtype)
    free = list(range(nb))
    rng.shuffle(free)
    rows_per_trace = forks * branches
    q = torch.randn(traces * rows_per_trace, hkv * grp, dh).to(dtype)
    items = []
    for tr in range(traces):
        base = tr * rows_per_trace
        fork_rows = [list(range(base + f * branches, base + (f + 1) * branches)) for f in range(forks)]
        for k in range(forks):
            n = seg[k % len(seg)]
            items.append(([free.pop() for _ in range(-(-n // bs))], n, sum(fork_rows[k:], [])))
            if k < forks - 1:   # the fork's own suffix, a sibling of the next segment
                n = suffix or rng.randint(1, 2 * bs)
                items.append(([free.pop() for _ in range(-(-n // bs))], n, fork_rows[k]))
        for r in range(base, base + rows_per_trace):
            n = rng.randint(1, bs + 3)
            items.append(([free.pop() for _ in range(-(-n // bs))], n, [r]))
    return q, k_cache, v_cache, items


# The plan runs each trace's nested segments as one chain (one partial per row instead of one per
# segment), with the forks' suffixes of whole tiles and blocks joined to it as segments of their
# rows' lane range: the chained plan must equal the oracle on every path, whatever the thread
# count, and segments that do not end on a 16-key tile and block boundary must stay unchained (and
# correct).
@over_cases_dtypes_paths([dict(hkv=2, grp=3, dh=64, bs=16), dict(hkv=2, grp=7, dh=64, bs=16),
                          dict(hkv=1, grp=5, dh=32, bs=8), dict(hkv=2, grp=2, dh=48, bs=5)])
def test_fork_tree_chains(case, dtype, path):
    simd, bf16_dot = path_flags(path, dtype)
    for seed, seg, branches in ((1, None, 3), (2, [3 * 16, 5 * 16, 16, 2 * 16], 40), (3, [40, 16, 80], 2)):
        bs = case["bs"]
        seg_len = [max(bs, n // bs * bs) for n in seg] if seg else None
        q, k_cache, v_cache, items = mrt_fork_tree(seed, **case, dtype=dtype, seg=seg_len, branches=branches)
        plan = cpu_kernel.DecodePlan(items, q.shape[0], q.shape[1], k_cache)
        chainable = all(n % bs == 0 and n % 16 == 0 for n in (seg_len or [2 * bs, bs, 3 * bs, bs])[:3])
        if chainable:
            # each trace's chain is its segments 0-2 and fork 2's suffix (the first of the two
            # 1-fork children: fork 2's suffix and segment 3), joined by the other 1-fork items
            # (forks 0 and 1's suffixes, segment 3) that are whole tiles and blocks
            in_chain = [set(range(b + 2 * branches, b + 3 * branches)) for b in (0, 4 * branches)]
            joined = sum(1 for _, n, rs in items if len(rs) == branches and set(rs) not in in_chain
                         and n % bs == 0 and n % 16 == 0)
            assert plan._plan.num_units == plan._plan.num_items - 2 * 3 - joined
        out = plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot)
        assert_matches_oracle(out, oracle(q, k_cache, v_cache, items, 0.2), bf16_dot)
        for threads in (1, 3):
            assert torch.equal(plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot,
                                        num_threads=threads), out)


# As an MRT step builds them (the suffix and the fork point's copied block: 2 whole blocks): each
# trace, its forks and their suffixes one unit; a row's partials are its chain's and its own tail.
@over_cases_dtypes_paths([dict(hkv=2, grp=3, dh=64, bs=16), dict(hkv=2, grp=7, dh=64, bs=16),
                          dict(hkv=1, grp=5, dh=32, bs=8)])
def test_fork_suffixes_join_the_chain(case, dtype, path):
    simd, bf16_dot = path_flags(path, dtype)
    bs = case["bs"]
    for seed, branches in ((4, 3), (5, 8)):
        q, k_cache, v_cache, items = mrt_fork_tree(seed, **case, dtype=dtype, branches=branches, suffix=32,
                                                   seg=[112, 128, 128, 160])
        plan = cpu_kernel.DecodePlan(items, q.shape[0], q.shape[1], k_cache)
        assert plan._plan.num_units == 2 + q.shape[0], (bs, plan._plan.num_units)
        out = plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot)
        assert_matches_oracle(out, oracle(q, k_cache, v_cache, items, 0.2), bf16_dot)
        for threads in (1, 3):
            assert torch.equal(plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot,
                                        num_threads=threads), out)


@pytest.mark.parametrize("path", PATHS)
def test_thread_count_does_not_change_the_result(path):
    simd, bf16_dot = path
    q, k_cache, v_cache, items = random_case(5, hkv=2, grp=3, dh=64, bs=16, dtype=torch.bfloat16)
    plan = cpu_kernel.DecodePlan(items, q.shape[0], q.shape[1], k_cache)
    one = plan.run(q, k_cache, v_cache, 0.125, simd=simd, bf16_dot=bf16_dot, num_threads=1)
    for threads in (2, 3):
        out = plan.run(q, k_cache, v_cache, 0.125, simd=simd, bf16_dot=bf16_dot, num_threads=threads)
        assert torch.equal(out, one)


@pytest.mark.skipif(not cpu_kernel.simd_available(), reason="needs AVX-512F")
def test_simd_and_scalar_paths_agree():
    q, k_cache, v_cache, items = random_case(7, hkv=2, grp=7, dh=64, bs=16, dtype=torch.float32, rows=50)
    plan = cpu_kernel.DecodePlan(items, q.shape[0], q.shape[1], k_cache)
    torch.testing.assert_close(plan.run(q, k_cache, v_cache, 0.125, simd=True),
                               plan.run(q, k_cache, v_cache, 0.125, simd=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS, ids=["scalar", "avx512", "avx512bf16"][:len(PATHS)])
def test_out_takes_the_result_in_either_dtype(path):
    # written into `out`: float32 as returned, bfloat16 as `.to(torch.bfloat16)` of it (nearest even)
    simd, bf16_dot = path
    q, k_cache, v_cache, items = random_case(13, hkv=2, grp=3, dh=48, bs=16, dtype=torch.bfloat16)
    plan = cpu_kernel.DecodePlan(items, q.shape[0], q.shape[1], k_cache)
    ref = plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot)
    out32 = torch.full(q.shape, float("nan"))
    assert plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot, out=out32) is out32
    assert torch.equal(out32, ref)
    out16 = torch.full(q.shape, float("nan"), dtype=torch.bfloat16)
    plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot, out=out16)
    assert torch.equal(out16, ref.to(torch.bfloat16))
    for bad in (torch.empty(q.shape, dtype=torch.float64), torch.empty(q.shape[0] + 1, *q.shape[1:]),
                torch.empty(q.shape[1], q.shape[0], q.shape[2]).transpose(0, 1)):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            plan.run(q, k_cache, v_cache, 0.2, simd=simd, bf16_dot=bf16_dot, out=bad)


def test_bad_plans_are_clear_errors():
    k_cache = torch.zeros(4, 16, 2, 64)
    ok = [([0], 5, [0]), ([1, 2], 32, [0, 1])]
    cpu_kernel.DecodePlan(ok, 2, 6, k_cache)
    bad = {
        "outside the cache": [([0], 5, [0]), ([9], 16, [1])],
        "outside \\[0, num_rows\\)": [([0], 5, [0, 1, 2])],
        "is in no item": [([0], 5, [0])],
        "does not fit": [([0], 17, [0, 1])],
        "no rows or no blocks": [([0], 5, [0, 1]), ([], 0, [1])],
    }
    for message, items in bad.items():
        with pytest.raises(ValueError, match=message):
            cpu_kernel.DecodePlan(items, 2, 6, k_cache)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 16"):
        cpu_kernel.DecodePlan(ok, 2, 6, torch.zeros(4, 16, 2, 12))
    with pytest.raises(ValueError, match="positive multiple of num_kv_heads"):
        cpu_kernel.DecodePlan(ok, 2, 5, k_cache)


def test_run_checks_its_tensors():
    k_cache = torch.randn(4, 16, 2, 64)
    plan = cpu_kernel.DecodePlan([([0], 5, [0]), ([1, 2], 32, [0, 1])], 2, 6, k_cache)
    q = torch.randn(2, 6, 64)
    plan.run(q, k_cache, k_cache, 0.1)
    with pytest.raises(ValueError, match="built for q"):
        plan.run(torch.randn(3, 6, 64), k_cache, k_cache, 0.1)
    with pytest.raises(ValueError, match="built for q"):
        plan.run(q, torch.randn(5, 16, 2, 64), torch.randn(5, 16, 2, 64), 0.1)
    with pytest.raises(TypeError, match="share one dtype"):
        plan.run(q.double(), k_cache, k_cache, 0.1)
    with pytest.raises(TypeError, match="share one dtype"):
        plan.run(q, k_cache.bfloat16(), k_cache, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        plan.run(q, k_cache.transpose(0, 1).contiguous().transpose(0, 1), k_cache, 0.1)
    with pytest.raises(ValueError, match="last dimension"):
        plan.run(torch.randn(2, 64, 6).transpose(1, 2), k_cache, k_cache, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_rows_equals_index_copy(dtype):
    torch.manual_seed(9)
    k_cache, v_cache = torch.zeros(6, 5, 2, 16, dtype=dtype), torch.zeros(6, 5, 2, 16, dtype=dtype)
    qkv = torch.randn(7, 6, 16).to(dtype)                  # k, v as strided views, like the model's
    k, v = qkv[:, 2:4], qkv[:, 4:6]
    slots = torch.tensor([0, 29, 5, 6, 17, 3, 11])
    assert cpu_kernel.store_usable(k, v, k_cache, v_cache, slots)
    cpu_kernel.store_kv(k, v, k_cache, v_cache, slots)
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ref_k.view(-1, 2, 16).index_copy_(0, slots, k)
    ref_v.view(-1, 2, 16).index_copy_(0, slots, v)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    with pytest.raises(ValueError, match="slot 30 outside the cache"):
        cpu_kernel.store_kv(k, v, k_cache, v_cache, torch.tensor([0, 1, 2, 3, 4, 5, 30]))
    with pytest.raises(ValueError, match="store_kv expects"):
        cpu_kernel.store_kv(k.float() if dtype != torch.float32 else k.double(), v, k_cache, v_cache, slots)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_store_kv_rows_split_over_threads(threads):
    """Enough rows for the store to split them over threads (and ask for lines ahead): the same
    cache as index_copy_, whatever the thread count; untouched slots stay as they were."""
    from mrt_engine import _C

    torch.manual_seed(threads)
    n, hkv, dh, blocks, bs = 333, 2, 64, 40, 16
    k_cache, v_cache = torch.randn(blocks, bs, hkv, dh), torch.randn(blocks, bs, hkv, dh)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(n, 6, dh)
    k, v = qkv[:, 2:4], qkv[:, 4:6]
    slots = torch.randperm(blocks * bs)[:n]
    _C.store_kv_rows(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                     slots.data_ptr(), n, hkv * dh, 4, blocks * bs, threads)
    ref_k.view(-1, hkv, dh).index_copy_(0, slots, k)
    ref_v.view(-1, hkv, dh).index_copy_(0, slots, v)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
