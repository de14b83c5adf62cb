"""GPU checks (opt-in: `pytest -m gpu`, run by benchmarks/gpu_check.sh): the kernels compiled
natively by Triton on CUDA vs their torch twins, the Triton backend vs the torch backend, and
deterministic mode's bitwise batch invariance on real hardware (MMA tiles, not the interpreter).

Runs without pytest too (`python tests/test_kernels_gpu.py`, see tests/gpu_runner.py), for GPU
images that have only torch and Triton; the one test that needs the torch backend (numpy) skips
when numpy is missing.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from gpu_runner import gpu_marks, missing_modules, run_tests, skip  # noqa: E402

pytestmark = gpu_marks()

from kernels_helpers import (DET_DH, DET_GRP, DET_HKV, DET_ROWS, TOL, LSE_TOL, assert_rounds_like_torch,  # noqa: E402
                             build_step, check_bitwise_independence, random_cache, random_tables)

from mrt_engine.kernels import reference as ref  # noqa: E402
from mrt_engine.kernels.cascade_decode import cascade_decode  # noqa: E402
from mrt_engine.kernels.extend import extend  # noqa: E402
from mrt_engine.kernels.kv_store import kv_store  # noqa: E402
from mrt_engine.kernels.matmul import matmul  # noqa: E402
from mrt_engine.kernels.merge import merge  # noqa: E402
from mrt_engine.kernels.paged_decode import paged_decode  # noqa: E402
from mrt_engine.kernels.rms_norm import rms_norm  # noqa: E402
from mrt_engine.kernels.rope import rope_  # noqa: E402
from mrt_engine.kernels.silu_mul import silu_mul  # noqa: E402

CUDA = "cuda"
SHAPES = [(16, 128, 4, 8, torch.bfloat16), (32, 64, 8, 2, torch.float16), (16, 64, 1, 2, torch.float32)]


def _close(got, want, dtype, lse=False):
    tol = (LSE_TOL if lse else TOL)[dtype]
    got, want = got.float().cpu(), want.float().cpu()
    assert not torch.isnan(got).any()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = ~torch.isinf(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=tol, atol=tol)


def test_kv_store_cuda():
    for bs, dh, _, hkv, dtype in SHAPES:
        kc, vc = random_cache(6, bs, hkv, dh, dtype)
        k, v = torch.randn(4, hkv, dh).to(dtype), torch.randn(4, hkv, dh).to(dtype)
        slots = torch.tensor([1, bs + 3, -1, 5 * bs + bs - 1])
        kg, vg = kc.to(CUDA), vc.to(CUDA)
        kv_store(k.to(CUDA), v.to(CUDA), kg, vg, slots.to(CUDA))
        ref.kv_store(k, v, kc, vc, slots)
        assert torch.equal(kg.cpu(), kc) and torch.equal(vg.cpu(), vc)


def test_paged_decode_and_merge_cuda():
    for bs, dh, grp, hkv, dtype in SHAPES:
        lens = [1, 300, 2 * bs + 5, 1000]
        starts = [0, 64, 0, 1000]
        kc, vc = random_cache(sum(-(-n // bs) for n in lens) + 2, bs, hkv, dh, dtype, seed=1)
        tables = random_tables(lens, bs, kc.shape[0], seed=2)
        q = torch.randn(4, hkv * grp, dh).to(dtype)
        args = (q, kc, vc, tables, torch.tensor(starts), torch.tensor(lens), 0.08)
        o, lse = paged_decode(*(a.to(CUDA) if torch.is_tensor(a) else a for a in args), split_size=128, num_splits=8)
        o_ref, lse_ref = ref.paged_decode(*args, split_size=128, num_splits=8)
        _close(o, o_ref, dtype)
        _close(lse, lse_ref, dtype, lse=True)
        m, mlse = merge(o, lse, out_dtype=dtype)
        m_ref, mlse_ref = ref.merge(o_ref, lse_ref)
        _close(m, m_ref, dtype)
        _close(mlse, mlse_ref, dtype, lse=True)


def test_cascade_decode_cuda():
    for bs, dh, grp, hkv, dtype in SHAPES:
        sizes, span = [16, 1, 5], 20 * bs
        lens = [span + 7 + i for i in range(sum(sizes))] + [33]
        shared, r = [], 0
        for n in sizes:
            shared.append((list(range(r, r + n)), 20))
            r += n
        kc, vc = random_cache(sum(-(-n // bs) for n in lens) + 2, bs, hkv, dh, dtype, seed=3)
        tables = random_tables(lens, bs, kc.shape[0], seed=3, shared=shared)
        ptr = torch.tensor([0, 16, 17, 22])
        rows = torch.arange(22)
        q = torch.randn(len(lens), hkv * grp, dh).to(dtype)
        for absolute in (False, True):
            starts, ends = torch.tensor([0, 0, 3 * bs]), torch.tensor([span, span, span])
            args = (q, kc, vc, tables, ptr, rows, starts, ends, 0.1)
            kw = dict(chunk_size=96, num_chunks=4, absolute=absolute)
            o, lse = cascade_decode(*(a.to(CUDA) if torch.is_tensor(a) else a for a in args), **kw)
            o_ref, lse_ref = ref.cascade_decode(*args, **kw)
            _close(o, o_ref, dtype)
            _close(lse, lse_ref, dtype, lse=True)


def test_extend_cuda():
    for bs, dh, grp, hkv, dtype in SHAPES:
        seqs = [(0, 200), (300, 77), (bs, 0), (5, 1)]
        lens = [c + n for c, n in seqs]
        kc, vc = random_cache(sum(-(-n // bs) for n in lens) + 1, bs, hkv, dh, dtype, seed=4)
        tables = random_tables(lens, bs, kc.shape[0], seed=4)
        starts = [0, 200, 277, 277]
        q = torch.randn(278, hkv * grp, dh).to(dtype)
        args = (q, kc, vc, tables, torch.tensor(starts), torch.tensor([n for _, n in seqs]), torch.tensor(lens), 0.1)
        o = extend(*(a.to(CUDA) if torch.is_tensor(a) else a for a in args))
        _close(o, ref.extend(*args), dtype)


def test_backend_matches_torch_backend_cuda():
    if missing_modules("numpy"):
        skip("the torch attention backend (the oracle here) needs numpy, which is not installed")
    from mrt_engine.attention import TorchAttentionBackend
    from mrt_engine.attention.triton_backend import TritonAttentionBackend

    prefills, groups = [(0, 40), (100, 9)], [(30, [1, 4, 20, 9]), (1, [16]), (0, [70, 3]), (12, [2] * 16)]
    for deterministic in (False, True):
        for dtype in (torch.bfloat16, torch.float32):
            outs = []
            for backend in (TritonAttentionBackend(deterministic=deterministic), TorchAttentionBackend()):
                meta, nb = build_step(prefills, groups, 16, seed=5)
                meta = _to_cuda(meta)
                torch.manual_seed(0)
                kc, vc = (c.to(CUDA) for c in random_cache(nb, 16, 8, 128, dtype, seed=6))
                n = meta.slot_mapping.shape[0]
                q = torch.randn(n, 32, 128).to(CUDA, dtype)
                k, v = torch.randn(n, 8, 128).to(CUDA, dtype), torch.randn(n, 8, 128).to(CUDA, dtype)
                outs.append(backend.forward(q, k, v, kc, vc, meta, 128 ** -0.5))
            _close(outs[0], outs[1], dtype)


def test_deterministic_mode_bitwise_on_gpu():
    g = torch.Generator().manual_seed(0)
    q = {r: torch.randn(DET_HKV * DET_GRP, DET_DH, generator=g) for r in DET_ROWS}
    kv = {r: (torch.randn(DET_HKV, DET_DH, generator=g), torch.randn(DET_HKV, DET_DH, generator=g)) for r in DET_ROWS}
    for dtype in (torch.bfloat16, torch.float32):
        check_bitwise_independence(q, kv, device=CUDA, dtype=dtype)


def test_layer_ops_cuda():
    # compiled on the GPU, the fused layer kernels round where torch's CUDA ops round: RoPE bit for
    # bit, RMSNorm and SiLU*up to one unit in the last place on a rare element (rsqrt / exp bits)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(37, 4096, generator=g) * 3).to(dtype).to(CUDA)
        w = torch.randn(4096, generator=g).to(dtype).to(CUDA)
        gate_up = (torch.randn(37, 2 * 1000, generator=g) * 4).to(dtype).to(CUDA)
        qk = (torch.randn(37, 40, 128, generator=g) * 2).to(dtype).to(CUDA)
        ang = torch.arange(37.0)[:, None] * torch.arange(1, 65.0)[None, :] * 0.1
        emb = torch.cat((ang, ang), dim=-1)
        cos, sin = emb.cos().to(dtype)[:, None].to(CUDA), emb.sin().to(dtype)[:, None].to(CUDA)
        for got, want in ((rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5)), (silu_mul(gate_up), ref.silu_mul(gate_up)),
                          (rope_(qk.clone(), cos, sin), ref.rope_(qk.clone(), cos, sin))):
            assert_rounds_like_torch(got, want, dtype)


def test_matmul_batch_invariant_cuda():
    # real MMA tiles (wgmma on Hopper) and the compiled M-unspecialised kernel: a row's bits do not
    # depend on the batch; and the result is the product to 16-bit rounding
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(300, 4096, generator=g).to(dtype).to(CUDA)
        w = (torch.randn(1000, 4096, generator=g) * 0.02).to(dtype).to(CUDA)
        b = torch.randn(1000, generator=g).to(dtype).to(CUDA)
        full = matmul(x, w, b)
        want = ref.matmul(x.cpu(), w.cpu(), b.cpu())
        tol = 2 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
        torch.testing.assert_close(full.float().cpu(), want.float(), rtol=tol, atol=1e-3)
        for lo, hi in ((0, 1), (7, 8), (60, 70), (255, 257), (299, 300), (3, 290)):
            assert torch.equal(matmul(x[lo:hi].contiguous(), w, b), full[lo:hi]), (dtype, lo, hi)


def _to_cuda(meta):
    for name in ("slot_mapping", "positions", "decode_block_tables", "decode_context_lens", "group_ptr",
                 "group_rows", "group_num_shared"):
        t = getattr(meta, name)
        if t is not None:
            setattr(meta, name, t.to(CUDA))
    for s in meta.prefill_seqs:
        s.block_table = s.block_table.to(CUDA)
    return meta


if __name__ == "__main__":
    sys.exit(run_tests(globals(), only_if=lambda: None if torch.cuda.is_available() else "needs CUDA"))
