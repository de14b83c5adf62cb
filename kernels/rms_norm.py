"""rms_norm: a decoder's RMSNorm in one launch (the torch path is four for 16-bit inputs).

One program per row: sum of squares in fp32, x * rsqrt(mean + eps), then the weight. For 16-bit
inputs the rounding is transformers' (and the engine's torch path's): the normalised row is cast to
the input dtype first and multiplied by the weight in that dtype (one more rounding); fp32 inputs
are scaled by the weight directly, as F.rms_norm does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrt_engine.kernels.checks import (FLOAT_DTYPES, check_inner_contiguous, check_launchable, check_tensor,
                                       next_pow2, output)
from mrt_engine.kernels.rounding import round_to

MAX_COLS = 65536          # one row per program, held in registers


@triton.jit
def rms_norm_kernel(
    x_ptr, w_ptr, out_ptr,      # x, out [N, H]; w [H]
    stride_xn, stride_on,
    n_cols, eps,
    BLOCK: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    xn = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    ty = out_ptr.dtype.element_ty
    if CAST_BEFORE_WEIGHT:
        xn = round_to(xn, ty)
    tl.store(out_ptr + row * stride_on + cols, round_to(xn * w, ty).to(ty), mask=mask)


def rms_norm_config(dtype: torch.dtype, hidden: int) -> dict:
    """Compile-time constants of a launch (shared with the ahead-of-time compile test)."""
    return dict(BLOCK=next_pow2(hidden), CAST_BEFORE_WEIGHT=dtype != torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x [N, H] (rows contiguous) with weight [H] of x's dtype -> [N, H] (or into `out`)."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_inner_contiguous("x", x)
    n, h = x.shape
    check_tensor("weight", weight, 1, (x.dtype,), x.device)
    if weight.shape[0] != h or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{h}] to match x [N, {h}], got {tuple(weight.shape)}")
    if h > MAX_COLS:
        raise ValueError(f"rms_norm holds a row in registers: at most {MAX_COLS} columns, got {h}")
    out = output(out, (n, h), x.dtype, x.device)
    if n == 0:
        return out
    check_launchable(rms_norm_kernel, x, weight, out)
    rms_norm_kernel[(n,)](x, weight, out, x.stride(0), out.stride(0), h, float(eps),
                          **rms_norm_config(x.dtype, h), num_warps=4)
    return out
