"""The C++ CPU decode-attention kernel (`mrt_engine._C.CpuDecodeAttention`) behind a checked API.

The torch backend uses it for the decode part of a step on a CPU with AVX-512F, for float32 and
bfloat16 caches with a head size that is a multiple of 16 (else it keeps its PyTorch path, which
is also the kernel's oracle in the tests). `MRT_ENGINE_CPU_KERNEL=0` turns it off.

A plan is built once per step from work items (blocks, length, rows) and run by every layer: the
kernel reads the paged caches in place, runs items whose row sets nest (a prefix tree's segments
along one path, with the leaves beside it that are whole blocks: each fork's suffix) as one chain,
gives every (chain or item, row) a partial result and LSE-merges each row's partials in item order,
on `torch.get_num_threads()` threads.
"""
from __future__ import annotations

import os

import torch

try:
    from mrt_engine import _C  # type: ignore[attr-defined]
    _Kernel = getattr(_C, "CpuDecodeAttention", None)
except ImportError:  # the extension is optional (MRT_ENGINE_NO_EXT=1 builds)
    _Kernel = None

ENV = "MRT_ENGINE_CPU_KERNEL"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def simd_available() -> bool:
    return _Kernel is not None and bool(_Kernel.simd_available())


def bf16_dot_available() -> bool:
    return _Kernel is not None and bool(_Kernel.bf16_dot_available())


def usable(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the engine should use the kernel for this layer's decode attention."""
    if os.environ.get(ENV, "1") == "0" or not simd_available():
        return False
    dh = q.shape[-1]
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype in _DTYPES
            and k_cache.dtype == q.dtype and dh % 16 == 0 and dh <= 256 and q.stride(-1) == 1)


class DecodePlan:
    """A kernel plan for work items (block ids, number of keys, decode rows), merged in item order.

    Built once per step; `run` checks that every layer's tensors have the shapes it was built for.
    """

    def __init__(self, items: list[tuple[list[int], int, list[int]]], num_rows: int, num_heads: int,
                 k_cache: torch.Tensor):
        if _Kernel is None:
            raise ValueError("the C++ extension mrt_engine._C with CpuDecodeAttention is not built")
        row_ptr, rows, block_ptr, blocks, lens = [0], [], [0], [], []
        for blk, n, rs in items:
            rows += rs
            row_ptr.append(len(rows))
            blocks += blk
            block_ptr.append(len(blocks))
            lens.append(n)
        num_cache_blocks, bs, hkv, dh = k_cache.shape
        self.q_shape = (num_rows, num_heads, dh)
        self.cache_shape = tuple(k_cache.shape)
        self._plan = _Kernel(num_rows, num_heads, hkv, dh, bs, num_cache_blocks, row_ptr, rows, block_ptr,
                             blocks, lens)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
            simd: bool = True, num_threads: int | None = None, bf16_dot: bool = True,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode attention of q [D, H, Dh] over the plan's items; returns float32 [D, H, Dh], or
        `out` filled in: a contiguous CPU float32 or bfloat16 [D, H, Dh] tensor (bf16 rounded to
        nearest even, as `.to(torch.bfloat16)`; the model's activations take it without a cast).

        `simd=False` runs the scalar path; `bf16_dot=False` keeps bfloat16 on the float32-FMA path
        instead of AVX512_BF16 dot products (which round the probabilities to bf16 for PV).
        """
        if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
            raise TypeError(f"q and both caches must share one dtype out of float32/bfloat16, got "
                            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
        if tuple(q.shape) != self.q_shape or tuple(k_cache.shape) != self.cache_shape \
                or tuple(v_cache.shape) != self.cache_shape:
            raise ValueError(f"the plan was built for q {self.q_shape} and caches {self.cache_shape}; got q "
                             f"{tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous CPU tensor")
        if q.device.type != "cpu" or q.stride(2) != 1:
            raise ValueError("q must be a CPU tensor whose last dimension is contiguous")
        if out is None:
            out = torch.empty(q.shape, dtype=torch.float32)
        elif (out.dtype not in _DTYPES or out.device.type != "cpu" or not out.is_contiguous()
              or tuple(out.shape) != self.q_shape):
            raise ValueError(f"out must be a contiguous CPU float32/bfloat16 tensor of shape {self.q_shape}, got "
                             f"{out.dtype} {tuple(out.shape)}")
        self._plan.run(q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
                       out.data_ptr(), _DTYPES[q.dtype], float(scale), num_threads or torch.get_num_threads(), simd,
                       bf16_dot, out.dtype == torch.bfloat16)
        return out


_store = getattr(_C, "store_kv_rows", None) if _Kernel is not None else None


def store_usable(k, v, k_cache, v_cache, slots) -> bool:
    """Whether `store_kv` can copy the rows in one C++ call (CPU, same dtype, heads contiguous)."""
    return (_store is not None and os.environ.get(ENV, "1") != "0" and k_cache.device.type == "cpu"
            and k.device.type == "cpu" and k.dtype == k_cache.dtype == v.dtype == v_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous() and slots.dtype == torch.int64
            and slots.is_contiguous() and k.dim() == 3 and v.dim() == 3 and k.shape == v.shape
            and k.shape[1:] == k_cache.shape[2:] and k.stride(2) == 1 and k.stride(1) == k.shape[2]
            and v.stride(2) == 1 and v.stride(1) == v.shape[2] and slots.shape == (k.shape[0],))


def store_kv(k, v, k_cache, v_cache, slots) -> None:
    """k, v [N, Hkv, Dh] into the caches [blocks, bs, Hkv, Dh] at flat slots [N] (bad slots raise)."""
    if not store_usable(k, v, k_cache, v_cache, slots):
        raise ValueError("store_kv expects CPU k, v [N, Hkv, Dh] (heads contiguous) of the caches' dtype, "
                         "contiguous caches and int64 slots [N]")
    row = k.shape[1] * k.shape[2]
    _store(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
           slots.data_ptr(), k.shape[0], row, k.element_size(), k_cache.shape[0] * k_cache.shape[1],
           torch.get_num_threads())
