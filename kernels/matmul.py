"""matmul: x @ w.T (+ bias) whose every output row is computed the same way whatever the batch.

For deterministic mode (MRT_ENGINE_DETERMINISTIC=1 with the triton backend): library GEMMs pick
kernels by shape (split-K, tile sizes, a gemv for one row), so a row's rounding depends on how many
rows share its call, and with it a sampled branch's logprobs on what else is in the batch (2.9e-6 on
the first lent H200). Here the tiles are fixed, K is walked in one fixed order with no split, and
a row's dot products never see other rows: the same row gives the same bits in any batch. The
price is speed (no autotuning, no split-K): the mode is opt-in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrt_engine.kernels.checks import (FLOAT_DTYPES, cdiv, check_inner_contiguous, check_launchable, check_tensor,
                                       is_interpreted, output)

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64


# M is not specialised: Triton would compile other variants for M == 1 or M % 16 == 0, and one
# compiled kernel for every batch size is the point
@triton.jit(do_not_specialize=["M"])
def matmul_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,   # x [M, K], w [N, K], b [N], out [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K),
                    other=0.0)
        if DOT_FP32:   # fp32 weights (and the interpreter): full fp32 products, never tf32
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul_config(dtype: torch.dtype, *, has_bias: bool = False, interpreted: bool = False) -> dict:
    """Compile-time constants of a launch (shared with the ahead-of-time compile test)."""
    return dict(HAS_BIAS=has_bias, DOT_FP32=interpreted or dtype == torch.float32,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype (or into `out`), batch-invariant."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_inner_contiguous("x", x)
    m, k = x.shape
    check_tensor("weight", weight, 2, (x.dtype,), x.device)
    check_inner_contiguous("weight", weight)
    if weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}] to match x [M, {k}], got {tuple(weight.shape)}")
    n = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, 1, (x.dtype,), x.device)
        if bias.shape[0] != n or bias.stride(0) != 1:
            raise ValueError(f"bias must be a contiguous [{n}], got {tuple(bias.shape)}")
    out = output(out, (m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    check_launchable(matmul_kernel, x, weight, out)
    cfg = matmul_config(x.dtype, has_bias=bias is not None, interpreted=is_interpreted(matmul_kernel))
    matmul_kernel[(cdiv(m, BLOCK_M), cdiv(n, BLOCK_N))](
        x, weight, x if bias is None else bias, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        **cfg, num_warps=4)
    return out
