"""Launcher-side checks shared by the kernel files: clear errors before a launch, never inside one.

Index tensors (block tables, lengths, ranges, CSR arrays, slot mappings) are int64 everywhere, as
`mrt_engine.attention.metadata` produces them, so no per-step casts are needed and block * stride
offsets never overflow.
"""
from __future__ import annotations

import sys

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_interpreted(kernel) -> bool:
    """True when `kernel` runs under the Triton interpreter (TRITON_INTERPRET=1 at import).

    Never imports the interpreter (it needs numpy, which neither torch nor Triton requires): if no
    kernel was decorated under it, the module is not loaded and nothing is interpreted.
    """
    interpreter = sys.modules.get("triton.runtime.interpreter")
    return interpreter is not None and isinstance(kernel, interpreter.InterpretedFunction)


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; interpreted ones accept any device."""
    if is_interpreted(kernel):
        return
    for t in tensors:
        if t.device.type != "cuda":
            raise RuntimeError(
                f"Triton kernel {kernel.__name__} got a tensor on {t.device}: compiled kernels need CUDA "
                "tensors; on CPU set TRITON_INTERPRET=1 before triton is imported")


def check_tensor(name: str, t, ndim: int, dtypes, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_index(name: str, t, ndim: int, device) -> None:
    check_tensor(name, t, ndim, (torch.int64,), device)


def check_inner_contiguous(name: str, t: torch.Tensor) -> None:
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def output(out, shape: tuple, dtype, device, name: str = "out") -> torch.Tensor:
    """A launch's output: the caller's `out`, checked to be a `shape` tensor of `dtype` on `device`
    contiguous in its last dim, or a fresh one when `out` is None."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor(name, out, len(shape), (dtype,), device)
    check_inner_contiguous(name, out)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must be [{', '.join(map(str, shape))}], got {tuple(out.shape)}")
    return out


def check_cache(k_cache, v_cache):
    """Validate a paged KV cache pair [num_blocks, bs, Hkv, Dh]; returns (bs, Hkv, Dh)."""
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES, k_cache.device)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache differ: {tuple(k_cache.shape)} {k_cache.dtype} vs "
                         f"{tuple(v_cache.shape)} {v_cache.dtype}")
    check_inner_contiguous("k_cache", k_cache)
    check_inner_contiguous("v_cache", v_cache)
    _, bs, hkv, dh = k_cache.shape
    return bs, hkv, dh


def check_query(q, k_cache, num_rows_name: str = "q"):
    """Validate q [R, Hq, Dh] against the cache; returns the GQA group size Hq // Hkv."""
    check_tensor(num_rows_name, q, 3, FLOAT_DTYPES, k_cache.device)
    check_inner_contiguous(num_rows_name, q)
    if q.dtype != k_cache.dtype:
        raise TypeError(f"{num_rows_name} dtype {q.dtype} differs from the cache dtype {k_cache.dtype}")
    hq, dh = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    if dh != k_cache.shape[3]:
        raise ValueError(f"head_dim mismatch: {num_rows_name} has {dh}, cache has {k_cache.shape[3]}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return hq // hkv


def check_partials(out, rows: int, heads: int, slots: int, head_dim: int, device):
    """Validate a caller-supplied (o [R, Hq, S, Dh] fp32, lse [R, Hq, S] fp32) partial buffer pair."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("out must be a tuple (o_partial, lse_partial)")
    o, lse = out
    check_tensor("out[0] (o_partial)", o, 4, (torch.float32,), device)
    check_tensor("out[1] (lse_partial)", lse, 3, (torch.float32,), device)
    if tuple(o.shape) != (rows, heads, slots, head_dim) or tuple(lse.shape) != (rows, heads, slots):
        raise ValueError(f"out shapes {tuple(o.shape)}, {tuple(lse.shape)} != expected "
                         f"{(rows, heads, slots, head_dim)}, {(rows, heads, slots)}")
    check_inner_contiguous("out[0] (o_partial)", o)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Plain Python on purpose: since Triton 3.5
    `triton.next_power_of_2` / `triton.cdiv` are constexpr-function objects costing several us per
    call, and the launchers run on every layer of every step (the GPU waits on this host)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_rows(n: int) -> int:
    """Rows of a tl.dot tile: a power of two and at least 16 (the MMA minimum)."""
    return max(16, next_pow2(n))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
