"""TritonAttentionBackend (under the interpreter) vs the torch backend, its oracle, on random steps.

Steps mix prefill/extend sequences and decode rows; decode rows come in sharing groups (wide forks,
groups of one, groups with no shared blocks). Both modes (fast and deterministic) are checked, and
the new K/V must land in the cache exactly as the torch backend puts them.
"""
from __future__ import annotations

import pytest
import torch
from kernels_helpers import TOL, build_step

from mrt_engine.attention import TorchAttentionBackend, get_attention_backend
from mrt_engine.attention.triton_backend import TritonAttentionBackend


def _compare(prefills, groups, *, bs, hkv, grp, dh, dtype=torch.float32, deterministic=False, seed=0):
    torch.manual_seed(seed)
    (meta, num_blocks), (ref_meta, _) = (build_step(prefills, groups, bs, seed) for _ in range(2))
    metas = [meta, ref_meta]            # one each: a backend caches its plan in the metadata
    n = metas[0].slot_mapping.shape[0]
    k_cache = torch.randn(num_blocks, bs, hkv, dh).to(dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(n, hkv * grp, dh).to(dtype)
    k, v = torch.randn(n, hkv, dh).to(dtype), torch.randn(n, hkv, dh).to(dtype)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    triton_be = TritonAttentionBackend(deterministic=deterministic, det_chunk=32)
    out = triton_be.forward(q, k, v, *caches[0], metas[0], dh ** -0.5)
    want = TorchAttentionBackend().forward(q, k, v, *caches[1], metas[1], dh ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    torch.testing.assert_close(out.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
    return metas[0]


@pytest.mark.parametrize("deterministic", [False, True])
def test_mixed_step(deterministic):
    bs = 16
    prefills = [(0, 23), (2 * bs + 3, 7), (bs, 1)]
    groups = [(5, [1, 4, bs + 2, 9]), (1, [bs]), (0, [17, 3]), (3, [2, 2, 2])]
    meta = _compare(prefills, groups, bs=bs, hkv=2, grp=4, dh=64, deterministic=deterministic)
    plan = meta.backend_cache["triton_plan_det" if deterministic else "triton_plan"]
    assert plan.shared is not None and plan.shared.group_ptr.numel() == 3   # the 4-row and 3-row groups


def test_odd_shapes_bf16_gqa8_block32():
    _compare([(40, 9)], [(2, [5, 33]), (0, [1])], bs=32, hkv=1, grp=8, dh=128, dtype=torch.bfloat16, seed=1)


def test_non_power_of_two_head_dim_and_block_size():
    _compare([(0, 11)], [(3, [2, 7, 1])], bs=5, hkv=3, grp=1, dh=12, seed=2)


def test_decode_only_without_sharing_info():
    meta, _ = build_step([], [(2, [3, 8]), (0, [40])], 16, seed=4, num_blocks=30)
    ref_meta, _ = build_step([], [(2, [3, 8]), (0, [40])], 16, seed=4, num_blocks=30)
    for m in (meta, ref_meta):
        m.group_ptr_host, m.group_num_shared_host = [], []
        m.group_ptr = m.group_rows = m.group_num_shared = None
    kc, vc = torch.randn(30, 16, 2, 64), torch.randn(30, 16, 2, 64)
    q, k, v = torch.randn(3, 4, 64), torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    out = TritonAttentionBackend().forward(q, k, v, kc.clone(), vc.clone(), meta, 0.1)
    want = TorchAttentionBackend().forward(q, k, v, kc.clone(), vc.clone(), ref_meta, 0.1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_get_attention_backend_returns_triton(monkeypatch):
    monkeypatch.delenv("MRT_ENGINE_ATTENTION_BACKEND", raising=False)
    assert isinstance(get_attention_backend("triton", "cpu"), TritonAttentionBackend)


def test_prefix_tree_segments():
    from mrt_engine.attention.triton_backend import prefix_tree_segments

    trunk = [10, 11, 12, 13, 14, 15, 16, 17]
    items = [(trunk, [0, 1]), (trunk[:3], [2, 3, 4]), (trunk[:5], [5, 6]), ([30, 31], [7, 8]),
             (trunk[:3] + [40, 41], [9, 10])]          # a fork of the trunk that diverges at block 3
    segs = prefix_tree_segments(items)
    as_sets = [(s, e, sorted(rows), p) for s, e, rows, p in segs]
    assert (0, 3, [0, 1, 2, 3, 4, 5, 6, 9, 10], -1) in as_sets
    root = as_sets.index((0, 3, [0, 1, 2, 3, 4, 5, 6, 9, 10], -1))
    assert (3, 5, [0, 1, 5, 6], root) in as_sets
    mid = as_sets.index((3, 5, [0, 1, 5, 6], root))
    assert (5, 8, [0, 1], mid) in as_sets
    assert (3, 5, [9, 10], root) in as_sets
    assert (0, 2, [7, 8], -1) in as_sets
    assert len(segs) == 5
    # every row's segments tile [0, its group's shared length)
    for blocks, rows in items:
        covered = sorted((s, e) for s, e, seg_rows, _ in segs if rows[0] in seg_rows)
        assert covered[0][0] == 0 and covered[-1][1] == len(blocks)
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_segment_blocks_repeats_equal_steps_without_sharing_state():
    """segment_blocks keeps the last step's tree: an equal step gets equal segments in a list of its
    own (a caller sorting it changes nothing for the next), a changed step gets its own tree."""
    from mrt_engine.attention.share_tree import prefix_tree_segments, segment_blocks

    def expected(items):
        blocks_of = {r: b for b, rows in items for r in rows}
        return [(blocks_of[rows[0]][s:e], rows) for s, e, rows, _ in prefix_tree_segments(items)]

    trunk = [10, 11, 12, 13, 14, 15]
    items = [(trunk, [0, 1]), (trunk[:3], [2, 3]), (trunk[:2] + [40, 41], [4])]
    first = segment_blocks([(list(b), list(r)) for b, r in items])
    assert first == expected(items)
    first.sort(key=lambda seg: -len(seg[0]))             # callers may reorder their list
    first.append(([99], [9]))
    again = segment_blocks([(list(b), list(r)) for b, r in items])
    assert again == expected(items) and again is not first
    moved = [(trunk, [0, 1]), (trunk[:3] + [50], [2, 3]), (trunk[:2] + [40, 41], [4])]
    assert segment_blocks(moved) == expected(moved) != expected(items)
    items[0][0][1] = 77                                  # the caller's lists change after the call
    assert segment_blocks([(list(b), list(r)) for b, r in items]) == expected(items)


@pytest.mark.parametrize("deterministic", [False, True])
def test_groups_forked_from_one_trace_read_the_trunk_once(deterministic):
    bs, hkv, grp, dh = 16, 2, 4, 64
    # group 0 holds the trunk (8 shared blocks); groups 1 and 2 fork the same trace earlier (3 and 5
    # blocks); group 3 is a single row on the trunk (no sharing); group 4 is an unrelated trace
    groups = [(8, [3, 5]), (3, [2, 9, 4]), (5, [1, 17]), (5, [7]), (2, [4, 4])]
    metas = []
    for _ in range(2):
        meta, num_blocks = build_step([(0, 9)], groups, bs, seed=3)
        tables = meta.decode_block_tables
        trunk = tables[0, :8].clone()
        for g, (ns, _) in enumerate(groups[1:4], start=1):
            for r in meta.group_rows[meta.group_ptr_host[g]:meta.group_ptr_host[g + 1]].tolist():
                tables[r, :ns] = trunk[:ns]
        metas.append(meta)
    torch.manual_seed(0)
    n = metas[0].slot_mapping.shape[0]
    k_cache = torch.randn(num_blocks, bs, hkv, dh)
    v_cache = torch.randn_like(k_cache)
    q, k, v = torch.randn(n, hkv * grp, dh), torch.randn(n, hkv, dh), torch.randn(n, hkv, dh)
    out = TritonAttentionBackend(deterministic=deterministic, det_chunk=32).forward(
        q, k, v, k_cache.clone(), v_cache.clone(), metas[0], dh ** -0.5)
    want = TorchAttentionBackend().forward(q, k, v, k_cache.clone(), v_cache.clone(), metas[1], dh ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    plan = metas[0].backend_cache["triton_plan_det" if deterministic else "triton_plan"]
    ptr = plan.shared.group_ptr.tolist()
    sizes = sorted(b - a for a, b in zip(ptr, ptr[1:]))
    # trunk [0,3) under 7 rows, [3,5) under 4 rows, [5,8) under 2, the unrelated group's 2
    # (deterministic mode trims segments to whole 32-token chunks: [0,32), [32,64), [64,128), [0,32))
    assert sizes == [2, 2, 4, 7]
